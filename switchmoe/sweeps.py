"""Sweeps: a config module's `get_sweep()` -> named trials, each a normal run workdir.

A config module may define `get_sweep(variant=None)` returning a list of override dicts
({"model.moe.num_experts": 8, ...}); every dict is one trial. A sweep directory holds
  sweep.json         the config file, variant, base overrides and every trial's overrides
  <trial name>/      a run workdir (config.json, metrics.jsonl, checkpoints/) per trial
Trial names come from the overrides (last key component=value, joined by ','), so they are stable
and readable: `num_experts=8,train_capacity_factor=1.25` (a repeated part is written once, so
{"seed": 1, "data.seed": 1} names `seed=1`). A trial is finished when its
metrics.jsonl has an eval record at its final step; unfinished trials resume from their latest
checkpoint (train_and_evaluate does that), finished ones are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from typing import Any

from switchmoe.runs import config_files
from switchmoe.runs.metrics import FINAL_DOCUMENTS_FILE, METRICS_FILE

SWEEP_FILE = "sweep.json"


def load_config_module(path: str):
    """Imports configs/NAME.py by path (configs/ is not a package)."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"switchmoe_config_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path!r} not found.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_config_arg(arg: str) -> tuple[str, str | None]:
    """'configs/x.py:variant' -> ('configs/x.py', 'variant')."""
    path, _, variant = arg.partition(":")
    return path, variant or None


def get_sweep(config_arg: str) -> list[dict[str, Any]]:
    path, variant = split_config_arg(config_arg)
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(); a sweep config returns override dicts.")
    trials = module.get_sweep(variant) if variant else module.get_sweep()
    if not trials:
        raise ValueError(f"{path}:get_sweep() returned no trial.")
    names = [trial_name(t) for t in trials]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"{path}:get_sweep() gives several trials named {sorted(duplicates)}.")
    return trials


