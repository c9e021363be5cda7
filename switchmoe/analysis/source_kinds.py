"""What kind of Python source each byte is: indentation, names, keywords, strings, ...

The vocabulary of the expert analysis (ST-MoE Table 13 asks which kinds of tokens each expert
receives); `tokenize` labels what it can parse and a regex scanner the rest."""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from typing import Iterable, Optional, Union

import numpy as np

# Kinds of byte positions in Python source (indices into this tuple are the kind codes).
# The byte tokenizer's ids 0..255 are bytes; pad, bos, eos and sentinels come after.
NUM_BYTES = 256

KINDS = (
    "indent",  # whitespace from the start of a line to its first non-blank character
    "space",  # other blanks between tokens
    "newline",  # \n and \r, wherever they are (also inside strings and comments)
    "keyword",  # a Python keyword (keyword.kwlist): def, return, if, None, ...
    "name",  # other identifiers: variables, attributes, builtins, self
    "number",  # numeric literals
    "bracket",  # ( ) [ ] { }
    "operator",  # other punctuation and operators: . , : = + - * / @ ...
    "string",  # string literals, prefix and quotes included (docstrings too)
    "comment",  # from # to the end of the line
    "other",  # anything else (stray non-ASCII, invalid UTF-8)
    "special",  # non-byte token ids: pad, bos, eos, sentinels
)
KIND = {name: code for code, name in enumerate(KINDS)}
_UNSET = -1
_BRACKETS = set("()[]{}")
_KEYWORDS = frozenset(keyword.kwlist)
_STRING_TOKENS = {tokenize.STRING} | {
    getattr(tokenize, name)
    for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")  # Python >= 3.12
    if hasattr(tokenize, name)
}

# Fallback scanner for source that `tokenize` rejects (a cut-off file, deliberate syntax errors):
# the same kinds from regular expressions, first alternative that matches wins.
_STRING_BODY = (
    r"'''(?:\\.|[^\\])*?(?:'''|\Z)"
    r'|"""(?:\\.|[^\\])*?(?:"""|\Z)'
    r"|'(?:\\.|[^\\'\r\n])*(?:'|(?=[\r\n])|\Z)"
    r'|"(?:\\.|[^\\"\r\n])*(?:"|(?=[\r\n])|\Z)'
)
_SCANNER = re.compile(
    rf"(?P<comment>#[^\r\n]*)"
    rf"|(?P<string>(?:[rRbBuUfF]{{1,2}})?(?:{_STRING_BODY}))"
    r"|(?P<name>[^\W\d]\w*)"
    r"|(?P<number>\d[\w.]*)"
    r"|(?P<bracket>[()\[\]{}])"
    r"|(?P<newline>[\r\n])"
    r"|(?P<space>[ \t\f\v]+)"
    r"|(?P<operator>[!-/:-@\\^`|~])"
    r"|(?P<other>.)",
    re.DOTALL,
)


def _scan(text: str, start: int, kinds: np.ndarray) -> None:
    """Fills kinds[start:] of `text` with the regex scanner (where tokenize gave up)."""
    for m in _SCANNER.finditer(text, start):
        group = m.lastgroup
        if group == "name":
            group = "keyword" if m.group() in _KEYWORDS else "name"
        kinds[m.start() : m.end()] = KIND[group]


def _token_kind_code(tok: tokenize.TokenInfo) -> Optional[int]:
    if tok.type in _STRING_TOKENS:
        return KIND["string"]
    if tok.type == tokenize.COMMENT:
        return KIND["comment"]
    if tok.type == tokenize.NAME:
        return KIND["keyword"] if tok.string in _KEYWORDS else KIND["name"]
    if tok.type == tokenize.NUMBER:
        return KIND["number"]
    if tok.type == tokenize.OP:
        return KIND["bracket"] if tok.string in _BRACKETS else KIND["operator"]
    if tok.type in (tokenize.NEWLINE, tokenize.NL):
        return KIND["newline"]
    if tok.type == tokenize.INDENT:
        return KIND["indent"]
    return None  # DEDENT, ENDMARKER (empty), ERRORTOKEN (left to the per-character rules)


