"""switchmoe.analysis against hand-made references: source kinds, sweeps, capacity evaluation."""

import json
import math
import os
import shutil
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tiny import tiny_config  # noqa: E402

from switchmoe import analysis  # noqa: E402
from switchmoe.analysis import KIND, KINDS  # noqa: E402
from switchmoe.config import default_config  # noqa: E402
from switchmoe.data.pipeline import LMDataPipeline, load_texts  # noqa: E402
from switchmoe.models import count_params  # noqa: E402
from switchmoe.runs import restore_run  # noqa: E402
from switchmoe.training.trainer import train_and_evaluate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

quiet = lambda line: None

# One letter per kind for hand labels.
LETTER = {
    "i": "indent",
    "s": "space",
    "N": "newline",
    "k": "keyword",
    "n": "name",
    "9": "number",
    "b": "bracket",
    "o": "operator",
    "q": "string",
    "c": "comment",
    "x": "other",
    "!": "special",
}


def labels(pairs):
    """(source lines, label lines) -> (source, [kind names]); checks the hand labels' widths."""
    for src, lab in pairs:
        assert len(src) == len(lab), (src, lab)
    source = "".join(s for s, _ in pairs)
    return source, [LETTER[c] for _, lab in pairs for c in lab]


# Hand-labelled Python: keywords vs names, numbers, brackets, operators, strings with prefixes and
# triple quotes, a '#' inside a string, quotes inside a comment, indentation by spaces and by a tab,
# a continuation line inside brackets, a blank line, a docstring spanning lines.
def test_token_kind_matches_hand_labels():
    pairs = [
        ("import os\n", "kkkkkksnnN"),
        ("\n", "N"),
        ("def f(x, y=0x1F):\n", "kkksnbnosno9999boN"),
        ('    """Doc # not a comment.\n', "iiii" + "q" * 23 + "N"),
        ('    more."""\n', "q" * 12 + "N"),
        ('    if x is None:  # it\'s "fine"\n', "iiii" + "kksnskkskkkko" + "ss" + "c" * 13 + "N"),
        ("\treturn (x +\n", "ikkkkkksbnsoN"),
        (
            "            3.5, rb'\\n', f\"{y}\")\n",
            "i" * 12 + "999os" + "q" * 6 + "os" + "q" * 6 + "bN",
        ),
    ]
    source, expected = labels(pairs)
    got = analysis.kind_names(analysis.token_kind(source))
    assert got == expected
    # Bytes in, bytes out: the same kinds.
    assert analysis.kind_names(analysis.token_kind(source.encode())) == expected


def test_token_kind_counts_bytes_of_non_ascii_and_invalid_utf8():
    source = 'é = "ü€"  # ö\n'.encode() + b"x\xff\n"
    got = analysis.kind_names(analysis.token_kind(source))
    assert len(got) == len(source)
    # é (2 bytes) name, ' = ', string of quote + 2 + 3 bytes + quote, 2 spaces, comment '# ' + 2 bytes.
    assert got[:2] == ["name", "name"]
    assert got[5 : 5 + 7] == ["string"] * 7
    assert got[12:14] == ["space", "space"]
    assert got[14:18] == ["comment"] * 4
    assert got[18] == "newline"
    assert got[-3:] == ["name", "other", "newline"]


def test_token_kind_falls_back_where_tokenize_fails():
    # A file cut off inside a docstring (tokenize: EOF in multi-line string).
    source, expected = labels(
        [("x = 1\n", "nsos9N"), ('s = """abc\n', "nsos" + "q" * 6 + "N"), ("  def", "qqqqq")]
    )
    assert analysis.kind_names(analysis.token_kind(source)) == expected
    # An inconsistent dedent (tokenize: IndentationError) is still indentation, then code.
    source, expected = labels(
        [
            ("if x:\n", "kksnoN"),
            ("    y = 1\n", "iiiinsos9N"),
            ("  z = 'a' # c\n", "iinsosqqqscccN"),
        ]
    )
    assert analysis.kind_names(analysis.token_kind(source)) == expected


