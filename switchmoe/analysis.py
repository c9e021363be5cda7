"""Analysis of trained runs for notebooks and reports: capacity sweeps at evaluation, what the
router learned, and sweep results.

    from switchmoe import analysis
    rows = analysis.evaluate_at_capacities("runs/demo")           # eval loss vs capacity factor
    capture = analysis.capture_routing("runs/demo", num_batches=4)  # who routes where
    table = analysis.expert_kind_table(capture)                   # ST-MoE Table 13, for Python
    trials = analysis.load_sweep("runs/sweeps/expert_count")      # one dict per trial

Everything here runs on a single plain device (a notebook kernel has one), whatever mesh wrote
the checkpoint. Plot helpers take plain lists and arrays and return matplotlib figures; nothing
needs pandas.

Shape legend: M MoE layers, N sequences (eval windows), L sequence length, E experts,
T kinds (len(KINDS)).
"""

from __future__ import annotations

import dataclasses
import io
import json
import keyword
import os
import re
import tokenize
from typing import Any, Iterable, Optional, Sequence, Union

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from switchmoe import sharding
from switchmoe.config import resolve, with_defaults
from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.metrics import METRICS_FILE, read_metrics
from switchmoe.runs import restore_run
from switchmoe.train import Trainer, build_model

# A run is a workdir (restored with its latest checkpoint) or an already restored (config, params).
Run = Union[str, os.PathLike, tuple]

# The byte tokenizer's ids 0..255 are bytes; pad, bos, eos and sentinels come after.
NUM_BYTES = 256


def load_run(run: Run, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of a workdir (at `step`, default latest) or of a (config, params) pair;
    the config resolved, with fields it lacks defaulted (`with_defaults`)."""
    if isinstance(run, (str, os.PathLike)):
        config, params = restore_run(os.fspath(run), step)
    else:
        config, params = run
    return resolve(with_defaults(config)), params


def single_device_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A resolved copy of `config` (missing fields defaulted) on a 1×1×1 mesh."""
    config = resolve(with_defaults(config))
    config.mesh.data = config.mesh.expert = config.mesh.model = 1
    return config


def _single_device_trainer(config: ml_collections.ConfigDict) -> Trainer:
    mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices()[:1])
    return Trainer(config, mesh)


# ----------------------------------------------------------------------------------------------
# Evaluation at several capacity factors.


def evaluate_at_capacities(
    run: Run,
    factors: Sequence[float] = (0.5, 1.0, 1.25, 2.0),
    dropless: bool = True,
    num_batches: Optional[int] = None,
    step: Optional[int] = None,
) -> list[dict[str, Any]]:
    """Evaluates the SAME parameters at several eval capacity factors (and dropless).

    Capacity only decides which tokens the experts see, not the parameters, so a model trained at
    one factor can be evaluated at any other: Switch §2.2 evaluates at 2.0, and the gap between a
    factor and dropless routing is what dropping costs. Each factor is one `Trainer` on a
    single-device mesh (capacity is static, so each compiles once) over the run's fixed
    validation batches, exactly as training evaluates.

    Args:
      run: a workdir or a (config, params) pair (see `load_run`).
      factors: values of `model.moe.eval_capacity_factor` to evaluate.
      dropless: also evaluate with `model.moe.backend='dropless'` (top-k router: no capacity,
        nothing dropped; token-choice routers). Skipped for the expert-choice router, whose
        capacity is what defines it.
      num_batches: validation batches (default: the config's `num_eval_batches`; 0 = all).
      step: checkpoint step when `run` is a workdir (default: latest).

    Returns:
      One dict per setting, in order: {"capacity_factor": float or "dropless", "eval_loss"
      (nats/token), "bits_per_token", "dropped_fraction" (mean over MoE layers and batches)}.

    Raises:
      ValueError: a dense model (num_experts == 0) has no capacity to vary.
    """
    config, params = load_run(run, step)
    if not config.model.moe.num_experts:
        raise ValueError("model.moe.num_experts is 0: a dense model has no capacity factor.")
    config = single_device_config(config)
    if num_batches is not None:
        config.num_eval_batches = int(num_batches)
    pipeline = LMDataPipeline(config.data, config.batch_size)  # packed once, shared
    settings: list[tuple[Any, ml_collections.ConfigDict]] = []
    for factor in factors:
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.moe.eval_capacity_factor = float(factor)
        settings.append((float(factor), c))
    if dropless and config.model.moe.router != "expert_choice":
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.moe.backend = "dropless"
        settings.append(("dropless", c))
    rows = []
    for label, c in settings:
        result = _single_device_trainer(c).evaluate(params, pipeline)
        rows.append(
            {
                "capacity_factor": label,
                "eval_loss": float(result["eval/loss"]),
                "bits_per_token": float(result["eval/bits_per_token"]),
                "dropped_fraction": float(result.get("eval/dropped_fraction", 0.0)),
            }
        )
    return rows


