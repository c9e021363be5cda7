"""Routing diagnostics of a sweep's trials: are experts starved, collapsed or dead, and does Adam
move them on too little evidence? Writes <workdir>/report/diagnosis.{md,csv} and plots.

  python -m experiments.diagnose --workdir=runs/sweeps/diagnosis

Per trial, from metrics.jsonl alone (no checkpoint is read):
  tokens/expert    (token, choice) pairs each expert processed over training, from the logged
                   train/expert_load × the kept pairs of each log interval; min / median / max
                   over the experts of all MoE layers.
  dead experts     experts whose final eval load is below a tenth of the uniform share 1/E.
  entropy          train router entropy ÷ log E (1 = uniform), at the first and the last log.
  top1_prob        mean over tokens of the largest router probability at the last log: with
                   Switch's raw top-1 gate, the factor the expert's output is multiplied by.
  load CV          coefficient of variation of the final eval load over experts.
  grad / update    per-expert L2 norms of the gradient and of the AdamW update of each expert's
                   weights at the last log: median, and max ÷ min over experts (how unevenly
                   experts learn). Adam's update is about lr per weight whatever the gradient's
                   size, so an expert that saw 10 tokens moves about as far as one that saw 1,000.
Plots: the expert-load histogram over training (experts sorted by final load, layer 0), router
entropy and the per-expert update spread over training, one line per trial.
"""

import csv
import math
import os

import numpy as np
from absl import app, flags

from switchmoe import cli
from switchmoe import analysis

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory written by experiments.sweep.")
flags.mark_flags_as_required(["workdir"])

COLUMNS = (
    "trial", "experts", "eval_loss", "eval_bits_per_byte", "tokens_per_expert_min",
    "tokens_per_expert_median", "tokens_per_expert_max", "dead_experts", "entropy_first",
    "entropy_last", "top1_prob", "load_cv", "train_dropped_pct", "grad_norm_median", "grad_norm_spread",
    "update_norm_median", "update_norm_spread",
)  # fmt: skip


def tokens_per_expert(trial) -> np.ndarray | None:
    """Pairs each expert processed over training [layers, E], from the logged loads."""
    config = trial["config"]
    tokens_per_step = config.batch_size * config.data.seq_len * config.model.moe.num_selected
    total, previous = None, 0
    for r in trial["records"]:
        if "train/expert_load" not in r:
            continue
        steps = r["step"] - previous
        previous = r["step"]
        kept = tokens_per_step * (1.0 - r.get("train/dropped_fraction", 0.0))
        part = np.asarray(r["train/expert_load"], np.float64) * kept * steps
        total = part if total is None else total + part
    return total


def diagnose(trial) -> dict:
    config, records = trial["config"], trial["records"]
    E = config.model.moe.num_experts
    last = lambda m: analysis.last_value(records, m)
    row = {c: None for c in COLUMNS}
    row.update(
        trial=trial["name"],
        experts=E,
        eval_loss=trial["final_eval_loss"],
        eval_bits_per_byte=last("eval/bits_per_byte"),
    )
    if not E:
        return row
    counts = tokens_per_expert(trial)
    if counts is not None:
        row.update(
            tokens_per_expert_min=float(counts.min()),
            tokens_per_expert_median=float(np.median(counts)),
            tokens_per_expert_max=float(counts.max()),
        )
    load = last("eval/expert_load")
    if load is not None:
        load = np.asarray(load, np.float64)
        row["dead_experts"] = int(np.sum(load < 0.1 / E))
        row["load_cv"] = float(np.mean(load.std(-1) / np.maximum(load.mean(-1), 1e-12)))
    _, entropy = analysis.metric_series(records, "train/router_entropy")
    if len(entropy):
        row["entropy_first"] = float(entropy[0] / math.log(E))
        row["entropy_last"] = float(entropy[-1] / math.log(E))
    row["top1_prob"] = last("train/top1_prob")
    dropped = last("train/dropped_fraction")
    row["train_dropped_pct"] = None if dropped is None else 100 * dropped
    for name in ("grad", "update"):
        norms = last(f"train/expert_{name}_norm")
        if norms is not None:
            norms = np.asarray(norms, np.float64).ravel()
            row[f"{name}_norm_median"] = float(np.median(norms))
            row[f"{name}_norm_spread"] = float(norms.max() / max(norms.min(), 1e-30))
    return row