def test_token_kind_of_ids_classifies_each_document_alone():
    eos = 258
    doc1, doc2 = b"s = '''\n", b'"""x"""\nif 1: pass\n'  # doc1 is cut off inside a string
    ids = np.concatenate([np.frombuffer(doc1, np.uint8), [eos], np.frombuffer(doc2, np.uint8)])
    got = analysis.kind_names(analysis.token_kind_of_ids(ids.astype(np.int32)))
    assert got[len(doc1)] == "special"
    assert got[: len(doc1)] == analysis.kind_names(analysis.token_kind(doc1))
    assert got[len(doc1) + 1 :] == analysis.kind_names(analysis.token_kind(doc2))
    assert got[len(doc1) + 1 : len(doc1) + 8] == ["string"] * 7  # doc2 starts a new file


# ----------------------------------------------------------------------------------------------
# Tables from a hand-made capture.


def _capture(source: str, experts_of_kind: dict, E: int = 3) -> analysis.RoutingCapture:
    """A one-row capture of `source` where each kind goes to a fixed expert."""
    tokens = np.frombuffer(source.encode(), np.uint8).astype(np.int32)[None]
    kinds = analysis.token_kind(source)[None]
    expert = np.vectorize(lambda k: experts_of_kind.get(KINDS[k], E - 1))(kinds).astype(np.int32)
    probs = np.full(expert.shape + (E,), 0.1, np.float32)
    np.put_along_axis(probs, expert[..., None], 1 - 0.1 * (E - 1), axis=-1)
    kept = np.ones_like(expert, bool)
    kept[0, -1] = False
    return analysis.RoutingCapture(
        tokens, tokens, kinds, ("block_1",), expert[None], kept[None], probs[None]
    )


def test_expert_kind_table_finds_a_planted_specialist():
    source = "def f(x):\n    if x:\n        return x\n    return 0\n"
    capture = _capture(source, {"indent": 0, "keyword": 1})
    kinds = analysis.token_kind(source)
    n = len(source)
    share = {kind: np.mean(kinds == KIND[kind]) for kind in ("indent", "keyword")}
    rows = analysis.expert_kind_table(capture, top=3, min_count=1)
    assert [(r["layer"], r["expert"]) for r in rows] == [
        ("block_1", 0),
        ("block_1", 1),
        ("block_1", 2),
    ]
    by_expert = {r["expert"]: r for r in rows}
    assert by_expert[0]["kinds"] == {"indent": 1.0}
    assert by_expert[0]["top_kinds"] == [("indent", pytest.approx(1 / share["indent"]), 1.0)]
    assert by_expert[0]["top_bytes"][0][0] == "␣"
    assert by_expert[1]["tokens"] == int(np.sum(kinds == KIND["keyword"]))
    assert by_expert[1]["share"] == pytest.approx(share["keyword"])
    assert sum(r["tokens"] for r in rows) == n
    load = analysis.expert_load(capture)
    np.testing.assert_allclose(
        load[0], [share["indent"], share["keyword"], 1 - sum(share.values())]
    )
    assert analysis.expert_load(capture, kept_only=True)[0].sum() == pytest.approx(1.0)
    text = analysis.format_kind_table(rows, capture)
    assert text.startswith("block_1: H(expert)") and "indent ×" in text


def test_mutual_information_of_simple_tables():
    assert analysis.mutual_information(np.eye(4) * 5) == pytest.approx(2.0)  # expert = kind
    assert analysis.mutual_information(np.ones((3, 5))) == pytest.approx(0.0, abs=1e-12)
    assert analysis.entropy_bits(np.array([1, 1, 0, 2])) == pytest.approx(1.5)


def test_routing_plots_draw():
    capture = _capture("class A:\n    x = [1, 2]  # c\n" * 3, {"indent": 0, "bracket": 1})
    figures = [
        analysis.plot_expert_load(analysis.expert_load(capture), capture.layers),
        analysis.plot_kind_expert(capture, 0),
        analysis.plot_confidence(capture),
        analysis.plot_routed_text(capture, layer=0, row=0),
    ]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    html = analysis.routed_text_html(capture)
    # One span per byte, plus the window's last byte (a target only: not routed).
    assert html.count("<span") == capture.tokens.size + 1 and 'title="expert 0"' in html
    plt.close("all")


# ----------------------------------------------------------------------------------------------
# Sweeps written by hand.


