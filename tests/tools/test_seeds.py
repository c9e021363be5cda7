"""Seeds in sweeps: trial names, mean ± std over seeds, the time-to-quality speed-up and
bits per byte, each against a hand computation or NumPy."""

import math

import numpy as np
import pytest

from switchmoe import sweeps
from switchmoe.analysis import seeds
from switchmoe.runs import metrics


def test_seed_trials_are_named_once_and_grouped_by_setting():
    trials = seeds.with_seeds([{"model.moe.num_experts": 8}, {"model.moe.num_experts": 0}], [0, 1])
    names = [sweeps.trial_name(t) for t in trials]
    assert names == [
        "num_experts=8,seed=0",
        "num_experts=8,seed=1",
        "num_experts=0,seed=0",
        "num_experts=0,seed=1",
    ]
    assert all(t["seed"] == t["data.seed"] for t in trials)
    assert [seeds.setting_name(n) for n in names] == ["num_experts=8"] * 2 + ["num_experts=0"] * 2
    assert seeds.setting_name("seed=3") == "base"
    assert seeds.setting_name("seed=1,lr=0.1") == "lr=0.1"
    assert seeds.with_seeds([{"a": 1}], []) == [{"a": 1}]


def test_aggregate_equals_numpy_mean_and_sample_std():
    rows = [
        {"trial": "num_experts=8,seed=0", "eval_loss": 1.40, "load_cv": 0.2},
        {"trial": "num_experts=8,seed=1", "eval_loss": 1.43, "load_cv": None},
        {"trial": "num_experts=8,seed=2", "eval_loss": 1.39, "load_cv": 0.4},
        {"trial": "num_experts=0,seed=0", "eval_loss": 1.47, "load_cv": None},
    ]
    out = {r["setting"]: r for r in seeds.aggregate(rows, ["eval_loss", "load_cv"])}
    moe, dense = out["num_experts=8"], out["num_experts=0"]
    assert moe["seeds"] == 3
    assert moe["eval_loss_mean"] == pytest.approx(np.mean([1.40, 1.43, 1.39]))
    assert moe["eval_loss_std"] == pytest.approx(np.std([1.40, 1.43, 1.39], ddof=1))
    assert moe["load_cv_mean"] == pytest.approx(0.3)  # missing values are left out
    assert moe["load_cv_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert dense["eval_loss_mean"] == 1.47 and dense["eval_loss_std"] is None
    assert dense["load_cv_mean"] is None
    assert list(out) == ["num_experts=8", "num_experts=0"]  # order of first appearance


def test_capacity_matrix_is_numpys_mean_and_std_per_cell():
    rows = [
        {"k": 1, "train_cf": 1.0, "eval_cf": 1.0, "eval_loss": 1.50},
        {"k": 1, "train_cf": 1.0, "eval_cf": 2.0, "eval_loss": 1.45},
        {"k": 1, "train_cf": 1.0, "eval_cf": "dropless", "eval_loss": 1.44},
        {"k": 1, "train_cf": 1.0, "eval_cf": 1.0, "eval_loss": 1.52},  # the second seed
        {"k": 1, "train_cf": 1.0, "eval_cf": 2.0, "eval_loss": 1.41},
        {"k": 1, "train_cf": 1.0, "eval_cf": "dropless", "eval_loss": 1.40},
        {"k": 2, "train_cf": 0.5, "eval_cf": 1.0, "eval_loss": 1.60},  # one seed only
    ]
    top1, top2 = seeds.capacity_matrix(rows)
    mean_std = lambda v: f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}"
    assert top1 == {
        "k": 1,
        "train_cf": 1.0,
        "1.0": mean_std([1.50, 1.52]),
        "2.0": mean_std([1.45, 1.41]),
        "dropless": mean_std([1.44, 1.40]),
    }
    assert top2 == {"k": 2, "train_cf": 0.5, "1.0": "1.6000", "2.0": "-", "dropless": "-"}