def format_capacity_table(rows: Sequence[dict[str, Any]]) -> str:
    """`evaluate_at_capacities` rows as an aligned text table."""
    lines = [f"{'capacity factor':>16} {'eval loss':>10} {'bits/token':>11} {'dropped':>9}"]
    for r in rows:
        f = r["capacity_factor"]
        label = f if isinstance(f, str) else f"{f:g}"
        lines.append(
            f"{label:>16} {r['eval_loss']:>10.4f} {r['bits_per_token']:>11.4f} "
            f"{100 * r['dropped_fraction']:>8.2f}%"
        )
    return "\n".join(lines)


def plot_capacity_sweep(rows: Sequence[dict[str, Any]]):
    """Eval loss and dropped fraction vs eval capacity factor; dropless as a dashed line."""
    import matplotlib.pyplot as plt

    fixed = [r for r in rows if not isinstance(r["capacity_factor"], str)]
    free = [r for r in rows if isinstance(r["capacity_factor"], str)]
    fig, (ax_loss, ax_drop) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["capacity_factor"] for r in fixed]
    ax_loss.plot(x, [r["bits_per_token"] for r in fixed], "o-", label="capacity factor")
    ax_drop.plot(x, [100 * r["dropped_fraction"] for r in fixed], "o-")
    for r in free:
        ax_loss.axhline(r["bits_per_token"], ls="--", color="gray", label=r["capacity_factor"])
    ax_loss.set(xlabel="eval capacity factor", ylabel="eval loss (bits/token)")
    ax_drop.set(xlabel="eval capacity factor", ylabel="tokens dropped (%)")
    ax_loss.legend()
    for ax in (ax_loss, ax_drop):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# What kind of Python source each byte is.

# Kinds of byte positions in Python source (indices into this tuple are the kind codes).
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


# ----------------------------------------------------------------------------------------------
# Routing capture.


@dataclasses.dataclass
class RoutingCapture:
    """Where the router sent every token of some validation windows, per MoE layer.

    The first choice of a token is its most probable expert (top-k: choice 0; expert-choice: the
    argmax of its probabilities); `kept` says whether that choice got a slot at the run's eval
    capacity factor.

    Attributes:
      tokens: int32 [N, L] input ids (bytes 0..255 for the byte tokenizer; 256+ are specials).
      targets: int32 [N, L] the next ids (tokens shifted by one). Consecutive windows are
        consecutive text except that each window's last target is no row's input: the text of
        rows r, r+1 is tokens[r], targets[r, -1], tokens[r + 1].
      kinds: int8 [N, L] `KINDS` code of each input byte, or None for non-byte tokenizers.
      layers: the M MoE layers' module names, in depth order ('block_1', 'block_3', ...).
      expert: int32 [M, N, L] first-choice expert of each token.
      kept: bool [M, N, L] that choice was placed in the expert's buffer (not dropped).
      probs: float32 [M, N, L, E] router probabilities.
    """

    tokens: np.ndarray
    targets: np.ndarray
    kinds: Optional[np.ndarray]
    layers: tuple[str, ...]
    expert: np.ndarray
    kept: np.ndarray
    probs: np.ndarray

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def valid(self) -> np.ndarray:
        """bool [N, L]: byte tokens (not pad, bos, eos or sentinels)."""
        return self.tokens < NUM_BYTES


def _block_index(name: str) -> tuple:
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]) if digits else -1, name)