def _write_trial(root, name, config, records=None):
    os.makedirs(root / name)
    (root / name / "config.json").write_text(json.dumps(config))
    if records is not None:
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _trial_config(num_experts, steps=100, factor=1.25):
    return {
        "num_train_steps": steps,
        "model": {"moe": {"num_experts": num_experts, "train_capacity_factor": factor}},
    }


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    train = lambda step, dropped: {
        "step": step,
        "train/loss": 3.0,
        "train/dropped_fraction": dropped,
    }
    _write_trial(
        root,
        "num_experts=8",
        _trial_config(8),
        [
            train(50, 0.2),
            {"step": 50, "eval/loss": 2.5},
            train(100, 0.1),
            {"step": 100, "eval/loss": 2.0},
        ],
    )
    _write_trial(
        root,
        "num_experts=16",
        _trial_config(16, factor=2.0),
        [train(100, 0.05), {"step": 100, "eval/loss": 1.8, "eval/dropped_fraction": 0.01}],
    )
    _write_trial(root, "num_experts=0", _trial_config(0), [{"step": 100, "eval/loss": 2.4}])
    # Unfinished: its last eval is before num_train_steps; its last record is train only.
    _write_trial(
        root,
        "num_experts=32",
        _trial_config(32, steps=200),
        [{"step": 100, "eval/loss": 1.9}, train(150, 0.3)],
    )
    _write_trial(root, "num_experts=2", _trial_config(2))  # started, nothing logged yet
    os.makedirs(root / "not_started")  # no config.json: skipped
    (root / "sweep.json").write_text("{}")  # the launcher's own file: not a trial
    return str(root)


def test_load_sweep_reads_every_started_trial(sweep_dir):
    trials = analysis.load_sweep(sweep_dir)
    assert [t["name"] for t in trials] == [
        "num_experts=0",
        "num_experts=2",
        "num_experts=8",
        "num_experts=16",
        "num_experts=32",
    ]
    by_name = {t["name"]: t for t in trials}
    assert {n: t["finished"] for n, t in by_name.items()} == {
        "num_experts=0": True,
        "num_experts=2": False,
        "num_experts=8": True,
        "num_experts=16": True,
        "num_experts=32": False,
    }
    assert by_name["num_experts=8"]["final_eval_loss"] == 2.0
    assert by_name["num_experts=32"]["final_eval_loss"] == 1.9  # latest eval of an unfinished one
    assert by_name["num_experts=32"]["last_step"] == 150
    assert by_name["num_experts=2"]["final_eval_loss"] is None
    assert by_name["num_experts=2"]["records"] == []
    assert isinstance(by_name["num_experts=16"]["config"], ml_collections.ConfigDict)
    assert by_name["num_experts=16"]["config"].model.moe.train_capacity_factor == 2.0
    assert len(by_name["num_experts=8"]["records"]) == 4
    assert by_name["num_experts=8"]["workdir"] == os.path.join(sweep_dir, "num_experts=8")
    assert [t["name"] for t in analysis.load_sweep(sweep_dir, finished_only=True)] == [
        "num_experts=0",
        "num_experts=8",
        "num_experts=16",
    ]
    assert analysis.config_value(by_name["num_experts=8"]["config"], "model.moe.num_experts") == 8
    assert analysis.config_value(by_name["num_experts=8"]["config"], "model.nope", "-") == "-"
    table = analysis.format_sweep_table(trials)
    assert "num_experts=32" in table and "1.9000" in table


def test_sweep_plots_show_the_final_values(sweep_dir):
    trials = analysis.load_sweep(sweep_dir)
    fig = analysis.plot_loss_vs_experts(trials)
    (line,) = fig.axes[0].lines
    np.testing.assert_allclose(line.get_xydata(), [[0, 2.4], [8, 2.0], [16, 1.8]])

    fig = analysis.plot_capacity_factor(trials)
    (loss,) = fig.axes[0].lines
    np.testing.assert_allclose(loss.get_xydata(), [[1.25, 2.0], [2.0, 1.8]])  # dense left out
    lines = {l.get_label(): l.get_xydata() for l in fig.axes[1].lines}
    np.testing.assert_allclose(lines["train"], [[1.25, 10.0], [2.0, 5.0]])
    np.testing.assert_allclose(lines["eval"], [[2.0, 1.0]])

    fig = analysis.plot_eval_curves(trials)
    curves = {l.get_label(): l.get_xydata() for l in fig.axes[0].lines}
    np.testing.assert_allclose(curves["8 experts"], [[50, 2.5], [100, 2.0]])
    assert "2 experts" not in curves
    plt.close("all")


