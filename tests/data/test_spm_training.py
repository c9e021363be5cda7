"""The SentencePiece vocabulary trained on the embedded corpus: exact round trips, byte-identical
rebuilds, one file per setting, and byte counts that agree with the text's own length."""

import os

import numpy as np
import pytest

from switchmoe.data import default_data_config, make_tokenizer, pipeline, spm_training

pytest.importorskip("sentencepiece")

MAX_FILES = 12
VOCAB = 400


@pytest.fixture
def config(data_dir):
    c = default_data_config()
    c.data_dir = str(data_dir)
    c.max_files = MAX_FILES
    c.tokenizer = "sentencepiece"
    c.spm_vocab_size = VOCAB
    return c


def test_trained_tokenizer_round_trips_text_it_never_saw(config):
    tok = make_tokenizer(config)
    assert tok.vocab_size == VOCAB and (tok.pad_id, tok.eos_id) == (0, 1)
    samples = [
        "def f(x):\n    return x  # indented, with trailing spaces   \n\n\tTab\n",
        "naïve café — 数学 🙂\r\n",  # characters the 12 files may not hold: byte fallback
        "  leading spaces and a final newline\n",
    ]
    for text in samples:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.max() < VOCAB
        assert tok.decode(ids) == text
    validation = pipeline.load_texts(config, "validation")
    for doc in validation:
        assert tok.decode(tok.encode(doc)) == doc.decode("utf-8")


def test_token_bytes_sum_to_the_text_length(config):
    tok = make_tokenizer(config)
    table = tok.token_bytes()
    for doc in pipeline.load_texts(config, "validation"):
        ids = tok.encode(doc)
        assert int(table[ids].sum()) == len(doc)
    assert table[[tok.pad_id, tok.eos_id]].tolist() == [0, 0]


def test_two_builds_of_one_setting_give_the_same_bytes(config):
    first = spm_training.train_model(config)
    second = spm_training.train_model(config)
    assert first == second and len(first) > 1000


def test_the_model_is_built_once_per_setting(config, monkeypatch):
    path = spm_training.ensure_model(config)
    assert os.path.dirname(path) == os.path.join(config.data_dir, "sentencepiece")
    mtime = os.path.getmtime(path)
    calls = []
    monkeypatch.setattr(spm_training, "train_model", lambda c: calls.append(c) or b"")
    assert spm_training.ensure_model(config) == path  # the same setting: reused, not rebuilt
    assert os.path.getmtime(path) == mtime and not calls
    other = config.copy_and_resolve_references()
    other.spm_vocab_size = VOCAB + 100
    assert spm_training.model_path(other) != path  # a new setting has its own file
    other.spm_vocab_size, other.spm_model_type = VOCAB, "bpe"
    assert spm_training.model_path(other) != path


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("spm_vocab_size", 100, "data.spm_vocab_size"),
        ("spm_model_type", "wordpiece", "data.spm_model_type"),
    ],
)
def test_bad_sentencepiece_settings_are_named(config, field, value, match):
    config[field] = value
    with pytest.raises(ValueError, match=match):
        pipeline.validate_data_config(config)