def routing_fn(config: ml_collections.ConfigDict):
    """A jitted (params, inputs[B, L]) -> {layer: (expert[B, L], kept[B, L], probs[B, L, E])}.

    Runs the model in evaluation mode with `mutable=['intermediates']` and reads the
    `RoutingResult` each MoE layer sows under 'routing'.
    """
    model = build_model(config)
    expert_choice = config.model.moe.router == "expert_choice"

    def run(params, inputs):
        _, state = model.apply(
            {"params": params}, inputs, deterministic=True, mutable=["intermediates"]
        )
        flat = flax.traverse_util.flatten_dict(state["intermediates"])
        out = {}
        for path, values in flat.items():
            if path[-1] != "routing":
                continue
            result = values[-1]  # sow keeps a tuple of the values sown
            B, L = inputs.shape
            if expert_choice:  # K = E: choice e is expert e
                first = jnp.argmax(result.probs, axis=-1)
                kept = jnp.take_along_axis(result.kept, first[..., None], axis=-1)[..., 0]
            else:  # top-k: choice 0 is the most probable expert
                first, kept = result.expert[..., 0], result.kept[..., 0]
            E = result.probs.shape[-1]
            out[path[0]] = (
                first.reshape(B, L),  # groups [G, S] are the flattened [B, L] in order
                kept.reshape(B, L),
                result.probs.reshape(B, L, E),
            )
        return out

    return jax.jit(run)


def capture_routing(
    run: Run,
    num_batches: int = 4,
    step: Optional[int] = None,
    pipeline: Optional[LMDataPipeline] = None,
) -> RoutingCapture:
    """Routes the first `num_batches` validation batches and records each token's first choice.

    The batches are the run's own eval batches (the same windows, batch size and groups as its
    evaluation), so `kept` reflects the run's eval capacity factor. Kinds are computed on the
    whole documents the windows come from, so a window that starts inside a docstring is still
    classified as string.

    Args:
      run: a workdir or a (config, params) pair.
      num_batches: validation batches of `batch_size` windows each.
      step: checkpoint step when `run` is a workdir.
      pipeline: an `LMDataPipeline` of the run's data config to reuse (it caches packed splits).
    """
    config, params = load_run(run, step)
    if not config.model.moe.num_experts:
        raise ValueError("model.moe.num_experts is 0: a dense model has no router to capture.")
    config = single_device_config(config)
    pipeline = pipeline or LMDataPipeline(config.data, config.batch_size)
    packed = pipeline.packed(config.data.eval_split)
    B, width = config.batch_size, config.data.seq_len + 1
    n = min(num_batches * B, len(packed))
    windows = np.asarray(packed.windows[:n], np.int32)

    kinds = None
    if config.data.tokenizer == "byte":
        # Classify up to the end of the last document (at most ~1M more tokens), so that it is
        # classified whole: tokenize needs the rest of a string to know it is one.
        tail = np.asarray(packed.windows[n : n + 2**20 // width], np.int32).reshape(-1)
        specials = np.flatnonzero(tail >= NUM_BYTES)
        tail = tail[: specials[0]] if len(specials) else tail
        stream = np.concatenate([windows.reshape(-1), tail])
        kinds = token_kind_of_ids(stream)[: n * width].reshape(n, width)[:, :-1]

    route = routing_fn(config)
    device = jax.local_devices()[0]
    params = jax.device_put(params, device)
    per_layer: dict[str, list] = {}
    pad = pipeline.tokenizer.pad_id
    for start in range(0, n, B):
        rows = windows[start : start + B, :-1]
        batch = np.full((B, width - 1), pad, np.int32)  # one compiled shape: pad the last batch
        batch[: len(rows)] = rows
        out = jax.device_get(route(params, jax.device_put(batch, device)))
        for name, arrays in out.items():
            per_layer.setdefault(name, []).append([a[: len(rows)] for a in arrays])
    layers = tuple(sorted(per_layer, key=_block_index))
    stack = lambda i: np.stack([np.concatenate([b[i] for b in per_layer[l]]) for l in layers])
    return RoutingCapture(
        tokens=windows[:, :-1],
        targets=windows[:, 1:],
        kinds=kinds,
        layers=layers,
        expert=stack(0).astype(np.int32),
        kept=stack(1).astype(bool),
        probs=stack(2).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------
# What the experts learned (ST-MoE Table 13 for Python source).


def kind_counts(capture: RoutingCapture, layer: int, kept_only: bool = False) -> np.ndarray:
    """int64 [E, T]: byte tokens of each kind whose first choice in `layer` is each expert."""
    if capture.kinds is None:
        raise ValueError("this capture has no kinds (not a byte-tokenizer run).")
    mask = capture.valid & (capture.kept[layer] if kept_only else True)
    E, T = capture.num_experts, len(KINDS)
    flat = capture.expert[layer][mask].astype(np.int64) * T + capture.kinds[mask]
    return np.bincount(flat, minlength=E * T).reshape(E, T)


def byte_counts(capture: RoutingCapture, layer: int, kept_only: bool = False) -> np.ndarray:
    """int64 [E, 256]: occurrences of each input byte whose first choice is each expert."""
    mask = capture.valid & (capture.kept[layer] if kept_only else True)
    E = capture.num_experts
    flat = capture.expert[layer][mask].astype(np.int64) * NUM_BYTES + capture.tokens[mask]
    return np.bincount(flat, minlength=E * NUM_BYTES).reshape(E, NUM_BYTES)


def mutual_information(counts: np.ndarray) -> float:
    """I(X; Y) in bits of a joint count table [X, Y]; 0 when X tells nothing about Y."""
    p = counts / max(counts.sum(), 1)
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / (px @ py)[nz])))


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-np.sum(p * np.log2(p)))


