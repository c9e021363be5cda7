"""data.pipeline='stream': grain reads, tokenizes and packs documents while training.

References: each slot's documents (grain's documented per-epoch index shuffle, or the stored
order) tokenized and concatenated with NumPy, then cut with a reshape; restarts compare with the
uninterrupted stream; process shares with the one-process batch; memory with the packer.
"""

import hashlib
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
import synthetic_text
import tensorflow_datasets as tfds
from tiny import tiny_config, train_straight_and_interrupted

from switchmoe.data import pipeline as data_pipeline
from switchmoe.data import span_corruption as sc
from switchmoe.data import streaming
from switchmoe.data.tokenizers import ByteTokenizer
from switchmoe.models import resolve
from switchmoe.runs import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    synthetic_text.prepare(d, 2)
    return d


def stream_config(data_dir, **overrides):
    """The tiny config on the generated dataset (documents of ~4.6 kB), streamed."""
    return tiny_config(
        data_dir,
        **{
            "data.dataset": "synthetic_text/mb2",
            "data.max_files": 0,
            "data.pipeline": "stream",
            **overrides,
        },
    )


def reference_windows(config, split, num_windows, width, *, shuffle):
    """[B, num_windows, width] tokens, [B, num_windows] lengths and [B] tokens read: slot i
    concatenates documents i, i + B, ... (EOS after each) and cuts the result into consecutive
    windows; a last window of fewer than 2 tokens (no prediction) is dropped."""
    source = tfds.builder(
        config.data.dataset, data_dir=config.data.data_dir, file_format="array_record"
    ).as_data_source(split)
    count = min(len(source), config.data.max_files or len(source))  # the first max_files
    order = grain.MapDataset.source(range(count))
    if shuffle:  # grain's per-epoch reseeded index shuffle, seeded from data.seed
        seed = hashlib.blake2b(f"{config.data.seed}/documents".encode(), digest_size=4).digest()
        order = order.shuffle(seed=int.from_bytes(seed, "little")).repeat()
    tok, B = ByteTokenizer(), config.batch_size
    windows = np.full([B, num_windows, width], tok.pad_id, np.int64)
    lengths = np.zeros([B, num_windows], np.int64)
    totals = np.zeros([B], np.int64)
    for slot in range(B):
        tokens, q = [], slot
        while len(tokens) < num_windows * width and (shuffle or q < count):
            tokens += list(tok.encode(source[order[q]]["text"])) + [tok.eos_id]
            q += B
        totals[slot] = len(tokens)
        for k in range(num_windows):
            piece = tokens[k * width : (k + 1) * width]
            piece = piece if len(piece) >= 2 else []
            windows[slot, k, : len(piece)] = piece
            lengths[slot, k] = len(piece)
    return windows, lengths, totals


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_rows_are_each_slots_documents_packed_in_order(data_dir):
    # 8 documents in all and ~4.6 kB each: every slot crosses documents and epochs.
    config = resolve(stream_config(data_dir, **{"data.max_files": 8, "data.seq_len": 511}))
    pipe = sc.make_pipeline(config)
    assert isinstance(pipe, streaming.StreamingPipeline)
    stream = pipe.train_batches()
    batches = take(stream, 30)
    windows, _, _ = reference_windows(config, "train", 30, 512, shuffle=True)
    for t, batch in enumerate(batches):
        np.testing.assert_array_equal(batch["inputs"], windows[:, t, :-1])
        np.testing.assert_array_equal(batch["targets"], windows[:, t, 1:])
        assert (batch["weights"] == 1).all()
    # The reference's order is a fresh permutation in each epoch.
    order = grain.MapDataset.source(range(8)).shuffle(seed=3).repeat()
    epochs = [sorted(order[e * 8 + i] for i in range(8)) for e in range(3)]
    assert epochs == [list(range(8))] * 3
    assert [order[i] for i in range(8)] != [order[8 + i] for i in range(8)]