def _format(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def trial_name(overrides: dict[str, Any]) -> str:
    """A directory name for a trial: 'num_experts=8,train_capacity_factor=1.25'."""
    if not overrides:
        return "base"
    parts = [f"{key.split('.')[-1]}={_format(value)}" for key, value in overrides.items()]
    # One part per distinct name=value: a seed sets both `seed` and `data.seed` ('seed=1').
    parts = list(dict.fromkeys(parts))
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def override_flags(overrides: dict[str, Any]) -> list[str]:
    return [f"--config.{key}={_format(value)}" for key, value in overrides.items()]


def is_finished(trial_dir: str) -> bool:
    """The trial's metrics.jsonl has its final evaluation (`final/loss`, the whole eval split) at
    the trial's final step. A trial trained before the final evaluation existed has only
    `eval/loss` there: it is not finished, and rerunning it adds the final evaluation (and its
    per-document file, `FINAL_DOCUMENTS_FILE`) without training."""
    config_path = os.path.join(trial_dir, "config.json")
    metrics_path = os.path.join(trial_dir, METRICS_FILE)
    if not (os.path.exists(config_path) and os.path.exists(metrics_path)):
        return False
    final = config_files.read_config(trial_dir).num_train_steps
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    has_documents = os.path.exists(os.path.join(trial_dir, FINAL_DOCUMENTS_FILE))
    return has_documents and any(r["step"] == final and "final/loss" in r for r in records)


# What a finished trial is without its checkpoints: enough for is_finished, the reports, the
# bootstrap over documents and the scaling fit (~40 KB per trial). Not train.log: it names the
# machine's paths, and metrics.jsonl holds every number it prints.
FINISHED_FILES = ("config.json", METRICS_FILE, FINAL_DOCUMENTS_FILE)


def keep_finished(trial_dir: str, store: str) -> bool:
    """Copies a finished trial's `FINISHED_FILES` to <store>/<trial name>/ (a directory that
    outlives the workdir, e.g. experiments/results/<study>/trials, committed); False if the trial
    is not finished. A study longer than one session keeps each trial as it finishes."""
    if not is_finished(trial_dir):
        return False
    out = os.path.join(store, os.path.basename(os.path.normpath(trial_dir)))
    os.makedirs(out, exist_ok=True)
    for name in FINISHED_FILES:
        if os.path.exists(os.path.join(trial_dir, name)):
            shutil.copyfile(os.path.join(trial_dir, name), os.path.join(out, name))
    return True


def restore_finished(store: str, sweep_dir: str, names: list[str]) -> list[str]:
    """Copies the kept trials of `store` among `names` that the sweep directory lacks (or has
    unfinished: a trial kept finished is not trained again) into it; returns their names."""
    restored = []
    for name in names:
        kept, trial_dir = os.path.join(store, name), os.path.join(sweep_dir, name)
        if not is_finished(kept) or is_finished(trial_dir):
            continue
        if os.path.exists(trial_dir):  # an unfinished copy: its checkpoints would be resumed
            shutil.rmtree(trial_dir)
        shutil.copytree(kept, trial_dir)
        restored.append(name)
    return restored


def write_sweep_file(sweep_dir: str, config_arg: str, base: list[str], trials: list[dict]) -> None:
    os.makedirs(sweep_dir, exist_ok=True)
    record = {
        "config": config_arg,
        "base_overrides": base,
        "trials": [{"name": trial_name(t), "overrides": t} for t in trials],
    }
    tmp = os.path.join(sweep_dir, SWEEP_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(sweep_dir, SWEEP_FILE))


# What a rerun of a sweep whose plan (sweep.json) differs from its command does: 'keep' refuses
# it, naming the difference; 'extend' adds the command's new trials to the plan; 'replace'
# writes the command's plan over it (the trials' directories stay either way).
PLAN_CHANGES = ("keep", "extend", "replace")


def plan_trials(
    sweep_dir: str, config_arg: str, base: list[str], trials: list[dict], change: str = "keep"
) -> list[dict]:
    """The trials of the sweep at `sweep_dir` after this command, written to its sweep.json:
    the command's own on a first run or when they equal the plan; otherwise as `change` says
    (PLAN_CHANGES). Raises ValueError naming the difference for 'keep', before anything runs, so
    that a rerun with other --seeds or another grid never silently rewrites the plan a plain
    rerun completes."""
    if change not in PLAN_CHANGES:
        raise ValueError(f"--plan={change!r}; allowed: {PLAN_CHANGES}.")
    path = os.path.join(sweep_dir, SWEEP_FILE)
    if os.path.exists(path) and change != "replace":
        old = read_sweep_file(sweep_dir)
        names = [trial_name(t) for t in trials]
        old_names = [t["name"] for t in old["trials"]]
        differences = []
        if old["config"] != config_arg or old["base_overrides"] != base:
            differences.append(
                f"the plan runs --config={old['config']} with {old['base_overrides'] or 'no'} "
                f"overrides; this command --config={config_arg} with {base or 'no'} overrides"
            )
        missing = [n for n in old_names if n not in names]
        added = [n for n in names if n not in old_names]
        if change == "extend" and not differences:
            trials = [t["overrides"] for t in old["trials"]] + [
                t for t in trials if trial_name(t) in added
            ]
        elif missing or added or differences:
            if missing:
                differences.append(f"trials in the plan but not in this command: {missing}")
            if added:
                differences.append(f"trials in this command but not in the plan: {added}")
            raise ValueError(
                f"{path} plans another sweep: " + "; ".join(differences) + ". Rerun with the "
                "plan's settings to complete it, or --plan=extend (add the new trials; same "
                "config and overrides) or --plan=replace (write this plan; finished trials "
                "are kept and skipped)."
            )
    write_sweep_file(sweep_dir, config_arg, base, trials)
    return trials


def read_sweep_file(sweep_dir: str) -> dict[str, Any]:
    with open(os.path.join(sweep_dir, SWEEP_FILE)) as f:
        return json.load(f)


def selected(names: list[str], only: str | None) -> list[str]:
    """The trial names `--only` (a regex, searched) selects; all of them without it. Raises
    ValueError, naming the trials, when it selects none."""
    if only is None:
        return list(names)
    chosen = [n for n in names if re.search(only, n)]
    if not chosen:
        raise ValueError(f"--only={only!r} matches none of the trials {names}.")
    return chosen
