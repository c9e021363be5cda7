"""What an evaluation scores (whole documents, every token once), its bootstrap interval over
documents, and the near-duplicate pass of the corpus build, each against a hand reference."""

import numpy as np
import pytest

from switchmoe import bootstrap
from switchmoe.data import eval_set as es
from switchmoe.data import near_duplicates as nd
from switchmoe.data.pipeline import _make_batch

EOS, PAD = 258, 257


def _encode(text: bytes) -> np.ndarray:
    return np.frombuffer(text, np.uint8).astype(np.int64)


DOCS = [b"alpha beta gamma\n" * 3, b"x = 1\n", b"def f():\n    return 2\n" * 5, b"z"]


@pytest.mark.parametrize("window", [4, 9, 64])
def test_every_token_of_the_split_is_a_target_once_with_its_document(window):
    s = es.build_eval_set(
        "split",
        DOCS,
        _encode,
        eos_id=EOS,
        pad_id=PAD,
        window=window,
        overlap=True,
        token_bytes=np.r_[np.ones(256), np.zeros(3)],
    )
    # The reference: documents + EOS each, as (token, document) pairs in order.
    expected = [(int(t), d) for d, doc in enumerate(DOCS) for t in [*doc, EOS]]
    got = []
    for batch, units, unit_bytes in es.eval_set_batches(s, 3, range(3), _lm_examples, "k"):
        real = batch["weights"] > 0
        np.testing.assert_array_equal(units >= 0, real)  # one process: its rows are the batch
        got += list(zip(batch["targets"][real].tolist(), units[real].tolist()))
        np.testing.assert_array_equal(unit_bytes[real], batch["targets"][real] < 256)
    assert got == expected
    assert s.doc_tokens.tolist() == [len(d) + 1 for d in DOCS]
    assert s.text == b"".join(DOCS) and s.describe()["bytes"] == sum(map(len, DOCS))


def test_process_rows_see_the_whole_batch_units():
    s = es.build_eval_set("split", DOCS, _encode, eos_id=EOS, pad_id=PAD, window=8, overlap=True)
    whole = list(es.eval_set_batches(s, 4, range(4), _lm_examples, "k"))
    halves = [
        list(es.eval_set_batches(s, 4, range(2 * p, 2 * p + 2), _lm_examples, "k"))
        for p in range(2)
    ]
    for k, (batch, units, _) in enumerate(whole):
        np.testing.assert_array_equal(halves[0][k][1], units)  # every process: all rows' units
        joined = np.concatenate([halves[0][k][0]["targets"], halves[1][k][0]["targets"]])
        np.testing.assert_array_equal(joined, batch["targets"])


def test_span_corruption_windows_are_whole_and_disjoint():
    s = es.build_eval_set("split", DOCS, _encode, eos_id=EOS, pad_id=PAD, window=10, overlap=False)
    stream = np.concatenate([np.r_[_encode(d), EOS] for d in DOCS])
    assert len(s.windows) == len(stream) // 10
    np.testing.assert_array_equal(s.windows.reshape(-1), stream[: len(s.windows) * 10])
    owner = np.repeat(np.arange(len(DOCS)), [len(d) + 1 for d in DOCS])
    np.testing.assert_array_equal(s.units, owner[np.arange(len(s.windows)) * 10])


def test_the_sample_is_whole_documents_covering_the_fraction_in_a_seeded_order():
    sizes = np.array([5, 100, 7, 60, 33, 1, 80, 20, 45, 9])
    picked = es.sample_documents(sizes, 0.35, seed=0)
    assert len(set(picked.tolist())) == len(picked)
    assert sizes[picked].sum() >= 0.35 * sizes.sum() > sizes[picked[:-1]].sum()
    np.testing.assert_array_equal(picked, es.sample_documents(sizes, 0.35, seed=0))
    orders = {tuple(es.sample_documents(sizes, 1.0, seed=s)) for s in range(6)}
    assert len(orders) > 1 and all(sorted(o) == list(range(10)) for o in orders)
    assert sorted(es.sample_documents(sizes, 1.0, seed=3)) == list(range(10))