def _show_byte(b: int) -> str:
    return {10: "\\n", 9: "\\t", 32: "␣", 13: "\\r"}.get(b, chr(b) if 32 < b < 127 else f"x{b:02x}")


def expert_kind_table(
    capture: RoutingCapture, top: int = 3, min_count: int = 20, kept_only: bool = False
) -> list[dict[str, Any]]:
    """Per MoE layer and expert: the kinds of source it receives and those it over-represents.

    ST-MoE (Zoph et al. 2022, Table 13) lists the tokens each encoder expert specialises in
    (punctuation, verbs, proper names...). For byte-level Python the natural vocabulary is the
    kind of source a byte belongs to (`KINDS`). The over-representation of kind k in expert e is
    P(k | e) / P(k): how much more often the expert sees that kind than a random expert would.

    Args:
      capture: from `capture_routing`.
      top: how many over-represented kinds (and bytes) to list.
      min_count: ignore kinds / bytes seen fewer than this many times by the expert (noise).
      kept_only: count only tokens whose first choice was kept.

    Returns:
      One dict per (layer, expert): {"layer", "expert", "tokens" (count), "share" (of the layer's
      tokens), "kinds" ({kind: fraction of the expert's tokens}), "top_kinds" ([(kind, ratio,
      fraction)], ratio > 1 only, best first), "top_bytes" ([(shown byte, ratio, count)])}.
    """
    rows = []
    for m, layer in enumerate(capture.layers):
        counts = kind_counts(capture, m, kept_only)
        overall = counts.sum(0) / max(counts.sum(), 1)
        bytes_ = byte_counts(capture, m, kept_only)
        byte_overall = bytes_.sum(0) / max(bytes_.sum(), 1)
        total = max(counts.sum(), 1)
        for e in range(capture.num_experts):
            n = int(counts[e].sum())
            frac = counts[e] / max(n, 1)
            ratio = np.divide(frac, overall, out=np.zeros_like(frac), where=overall > 0)
            order = [k for k in np.argsort(-ratio) if counts[e, k] >= min_count and ratio[k] > 1]
            bfrac = bytes_[e] / max(n, 1)
            bratio = np.divide(
                bfrac, byte_overall, out=np.zeros_like(bfrac), where=byte_overall > 0
            )
            border = [b for b in np.argsort(-bratio) if bytes_[e, b] >= min_count and bratio[b] > 1]
            rows.append(
                {
                    "layer": layer,
                    "expert": e,
                    "tokens": n,
                    "share": n / total,
                    "kinds": {KINDS[k]: float(frac[k]) for k in range(len(KINDS)) if counts[e, k]},
                    "top_kinds": [(KINDS[k], float(ratio[k]), float(frac[k])) for k in order[:top]],
                    "top_bytes": [
                        (_show_byte(int(b)), float(bratio[b]), int(bytes_[e, b]))
                        for b in border[:top]
                    ],
                }
            )
    return rows


