"""Compressor baselines: code lengths in bits per byte, on the bytes an evaluation scored."""

import lzma
import os
import zlib

import pytest

from switchmoe.data import baselines


def test_compressors_give_their_code_length_per_byte():
    data = b"def f(x):\n    return x\n" * 200 + os.urandom(300)
    out = baselines.compressor_bits_per_byte(data)
    assert out["zlib -9"] == pytest.approx(8 * len(zlib.compress(data, 9)) / len(data))
    assert out["xz -9"] == pytest.approx(8 * len(lzma.compress(data, preset=9)) / len(data))
    assert out["xz -9"] < 8 * 360 / len(data) + 1  # the repeats cost almost nothing
    noise = baselines.compressor_bits_per_byte(os.urandom(4096))
    assert all(v > 7.9 for v in noise.values())  # random bytes do not compress
    with pytest.raises(ValueError):
        baselines.compressor_bits_per_byte(b"")


def test_split_prefix_joins_documents_in_order():
    assert baselines.split_prefix([b"abc", b"de", b"fgh"], 6) == b"abcdef"
    assert baselines.split_prefix([b"abc"], 10) == b"abc"
