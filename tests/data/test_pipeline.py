"""Tests for switchmoe.data: the stdlib TFDS corpus, tokenizers, packing and step-indexed batches.

A 40-file corpus is built once into a temporary directory (about a second). References are
computed here from the files on disk and plain Python (bytes, Counter), never from the package's
own output.
"""

import collections
import math
import pathlib
import sys
import sysconfig

import numpy as np
import pytest

from switchmoe.data import (
    ByteTokenizer,
    LMDataPipeline,
    StdlibSource,
    corpus_statistics,
    default_data_config,
    epoch_permutation,
    make_tokenizer,
    pipeline,
    stdlib_corpus,
    tokenizers,
)

MAX_FILES = 40
SEQ_LEN = 16
BATCH = 8
EOS = 258  # The byte tokenizer's layout: 0..255 bytes, 256 pad, 257 bos, 258 eos.
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def config(data_dir):
    c = default_data_config()
    c.data_dir = str(data_dir)
    c.max_files = MAX_FILES
    c.seq_len = SEQ_LEN
    c.seed = 3
    return c


def _paths(data_dir, split):
    source = StdlibSource(data_dir=data_dir, max_files=MAX_FILES).as_data_source(split)
    return [source[i]["path"].decode() for i in range(len(source))]


def _reference_stream(data_dir, split):
    """The split's token stream from the files on disk: each file's bytes, then EOS."""
    stream = []
    for rel in _paths(data_dir, split):
        stream.extend((STDLIB / rel).read_bytes())
        stream.append(EOS)
    return np.array(stream)


# -- The TFDS builder --------------------------------------------------------------------------


def test_builder_reads_back_the_source_files(data_dir):
    builder = StdlibSource(data_dir=data_dir, max_files=MAX_FILES)
    assert builder.info.file_format.value == "array_record"
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    assert counts["train"] + counts["validation"] == MAX_FILES
    assert counts["validation"] == round(MAX_FILES * 0.05)
    for split in ("train", "validation"):
        source = builder.as_data_source(split)
        paths = []
        for i in range(len(source)):
            example = source[i]
            rel = example["path"].decode()
            # Every file of the stdlib here is valid UTF-8, so the text is the file, byte for byte.
            assert example["text"] == (STDLIB / rel).read_bytes(), rel
            paths.append(rel)
        assert paths == sorted(set(paths))  # Written in path order, no duplicates.


def test_builder_writes_identical_files_twice(tmp_path, data_dir):
    StdlibSource(data_dir=tmp_path, max_files=MAX_FILES).download_and_prepare()
    first = sorted((data_dir / "stdlib_source").glob("*/*/*.array_record-*"))
    second = sorted((tmp_path / "stdlib_source").glob("*/*/*.array_record-*"))
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 2
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()


def test_file_list_excludes_tests_and_site_packages():
    files = stdlib_corpus.list_source_files()
    assert {"os.py", "json/decoder.py", "asyncio/base_events.py"} <= set(files)
    assert files == sorted(files) and all(f.endswith(".py") for f in files)
    for f in files:
        dirs = f.split("/")[:-1]
        assert not {"site-packages", "test", "tests", "idle_test"} & set(dirs), f
        assert not f.split("/")[-1].startswith("_sysconfigdata_"), f


def test_split_is_deterministic_and_disjoint(data_dir):
    files = stdlib_corpus.list_source_files()
    full = stdlib_corpus.select_files(files, 0)
    assert full == stdlib_corpus.select_files(list(reversed(files)), 0)
    train, val = set(full["train"]), set(full["validation"])
    assert not train & val and train | val == set(files)
    assert 0.02 < len(val) / len(files) < 0.10
    # The small built corpus keeps each file in the split it has in the full corpus.
    for split, members in (("train", train), ("validation", val)):
        small = _paths(data_dir, split)
        assert small and set(small) <= members


def test_read_source_honours_the_coding_cookie(tmp_path):
    path = tmp_path / "latin.py"
    text = "# -*- coding: latin-1 -*-\r\nname = 'café'\n"
    path.write_bytes(text.encode("latin-1"))
    assert stdlib_corpus.read_source(path) == text  # Decoded, and \r\n kept as on disk.