@pytest.mark.parametrize("workers", [0, 2])
def test_restarts_at_random_steps_give_the_uninterrupted_batches(data_dir, workers):
    config = resolve(stream_config(data_dir))
    pipe = sc.make_pipeline(config)
    straight = take(pipe.train_batches(), 24)
    config.data.num_workers = workers
    restarted, stream = [], sc.make_pipeline(config).train_batches()
    # Each start of worker processes costs seconds: fewer restarts with workers.
    stops = np.random.default_rng(workers).choice(np.arange(1, 24), 1 if workers else 4, False)
    for stop in sorted(stops):
        restarted += take(stream, stop - len(restarted))
        state = json.loads(json.dumps(stream.get_state()))  # what a checkpoint holds
        stream.close()
        stream = sc.make_pipeline(config).train_batches(stop, state)  # a new job
    restarted += take(stream, 24 - len(restarted))
    stream.close()
    assert_batches_equal(restarted, straight)


def test_processes_see_disjoint_rows_whose_union_is_the_one_process_batch(data_dir):
    config = resolve(stream_config(data_dir))
    pipe = sc.make_pipeline(config)
    whole = take(pipe.train_batches(), 6)
    for count in (2, 4):
        shares = [take(pipe.train_batches(0, None, p, count), 6) for p in range(count)]
        for t in range(6):
            for name in whole[t]:
                joined = np.concatenate([share[t][name] for share in shares])
                np.testing.assert_array_equal(joined, whole[t][name])
    # Disjoint: no two slots ever read the same document position in an epoch.
    rows = whole[0]["inputs"]
    assert len({row.tobytes() for row in rows}) == len(rows)


def test_a_full_eval_pass_scores_each_slots_documents_once(data_dir):
    config = resolve(stream_config(data_dir, batch_size=4))
    pipe = sc.make_pipeline(config)
    batches = list(pipe.eval_batches())
    source = tfds.builder(config.data.dataset, data_dir=data_dir).as_data_source("validation")
    width = config.data.seq_len + 1
    n = len(batches)
    windows, lengths, totals = reference_windows(config, "validation", n + 1, width, shuffle=False)
    assert lengths[:, n].sum() == 0  # the pass ends when the longest slot does
    for t, batch in enumerate(batches):
        # Each window's tokens after its first are targets, real where the window is.
        real = (np.arange(1, width)[None, :] < lengths[:, t, None]).astype(np.float32)
        np.testing.assert_array_equal(batch["weights"], real)
        np.testing.assert_array_equal(
            np.where(real > 0, batch["targets"], 0), np.where(real > 0, windows[:, t, 1:], 0)
        )
    # Every token of the split is in exactly one window (one EOS per document), but for a
    # slot's last token when it would be a window of its own.
    assert totals.sum() == sum(len(source[i]["text"]) + 1 for i in range(len(source)))
    assert lengths.sum() == sum(t - (t % width == 1) for t in totals)
    # The first `num` batches are the same ones on every call.
    assert_batches_equal(list(pipe.eval_batches(2)), batches[:2])
    assert_batches_equal(list(pipe.eval_batches(2)), batches[:2])


def test_span_corruption_runs_on_the_stream(data_dir):
    config = resolve(
        stream_config(data_dir, **{"model.arch": "encoder_decoder", "data.num_sentinels": 16})
    )
    pipe = sc.make_pipeline(config)
    assert isinstance(pipe.objective, sc.SpanCorruptionPipeline)
    batches = take(pipe.train_batches(), 3)
    raw = pipe.objective.lengths.raw
    windows, _, _ = reference_windows(config, "train", 3, raw, shuffle=True)
    for t, batch in enumerate(batches):
        for row in range(config.batch_size):
            filled = sc.fill_in_sentinels(
                batch["inputs"][row], batch["targets"][row], pipe.objective.sentinels, 258
            )
            assert filled == windows[row, t].tolist()


def test_training_on_the_stream_resumes_exactly_after_a_preemption(data_dir, tmp_path):
    config = stream_config(
        data_dir, num_train_steps=8, log_every=2, eval_every=4, checkpoint_every=4,
        final_eval="sample",  # the whole split's evaluation is tested elsewhere
    )  # fmt: skip
    # Preempted (SIGTERM) after step 3, between checkpoints and between logged rows.
    _, interrupted = train_straight_and_interrupted(config, tmp_path, signal_after=2)
    saved = os.path.join(interrupted, checkpoints.CHECKPOINT_DIR, "8", "data")
    state = json.load(open(os.path.join(saved, "process_0-of-1.json")))
    assert state["batches"] == 8 and len(state["cursors"]) == config.batch_size
    assert checkpoints.Checkpointer(interrupted).restore_data_state(8) == state