def format_kind_table(
    rows: Sequence[dict[str, Any]], capture: Optional[RoutingCapture] = None
) -> str:
    """`expert_kind_table` rows as text, one line per expert.

    With `capture`, each layer's header gives the entropy of the expert choice and the mutual
    information between a token's expert and its kind (and its byte): how many bits of the kind
    the expert reveals. 0 means the routing ignores kinds; I(expert; byte) = H(expert) means the
    expert is a function of the input byte alone.
    """
    lines, current = [], None
    for r in rows:
        if r["layer"] != current:
            current = r["layer"]
            header = f"{current}"
            if capture is not None:
                m = capture.layers.index(current)
                kinds, bytes_ = kind_counts(capture, m), byte_counts(capture, m)
                header += (
                    f": H(expert) = {entropy_bits(kinds.sum(1)):.2f} bits; "
                    f"I(expert; kind) = {mutual_information(kinds):.2f} of "
                    f"H(kind) = {entropy_bits(kinds.sum(0)):.2f} bits; "
                    f"I(expert; byte) = {mutual_information(bytes_):.2f} bits"
                )
            lines.append(header)
        kinds = ", ".join(f"{k} ×{ratio:.1f} ({100 * f:.0f}%)" for k, ratio, f in r["top_kinds"])
        bytes_ = " ".join(f"{b}×{ratio:.1f}" for b, ratio, _ in r["top_bytes"])
        lines.append(
            f"  expert {r['expert']:>2} {100 * r['share']:5.1f}% | {kinds or '-'} | bytes {bytes_ or '-'}"
        )
    return "\n".join(lines)


def expert_load(capture: RoutingCapture, kept_only: bool = False) -> np.ndarray:
    """float [M, E]: fraction of each layer's byte tokens whose first choice is each expert."""
    E = capture.num_experts
    load = []
    for m in range(len(capture.layers)):
        mask = capture.valid & (capture.kept[m] if kept_only else True)
        counts = np.bincount(capture.expert[m][mask], minlength=E).astype(np.float64)
        load.append(counts / max(counts.sum(), 1.0))
    return np.stack(load)


