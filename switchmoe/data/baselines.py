"""What any language model of a split should beat: its unigram byte entropy, and general-purpose
compressors on the same bytes.

A compressor's output size is a code length, so 8 · len(compressed) / len(raw) is its bits per
byte; an LM's eval loss in bits per byte is a code length too (arithmetic coding would reach it),
so the two compare directly. zlib at level 9 (DEFLATE: LZ77 over a 32 KiB window) and xz at preset
9 (LZMA2, a 64 MiB dictionary and context modelling of literals) are the usual two: a small model
that does not beat xz has learned less than a dictionary coder does from the text itself.

Cold compressors start from nothing, while the model has read the training split: the fair
dictionary baseline is xz given the training split as context, the extra compressed bytes that
the scored text adds to the compressed training split. Every baseline is computed on exactly the
bytes the evaluation scored (the eval set's documents, `eval_set.EvalSet.text`), never on a
prefix or on the whole split when the model scored a sample.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import zlib

import numpy as np

COMPRESSORS = ("zlib -9", "xz -9")


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """{'zlib -9': bits/byte, 'xz -9': bits/byte} of `data` (compressed as one stream)."""
    if not data:
        raise ValueError("compressor_bits_per_byte needs at least one byte.")
    sizes = {
        "zlib -9": len(zlib.compress(data, 9)),
        "xz -9": len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9)),
    }
    return {name: 8.0 * size / len(data) for name, size in sizes.items()}


def unigram_entropy(data: bytes) -> float:
    """Entropy of `data`'s byte histogram in bits per byte: the best context-free code length."""
    if not data:
        raise ValueError("unigram_entropy needs at least one byte.")
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    probs = counts[counts > 0] / len(data)
    return float(-(probs * np.log2(probs)).sum())


def _xz_size(data: bytes) -> int:
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9))


def xz_with_context_bits_per_byte(
    data: bytes, context: bytes, context_size: int | None = None
) -> float:
    """xz -9's cost of `data` once it has read `context`: 8 · (|xz(context + data)| −
    |xz(context)|) / |data|. A model that has trained on the training split should be compared
    with a compressor that has read it too; xz's 64 MiB dictionary holds the embedded corpus'
    11.4 MB training split whole. `context_size` (|xz(context)|) may be passed when known."""
    if not data:
        raise ValueError("xz_with_context_bits_per_byte needs at least one byte.")
    base = _xz_size(context) if context_size is None else context_size
    return 8.0 * (_xz_size(context + data) - base) / len(data)


# What `scored_baselines` reports, in order.
BASELINES = ("unigram entropy", "zlib -9", "xz -9", "xz -9 after train")


def scored_baselines(
    scored: bytes, context: bytes | None = None, cache_dir: str | None = None
) -> dict:
    """Every baseline on exactly the bytes an evaluation scored, in bits per byte:
    {'unigram entropy', 'zlib -9', 'xz -9' (both cold), 'xz -9 after train' (with `context`, the
    training split's documents joined; absent without it)}.

    xz on a training split takes tens of seconds, so with `cache_dir` each result is kept in a
    JSON file named by the SHA-256 of its inputs (a different corpus or scored set never reads
    another's numbers).
    """
    key = hashlib.sha256(scored).hexdigest()[:32]
    if context is not None:
        key += "-" + hashlib.sha256(context).hexdigest()[:32]
    path = (
        os.path.join(os.path.expanduser(cache_dir), f"baselines-{key}.json") if cache_dir else None
    )
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = {"unigram entropy": unigram_entropy(scored), **compressor_bits_per_byte(scored)}
    if context is not None:
        out["xz -9 after train"] = xz_with_context_bits_per_byte(scored, context)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, path)
    return out
