"""Smoke test of the sweep launcher and the report: 2 tiny trials, skip and resume, outputs."""

import csv
import json
import os
import subprocess
import sys

import jax
import pytest

from switchmoe import sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(module, *args, env):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_trial_names_come_from_overrides():
    assert sweeps.trial_name({"model.moe.num_experts": 8, "model.moe.random_routing": True}) == (
        "num_experts=8,random_routing=true"
    )
    assert sweeps.override_flags({"model.d_ff": 256}) == ["--config.model.d_ff=256"]


@pytest.mark.slow
def test_two_trial_sweep_and_report(tmp_path):
    env = {
        **os.environ,
        "SWITCHMOE_TEST_DATA_DIR": str(tmp_path / "tfds"),
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.path.join(ROOT, "tests"),
    }
    sweep_dir = str(tmp_path / "sweep")
    config = "tests/sweep_config.py"
    first = run(
        "experiments.sweep", f"--config={config}", f"--workdir={sweep_dir}", "--parallel=2", env=env
    )
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["train_capacity_factor=0.5", "train_capacity_factor=2.0"]
    assert all(sweeps.is_finished(os.path.join(sweep_dir, n)) for n in names)

    # A study longer than a session keeps its finished trials elsewhere (no checkpoints) and a
    # new workdir takes them back: finished there, an unfinished copy replaced, nothing twice.
    store, fresh = str(tmp_path / "kept"), str(tmp_path / "fresh")
    assert all(sweeps.keep_finished(os.path.join(sweep_dir, n), store) for n in names)
    assert not sweeps.keep_finished(str(tmp_path / "none"), store)
    assert sorted(os.listdir(os.path.join(store, names[0]))) == sorted(sweeps.FINISHED_FILES)
    os.makedirs(os.path.join(fresh, names[1], "checkpoints"))
    assert sweeps.restore_finished(store, fresh, names) == names
    assert all(sweeps.is_finished(os.path.join(fresh, n)) for n in names)
    assert not os.path.exists(os.path.join(fresh, names[1], "checkpoints"))
    assert sweeps.restore_finished(store, fresh, names) == []

    # A rerun of one trial skips it, finished, and runs nothing else; the plan stays as it was.
    plan = open(os.path.join(sweep_dir, sweeps.SWEEP_FILE)).read()
    again = run("experiments.sweep", f"--config={config}", f"--workdir={sweep_dir}",
                "--only=factor=0.5", env=env)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("[skip]") == 1 and f"[skip] {names[0]}: finished" in again.stdout
    assert "0 of 2 trials to run" in again.stdout, again.stdout
    assert open(os.path.join(sweep_dir, sweeps.SWEEP_FILE)).read() == plan
    # A selection that matches nothing is refused (before the plan is written: experiments/sweep.py).
    with pytest.raises(ValueError, match=r"--only='xyz' matches none of the trials"):
        sweeps.selected(names, "xyz")
    assert sweeps.selected(names, None) == names

    timed = run("experiments.step_time", f"--workdir={sweep_dir}", "--steps=2", env=env)
    assert timed.returncode == 0, timed.stdout + timed.stderr
    report = run("experiments.report", f"--workdir={sweep_dir}", env=env)
    assert report.returncode == 0, report.stdout + report.stderr
    out = os.path.join(sweep_dir, "report")
    step_times = json.load(open(os.path.join(out, "step_times.json")))
    assert step_times["machine"]["platform"] == jax.default_backend()
    assert sorted(step_times["trials"]) == names
    for name in (
        "results.csv",
        "results.md",
        "eval_curves.png",
        "capacity_train.png",
        "capacity_eval.csv",
        "capacity_eval.png",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert [r["trial"] for r in rows] == names
    assert float(rows[0]["train_dropped_pct"]) > float(rows[1]["train_dropped_pct"])
    for r in rows:  # the re-timed step is the one step_time.json holds
        t = step_times["trials"][r["trial"]]
        assert float(r["quiet_step_ms"]) == pytest.approx(t["median_ms"], rel=1e-3)
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"]
    cap = list(csv.DictReader(open(os.path.join(out, "capacity_eval.csv"))))
    assert len(cap) == 2 * 5  # each checkpoint at 4 eval factors and dropless
    dropless = [r for r in cap if r["eval_cf"] == "dropless"]
    assert all(float(r["eval_dropped_pct"]) == 0 for r in dropless)


def test_a_sweep_plan_changes_only_when_asked(tmp_path):
    sweep_dir = str(tmp_path)
    grid = [{"model.moe.num_experts": e} for e in (4, 8)]
    seeded = lambda seeds: [{**t, "seed": s} for t in grid for s in seeds]
    names = lambda trials: [sweeps.trial_name(t) for t in trials]
    assert sweeps.plan_trials(sweep_dir, "c.py", [], seeded([0])) == seeded([0])
    assert sweeps.plan_trials(sweep_dir, "c.py", [], seeded([0])) == seeded([0])  # a plain rerun
    with pytest.raises(ValueError, match=r"not in this command: \['num_experts=4,seed=0'"):
        sweeps.plan_trials(sweep_dir, "c.py", [], seeded([1]))
    with pytest.raises(ValueError, match="overrides; this command --config=c.py with"):
        sweeps.plan_trials(sweep_dir, "c.py", ["--config.seed=3"], seeded([0]), "extend")
    extended = sweeps.plan_trials(sweep_dir, "c.py", [], seeded([1]), "extend")
    assert names(extended) == names(seeded([0])) + names(seeded([1]))
    assert [t["name"] for t in sweeps.read_sweep_file(sweep_dir)["trials"]] == names(extended)
    assert sweeps.plan_trials(sweep_dir, "c.py", [], seeded([2]), "replace") == seeded([2])
    assert [t["name"] for t in sweeps.read_sweep_file(sweep_dir)["trials"]] == names(seeded([2]))