def _char_kinds(text: str) -> np.ndarray:
    """Kind code of every character of `text` (see `token_kind`)."""
    kinds = np.full(len(text), _UNSET, np.int8)
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def offset(row: int, col: int) -> int:  # tokenize's (1-based row, column) -> text index
        return min(line_starts[row - 1] + col, len(text)) if row <= len(line_starts) else len(text)

    reached = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            code = _token_kind_code(tok)
            start, end = offset(*tok.start), offset(*tok.end)
            if code is not None:
                kinds[start:end] = code
            if tok.type != tokenize.ERRORTOKEN:
                reached = max(reached, end)
        failed = False
    except (tokenize.TokenError, SyntaxError):
        failed = True
    if failed:  # Keep what parsed; classify the rest with the scanner.
        kinds[reached:] = _UNSET
        _scan(text, reached, kinds)
    # Characters no token claimed: blanks between tokens, line continuations, stray characters.
    for i in np.flatnonzero(kinds == _UNSET):
        ch = text[i]
        if ch in "\r\n":
            kinds[i] = KIND["newline"]
        elif ch in " \t\f\v":
            kinds[i] = KIND["space"]
        elif ch.isascii() and not ch.isalnum():
            kinds[i] = KIND["operator"]
        else:
            kinds[i] = KIND["other"]
    # Indentation: leading blanks of a line, unless they lie inside a string or comment.
    for m in re.finditer(r"^[ \t\f]+", text, re.MULTILINE):
        span = kinds[m.start() : m.end()]
        span[span == KIND["space"]] = KIND["indent"]
    # Newlines are newlines wherever they are (a byte-level router sees the byte).
    for m in re.finditer(r"[\r\n]", text):
        kinds[m.start()] = KIND["newline"]
    return kinds


def token_kind(source: Union[str, bytes]) -> np.ndarray:
    """The kind of every byte of Python source: int8 codes into `KINDS`, one per UTF-8 byte.

    Classifies with the `tokenize` module (strings, comments, keywords, names, numbers, operators,
    brackets, NEWLINE/NL/INDENT), then labels what no token covers by character: blanks are
    `space`, and blanks at the start of a line become `indent`; newline bytes are `newline` even
    inside strings. Where tokenize stops (a file cut off mid-string, deliberate syntax errors) the
    rest is classified by a regular-expression scanner that knows comments, strings with prefixes
    and triple quotes, names and numbers. All bytes of a multi-byte character get its kind;
    invalid UTF-8 bytes are `other` (or `string`/`comment` inside one).

    Args:
      source: text, or its UTF-8 bytes (invalid bytes allowed).

    Returns:
      int8 [len(UTF-8 bytes of source)].
    """
    text = source.decode("utf-8", "surrogateescape") if isinstance(source, bytes) else source
    kinds = _char_kinds(text)
    if text.isascii():
        return kinds
    widths = np.fromiter(
        (len(ch.encode("utf-8", "surrogateescape")) for ch in text), np.int64, len(text)
    )
    return np.repeat(kinds, widths)


def token_kind_of_ids(ids: np.ndarray) -> np.ndarray:
    """`token_kind` for a byte-tokenizer id stream: each run of byte ids (0..255) between special
    ids (pad, bos, eos, sentinels) is classified as one source file; special ids are `special`.

    Args:
      ids: int [T] token ids.

    Returns:
      int8 [T] kind codes.
    """
    ids = np.asarray(ids).reshape(-1)
    kinds = np.full(len(ids), KIND["special"], np.int8)
    is_byte = ids < NUM_BYTES
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_byte.astype(np.int8), [0]])))
    for start, end in zip(edges[::2], edges[1::2]):
        kinds[start:end] = token_kind(ids[start:end].astype(np.uint8).tobytes())
    return kinds


def kind_names(codes: Iterable[int]) -> list[str]:
    """Kind codes -> names."""
    return [KINDS[int(c)] for c in codes]