def summary_table(rows) -> str:
    """The columns EXPERIMENTS.md shows, one row per trial, labelled for people."""
    head = (
        "| trial | eval loss (nats) | bits/byte | top-1 prob | entropy / log E | "
        "pairs per expert, min–max | dead | train dropped % | grad norm (median) | "
        "update max/min |"
    )
    lines = [head, "|" + "---|" * 10]
    num = lambda v, spec: "-" if v is None else format(v, spec)
    for r in rows:
        pairs = (
            "-"
            if r["tokens_per_expert_min"] is None
            else f"{r['tokens_per_expert_min'] / 1e3:.0f}k–{r['tokens_per_expert_max'] / 1e3:.0f}k"
        )
        cells = [
            analysis.trial_label(r["trial"]),
            num(r["eval_loss"], ".3f"),
            num(r["eval_bits_per_byte"], ".3f"),
            num(r["top1_prob"], ".3f"),
            num(r["entropy_last"], ".2f"),
            pairs,
            num(r["dead_experts"], "d"),
            num(r["train_dropped_pct"], ".1f"),
            num(r["grad_norm_median"], ".2g"),
            num(r["update_norm_spread"], ".2g"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(trials, out):
    import matplotlib.pyplot as plt

    moe = [t for t in trials if t["config"].model.moe.num_experts]
    if not moe:
        return []
    cols = min(4, len(moe))
    rows = -(-len(moe) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, t in zip(axes.ravel(), moe):
        loads = [
            (r["step"], np.asarray(r["train/expert_load"])[0])
            for r in t["records"]
            if "train/expert_load" in r
        ]
        if not loads:
            continue
        steps, values = zip(*loads)
        values = np.stack(values)  # [logs, E]
        E = values.shape[1]
        order = np.argsort(-values[-1])
        image = ax.imshow(
            (values[:, order] * E).T, aspect="auto", cmap="viridis", vmin=0, vmax=3,
            extent=(steps[0], steps[-1], E - 0.5, -0.5),
        )  # fmt: skip
        ax.set(
            title=analysis.trial_label(t["name"]), xlabel="step", ylabel="expert (by final load)"
        )
        ax.title.set_fontsize(7)
    for ax in axes.ravel()[len(moe) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="load × E (1 = balanced), MoE layer 0")
    names = ["load_over_training.png"]
    fig.savefig(os.path.join(out, names[0]), dpi=100, bbox_inches="tight")

    fig, (ax_h, ax_u) = plt.subplots(1, 2, figsize=(13, 4))
    for t in moe:
        E = t["config"].model.moe.num_experts
        steps, entropy = analysis.metric_series(t["records"], "train/router_entropy")
        ax_h.plot(steps, entropy / math.log(E), label=analysis.trial_label(t["name"]))
        spread = [
            (r["step"], np.max(r["train/expert_update_norm"]) / max(np.min(r["train/expert_update_norm"]), 1e-30))
            for r in t["records"]
            if "train/expert_update_norm" in r
        ]  # fmt: skip
        if spread:
            ax_u.plot(*zip(*spread), label=analysis.trial_label(t["name"]))
    ax_h.set(xlabel="step", ylabel="router entropy / log E (1 = uniform)")
    ax_u.set(xlabel="step", ylabel="expert update norm, max / min", yscale="log")
    for ax in (ax_h, ax_u):
        ax.grid(alpha=0.3)
    ax_u.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    names.append("entropy_and_update_spread.png")
    fig.savefig(os.path.join(out, names[1]), dpi=100, bbox_inches="tight")
    return names


def main(argv):
    del argv
    sweep_dir = _WORKDIR.value
    trials = analysis.load_sweep(sweep_dir, finished_only=True)
    if not trials:
        raise app.UsageError(f"no finished trial under {sweep_dir}.")
    out = os.path.join(sweep_dir, "report")
    os.makedirs(out, exist_ok=True)
    rows = [diagnose(t) for t in trials]
    with open(os.path.join(out, "diagnosis.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Routing diagnosis: {sweep_dir}", ""]
    lines += [analysis.markdown_table(rows, COLUMNS)]
    summary = summary_table(rows)
    with open(os.path.join(out, "diagnosis_summary.md"), "w") as f:
        f.write(summary + "\n")
    lines += ["", "## Summary", "", summary]
    names = plots(trials, out)
    lines += ["", "Plots: " + ", ".join(f"report/{n}" for n in names)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "diagnosis.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cli.run(main)
