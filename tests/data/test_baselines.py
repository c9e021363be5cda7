"""Compressor baselines: code lengths in bits per byte, on the bytes an evaluation scored."""

import lzma
import os
import zlib

import numpy as np
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


def test_scored_baselines_on_exactly_the_given_bytes(tmp_path):
    rng = np.random.default_rng(0)
    train = b"".join(b"def f%d(x):\n    return x * %d\n" % (i, i) for i in range(400))
    scored = train[1000:3000] + bytes(rng.integers(97, 123, 50, dtype=np.uint8))
    out = baselines.scored_baselines(scored, train, cache_dir=str(tmp_path))
    assert list(out) == list(baselines.BASELINES)
    counts = np.bincount(np.frombuffer(scored, np.uint8), minlength=256)
    p = counts[counts > 0] / len(scored)
    assert out["unigram entropy"] == pytest.approx(-(p * np.log2(p)).sum())
    xz = lambda b: len(lzma.compress(b, format=lzma.FORMAT_XZ, preset=9))
    assert out["xz -9 after train"] == pytest.approx(
        8 * (xz(train + scored) - xz(train)) / len(scored)
    )
    # Having read the training text, xz codes its repeat almost for free; cold it cannot.
    assert out["xz -9 after train"] < 0.5 * out["xz -9"]
    # Cached by content: a second call reads the file, another scored set does not.
    assert baselines.scored_baselines(scored, train, cache_dir=str(tmp_path)) == out
    assert len(os.listdir(tmp_path)) == 1
    assert "xz -9 after train" not in baselines.scored_baselines(scored[:100], None, str(tmp_path))