# -- Tokenizers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "def f(x):\n    return x + 1\n", "héllo wörld — 日本語 🙂 Ω≈ç√"]
)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(text.encode("utf-8")).tolist() == ids.tolist()


def test_byte_tokenizer_layout_and_specials_skipped():
    tok = ByteTokenizer(num_sentinels=3)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 262)
    assert [tok.sentinel_id(i) for i in range(3)] == [261, 260, 259]
    ids = (
        [tok.bos_id]
        + list("añ".encode())
        + [tok.sentinel_id(0), tok.eos_id]
        + list("b".encode())
        + [tok.pad_id, tok.sentinel_id(2)]
    )
    assert tok.decode(ids) == "añb"
    assert tok.decode([0xFF, ord("A")]) == "\ufffdA"  # Invalid UTF-8 is replaced, not raised.
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.sentinel_id(3)


def test_sentencepiece_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import sentencepiece` now fails.
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        tokenizers.SentencePieceTokenizer("unused.model")


def test_make_tokenizer(config):
    config.num_sentinels = 100
    tok = make_tokenizer(config)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259 + 100
    config.tokenizer = "wordpiece"
    with pytest.raises(ValueError, match="data.tokenizer"):
        make_tokenizer(config)


# -- Packing -----------------------------------------------------------------------------------


def test_packed_windows_concatenate_to_the_token_stream(config, data_dir):
    pipe = LMDataPipeline(config, BATCH)
    width = SEQ_LEN + 1
    # Train drops the tail shorter than one window.
    stream = _reference_stream(data_dir, "train")
    windows = pipe.packed("train").windows
    assert windows.shape == (len(stream) // width, width)
    np.testing.assert_array_equal(windows.reshape(-1), stream[: windows.size])
    # Eval keeps it, padded: real tokens of all windows, in order, are the whole stream.
    stream = _reference_stream(data_dir, "validation")
    packed = pipe.packed("validation")
    real = np.concatenate([w[:n] for w, n in zip(packed.windows, packed.lengths)])
    np.testing.assert_array_equal(real, stream)


def test_inputs_and_targets_shift_by_one(config, data_dir):
    batch = LMDataPipeline(config, BATCH).batch(5)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "inputs": ((BATCH, SEQ_LEN), "int32"),
        "targets": ((BATCH, SEQ_LEN), "int32"),
        "weights": ((BATCH, SEQ_LEN), "float32"),
    }
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert (batch["weights"] == 1.0).all()
    # Each row (inputs + last target) is one aligned window of the reference stream.
    stream = _reference_stream(data_dir, "train")
    width = SEQ_LEN + 1
    windows = {tuple(stream[i : i + width]) for i in range(0, len(stream) - width + 1, width)}
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
        assert tuple(np.append(inputs, targets[-1])) in windows


# -- Step-indexed training order ---------------------------------------------------------------


def _equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in ("inputs", "targets", "weights"))


def test_batch_is_a_pure_function_of_seed_and_step(config):
    pipe = LMDataPipeline(config, BATCH)
    n = pipe.num_train_examples
    steps_per_epoch = n // BATCH
    straight = [pipe.batch(step) for step in range(steps_per_epoch + 4)]  # Crosses an epoch.
    assert _equal(pipe.batch(7), straight[7])
    assert not _equal(straight[0], straight[1])
    fresh = LMDataPipeline(config, BATCH)  # A restarted job: new object, no history.
    for k in (0, 1, 7, steps_per_epoch - 1, steps_per_epoch, steps_per_epoch + 3):
        assert _equal(fresh.batch(k), straight[k]), k
    config.seed = 4
    assert not _equal(LMDataPipeline(config, BATCH).batch(0), straight[0])


def test_each_epoch_visits_every_window_once(config):
    pipe = LMDataPipeline(config, BATCH)
    n = pipe.num_train_examples
    steps = -(-2 * n // BATCH)
    order = np.concatenate([pipe.train_indices(step) for step in range(steps)])
    first, second = order[:n], order[n : 2 * n]
    np.testing.assert_array_equal(np.sort(first), np.arange(n))
    np.testing.assert_array_equal(np.sort(second), np.arange(n))
    assert not np.array_equal(first, second)  # A new order each epoch.


def test_epoch_permutation_is_a_permutation():
    perm = epoch_permutation(seed=0, epoch=0, n=1000)
    assert sorted(perm.tolist()) == list(range(1000))
    assert not np.array_equal(perm, np.arange(1000))
    assert not np.array_equal(perm, epoch_permutation(seed=0, epoch=1, n=1000))
    assert not np.array_equal(perm, epoch_permutation(seed=1, epoch=0, n=1000))


@pytest.mark.parametrize("process_count", [1, 2, 4, 8])
def test_process_slices_concatenate_to_the_global_batch(config, process_count):
    pipe = LMDataPipeline(config, BATCH)
    whole = pipe.batch(11)
    parts = [pipe.batch(11, i, process_count) for i in range(process_count)]
    for key in whole:
        assert all(p[key].shape[0] == BATCH // process_count for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_batch_size_not_divisible_by_process_count(config):
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        LMDataPipeline(config, BATCH).batch(0, 0, 3)


# -- Evaluation --------------------------------------------------------------------------------


def test_eval_batches_cover_the_split_once_in_order(config, data_dir):
    pipe = LMDataPipeline(config, BATCH)
    batches = list(pipe.eval_batches())
    assert len(batches) == pipe.num_eval_batches
    again = list(LMDataPipeline(config, BATCH).eval_batches(2))
    assert len(again) == min(2, len(batches))
    assert all(_equal(a, b) for a, b in zip(again, batches))
    # Reference: chunk the stream; every token but each chunk's first is a target, once.
    stream = _reference_stream(data_dir, "validation")
    chunks = [stream[i : i + SEQ_LEN + 1] for i in range(0, len(stream), SEQ_LEN + 1)]
    chunks = [c for c in chunks if len(c) >= 2]
    weights = np.concatenate([b["weights"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert weights.sum() == sum(len(c) - 1 for c in chunks)
    np.testing.assert_array_equal(targets[weights > 0], np.concatenate([c[1:] for c in chunks]))
    assert (targets[weights == 0] == 256).all()  # Padding is pad_id, with weight 0.
    # Process slices of eval batches concatenate to the global ones too.
    halves = [list(pipe.eval_batches(None, i, 2)) for i in range(2)]
    for whole, a, b in zip(batches, *halves):
        np.testing.assert_array_equal(
            np.concatenate([a["targets"], b["targets"]]), whole["targets"]
        )


# -- Statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "validation"])
def test_corpus_statistics_match_counter(config, data_dir, split):
    data = b"".join((STDLIB / rel).read_bytes() for rel in _paths(data_dir, split))
    counts = collections.Counter(data)
    entropy = -sum(c / len(data) * math.log2(c / len(data)) for c in counts.values())
    stats = corpus_statistics(config, split)
    assert stats.num_documents == len(_paths(data_dir, split))
    assert stats.num_bytes == len(data)
    assert stats.unigram_entropy_bits_per_byte == pytest.approx(entropy, rel=1e-12)


# -- Configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("tokenizer", "wordpiece"),
        ("seq_len", 0),
        ("seq_len", -5),
        ("dataset", "no_such_dataset_xyz"),
        ("max_files", -1),
        ("max_files", 1),
    ],
)
def test_bad_config_names_the_setting(config, field, value):
    config[field] = value
    with pytest.raises(ValueError, match=f"data.{field}"):
        LMDataPipeline(config, BATCH)


def test_sentencepiece_config_needs_a_model_path(config):
    config.tokenizer = "sentencepiece"
    with pytest.raises(ValueError, match="data.spm_model_path"):
        pipeline.validate_data_config(config)


def test_public_dataset_names_resolve_without_network(config):
    # Only resolves the builder classes; nothing is downloaded. c4 needs the registration
    # workaround in pipeline._tfds_builder_cls when TensorFlow is not installed.
    for name in ("lm1b", "c4/en"):
        config.dataset = name
        pipeline.validate_data_config(config)


def test_default_config_fields_can_be_overridden_from_strings():
    c = default_data_config()
    c.data_dir = "/some/dir"  # Placeholders keep their type: command-line overrides work.
    c.spm_model_path = "/some/spm.model"
    with pytest.raises(TypeError):
        c.data_dir = 3
    assert pipeline.resolve_data_dir(c) == "/some/dir"