def test_capacity_table_and_plot_from_rows():
    rows = [
        {
            "capacity_factor": 1.0,
            "eval_loss": 2.0,
            "bits_per_token": 2 / math.log(2),
            "dropped_fraction": 0.1,
        },
        {
            "capacity_factor": "dropless",
            "eval_loss": 1.9,
            "bits_per_token": 1.9 / math.log(2),
            "dropped_fraction": 0.0,
        },
    ]
    text = analysis.format_capacity_table(rows)
    assert "dropless" in text and "10.00%" in text
    fig = analysis.plot_capacity_sweep(rows)
    assert len(fig.axes) == 2
    plt.close("all")


# ----------------------------------------------------------------------------------------------
# A tiny trained run.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("analysis") / "run")
    result = train_and_evaluate(tiny_config(data_dir), workdir, log=quiet)
    return workdir, result


def test_evaluate_at_capacities_on_a_tiny_run(tiny_run):
    workdir, result = tiny_run
    rows = analysis.evaluate_at_capacities(workdir)
    assert [r["capacity_factor"] for r in rows] == [0.5, 1.0, 1.25, 2.0, "dropless"]
    dropped = [r["dropped_fraction"] for r in rows]
    assert all(a >= b for a, b in zip(dropped, dropped[1:])), dropped
    assert dropped[0] > 0  # capacity 4 of 32 tokens per group over 4 experts: something drops
    assert dropped[-1] == 0.0
    # The tiny config evaluates at 2.0: the same parameters give training's own final eval loss.
    assert rows[3]["eval_loss"] == pytest.approx(result["eval/loss"], rel=1e-6)
    assert rows[3]["dropped_fraction"] == pytest.approx(result["eval/dropped_fraction"], rel=1e-6)
    for r in rows:
        assert r["bits_per_token"] == pytest.approx(r["eval_loss"] / math.log(2))
    # The command prints the table and writes the same rows as JSON.
    out = _run_script("evaluate", f"--workdir={workdir}", "--capacity_factors=0.5,2",
                      "--dropless", f"--out={workdir}/capacity.json")  # fmt: skip
    assert "dropless" in out and "capacity factor" in out
    written = json.load(open(f"{workdir}/capacity.json"))["rows"]
    assert [r["capacity_factor"] for r in written] == [0.5, 2.0, "dropless"]
    for got, want in zip(written, [rows[0], rows[3], rows[4]]):
        assert got.keys() == want.keys()
        for key in ("eval_loss", "bits_per_token", "bits_per_byte", "dropped_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_evaluate_at_capacities_refuses_a_dense_model():
    config = default_config()
    config.model.moe.num_experts = 0
    with pytest.raises(ValueError, match="dense model has no capacity"):
        analysis.evaluate_at_capacities((config, None))


def test_capture_routing_on_a_tiny_run(tiny_run):
    workdir, result = tiny_run
    config, params = restore_run(workdir)
    capture = analysis.capture_routing((config, params), num_batches=2)
    B, L = config.batch_size, config.data.seq_len
    assert capture.layers == ("block_1",)
    assert capture.expert.shape == capture.kept.shape == (1, 2 * B, L)
    assert capture.probs.shape == (1, 2 * B, L, 4)

    # The tokens are the run's periodic eval batches (the eval sample's first two).
    pipeline = LMDataPipeline(config.data, config.batch_size)
    batches = [batch for batch, _, _ in pipeline.eval_set_batches("sample", 2)]
    np.testing.assert_array_equal(capture.tokens, np.concatenate([b["inputs"] for b in batches]))
    np.testing.assert_array_equal(capture.targets, np.concatenate([b["targets"] for b in batches]))
    # Kinds are those of the whole sample's token stream (its documents, each after an EOS),
    # read at each input position.
    eval_set = pipeline.eval_set("sample")
    as_ids = lambda text: np.r_[np.frombuffer(text, np.uint8).astype(np.int32), 258]
    stream = np.concatenate([[258]] + [as_ids(t) for t in _sample_texts(config, eval_set)])
    stream_kinds = analysis.token_kind_of_ids(stream)
    positions = np.arange(len(capture.tokens))[:, None] * L + np.arange(L)[None, :]
    real = positions < len(stream)
    np.testing.assert_array_equal(capture.kinds[real], stream_kinds[positions[real]])
    assert np.all((capture.kinds == KIND["special"]) == (capture.tokens >= 256))

    # Top-1: the first choice is the most probable expert.
    np.testing.assert_allclose(capture.probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(capture.expert, capture.probs.argmax(-1))
    # Load and dropped fraction agree with the statistics training logged for the same batches
    # (means over batches of each batch's kept-per-expert fractions, every token counted).
    per_batch = lambda a: a[0].reshape(2, B * L)
    expert, kept = per_batch(capture.expert), per_batch(capture.kept)
    load = np.mean([np.bincount(e[k], minlength=4) / k.sum() for e, k in zip(expert, kept)], axis=0)
    np.testing.assert_allclose(load, np.asarray(result["eval/expert_load"])[0], atol=1e-6)
    assert 1 - kept.mean() == pytest.approx(result["eval/dropped_fraction"], abs=1e-6)

    rows = analysis.expert_kind_table(capture)
    assert len(rows) == 4 and sum(r["tokens"] for r in rows) == int(capture.valid.sum())


def test_a_config_json_from_an_older_version_loads_with_the_new_fields_defaulted(tmp_path):
    # A trial written before model.moe.causal_routing existed: the report must still read it.
    old = default_config().to_dict()
    del old["model"]["moe"]["causal_routing"]
    del old["model"]["moe"]["noncausal_ablation"]  # newer still
    (tmp_path / "config.json").write_text(json.dumps(old))
    trial = analysis.load_trial(str(tmp_path))
    assert trial["config"].model.moe.causal_routing is False
    # k = 1: rank-major order is causal, so the old run is not flagged as an ablation...
    assert trial["config"].model.moe.noncausal_ablation is False
    # ...but an old top-2 run was trained with rank-major order, and is reloaded as one.
    old["model"]["moe"]["num_selected"] = 2
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert analysis.load_trial(str(tmp_path))["config"].model.moe.noncausal_ablation is True
    assert count_params(trial["config"])["total"] > 0


def _sample_texts(config, eval_set):
    texts = load_texts(config.data, config.data.eval_split)
    return [texts[i] for i in eval_set.documents]


def _run_script(module, *flags):
    """Runs `python -m experiments.<module>` from the repo root; its stdout."""
    out = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_generation_speed_script_on_a_tiny_run(tiny_run, tmp_path):
    # The script behind EXPERIMENTS.md's generation-speed numbers: cached and recomputed
    # decoding agree token for token, and its JSON records both times.
    workdir, _ = tiny_run
    _run_script("generation_speed", f"--workdir={workdir}", "--lengths=16", "--rows=2",
                "--repeats=1", f"--out={tmp_path}")  # fmt: skip
    with open(tmp_path / "generation_speed.json") as f:
        rows = json.load(f)["rows"]
    assert [r["T"] for r in rows] == [16] and rows[0]["tokens_identical"] is True
    assert rows[0]["cached_s"] > 0 and rows[0]["recompute_s"] > 0


def test_diagnose_script_on_a_tiny_sweep(tiny_run, tmp_path):
    # The script behind the diagnosis tables, on a one-trial sweep made of the tiny run.
    workdir, _ = tiny_run
    trial = tmp_path / "sweep" / "num_experts=4"
    trial.mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(workdir, name), trial / name)
    _run_script("diagnose", f"--workdir={tmp_path / 'sweep'}")
    report = (tmp_path / "sweep" / "report" / "diagnosis_summary.md").read_text()
    assert "num_experts=4" in report or "4 experts" in report
    assert (tmp_path / "sweep" / "report" / "diagnosis.csv").exists()


def test_a_relative_default_path_is_found_from_the_repository(tmp_path, monkeypatch):
    # A notebook kernel starts in notebooks/ (here: anywhere else): "runs/demo" means the
    # repository's; a path that exists where the kernel is, or an absolute one, stays as given.
    monkeypatch.chdir(tmp_path)
    assert analysis.in_repository("runs/demo") == os.path.join(ROOT, "runs", "demo")
    (tmp_path / "mine").mkdir()
    assert analysis.in_repository("mine") == "mine"
    assert analysis.in_repository("/abs/run") == "/abs/run"


def test_a_short_seeded_sweep_reports_means_markers_and_empty_panels_with_reasons(tmp_path):
    """Two seeds per setting, one evaluation each, no step times: the loss-vs-experts points are
    each setting's mean with its sample std (not the seeds joined one by one), a one-point eval
    curve draws its marker, the step-time and speed-up panels say why they are empty, and the
    dense rows show no routing settings."""
    from experiments import report

    root = tmp_path / "short"
    finals = {(0, 0): 2.4, (0, 1): 2.6, (8, 0): 2.7, (8, 1): 2.8}  # MoE never reaches dense
    for (experts, seed), loss in finals.items():
        _write_trial(root, f"num_experts={experts},seed={seed}", _trial_config(experts),
                     [{"step": 100, "train/loss": 3.0}, {"step": 100, "eval/loss": loss}])  # fmt: skip
    trials = analysis.load_sweep(str(root))
    fig = analysis.plot_loss_vs_experts(trials)
    ax = fig.axes[0]
    data = [l for l in ax.lines if l.get_marker() == "o"]
    assert len(data) == 1
    np.testing.assert_allclose(data[0].get_xydata(), [[0, 2.5], [8, 2.75]])
    (bars,) = ax.collections  # the error bars: mean ± sample std of the two seeds
    segments = bars.get_segments()
    np.testing.assert_allclose([s[1][1] - s[0][1] for s in segments],
                               [2 * np.std([2.4, 2.6], ddof=1), 2 * np.std([2.7, 2.8], ddof=1)])  # fmt: skip
    step_fig = analysis.plot_final_vs(trials, "model.moe.num_experts", y=report.step_time_ms,
                                      empty_note=report.NO_STEP_TIMES)  # fmt: skip
    assert [t.get_text() for t in step_fig.axes[0].texts] == [report.NO_STEP_TIMES]

    rows = [report.row(t) for t in trials]
    dense = [r for r in rows if r["experts"] == 0]
    assert dense and all(r["k"] is None and r["train_cf"] is None for r in dense)
    assert all(r["k"] is not None for r in rows if r["experts"])
    table = analysis.format_sweep_table(trials, ("model.moe.num_experts",
                                                 "model.moe.train_capacity_factor"))  # fmt: skip
    dense_line = next(l for l in table.splitlines() if l.startswith("num_experts=0,seed=0"))
    assert dense_line.split()[1:3] == ["0", "-"]

    _, figures = report.seed_report(trials, rows, str(tmp_path))
    notes = [t.get_text() for a in figures["by_experts_seeds.png"].axes for t in a.texts]
    assert report.NO_SPEEDUP in notes and report.NO_STEP_TIMES in notes
    curves = figures["eval_curves_seeds.png"].axes[0].lines
    assert curves and all(l.get_marker() == "o" and len(l.get_xydata()) == 1 for l in curves)
    plt.close("all")


def test_upcycle_study_table_from_its_json(tmp_path):
    # The table behind EXPERIMENTS.md's upcycling rows, rewritten from a hand-made
    # upcycling.json: mean ± sample std per arm, each seed, and the paired difference from the
    # dense model continued on the same seed (NumPy on the same numbers).
    losses = {
        "dense_continued": [1.40, 1.41],
        "upcycled": [1.38, 1.395],
        "moe_scratch": [1.6, 1.61],
    }
    run = lambda loss: {"step": 300, "eval/loss": loss, "eval/bits_per_byte": loss / np.log(2)}
    results = {
        "dense": {"eval/loss": 1.46, "eval/bits_per_byte": 2.1},
        "arms": {arm: [run(v) for v in values] for arm, values in losses.items()},
        "seeds": ["3", "4"],
    }
    (tmp_path / "upcycling.json").write_text(json.dumps(results))
    _run_script("upcycle_study", f"--workdir={tmp_path}", "--report_only")
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")
        for line in (tmp_path / "upcycling.md").read_text().splitlines()
    }
    assert rows["run"][4:6] == ["seed 3", "seed 4"]
    for arm, values in losses.items():
        cells = rows[arm]
        assert cells[2] == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
        assert cells[4:6] == [f"{v:.4f}" for v in values]
        paired = np.subtract(values, losses["dense_continued"])
        want = "–" if arm == "dense_continued" else ", ".join(f"{d:+.4f}" for d in paired)
        assert cells[6] == want
