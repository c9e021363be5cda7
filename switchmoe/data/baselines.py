"""What any language model of a split should beat: its unigram byte entropy, and general-purpose
compressors on the same bytes.

A compressor's output size is a code length, so 8 · len(compressed) / len(raw) is its bits per
byte; an LM's eval loss in bits per byte is a code length too (arithmetic coding would reach it),
so the two compare directly. zlib at level 9 (DEFLATE: LZ77 over a 32 KiB window) and xz at preset
9 (LZMA2, a 64 MiB dictionary and context modelling of literals) are the usual two: a small model
that does not beat xz has learned less than a dictionary coder does from the text itself.
"""

from __future__ import annotations

import lzma
import zlib

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


def split_prefix(texts: list[bytes], num_bytes: int) -> bytes:
    """The first `num_bytes` bytes of a split's documents joined in stored order.

    An evaluation over the first batches of a split scores this prefix (EOS separators stand for
    no bytes), to within the one unpredicted first token of each window.
    """
    return b"".join(texts)[: int(num_bytes)]