def test_speedup_on_synthetic_curves():
    steps = [100, 200, 300, 400]
    dense = [3.0, 2.5, 2.2, 2.0]  # reaches its final loss 2.0 at step 400
    fast = [2.6, 2.2, 1.9, 1.7]  # crosses 2.0 between 200 (2.2) and 300 (1.9): 200 + 100·2/3
    assert seeds.speedup(steps, dense, steps, fast) == pytest.approx(400 / (200 + 200 / 3))
    assert seeds.speedup(steps, dense, steps, dense) == pytest.approx(1.0)
    never = [3.1, 2.7, 2.4, 2.1]
    assert seeds.speedup(steps, dense, steps, never) is None
    first = [1.9, 1.8, 1.7, 1.6]  # already better at its first eval
    assert seeds.speedup(steps, dense, steps, first) == pytest.approx(4.0)
    # A baseline that dipped below its final loss earlier: its own first crossing counts.
    bumpy = [3.0, 1.9, 2.1, 2.0]  # reaches 2.0 between 100 and 200: 100 + 100·1.0/1.1
    assert seeds.speedup(steps, bumpy, steps, fast) == pytest.approx(
        (100 + 100 / 1.1) / (200 + 200 / 3)
    )


def test_seed_speedups_use_the_baselines_mean_curve():
    steps = np.array([100, 200])
    base = [(steps, np.array([3.0, 2.2])), (steps, np.array([3.0, 1.8]))]  # mean: 3.0, 2.0
    moe = [(steps, np.array([2.0, 1.5])), (steps, np.array([2.5, 1.5]))]
    # Targets 2.0 at step 200 for the mean baseline: seed 0 reaches it at 100, seed 1 at 150.
    assert seeds.seed_speedups(base, moe) == pytest.approx([2.0, 200 / 150])
    s, mean, std = seeds.mean_curve(base)
    assert mean.tolist() == pytest.approx([3.0, 2.0])
    assert std.tolist() == pytest.approx([0.0, np.std([2.2, 1.8], ddof=1)])


def test_bits_per_byte_by_hand():
    # 10 tokens at 2.0 nats each, standing for 25 bytes: 20 nats / 25 bytes = 0.8 nats/byte.
    assert metrics.bits_per_byte(2.0, 10, 25) == pytest.approx(0.8 / math.log(2))
    assert metrics.bits_per_byte(2.0, 10, 25) == pytest.approx(1.1541560327111708)
    with pytest.raises(ValueError, match="num_bytes"):
        metrics.bits_per_byte(2.0, 10, 0)


def test_the_report_aggregates_hand_made_trials(tmp_path):
    import csv

    from experiments import report

    curve = lambda *losses: [{"step": 100 * (i + 1), "eval/loss": v} for i, v in enumerate(losses)]
    dense = {0: curve(3.0, 2.4, 2.0), 1: curve(3.0, 2.6, 2.2)}  # mean curve 3.0, 2.5, 2.1
    moe = {0: curve(2.5, 2.1, 1.9), 1: curve(2.9, 2.3, 2.0), 2: curve(3.0, 2.8, 2.5)}
    trials, rows = [], []
    for experts, curves in ((0, dense), (8, moe)):
        for seed, records in curves.items():
            name = f"num_experts={experts},seed={seed}"
            trials.append({"name": name, "finished": True, "records": records})
            rows.append({"trial": name, "eval_loss": records[-1]["eval/loss"]})
    text, figures = report.seed_report(trials, rows, str(tmp_path))
    table = {r["setting"]: r for r in csv.DictReader(open(tmp_path / "results_by_setting.csv"))}
    finals = [1.9, 2.0, 2.5]
    assert float(table["num_experts=8"]["eval_loss_mean"]) == pytest.approx(np.mean(finals))
    assert float(table["num_experts=8"]["eval_loss_std"]) == pytest.approx(np.std(finals, ddof=1))
    assert float(table["num_experts=0"]["eval_loss_std"]) == pytest.approx(
        np.std([2.0, 2.2], ddof=1)
    )
    # Target 2.1, which the dense mean curve reaches at step 300. Seed 0 crosses it at 200
    # (2.1 exactly), seed 1 between 200 (2.3) and 300 (2.0): 200 + 100·0.2/0.3; seed 2 never.
    ups = [300 / 200, 300 / (200 + 200 / 3)]
    assert float(table["num_experts=8"]["speedup_mean"]) == pytest.approx(np.mean(ups))
    assert float(table["num_experts=8"]["speedup_std"]) == pytest.approx(np.std(ups, ddof=1))
    assert table["num_experts=8"]["speedup_reached"] == "2/3"
    assert "num_experts=8 | 3 | 2.1333 ± 0.3215" in text
    assert {"by_experts_seeds.png", "eval_curves_seeds.png"} <= set(figures)