def test_bootstrap_interval_equals_a_numpy_resampling():
    loss = np.array([10.0, 3.5, 8.0, 0.5, 12.0, 4.0, 7.5])
    tokens = np.array([5.0, 2.0, 4.0, 1.0, 6.0, 2.0, 3.0])
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(bootstrap.RESAMPLES // bootstrap.CHUNK):
        draw = rng.integers(0, len(loss), size=(bootstrap.CHUNK, len(loss)))
        ratios += [loss[row].sum() / tokens[row].sum() for row in draw]
    expected = np.quantile(ratios, [0.025, 0.975])
    assert bootstrap.ratio_interval(loss, tokens) == pytest.approx(tuple(expected), rel=1e-12)
    low, high = bootstrap.ratio_interval(loss, tokens)
    assert low < loss.sum() / tokens.sum() < high
    with pytest.raises(ValueError, match="per-document sums"):
        bootstrap.ratio_interval(loss, tokens[:3])


def _module(seed: int, lines: int = 40) -> str:
    rng = np.random.default_rng(seed)
    return "".join(
        f"value_{seed}_{i} = compute({rng.integers(1000)}, '{i}')\n" for i in range(lines)
    )


def test_near_duplicate_pass_removes_a_planted_copy_and_keeps_a_dissimilar_file():
    original = _module(1)
    lines = original.splitlines(keepends=True)
    lines[5] = "changed = 1\n"
    lines[20] = "    also_changed()\n"
    near_copy = "".join(lines)
    train = {"pkg/original.py": original, "pkg/other.py": _module(2)}
    validation = {
        "pkg/near_copy.py": near_copy,
        "pkg/fresh.py": _module(3),
        "pkg/fresh_twin.py": _module(3).replace("'3'", "'4'", 1),
    }
    report = nd.deduplicate_validation(train, validation)
    removed = {r.name: r for r in report.removed}
    assert set(removed) == {"pkg/near_copy.py", "pkg/fresh_twin.py"}
    assert removed["pkg/near_copy.py"].match == "pkg/original.py"
    assert removed["pkg/fresh_twin.py"].match_split == "validation"  # a twin within the split
    assert report.kept == ("pkg/fresh.py",)
    # Jaccard by hand: 40 lines give 38 shingles, each changed line breaks the 3 that hold it.
    assert removed["pkg/near_copy.py"].jaccard == pytest.approx(32 / (38 + 6), abs=1e-6)
    assert report.before.max_jaccard > 0.7 and report.after.max_jaccard < 0.1
    assert report.after.shingle_overlap < report.before.shingle_overlap
    # Blank lines and indentation do not hide a copy.
    assert (
        nd.jaccard(
            nd.line_shingles(original), nd.line_shingles("\n  " + original.replace("\n", "\n\n"))
        )
        == 1.0
    )


def _lm_examples(windows, lengths, keys):
    del keys
    return _make_batch(windows, lengths)


def test_paired_difference_interval_resamples_both_models_on_one_draw():
    rng = np.random.default_rng(1)
    tokens = rng.integers(100, 1000, 12).astype(float)
    hard = rng.uniform(1.0, 3.0, 12)  # per-document difficulty, shared by both models
    loss_a, loss_b = hard * tokens, (hard - 0.05) * tokens
    draws = np.random.default_rng(0)
    diffs = []
    for _ in range(bootstrap.RESAMPLES // bootstrap.CHUNK):
        draw = draws.integers(0, 12, size=(bootstrap.CHUNK, 12))
        diffs += [
            loss_a[r].sum() / tokens[r].sum() - loss_b[r].sum() / tokens[r].sum() for r in draw
        ]
    expected = tuple(np.quantile(diffs, [0.025, 0.975]))
    got = bootstrap.paired_difference_interval(loss_a, tokens, loss_b, tokens)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[0] == pytest.approx(0.05) and got[1] == pytest.approx(0.05)  # the shift is exact
    own = bootstrap.ratio_interval(loss_a, tokens)
    assert own[1] - own[0] > 100 * (got[1] - got[0] + 1e-9)