def test_a_stream_is_not_positioned_by_a_step_or_by_another_streams_state(data_dir):
    config = resolve(stream_config(data_dir))
    pipe = sc.make_pipeline(config)
    with pytest.raises(
        ValueError, match=r"checkpoint of step 5 has none .*resume with data.pipeline='packed'"
    ):
        pipe.train_batches(5, None)
    stream = pipe.train_batches()
    take(stream, 2)
    state = stream.get_state()
    other = resolve(stream_config(data_dir, **{"data.seed": 1}))
    with pytest.raises(ValueError, match=r"another stream: seed 0 \(now 1\)"):
        sc.make_pipeline(other).train_batches(2, state)
    half = pipe.train_batches(0, None, 0, 2)  # process 0 of 2 saves rows 0-3 only
    take(half, 2)
    with pytest.raises(ValueError, match=r"no cursor for rows \[4, 5, 6, 7\].*process count"):
        pipe.train_batches(2, half.get_state())


@pytest.mark.parametrize("dataset", ["lm1b", "c4/en:3.1.0"])
def test_public_datasets_stream_up_to_their_download(dataset, tmp_path, monkeypatch):
    config = resolve(tiny_config(str(tmp_path), **{"data.dataset": dataset, "data.max_files": 0,
                                                  "data.pipeline": "stream"}))  # fmt: skip
    pipe = sc.make_pipeline(config)
    reached = []

    def no_network(manager, *args, **kwargs):
        reached.append(args)
        raise ConnectionError("no network in tests")

    # Everything TFDS does before fetching a file runs (its checksums, its download manager,
    # the builder's own split code); the fetch itself is refused.
    for name in ("download", "download_and_extract", "download_checksums"):
        monkeypatch.setattr(tfds.download.DownloadManager, name, no_network)
    try:
        import apache_beam  # noqa: F401, PLC0415
    except ImportError:
        if dataset.startswith("c4"):  # c4 is prepared with Beam: without it, a clear message
            with pytest.raises(ValueError, match=r"prepares it with Apache Beam.*\[beam\]"):
                next(pipe.train_batches())
            return
    with pytest.raises(ConnectionError):
        next(pipe.train_batches())
    assert reached


def test_streaming_memory_stays_bounded_where_packing_does_not(tmp_path):
    data_dir = str(tmp_path / "tfds")
    synthetic_text.prepare(data_dir, 24)
    out = {}
    for mode in ("packed", "stream"):
        command = [
            sys.executable, "-m", "experiments.data_memory", "--config=configs/demo.py",
            f"--pipeline={mode}", "--register=tests.synthetic_text", "--batches=100",
            "--config.data.dataset=synthetic_text/mb24", f"--config.data.data_dir={data_dir}",
            f"--out={tmp_path / mode}.json",
        ]  # fmt: skip
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        out[mode] = json.load(open(f"{tmp_path / mode}.json"))
    # The packer holds the 24 MB split as documents, an int32 stream and windows (~230 MiB).
    assert out["packed"]["growth_mib"] > 100, out
    assert out["stream"]["growth_mib"] < 32
    assert out["stream"]["tokens_read"] == out["packed"]["tokens_read"]


def test_a_balanced_hash_table_from_the_stream_balances_the_corpus(data_dir):
    from switchmoe.moe.routers.hash import table_for_config  # noqa: PLC0415

    config = resolve(stream_config(data_dir, **{"model.moe.router": "hash",
                                                "model.moe.hash_kind": "balanced"}))  # fmt: skip
    table = table_for_config(config)  # from a sample of the stream (nothing packed)
    config.data.pipeline = "packed"
    windows = data_pipeline.LMDataPipeline(config.data, config.batch_size).packed("train").windows
    counts = np.bincount(windows.ravel().astype(np.int64), minlength=len(table))[: len(table)]
    share = np.bincount(table, weights=counts, minlength=4) / counts.sum()
    np.testing.assert_allclose(share, 0.25, atol=0.02)
