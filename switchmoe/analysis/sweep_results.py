"""Sweep directories (one run workdir per trial): loading trials, tables and the scaling and
capacity-factor plots."""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from switchmoe.runs import config_files
from switchmoe.runs.metrics import METRICS_FILE, read_metrics


def config_value(config: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
    """`config` at a dotted key ('model.moe.num_experts'), or `default` when absent."""
    node: Any = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            return default
    return node


def metric_series(records: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold `metric`."""
    pairs = [(r["step"], r[metric]) for r in records if metric in r]
    if not pairs:
        return np.zeros([0], np.int64), np.zeros([0])
    steps, values = zip(*pairs)
    return np.asarray(steps), np.asarray(values, np.float64)


def last_value(records: Sequence[dict], metric: str, default: Any = None) -> Any:
    """The value of `metric` in the last record that holds it."""
    for r in reversed(records):
        if metric in r:
            return r[metric]
    return default


def load_trial(workdir: str, name: Optional[str] = None) -> dict[str, Any]:
    """One run workdir as a trial dict (see `load_sweep`)."""
    # read_config fills in fields that a config.json from an older switchmoe lacks.
    config = config_files.read_config(workdir)
    path = os.path.join(workdir, METRICS_FILE)
    records = read_metrics(workdir) if os.path.exists(path) else []
    total = config_value(config, "num_train_steps")
    final = [r for r in records if r.get("step") == total and "eval/loss" in r]
    last_eval = last_value(records, "eval/loss")
    # The whole-split final evaluation (switchmoe/data/eval_set.py) when the run has one; runs
    # from before it report their last periodic evaluation, a stored-order prefix of the split.
    whole = [r for r in records if r.get("step") == total and "final/loss" in r]
    final_metrics = {k: v for k, v in whole[-1].items() if k.startswith("final/")} if whole else {}
    return {
        "name": name or os.path.basename(os.path.normpath(workdir)),
        "workdir": workdir,
        "config": config,
        "records": records,
        "finished": bool(final),
        "last_step": max((r["step"] for r in records), default=0),
        "final_eval_loss": (
            final_metrics["final/loss"]
            if final_metrics
            else final[-1]["eval/loss"]
            if final
            else last_eval
        ),
        "final": final_metrics,
        # What the final number scored: 'whole split', 'sample', or 'prefix' (an older run's
        # first num_eval_batches batches in stored order).
        "eval_scope": (
            ("whole split" if final_metrics.get("final/whole_split") else "sample")
            if final_metrics
            else "prefix"
        ),
    }


def load_sweep(sweep_dir: str, finished_only: bool = False) -> list[dict[str, Any]]:
    """The trials of a sweep directory: one sub-directory per trial, each a run workdir.

    Args:
      sweep_dir: holds `<trial name>/config.json`, `metrics.jsonl`, `checkpoints/`.
      finished_only: drop trials that are not finished.

    Returns:
      Trials sorted by name (numbers in names compare as numbers), each {"name", "workdir",
      "config" (ConfigDict of config.json), "records" (metrics.jsonl), "finished" (an eval/loss
      record at step == num_train_steps), "last_step", "final_eval_loss" (the whole-split final
      evaluation's when there is one, else eval/loss at the last step if finished, else the
      latest eval/loss, None if none), "final" (the final/* metrics, {} if none), "eval_scope"
      ('whole split', 'sample' or 'prefix')}. Sub-directories without config.json
      (not started) are skipped.
    """
    natural = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
    trials = []
    for name in sorted(os.listdir(sweep_dir), key=natural):
        workdir = os.path.join(sweep_dir, name)
        if os.path.isfile(os.path.join(workdir, "config.json")):
            trials.append(load_trial(workdir, name))
    return [t for t in trials if t["finished"] or not finished_only]


def format_value(value) -> str:
    """A table cell: '-' for None, 4 significant digits, thousands separators from 10,000."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1e4:
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """`rows` (dicts) as a markdown table of `columns`, cells by `format_value`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _setting_cell(config: ml_collections.ConfigDict, key: str) -> str:
    """A config value for a table; a dense model's routing settings (it has no router) as '-'."""
    routing = key.startswith("model.moe.") and key != "model.moe.num_experts"
    if routing and not config_value(config, "model.moe.num_experts"):
        return "-"
    return str(config_value(config, key))


def format_sweep_table(
    trials: Sequence[dict], keys: Sequence[str] = ("model.moe.num_experts",)
) -> str:
    """One line per trial: name, the given config keys, steps, final eval loss."""
    w = max([len("trial")] + [len(t["name"]) for t in trials]) + 2
    head = f"{'trial':<{w}}" + "".join(f"{k.split('.')[-1]:>22}" for k in keys)
    lines = [head + f"{'step':>8}{'eval loss':>11}{'finished':>10}"]
    for t in trials:
        loss = t["final_eval_loss"]
        lines.append(
            f"{t['name']:<{w}}"
            + "".join(f"{_setting_cell(t['config'], k):>22}" for k in keys)
            + f"{t['last_step']:>8}{(f'{loss:.4f}' if loss is not None else '-'):>11}"
            + f"{str(t['finished']):>10}"
        )
    return "\n".join(lines)


# Short labels for the settings sweeps vary, for legends a reader can take in at a glance.
_LABELS = {
    "num_experts": lambda v: "dense" if v == "0" else f"{v} experts",
    "num_selected": lambda v: f"top-{v}",
    "train_capacity_factor": lambda v: f"cf {v}",
    "learning_rate": lambda v: f"lr {v}",
    "load_balancing_weight": lambda v: f"α {v}",
    "moe_every": lambda v: "MoE every block" if v == "1" else f"MoE every {v}",
    "num_train_steps": lambda v: f"{v} steps",
    "spm_vocab_size": lambda v: f"{int(v) // 1024}k SentencePiece",
    "seed": lambda v: f"seed {v}",
    "backend": lambda v: v,
    "router": lambda v: v.replace("_", " "),
    "hash_kind": lambda v: f"({v})",
    "gate_norm": lambda v: "unit gate" if v == "normalized" else "raw gate",
    "sequence_balance_weight": lambda v: f"seq-wise {v}",
    "global_balance_weight": lambda v: f"global-batch {v}",
    "bias_update_speed": lambda v: f"bias γ {v}",
    "score_function": lambda v: f"{v} scores",
    "granularity": lambda v: f"granularity {v}",
    "group_size": lambda v: f"groups of {v}",
    "overflow": lambda v: "next choice" if v == "next_choice" else "overflow dropped",
    "drop_priority": lambda v: f"{v} priority",
    # optimizer.freeze; trial names turn 're:.' (every parameter) into 're_.'
    "freeze": lambda v: {
        "none": "update all",
        "moe": "MoE frozen",
        "non_moe": "only MoE updated",
        "re_.": "nothing updated",
    }.get(v, f"frozen: {v}"),  # fmt: skip
}
# Parts implied by another part of the same name ('top-2' implies its normalised gates and
# half-width experts in these studies; a SentencePiece vocabulary size implies the tokenizer).
_IMPLIED = {"tokenizer", "expert_d_ff", "noncausal_ablation"}


def trial_label(name: str) -> str:
    """A short human label for a trial name: 'num_selected=2,...,train_capacity_factor=0.5' ->
    'top-2, cf 0.5'; 'num_experts=0' -> 'dense'. Unknown parts stay as they are."""
    parts = [p.partition("=") for p in name.split(",") if p]
    keys = {k for k, _, _ in parts}
    words = []
    for key, eq, value in parts:
        if not eq:
            words.append(key)
            continue
        if key in _IMPLIED or (key == "gate_norm" and "num_selected" in keys):
            continue
        words.append(_LABELS[key](value) if key in _LABELS else f"{key}={value}")
    return ", ".join(words).replace(", (", " (") or name


def plot_eval_curves(trials: Sequence[dict], metric: str = "eval/loss"):
    """`metric` vs step, one line per trial."""
    import matplotlib.pyplot as plt

    # Long trial names (a routing study's) go in a legend beside the axes, not over the curves.
    longest = max((len(trial_label(t["name"])) for t in trials), default=0)
    outside = longest > 40 or len(trials) > 8
    fig, ax = plt.subplots(figsize=(7 + (0.055 * min(longest, 110) if outside else 0), 4))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(trials):
        steps, values = metric_series(t["records"], metric)
        if len(steps):
            style = "o-" if i < len(cycle) else "s--"  # more trials than colours: new markers
            ax.plot(steps, values, style, ms=3, label=trial_label(t["name"]))
    ax.set(xlabel="step", ylabel=metric)
    ax.grid(alpha=0.3)
    if ax.lines:
        if outside:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_run_curves(records: Sequence[dict], metrics: Sequence[str] = ("train/loss", "eval/loss")):
    """One run's metrics (from `read_metrics`) vs step, one line per metric."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for metric in metrics:
        steps, values = metric_series(records, metric)
        if len(steps):
            ax.plot(steps, values, "o-", ms=3, label=metric)
    ax.set(xlabel="step", ylabel="loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return fig


def _groups(trials: Sequence[dict], x_key: str, group_by: Optional[str]):
    groups: dict[Any, list] = {}
    for t in trials:
        x = config_value(t["config"], x_key)
        if x is None:
            continue
        label = config_value(t["config"], group_by) if group_by else None
        groups.setdefault(label, []).append((x, t))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in groups.items()}


def explain_empty(ax, reason: str) -> None:
    """Writes `reason` across `ax` when nothing was drawn in it, so an empty panel says why."""
    if not ax.has_data():
        ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, fontsize=8,
                color="0.35", transform=ax.transAxes)  # fmt: skip


def plot_final_vs(
    trials: Sequence[dict],
    x_key: str,
    y: Any = "final_eval_loss",
    group_by: Optional[str] = None,
    ax=None,
    empty_note: Optional[str] = None,
    **plot_kwargs,
):
    """A final value of each trial vs a config value, one line per `group_by` value. Trials at
    the same x in one line (the seeds of a setting) are drawn as their mean with ± one sample
    std as error bars, never joined one by one; every point has a marker, so a line of one point
    shows.

    Args:
      trials: from `load_sweep`.
      x_key: dotted config key for x ('model.moe.num_experts').
      y: a trial key ('final_eval_loss'), a metric name whose last value is used
        ('train/dropped_fraction'), or a function trial -> value. Trials without it are skipped.
      group_by: dotted config key separating lines.
      ax: draw into this axes (default: a new figure).
      empty_note: written across the axes when no trial has a value (say why).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    get = y if callable(y) else (lambda t: t[y] if y in t else last_value(t["records"], y))
    for label, points in _groups(trials, x_key, group_by).items():
        by_x: dict[Any, list[float]] = {}
        for x, t in points:
            if (value := get(t)) is not None:
                by_x.setdefault(x, []).append(float(value))
        if not by_x:
            continue
        xs = sorted(by_x)
        means = [float(np.mean(by_x[x])) for x in xs]
        name = trial_label(f"{group_by.split('.')[-1]}={label}") if group_by else None
        most = max(len(v) for v in by_x.values())
        if most > 1:
            stds = [float(np.std(by_x[x], ddof=1)) if len(by_x[x]) > 1 else 0.0 for x in xs]
            suffix = f"mean ± std over up to {most} seeds"
            ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=3,
                        label=f"{name}, {suffix}" if name else suffix, **plot_kwargs)  # fmt: skip
        else:
            ax.plot(xs, means, "o-", label=name, **plot_kwargs)
    ax.set(xlabel=x_key, ylabel=y if isinstance(y, str) else "")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    if empty_note:
        explain_empty(ax, empty_note)
    return ax.figure


def plot_loss_vs_experts(
    trials: Sequence[dict], group_by: Optional[str] = None, finished_only: bool = True
):
    """Final eval loss vs number of experts (0 = dense): the Switch Figure 4 / GShard scaling plot."""
    trials = [t for t in trials if t["finished"] or not finished_only]
    fig = plot_final_vs(trials, "model.moe.num_experts", group_by=group_by)
    ax = fig.axes[0]
    counts = sorted({config_value(t["config"], "model.moe.num_experts") for t in trials})
    if counts and max(counts) > 4:
        ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xticks(counts, ["dense" if c == 0 else str(c) for c in counts])
    ax.set(xlabel="experts per MoE layer", ylabel="final eval loss (nats/token)")
    fig.tight_layout()
    return fig


def plot_capacity_factor(
    trials: Sequence[dict],
    x_key: str = "model.moe.train_capacity_factor",
    group_by: Optional[str] = None,
    finished_only: bool = True,
):
    """Final eval loss and dropped fraction (train and eval, last logged) vs the capacity factor
    the trials trained with (Switch Table 1). Dense trials (no experts) are left out."""
    import matplotlib.pyplot as plt

    trials = [
        t
        for t in trials
        if (t["finished"] or not finished_only)
        and config_value(t["config"], "model.moe.num_experts")
    ]
    fig, (ax_loss, ax_drop) = plt.subplots(1, 2, figsize=(11, 4))
    plot_final_vs(trials, x_key, group_by=group_by, ax=ax_loss)
    ax_loss.set(ylabel="final eval loss (nats/token)")
    for metric, style in (("train/dropped_fraction", "o-"), ("eval/dropped_fraction", "s--")):
        for label, points in _groups(trials, x_key, group_by).items():
            values = [(x, last_value(t["records"], metric)) for x, t in points]
            xy = [(x, 100 * v) for x, v in values if v is not None]
            if xy:
                suffix = (
                    f", {trial_label(f'{group_by.split(chr(46))[-1]}={label}')}" if group_by else ""
                )
                where = "train" if metric.startswith("train") else "eval"
                ax_drop.plot(*zip(*xy), style, label=f"{where}{suffix}")
    ax_drop.set(xlabel=x_key)
    ax_drop.grid(alpha=0.3)
    ax_drop.set(ylabel="tokens dropped (%)")
    if ax_drop.lines:
        ax_drop.legend(fontsize=8)
    fig.tight_layout()
    return fig