def test_trial_labels_are_short_and_human():
    from switchmoe.analysis import trial_label

    assert trial_label("num_experts=0") == "dense"
    assert trial_label("num_experts=64,seed=2") == "64 experts, seed 2"
    name = "num_selected=2,gate_norm=normalized,expert_d_ff=256,train_capacity_factor=0.5"
    assert trial_label(name) == "top-2, cf 0.5"
    assert (
        trial_label("num_experts=8,router=hash,hash_kind=balanced") == "8 experts, hash (balanced)"
    )
    assert trial_label("num_experts=8,gate_norm=normalized") == "8 experts, unit gate"
    assert trial_label("base") == "base" and trial_label("foo=1") == "foo=1"
    assert trial_label("freeze=moe,learning_rate=0.0001") == "MoE frozen, lr 0.0001"
    assert trial_label("freeze=re_.") == "nothing updated"


def test_balance_figure_has_a_row_per_expert_count_and_a_colour_per_balancer():
    import ml_collections

    from experiments import report

    def trial(experts, seed, **moe):
        cfg = ml_collections.ConfigDict(
            {"model": {"moe": {"num_experts": experts, "load_balancing_weight": 0.01, **moe}}}
        )
        records = [
            {
                "step": s,
                "train/expert_load": [0.5, 0.5],
                "train/dead_expert_fraction": 0.0,
                "train/dropped_fraction": 0.1 * seed,
            }  # fmt: skip
            for s in (10, 20)
        ]
        return {"name": f"e={experts},{moe},seed={seed}", "finished": True, "config": cfg,
                "records": records}  # fmt: skip

    none = {"load_balancing_weight": 0.0}
    deepseek = {"load_balancing_weight": 0.0, "bias_update_speed": 1e-3,
                "sequence_balance_weight": 1e-4}  # fmt: skip
    assert report.balancer_label(ml_collections.ConfigDict(none)) == "none"
    assert report.balancer_label(ml_collections.ConfigDict(deepseek)) == (
        "bias γ 0.001 + sequence-wise 0.0001"
    )
    trials = [trial(e, s, **m) for e in (16, 64) for m in ({}, none, deepseek) for s in (0, 1)]
    fig = report.balance_figure(trials[:-1])  # 64 experts' DeepSeek run has one seed only
    axes = fig.axes
    assert len(axes) == 6 and axes[0].get_title(loc="left") == "16 experts"
    assert axes[3].get_title(loc="left") == "64 experts"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["none", "Switch α 0.01", "bias γ 0.001 + sequence-wise 0.0001"]
    # The same balancer has the same colour in both rows, and different ones differ.
    colours = [{ln.get_label(): ln.get_color() for ln in ax.lines} for ax in (axes[2], axes[5])]
    assert colours[0] == colours[1] and len(set(colours[0].values())) == 3
    # Dropped % of seeds 0 and 1 (0 and 10): mean 5 in every row with both seeds.
    assert np.allclose(axes[2].lines[0].get_ydata(), 5.0)
