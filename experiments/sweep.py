"""Run every trial of a config's get_sweep(), each in its own sub-workdir; rerun to resume.

  python -m experiments.sweep --config=configs/studies.py:expert_count \
      --workdir=runs/sweeps/expert_count [--seeds=0,1,2] [--parallel=2] [--only=REGEX]
      [--plan=keep|extend|replace] [--finished=DIR] [--config.num_train_steps=100 ...]

Finished trials are skipped, unfinished ones resume from their latest checkpoint. Each trial runs
as `python -m experiments.train` in a subprocess (--parallel of them at a time), so a crash in one
trial leaves the others running; its output goes to <trial>/train.log. The first run writes the
plan (sweep.json: config, overrides, trials); a rerun whose trials differ from it (other --seeds,
another grid) is refused with the difference named unless --plan says to extend or replace it,
and an --only that matches no trial is refused. A study longer than a session keeps its finished
trials (without checkpoints) in --finished=DIR as they finish and takes them back from there.
"""

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from absl import app, flags

from switchmoe import cli
from switchmoe import sweeps
from switchmoe.analysis import seeds

_CONFIG = flags.DEFINE_string("config", None, "Config file with get_sweep() (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one sub-directory per trial).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials run at the same time.")
_SEEDS = flags.DEFINE_list(
    "seeds",
    [],
    "Run every trial once per seed (sets seed and data.seed: initialisation and data order); "
    "trial names end in ',seed=S' and the report aggregates them (mean ± std).",
)
_ONLY = flags.DEFINE_string(
    "only",
    None,
    "Run only the trials whose name matches this regular expression (re.search); the sweep file "
    "still lists every trial, so a later run without --only completes the sweep.",
)
_PLAN = flags.DEFINE_enum(
    "plan",
    "keep",
    list(sweeps.PLAN_CHANGES),
    "When sweep.json plans other trials than this command: 'keep' refuses (naming the "
    "difference), 'extend' adds this command's new trials, 'replace' writes this plan.",
)
_FINISHED = flags.DEFINE_string(
    "finished",
    None,
    "A directory that outlives the workdir (e.g. experiments/results/<study>/trials, committed): "
    "finished trials kept there are copied into the workdir first (and not trained again), and "
    "each trial that finishes is kept there (config, metrics, per-document final losses).",
)
flags.mark_flags_as_required(["config", "workdir"])


def run_trial(name: str, command: list[str], trial_dir: str) -> tuple[str, int, float]:
    os.makedirs(trial_dir, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(trial_dir, "train.log"), "a") as log:
        rc = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    return name, rc, time.perf_counter() - start


def main(argv):
    # Everything after the known flags that looks like --config.KEY=VALUE applies to all trials.
    base = [a for a in argv[1:] if a.startswith("--config.")]
    unknown = [a for a in argv[1:] if not a.startswith("--config.")]
    if unknown:
        raise app.UsageError(f"unexpected arguments: {unknown}")
    trials = seeds.with_seeds(sweeps.get_sweep(_CONFIG.value), [int(s) for s in _SEEDS.value])
    # Refused before the plan is written: a selection that runs nothing changes nothing.
    sweeps.selected([sweeps.trial_name(t) for t in trials], _ONLY.value)
    trials = sweeps.plan_trials(_WORKDIR.value, _CONFIG.value, base, trials, _PLAN.value)
    if _FINISHED.value:
        restored = sweeps.restore_finished(
            _FINISHED.value, _WORKDIR.value, [sweeps.trial_name(t) for t in trials]
        )
        for name in restored:
            print(f"[restored] {name}: finished, from {_FINISHED.value}")
    jobs = []
    for overrides in trials:
        name = sweeps.trial_name(overrides)
        if _ONLY.value is not None and not re.search(_ONLY.value, name):
            continue
        trial_dir = os.path.join(_WORKDIR.value, name)
        if sweeps.is_finished(trial_dir):
            print(f"[skip] {name}: finished")
            continue
        command = [
            sys.executable,
            "-m",
            "experiments.train",
            f"--config={_CONFIG.value}",
            f"--workdir={trial_dir}",
            *base,
            *sweeps.override_flags(overrides),
        ]
        jobs.append((name, command, trial_dir))
    print(f"{len(jobs)} of {len(trials)} trials to run, {_PARALLEL.value} at a time.")
    if jobs:  # build the dataset once, before trials that would race to build it together
        subprocess.check_call(
            [sys.executable, "-m", "experiments.prepare_data", f"--config={_CONFIG.value}", *base]
        )
    failed = []
    with ThreadPoolExecutor(max_workers=max(_PARALLEL.value, 1)) as pool:
        for name, rc, seconds in pool.map(lambda job: run_trial(*job), jobs):
            status = "done" if rc == 0 else f"FAILED (exit {rc}; see {name}/train.log)"
            if rc == 0 and _FINISHED.value:
                sweeps.keep_finished(os.path.join(_WORKDIR.value, name), _FINISHED.value)
            print(f"[{status}] {name} in {seconds / 60:.1f} min", flush=True)
            if rc:
                failed.append(name)
    if failed:
        sys.exit(f"{len(failed)} trial(s) failed: {failed}")


if __name__ == "__main__":
    # --config.* flags are passed through to the trials; absl must not reject them here.
    cli.run(main, known_only=True)
