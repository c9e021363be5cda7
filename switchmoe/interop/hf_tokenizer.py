"""A run's tokenizer, special ids and generation defaults as Hugging Face files.

An exported model generates correctly in transformers only if transformers knows the ids the run
was trained with: a byte-level run's pad, BOS and EOS are 256, 257 and 258, not T5's 0, 1 and 0.
`export_files` writes, beside the weights:

  tokenizer.json          the run's tokenizer for the `tokenizers` library (below); loaded by
  tokenizer_config.json   `AutoTokenizer.from_pretrained(out)`, with ids equal to switchmoe's
  tokenizer.model         (SentencePiece runs) the run's own model file, for sentencepiece users
  generation_config.json  pad, BOS, EOS and (encoder–decoder) decoder start ids

and `special_ids` gives the ids config.json carries. What the tokenizer.json holds:

- **byte** runs: ids 0..255 are the bytes themselves. The model is a BPE with no merges over the
  256 byte symbols of the `ByteLevel` alphabet (each byte is one token, id == byte) and the
  ByteLevel decoder, which decodes invalid UTF-8 as U+FFFD per bad byte, as switchmoe's
  `errors="replace"` does. pad/bos/eos and the sentinels are added tokens at switchmoe's ids.
- **SentencePiece** runs (`sentencepiece` and `t5`): a Unigram model with the model file's pieces
  and scores, its byte fallback, and its normaliser (the precompiled character map when it has
  one; the dummy prefix and whitespace handling it was trained with). switchmoe's ids for
  specials the model lacks, and its sentinels, are added tokens after the pieces. A BPE
  SentencePiece model has no tokenizer.json here (its merges are not stored in the file; the
  exact conversion is not built) and is exported with tokenizer.model only, which the result
  says.

Text is text: `split_special_tokens` is on, so a literal "</s>" in a prompt is encoded as its
characters, as switchmoe's `encode` does. One difference remains for SentencePiece runs: the
`tokenizers` Unigram model matches every piece of the model file in text, its control, unknown
and byte pieces included, so a prompt that spells one out ("<s>", "<unk>", "<0x41>") gets that
piece where sentencepiece, which never matches those, encodes the characters (transformers' own
converted SentencePiece tokenizers behave the same; the ids of a piece cannot be kept while
renaming it, because `tokenizers` assigns added tokens' ids by their text). Any other text
encodes to the same ids (tests/interop/test_hf_tokenizer.py, on validation documents and on
text with characters the model lacks). A prompt is framed as in training: a decoder-only run's
text follows an EOS (documents are joined with EOS), an encoder input ends with one; the
tokenizer's post-processor adds that id, so `tokenizer(text).input_ids` is what
`LMGenerator.complete` and the span-corruption inputs feed the model.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Mapping, Optional

import ml_collections

from switchmoe.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, make_tokenizer

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPM_FILE = "tokenizer.model"

# sentencepiece_model.proto's ModelProto.SentencePiece.Type and TrainerSpec.ModelType values.
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
_SPM_UNIGRAM = 1


def _is_encoder_decoder(config: ml_collections.ConfigDict) -> bool:
    return config.model.get("arch", "decoder") == "encoder_decoder"


def special_ids(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The ids the run trained and generates with, by their config.json names: pad, BOS, EOS and,
    for an encoder–decoder, the decoder start (switchmoe starts the decoder from BOS; in T5's
    layout BOS is pad).

    Raises ValueError when the run's tokenizer has ids the model's vocabulary lacks (a run whose
    data.tokenizer was never its model's)."""
    tokenizer = make_tokenizer(config.data)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"data.tokenizer={config.data.tokenizer!r} has {tokenizer.vocab_size} ids but "
            f"model.vocab_size={config.model.vocab_size}: the run's tokenizer is not its model's. "
            "Set data.tokenizer (and data.spm_model_path) to the tokenizer the model was trained "
            "with."
        )
    ids = {
        "pad_token_id": tokenizer.pad_id,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
    }
    if _is_encoder_decoder(config):
        ids["decoder_start_token_id"] = tokenizer.bos_id
    return ids


def generation_config(ids: Mapping[str, int]) -> dict:
    """generation_config.json: the special ids; greedy decoding, as switchmoe's default."""
    return {**ids, "do_sample": False, "num_beams": 1}


# -- tokenizer.json -------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The ByteLevel alphabet in byte order: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for chr(256 + n) in byte order (GPT-2's reversible byte-to-unicode map)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = iter(range(256, 256 + 256 - len(printable)))
    kept = set(printable)
    return [chr(b) if b in kept else chr(next(others)) for b in range(256)]


def _added_tokens(tokenizer, first_new_id: int, names: Mapping[int, str]) -> list[tuple[int, str]]:
    """(id, text) of every id at or above `first_new_id`: specials by `names`, sentinels as T5
    names them (<extra_id_i> at sentinel_id(i))."""
    sentinels = {
        tokenizer.sentinel_id(i): f"<extra_id_{i}>" for i in range(tokenizer.num_sentinels)
    }
    out = []
    for i in range(first_new_id, tokenizer.vocab_size):
        if i in sentinels:
            out.append((i, sentinels[i]))
        elif i in names:
            out.append((i, names[i]))
        else:  # pragma: no cover - the tokenizers above leave no other ids
            raise AssertionError(f"id {i} of {tokenizer!r} has no name")
    return out