def plot_expert_load(load: np.ndarray, layers: Sequence[str]):
    """Heat map of `expert_load` (layers × experts), 1/E is perfectly balanced."""
    import matplotlib.pyplot as plt

    M, E = load.shape
    fig, ax = plt.subplots(figsize=(1 + 0.6 * E, 1 + 0.5 * M))
    im = ax.imshow(load, cmap="viridis", aspect="auto", vmin=0)
    for m in range(M):
        for e in range(E):
            ax.text(
                e, m, f"{100 * load[m, e]:.0f}", ha="center", va="center", color="w", fontsize=8
            )
    ax.set(xticks=range(E), yticks=range(M), yticklabels=list(layers), xlabel="expert")
    ax.set_title(f"share of tokens per expert (%); balanced = {100 / E:.1f}%")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_kind_expert(capture: RoutingCapture, layer: int = 0):
    """Heat map of P(expert | kind) for one layer: a row concentrated on one expert means that
    expert owns that kind of source."""
    import matplotlib.pyplot as plt

    counts = kind_counts(capture, layer).T  # [T, E]
    present = counts.sum(1) > 0
    p = counts[present] / counts[present].sum(1, keepdims=True)
    names = [f"{k} ({n})" for k, n, ok in zip(KINDS, counts.sum(1), present) if ok]
    fig, ax = plt.subplots(figsize=(2 + 0.6 * capture.num_experts, 0.5 + 0.35 * len(names)))
    im = ax.imshow(p, cmap="magma", aspect="auto", vmin=0, vmax=1)
    ax.set(xticks=range(capture.num_experts), yticks=range(len(names)), yticklabels=names)
    ax.set(xlabel="expert", title=f"{capture.layers[layer]}: P(expert | kind)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_confidence(capture: RoutingCapture, bins: int = 40):
    """Histogram of the router's top-1 probability per MoE layer (1/E = no preference)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.linspace(0, 1, bins + 1)
    for m, layer in enumerate(capture.layers):
        top1 = capture.probs[m].max(-1)[capture.valid]
        ax.hist(top1, bins=edges, histtype="step", lw=1.5, density=True, label=layer)
    ax.axvline(1 / capture.num_experts, color="gray", ls="--", label="1/E")
    ax.set(xlabel="router top-1 probability", ylabel="density", title="router confidence")
    ax.legend()
    fig.tight_layout()
    return fig


def _text_cells(capture: RoutingCapture, layer: int, row: int, num_rows: int):
    """(character, expert, kept) for consecutive windows; non-ASCII bytes shown as '·'.

    Each window's last target, which no window routes, is included with expert -1.
    """

    def show(t: int) -> str:
        if t >= NUM_BYTES:
            return "¶"  # end of a document (or padding)
        return "\n" if t == 10 else " " if t in (9, 13, 32) else chr(t) if t < 127 else "·"

    cells = []
    for r in range(row, min(row + num_rows, len(capture.tokens))):
        for t, e, k in zip(capture.tokens[r], capture.expert[layer, r], capture.kept[layer, r]):
            cells.append((show(int(t)), int(e), bool(k)))
        cells.append((show(int(capture.targets[r, -1])), -1, True))
    return cells


def plot_routed_text(
    capture: RoutingCapture, layer: int = 0, row: int = 0, num_rows: int = 4, max_lines: int = 40
):
    """Source text with each byte's background coloured by its first-choice expert.

    Consecutive eval windows are consecutive text, so rows row..row+num_rows-1 read on. Dropped
    tokens are hatched. Blanks are drawn as coloured cells too, so indentation shows its expert.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    cells = _text_cells(capture, layer, row, num_rows)
    cmap = plt.get_cmap("tab10" if capture.num_experts <= 10 else "tab20")
    lines, line = [], []
    for cell in cells:
        line.append(cell)
        if cell[0] == "\n":
            lines.append(line)
            line = []
    lines = (lines + [line])[:max_lines]
    width = max(40, min(100, max(len(l) for l in lines)))
    fig, ax = plt.subplots(figsize=(0.11 * width + 1, 0.2 * len(lines) + 1))
    for y, line in enumerate(lines):
        for x, (ch, e, kept) in enumerate(line[:width]):
            color = cmap(e % cmap.N) if e >= 0 else "white"  # -1: not routed (window edge)
            ax.add_patch(
                Rectangle(
                    (x, y), 1, 1, color=color, alpha=0.55, hatch=None if kept else "///", lw=0
                )
            )
            if ch not in " \n":
                ax.text(
                    x + 0.5, y + 0.5, ch, ha="center", va="center", family="monospace", fontsize=8
                )
    ax.set(xlim=(0, width), ylim=(len(lines), 0))
    ax.axis("off")
    handles = [
        Patch(color=cmap(e % cmap.N), alpha=0.55, label=f"expert {e}")
        for e in range(capture.num_experts)
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"{capture.layers[layer]}: first-choice expert of each byte (hatched: dropped)")
    fig.tight_layout()
    return fig


def routed_text_html(
    capture: RoutingCapture, layer: int = 0, row: int = 0, num_rows: int = 4
) -> str:
    """The same as `plot_routed_text` as HTML (for `IPython.display.HTML`); hover shows expert."""
    import html

    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    cmap = plt.get_cmap("tab10" if capture.num_experts <= 10 else "tab20")
    spans = []
    for ch, e, kept in _text_cells(capture, layer, row, num_rows):
        shown = "↵\n" if ch == "\n" else html.escape(ch)
        if e < 0:  # a window's last byte: not routed
            spans.append(f'<span title="not routed">{shown}</span>')
            continue
        style = f"background:{to_hex(cmap(e % cmap.N))}88" + (
            "" if kept else ";text-decoration:line-through"
        )
        spans.append(f'<span title="expert {e}" style="{style}">{shown}</span>')
    return '<pre style="line-height:1.3">' + "".join(spans) + "</pre>"


# ----------------------------------------------------------------------------------------------
# Sweeps: one run workdir per trial under a sweep directory.


def config_value(config: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
    """`config` at a dotted key ('model.moe.num_experts'), or `default` when absent."""
    node: Any = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            return default
    return node


def metric_series(records: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold `metric`."""
    pairs = [(r["step"], r[metric]) for r in records if metric in r]
    if not pairs:
        return np.zeros([0], np.int64), np.zeros([0])
    steps, values = zip(*pairs)
    return np.asarray(steps), np.asarray(values, np.float64)


def last_value(records: Sequence[dict], metric: str, default: Any = None) -> Any:
    """The value of `metric` in the last record that holds it."""
    for r in reversed(records):
        if metric in r:
            return r[metric]
    return default


def load_trial(workdir: str, name: Optional[str] = None) -> dict[str, Any]:
    """One run workdir as a trial dict (see `load_sweep`)."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    path = os.path.join(workdir, METRICS_FILE)
    records = read_metrics(workdir) if os.path.exists(path) else []
    total = config_value(config, "num_train_steps")
    final = [r for r in records if r.get("step") == total and "eval/loss" in r]
    last_eval = last_value(records, "eval/loss")
    return {
        "name": name or os.path.basename(os.path.normpath(workdir)),
        "workdir": workdir,
        "config": config,
        "records": records,
        "finished": bool(final),
        "last_step": max((r["step"] for r in records), default=0),
        "final_eval_loss": final[-1]["eval/loss"] if final else last_eval,
    }


def load_sweep(sweep_dir: str, finished_only: bool = False) -> list[dict[str, Any]]:
    """The trials of a sweep directory: one sub-directory per trial, each a run workdir.

    Args:
      sweep_dir: holds `<trial name>/config.json`, `metrics.jsonl`, `checkpoints/`.
      finished_only: drop trials that are not finished.

    Returns:
      Trials sorted by name (numbers in names compare as numbers), each {"name", "workdir",
      "config" (ConfigDict of config.json), "records" (metrics.jsonl), "finished" (an eval/loss
      record at step == num_train_steps), "last_step", "final_eval_loss" (at the last step if
      finished, else the latest eval/loss, None if none)}. Sub-directories without config.json
      (not started) are skipped.
    """
    natural = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
    trials = []
    for name in sorted(os.listdir(sweep_dir), key=natural):
        workdir = os.path.join(sweep_dir, name)
        if os.path.isfile(os.path.join(workdir, "config.json")):
            trials.append(load_trial(workdir, name))
    return [t for t in trials if t["finished"] or not finished_only]


def format_sweep_table(
    trials: Sequence[dict], keys: Sequence[str] = ("model.moe.num_experts",)
) -> str:
    """One line per trial: name, the given config keys, steps, final eval loss."""
    w = max([len("trial")] + [len(t["name"]) for t in trials]) + 2
    head = f"{'trial':<{w}}" + "".join(f"{k.split('.')[-1]:>22}" for k in keys)
    lines = [head + f"{'step':>8}{'eval loss':>11}{'finished':>10}"]
    for t in trials:
        loss = t["final_eval_loss"]
        lines.append(
            f"{t['name']:<{w}}"
            + "".join(f"{str(config_value(t['config'], k)):>22}" for k in keys)
            + f"{t['last_step']:>8}{(f'{loss:.4f}' if loss is not None else '-'):>11}"
            + f"{str(t['finished']):>10}"
        )
    return "\n".join(lines)


def plot_eval_curves(trials: Sequence[dict], metric: str = "eval/loss"):
    """`metric` vs step, one line per trial."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        steps, values = metric_series(t["records"], metric)
        if len(steps):
            ax.plot(steps, values, "o-", ms=3, label=t["name"])
    ax.set(xlabel="step", ylabel=metric)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_run_curves(records: Sequence[dict], metrics: Sequence[str] = ("train/loss", "eval/loss")):
    """One run's metrics (from `read_metrics`) vs step, one line per metric."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for metric in metrics:
        steps, values = metric_series(records, metric)
        if len(steps):
            ax.plot(steps, values, "o-", ms=3, label=metric)
    ax.set(xlabel="step", ylabel="loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return fig


def _groups(trials: Sequence[dict], x_key: str, group_by: Optional[str]):
    groups: dict[Any, list] = {}
    for t in trials:
        x = config_value(t["config"], x_key)
        if x is None:
            continue
        label = config_value(t["config"], group_by) if group_by else None
        groups.setdefault(label, []).append((x, t))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in groups.items()}


def plot_final_vs(
    trials: Sequence[dict],
    x_key: str,
    y: Any = "final_eval_loss",
    group_by: Optional[str] = None,
    ax=None,
    **plot_kwargs,
):
    """A final value of each trial vs a config value, one line per `group_by` value.

    Args:
      trials: from `load_sweep`.
      x_key: dotted config key for x ('model.moe.num_experts').
      y: a trial key ('final_eval_loss'), a metric name whose last value is used
        ('train/dropped_fraction'), or a function trial -> value. Trials without it are skipped.
      group_by: dotted config key separating lines.
      ax: draw into this axes (default: a new figure).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    get = y if callable(y) else (lambda t: t[y] if y in t else last_value(t["records"], y))
    for label, points in _groups(trials, x_key, group_by).items():
        xy = [(x, get(t)) for x, t in points if get(t) is not None]
        if xy:
            xs, ys = zip(*xy)
            name = f"{group_by.split('.')[-1]}={label}" if group_by else None
            ax.plot(xs, ys, "o-", label=name, **plot_kwargs)
    ax.set(xlabel=x_key, ylabel=y if isinstance(y, str) else "")
    ax.grid(alpha=0.3)
    if group_by and ax.lines:
        ax.legend(fontsize=8)
    return ax.figure


def plot_loss_vs_experts(
    trials: Sequence[dict], group_by: Optional[str] = None, finished_only: bool = True
):
    """Final eval loss vs number of experts (0 = dense): the Switch Figure 4 / GShard scaling plot."""
    trials = [t for t in trials if t["finished"] or not finished_only]
    fig = plot_final_vs(trials, "model.moe.num_experts", group_by=group_by)
    ax = fig.axes[0]
    counts = sorted({config_value(t["config"], "model.moe.num_experts") for t in trials})
    if counts and max(counts) > 4:
        ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xticks(counts, ["dense" if c == 0 else str(c) for c in counts])
    ax.set(xlabel="experts per MoE layer", ylabel="final eval loss (nats/token)")
    fig.tight_layout()
    return fig


def plot_capacity_factor(
    trials: Sequence[dict],
    x_key: str = "model.moe.train_capacity_factor",
    group_by: Optional[str] = None,
    finished_only: bool = True,
):
    """Final eval loss and dropped fraction (train and eval, last logged) vs the capacity factor
    the trials trained with (Switch Table 1). Dense trials (no experts) are left out."""
    import matplotlib.pyplot as plt

    trials = [
        t
        for t in trials
        if (t["finished"] or not finished_only)
        and config_value(t["config"], "model.moe.num_experts")
    ]
    fig, (ax_loss, ax_drop) = plt.subplots(1, 2, figsize=(11, 4))
    plot_final_vs(trials, x_key, group_by=group_by, ax=ax_loss)
    ax_loss.set(ylabel="final eval loss (nats/token)")
    for metric, style in (("train/dropped_fraction", "o-"), ("eval/dropped_fraction", "s--")):
        for label, points in _groups(trials, x_key, group_by).items():
            values = [(x, last_value(t["records"], metric)) for x, t in points]
            xy = [(x, 100 * v) for x, v in values if v is not None]
            if xy:
                suffix = f" {group_by.split('.')[-1]}={label}" if group_by else ""
                ax_drop.plot(*zip(*xy), style, label=metric + suffix)
    ax_drop.set(xlabel=x_key)
    ax_drop.grid(alpha=0.3)
    ax_drop.set(ylabel="tokens dropped (%)")
    if ax_drop.lines:
        ax_drop.legend(fontsize=8)
    fig.tight_layout()
    return fig
