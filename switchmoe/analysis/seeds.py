"""Trials over seeds: mean ± standard deviation per setting, and the time-to-quality speed-up.

A sweep run with seeds (`experiments.sweep --seeds=0,1,2`) holds one trial per (setting, seed),
named `<setting>,seed=<s>`; `setting_name` strips the seed so that trials of one setting group
together. Spreads are sample standard deviations (ddof=1: with 3 seeds the population formula
would understate the spread by a fifth); a setting with one seed has std None.

The speed-up (Switch Fig. 5/6) of a model over a baseline: take the baseline's final eval loss as
the target, find the step at which each curve first reaches it (linearly interpolated between eval
points), and divide the baseline's step by the model's. A curve that never reaches the target
has no speed-up (None): it is slower than the baseline at every step it ran.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np

# Config keys a seed sweep sets: initialisation and per-step keys, and the data order.
SEED_KEYS = ("seed", "data.seed")
_SEED_PART = re.compile(r"(^|,)seed=[^,]*")


def setting_name(trial_name: str) -> str:
    """A trial's name without its seed: 'num_experts=8,seed=2' -> 'num_experts=8'."""
    name = _SEED_PART.sub("", trial_name).strip(",")
    return name or "base"


def with_seeds(trials: Sequence[dict], seeds: Iterable[int]) -> list[dict]:
    """Every trial once per seed (outer loop: trials), each setting both seeds of SEED_KEYS."""
    seeds = list(seeds)
    if not seeds:
        return list(trials)
    return [{**t, **{key: int(s) for key in SEED_KEYS}} for t in trials for s in seeds]


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """(mean, sample std) of the values that are not None; std None for fewer than two."""
    vals = np.asarray([v for v in values if v is not None], np.float64)
    if not len(vals):
        return None, None
    return float(vals.mean()), (float(vals.std(ddof=1)) if len(vals) > 1 else None)


def aggregate(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """One row per setting: {'setting', 'seeds', '<metric>_mean', '<metric>_std', ...}.

    `rows` are per-trial dicts with a 'trial' name and the metric values (None when missing).
    Settings keep the order of their first trial.
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(setting_name(r["trial"]), []).append(r)
    out = []
    for setting, members in groups.items():
        agg: dict[str, Any] = {"setting": setting, "seeds": len(members)}
        for m in metrics:
            agg[f"{m}_mean"], agg[f"{m}_std"] = mean_std([r.get(m) for r in members])
        out.append(agg)
    return out


def first_step_at(steps: Sequence[float], losses: Sequence[float], target: float):
    """The first step at which the curve reaches `target` (loss <= target), interpolated
    linearly between the eval points around the crossing; None if it never does."""
    steps = np.asarray(steps, np.float64)
    losses = np.asarray(losses, np.float64)
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(steps[0])
            s0, s1, l0, l1 = steps[i - 1], steps[i], losses[i - 1], losses[i]
            return float(s0 + (l0 - target) / (l0 - l1) * (s1 - s0))
    return None


def speedup(
    base_steps: Sequence[float],
    base_losses: Sequence[float],
    steps: Sequence[float],
    losses: Sequence[float],
) -> Optional[float]:
    """Baseline steps to its own final loss ÷ the model's steps to that loss (None: never)."""
    target = float(np.asarray(base_losses, np.float64)[-1])
    base = first_step_at(base_steps, base_losses, target)
    mine = first_step_at(steps, losses, target)
    return None if mine is None or mine <= 0 else base / mine


def mean_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]]):
    """(steps, mean, std) over curves logged at the same steps (the steps all curves share)."""
    common = sorted(set.intersection(*[set(np.asarray(s).tolist()) for s, _ in curves]))
    values = np.stack(
        [np.asarray(v, np.float64)[np.isin(np.asarray(s), common)] for s, v in curves]
    )
    std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return np.asarray(common), values.mean(axis=0), std


def seed_speedups(
    base_curves: Sequence[tuple[np.ndarray, np.ndarray]],
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> list[Optional[float]]:
    """The speed-up of each of a setting's seeds over the baseline's mean curve over seeds."""
    steps, mean, _ = mean_curve(base_curves)
    return [speedup(steps, mean, s, v) for s, v in curves]


def capacity_matrix(rows: Sequence[dict], metric: str = "eval_loss") -> list[dict]:
    """The capacity study's re-evaluations, mean ± std over seeds: one row per (k, train factor),
    one column per eval factor (in first-seen order), each cell "mean ± std" (or the value alone
    for one seed).

    rows: {'k', 'train_cf', 'eval_cf', metric} per checkpoint and eval factor (report's
    capacity_eval.csv); the seed is what tells rows with the same three apart.
    """
    cells: dict[tuple, dict[Any, list[float]]] = {}
    columns: list[Any] = []
    for r in rows:
        cells.setdefault((r["k"], r["train_cf"]), {}).setdefault(r["eval_cf"], []).append(r[metric])
        if r["eval_cf"] not in columns:
            columns.append(r["eval_cf"])
    out = []
    for (k, train_cf), by_eval in cells.items():
        row: dict[str, Any] = {"k": k, "train_cf": train_cf}
        for eval_cf in columns:
            mean, std = mean_std(by_eval.get(eval_cf, []))
            row[str(eval_cf)] = (
                "-" if mean is None else f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
            )
        out.append(row)
    return out