def _byte_model(tokenizer: ByteTokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: one word per text, so a byte never merges (there are no merges anyway)
    # and no prefix space is added.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = {tokenizer.pad_id: "<pad>", tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
    return tok, _added_tokens(tokenizer, ByteTokenizer.NUM_BYTES, names)


def _spm_model(tokenizer: SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers  # noqa: PLC0415

    with open(tokenizer.model_path, "rb") as f:
        proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    if proto.trainer_spec.model_type != _SPM_UNIGRAM:
        return None, []
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk = next(i for i, p in enumerate(proto.pieces) if p.type == _UNKNOWN)
    tok = Tokenizer(
        models.Unigram(pieces, unk_id=unk, byte_fallback=proto.trainer_spec.byte_fallback)
    )
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    # sentencepiece decodes the unknown piece as its surface (" \u2047 " by default).
    surface = proto.trainer_spec.unk_surface
    decode = [decoders.Replace(proto.pieces[unk].piece, surface), decoders.Replace("\u2581", " "),
              decoders.ByteFallback(), decoders.Fuse()]  # fmt: skip
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    # Pieces the encoder must never produce from text, and user-defined ones it must always
    # match whole, are added tokens with their own ids (control pieces special, so that
    # decode(skip_special_tokens=True) drops them as switchmoe's decode does).
    added = [(i, p.piece, p.type == _CONTROL) for i, p in enumerate(proto.pieces)
             if p.type in (_CONTROL, _USER_DEFINED)]  # fmt: skip
    names = {tokenizer.pad_id: "<pad>", tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
    extra = _added_tokens(tokenizer, tokenizer.num_pieces, names)
    return tok, [(i, t, True) for i, t in extra] + added


def tokenizer_files(
    config: ml_collections.ConfigDict, directory: str
) -> tuple[list[str], Optional[str]]:
    """Writes the run's tokenizer to `directory`: (files written, why tokenizer.json was not, or
    None). Needs the `tokenizers` package (the hf extra)."""
    try:
        from tokenizers import AddedToken, processors  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - the hf extra installs it
        raise ImportError(
            "writing the tokenizer needs the tokenizers package: pip install -e '.[hf]'"
        ) from e
    tokenizer = make_tokenizer(config.data)
    written = []
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(tokenizer.model_path, os.path.join(directory, SPM_FILE))
        written.append(SPM_FILE)
        tok, added = _spm_model(tokenizer)
        if tok is None:
            return written, (
                f"{tokenizer.model_path} is a BPE SentencePiece model; only its unigram "
                "models convert to tokenizer.json here (load tokenizer.model with sentencepiece)"
            )
    else:
        tok, plain = _byte_model(tokenizer)
        added = [(i, t, True) for i, t in plain]
    # Added tokens take the next free id in the order given; check that order is switchmoe's.
    for i, text, special in sorted(added):
        add = tok.add_special_tokens if special else tok.add_tokens
        add([AddedToken(text, special=special, normalized=False)])
        if tok.token_to_id(text) != i:
            raise AssertionError(f"{text!r} got id {tok.token_to_id(text)}, expected {i}")
    eos = tok.id_to_token(tokenizer.eos_id)
    template = "$A </s>" if _is_encoder_decoder(config) else "</s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=template.replace("</s>", eos), special_tokens=[(eos, tokenizer.eos_id)]
    )
    tok.save(os.path.join(directory, TOKENIZER_FILE))
    token = lambda i: tok.id_to_token(i)
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": token(tokenizer.pad_id),
        "bos_token": token(tokenizer.bos_id),
        "eos_token": eos,
        # The Unigram model knows its unknown piece; naming it here would make transformers
        # count it special and drop it from decode(skip_special_tokens=True), which
        # sentencepiece decodes as its surface.
        "unk_token": None,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.num_sentinels:
        settings["extra_special_tokens"] = [
            f"<extra_id_{i}>" for i in range(tokenizer.num_sentinels)
        ]
    with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w") as f:
        json.dump(settings, f, indent=2)
    return written + [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE], None


def write_generation_config(directory: str, ids: Mapping[str, int]) -> None:
    with open(os.path.join(directory, GENERATION_CONFIG_FILE), "w") as f:
        json.dump(generation_config(ids), f, indent=2)


def export_files(
    config: ml_collections.ConfigDict, directory: str, ids: Mapping[str, int]
) -> tuple[list[str], Optional[str]]:
    """generation_config.json and the tokenizer files (see the module docstring): (files
    written, a note on what was not written, or None)."""
    write_generation_config(directory, ids)
    files, note = tokenizer_files(config, directory)
    return [GENERATION_CONFIG_FILE, *files], note
