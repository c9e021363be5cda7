"""Report a sweep: a CSV, a markdown table and PNG plots under <workdir>/report/.

  python -m experiments.report --workdir=runs/sweeps/expert_count

Always: one row per trial (final eval loss, dropped fractions, load spread, step time as logged
while the sweep ran, and as re-timed alone by `experiments.step_time` when it has been run,
parameter counts) and eval-loss curves. When the trials vary model.moe.num_experts: loss and step time
against experts. When every trial sets model.moe.train_capacity_factor: every finished checkpoint is
evaluated again at eval capacity factors 0.5, 1.0, 1.25, 2.0 and dropless (cached per trial in
capacity_eval.json), as a table and a plot.
"""

import csv
import json
import os
import re

import numpy as np
from absl import app, flags, logging

from switchmoe import analysis, bootstrap, cli, sweeps
from switchmoe.analysis import seeds as seeds_lib
from switchmoe.config import is_noncausal_ablation
from switchmoe.models import count_params, resolve
from switchmoe.runs.metrics import FINAL_DOCUMENTS_FILE
from switchmoe.runs.summary import scored_text_baselines

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory written by experiments.sweep.")
_CAPACITY_FACTORS = flags.DEFINE_list(
    "eval_capacity_factors", ["0.5", "1.0", "1.25", "2.0"], "Eval factors of the capacity study."
)
_CAPACITY_EVAL = flags.DEFINE_enum(
    "capacity_eval",
    "auto",
    ["auto", "on", "off"],
    "Re-evaluate every checkpoint at each eval capacity factor: 'auto' when every trial sets "
    "model.moe.train_capacity_factor (a capacity study).",
)
flags.mark_flags_as_required(["workdir"])

COLUMNS = (
    "trial", "experts", "k", "train_cf", "causal", "eval_loss", "eval_bits_per_token", "eval_bits_per_byte",
    "bpb_low", "bpb_high", "eval_scope", "eval_documents", "eval_bytes", "train_loss",
    "train_dropped_pct", "eval_dropped_pct", "load_cv", "dead_pct", "max_share", "logit_rms",
    "router_z", "step_time_ms",
    "quiet_step_ms",
    "params_total", "params_active", "steps", "finished",
)  # fmt: skip


def step_time_ms(trial) -> float | None:
    """Median seconds per step over the logged intervals, leaving out the first (compilation)."""
    rates = [
        r["train/tokens_per_second"] for r in trial["records"] if "train/tokens_per_second" in r
    ]
    if len(rates) < 2:
        return None
    c = trial["config"]
    return 1e3 * c.batch_size * c.data.seq_len / float(np.median(rates[1:]))


def quiet_step_times(sweep_dir) -> dict:
    """{trial: median ms} from experiments.step_time, if it has been run on this sweep."""
    path = os.path.join(sweep_dir, "report", "step_times.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {name: t["median_ms"] for name, t in json.load(f)["trials"].items()}


def row(trial, quiet: dict | None = None) -> dict:
    records, config = trial["records"], trial["config"]
    last = lambda m: analysis.last_value(records, m)
    load = last("eval/expert_load")
    load_cv = dead_pct = max_share = None
    if load is not None:
        load = np.asarray(load, np.float64)  # [layers, E], each row sums to 1
        load_cv = float(np.mean(load.std(-1) / np.maximum(load.mean(-1), 1e-12)))
        # Utilisation at the last evaluation, mean over layers: experts under 10% of a uniform
        # share, and the largest expert's share.
        dead_pct = float(100 * np.mean(load * load.shape[-1] < 0.1))
        max_share = float(np.mean(load.max(-1)))
    counts = count_params(resolve(config))
    pct = lambda v: None if v is None else 100 * v
    eval_loss = trial["final_eval_loss"]
    final = trial.get("final", {})
    dense = not config.model.moe.num_experts  # no router: its routing settings are unused
    return {
        "trial": trial["name"],
        "experts": config.model.moe.num_experts,
        "k": None if dense else config.model.moe.num_selected,
        "train_cf": None if dense else config.model.moe.train_capacity_factor,
        # A non-causal ablation's eval loss saw later tokens through its routing.
        "causal": "no (ablation)" if is_noncausal_ablation(config) else "yes",
        "eval_loss": eval_loss,
        "eval_bits_per_token": None if eval_loss is None else eval_loss / np.log(2),
        # Runs from before bits/byte was logged have none (for byte tokens it is bits/token).
        "eval_bits_per_byte": (
            final.get("final/bits_per_byte", last("eval/bits_per_byte"))
            if trial["finished"]
            else None
        ),
        # The eval set's own uncertainty: a 95% bootstrap interval over documents.
        "bpb_low": final.get("final/bits_per_byte_low"),
        "bpb_high": final.get("final/bits_per_byte_high"),
        "bpb_ci_half": (
            (final["final/bits_per_byte_high"] - final["final/bits_per_byte_low"]) / 2
            if "final/bits_per_byte_high" in final
            else None
        ),
        "loss_ci_half": (
            (final["final/loss_high"] - final["final/loss_low"]) / 2
            if "final/loss_high" in final
            else None
        ),
        "eval_scope": trial.get("eval_scope", "prefix"),
        "eval_documents": final.get("final/documents"),
        "eval_bytes": final.get("final/scored_bytes", last("eval/scored_bytes")),
        "train_loss": last("train/loss"),
        "train_dropped_pct": pct(last("train/dropped_fraction")),
        "eval_dropped_pct": pct(last("eval/dropped_fraction")),
        "load_cv": load_cv,
        "dead_pct": dead_pct,
        "max_share": max_share,
        "logit_rms": last("train/logit_rms"),
        # mean over tokens of logsumexp(logits)², the quantity the z-loss penalises
        "router_z": last("train/router_z"),
        "step_time_ms": step_time_ms(trial),
        "quiet_step_ms": (quiet or {}).get(trial["name"]),
        "params_total": counts["total"],
        "params_active": counts["active_per_token"],
        "steps": trial["last_step"],
        "finished": trial["finished"],
    }


markdown = analysis.markdown_table


def write_csv(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)


def capacity_evaluation(trials, factors) -> list[dict]:
    """Each finished checkpoint at each eval capacity factor and dropless (cached per trial)."""
    rows = []
    for t in trials:
        if not (t["finished"] and t["config"].model.moe.num_experts):
            continue
        cache = os.path.join(t["workdir"], "capacity_eval.json")
        if os.path.exists(cache):
            with open(cache) as f:
                results = json.load(f)
        else:
            results = analysis.evaluate_at_capacities(t["workdir"], factors=factors)
            with open(cache, "w") as f:
                json.dump(results, f, indent=1)
        for r in results:
            rows.append(
                {
                    "trial": t["name"],
                    "k": t["config"].model.moe.num_selected,
                    "train_cf": t["config"].model.moe.train_capacity_factor,
                    "eval_cf": r["capacity_factor"],
                    "eval_loss": r["eval_loss"],
                    "eval_dropped_pct": 100 * r["dropped_fraction"],
                }
            )
    return rows


def plot_capacity_evaluation(rows):
    """Eval loss and eval drops against the eval capacity factor, one line per trained setting
    (mean over its seeds, error bars ± std): colour = training factor, solid top-1, dashed top-2."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_drop) = plt.subplots(1, 2, figsize=(11, 4))
    settings: dict[str, list[dict]] = {}
    for r in rows:
        settings.setdefault(seeds_lib.setting_name(r["trial"]), []).append(r)
    train_factors = sorted({r["train_cf"] for r in rows})
    colour = {
        f: plt.cm.viridis(i / max(len(train_factors) - 1, 1)) for i, f in enumerate(train_factors)
    }
    for setting, mine in settings.items():
        k, train_cf = mine[0]["k"], mine[0]["train_cf"]
        style = dict(color=colour[train_cf], ls="-" if k == 1 else "--", marker="o", capsize=3)
        n_seeds = len({r["trial"] for r in mine})
        label = f"top-{k}, trained at cf {train_cf:g}" + (
            f" ({n_seeds} seeds)" if n_seeds > 1 else ""
        )
        factors = sorted({float(r["eval_cf"]) for r in mine if r["eval_cf"] != "dropless"})
        for ax, metric in ((ax_loss, "eval_loss"), (ax_drop, "eval_dropped_pct")):
            stats = [
                seeds_lib.mean_std(
                    [
                        r[metric]
                        for r in mine
                        if r["eval_cf"] != "dropless" and float(r["eval_cf"]) == f
                    ]
                )
                for f in factors
            ]
            ax.errorbar(factors, [m for m, _ in stats], yerr=[sd or 0.0 for _, sd in stats],
                        label=label, **style)  # fmt: skip
        dropless, _ = seeds_lib.mean_std(
            [r["eval_loss"] for r in mine if r["eval_cf"] == "dropless"]
        )
        if dropless is not None:
            ax_loss.axhline(dropless, ls=":", color=colour[train_cf], lw=0.8)
    ax_loss.set(xlabel="eval capacity factor", ylabel="eval loss (nats/token; dotted: dropless)")
    ax_drop.set(xlabel="eval capacity factor", ylabel="tokens dropped at eval (%)")
    for ax in (ax_loss, ax_drop):
        ax.grid(alpha=0.3)
    # One legend for both panels, beside them: over the curves it hid the top-2 models.
    handles, labels = ax_loss.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


SEED_METRICS = (
    "eval_loss", "eval_bits_per_byte", "loss_ci_half", "bpb_ci_half", "train_dropped_pct", "eval_dropped_pct", "load_cv",
    "dead_pct", "step_time_ms", "quiet_step_ms",
)  # fmt: skip


# Why a panel can be empty, written across it (a short or partial sweep).
NO_STEP_TIMES = (
    "no step times: a trial needs two progress lines after its first\n(log_every below "
    "num_train_steps / 2), or run experiments.step_time"
)
NO_SPEEDUP = (
    "no speed-up: it needs a finished dense setting (num_experts=0)\nwith eval curves, and an "
    "MoE setting whose seeds reach its final loss"
)


def dense_setting(setting: str) -> str:
    """The dense baseline of a setting: the same name with num_experts=0."""
    return re.sub(r"(^|,)num_experts=\d+", r"\1num_experts=0", setting)


def seed_report(trials, rows, out):
    """Mean ± std over seeds per setting, speed-ups over the dense setting, and their plots."""
    finished = [r for r, t in zip(rows, trials) if t["finished"]]
    table = seeds_lib.aggregate(finished, SEED_METRICS)
    curves: dict[str, list] = {}
    for t in trials:
        if t["finished"]:
            curve = analysis.metric_series(t["records"], "eval/loss")
            curves.setdefault(seeds_lib.setting_name(t["name"]), []).append(curve)
    for r in table:
        base = dense_setting(r["setting"])
        if base not in curves and "num_experts=0" in curves:
            # Settings of the MoE layer only (capacity, routing) have no dense twin: the plain
            # dense setting is their baseline. The table names the baseline of each row.
            base = "num_experts=0"
        r["baseline"] = base if base in curves and base != r["setting"] else None
        ups = (
            seeds_lib.seed_speedups(curves[base], curves[r["setting"]])
            if base in curves and base != r["setting"]
            else []
        )
        reached = [u for u in ups if u is not None]
        r["speedup_mean"], r["speedup_std"] = seeds_lib.mean_std(reached)
        r["speedup_reached"] = f"{len(reached)}/{len(ups)}" if ups else None
    paired_differences(trials, table)
    for r in table:
        if r["quiet_step_ms_std"] == 0.0:
            r["quiet_step_ms_std"] = (
                None  # timed once per setting (step_time --one_seed_per_setting)
            )
    write_csv(os.path.join(out, "results_by_setting.csv"), table, list(table[0]))
    pm = lambda m, s, digits: (
        "-" if m is None else (f"{m:.{digits}f}" + ("" if s is None else f" ± {s:.{digits}f}"))
    )
    columns = [
        ("eval loss (nats/token)", "eval_loss", 4),
        ("eval-set 95% ± (nats)", "loss_ci_half", 4),
        ("eval bits/byte", "eval_bits_per_byte", 4),
        ("Δ bits/byte vs baseline [paired 95%, documents]", "delta_bpb", None),
        ("speed-up vs dense", "speedup", 2),
        ("train dropped %", "train_dropped_pct", 2),
        ("load CV", "load_cv", 3),
        ("dead experts %", "dead_pct", 1),
        ("step ms (alone)", "quiet_step_ms", 0),
        ("step ms (logged)", "step_time_ms", 0),
    ]
    scopes = sorted({t.get("eval_scope", "prefix") for t in trials if t["finished"]})
    lines = [
        "## Mean ± std over seeds",
        "",
        "Eval loss and bits/byte: mean ± sample std over seeds (the uncertainty of training). "
        "'eval-set 95% ±': the half-width of the 95% bootstrap interval over documents of the "
        "final evaluation (the uncertainty of which text was scored), mean over seeds. Scored: "
        + ", ".join(scopes)
        + (
            ""
            if scopes == ["whole split"]
            else " (prefix: an older run's first eval batches in stored order, not the whole split)"
        )
        + ".",
        "",
        "| setting | seeds | "
        + " | ".join(c[0] for c in columns)
        + " | speed-up reached | speed-up baseline |",
        "|" + "---|" * (len(columns) + 4),
    ]
    for r in table:
        cells = [
            r.get(key) or "-" if d is None else pm(r[f"{key}_mean"], r[f"{key}_std"], d)
            for _, key, d in columns
        ]
        lines.append(
            f"| {r['setting']} | {r['seeds']} | "
            + " | ".join(cells)
            + f" | {r['speedup_reached'] or '-'} | {r['baseline'] or '-'} |"
        )
    return "\n".join(lines), seed_figures(table, curves)


def document_sums(trial):
    """(per-document loss in bits, per-document bytes) of a trial's final evaluation, or None."""
    if not (trial.get("workdir") and trial["finished"]):
        return None
    path = os.path.join(trial["workdir"], FINAL_DOCUMENTS_FILE)
    if not os.path.exists(path):
        return None
    sums = np.load(path)
    return np.asarray(sums["loss"]) / np.log(2), np.asarray(sums["bytes"], np.float64)


def paired_differences(trials, table) -> None:
    """Sets r['delta_bpb'] on each table row with a baseline: its bits/byte minus the
    baseline's, each averaged over its seeds document by document, with the 95% interval of a
    paired bootstrap over the documents both scored (switchmoe/bootstrap.py)."""
    by_setting: dict[str, list] = {}
    for t in trials:
        sums = document_sums(t)
        if sums is not None:
            by_setting.setdefault(seeds_lib.setting_name(t["name"]), []).append(sums)
    mean = lambda runs: (np.mean([r[0] for r in runs], axis=0), runs[0][1])
    for r in table:
        r["delta_bpb"] = None
        base = r.get("baseline")
        if not base or base not in by_setting or r["setting"] not in by_setting:
            continue
        (loss, size), (base_loss, base_size) = (
            mean(by_setting[r["setting"]]),
            mean(by_setting[base]),
        )
        if loss.shape != base_loss.shape:
            continue  # scored different eval sets
        low, high = bootstrap.paired_difference_interval(loss, size, base_loss, base_size)
        delta = loss.sum() / size.sum() - base_loss.sum() / base_size.sum()
        r["delta_bpb"] = f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]"


def _lines_over_experts(rows) -> dict[str, list]:
    """Settings that differ only in num_experts, keyed by what else they set ('' for none)."""
    lines: dict[str, list] = {}
    for r in rows:
        rest = re.sub(r"(^|,)num_experts=\d+", "", r["setting"]).strip(",")
        lines.setdefault(rest, []).append(r)
    return lines


def seed_figures(table, curves) -> dict:
    import matplotlib.pyplot as plt

    experts = lambda setting: int(re.search(r"num_experts=(\d+)", setting).group(1))
    by_experts = [r for r in table if re.search(r"num_experts=\d+", r["setting"])]
    figures = {}
    # Against the expert count only when the sweep varies it (a granularity sweep does not).
    if len({experts(r["setting"]) for r in by_experts}) > 1:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        quiet = any(r["quiet_step_ms_mean"] is not None for r in by_experts)
        step_key = "quiet_step_ms" if quiet else "step_time_ms"
        for ax, key, label in zip(
            axes,
            ("eval_loss", "speedup", step_key),
            (
                "final eval loss (nats/token)",
                "speed-up over dense (steps to dense's final loss)",
                "step time (ms, each trial alone)" if quiet else "step time (ms, as logged)",
            ),
        ):
            ticks, plotted = set(), 0
            for rest, group in _lines_over_experts(by_experts).items():
                pts = [(experts(r["setting"]), r[f"{key}_mean"], r[f"{key}_std"]) for r in group]
                pts = sorted(p for p in pts if p[1] is not None)
                if pts:
                    xs, ys, es = zip(*pts)
                    name = analysis.trial_label(rest) if rest else "base"
                    ax.errorbar(xs, ys, yerr=[e or 0 for e in es], fmt="o-", capsize=3, label=name)
                    ticks |= set(xs)
                    plotted += 1
            if ticks:
                ax.set_xscale("symlog", base=2, linthresh=1)
                ax.set_xticks(sorted(ticks), ["dense" if x == 0 else str(x) for x in sorted(ticks)])
            if key == "speedup" and plotted:
                ax.axhline(1.0, color="gray", lw=0.8, ls="--")  # as fast as dense
            analysis.explain_empty(ax, {"eval_loss": "no finished trial",
                                        "speedup": NO_SPEEDUP}.get(key, NO_STEP_TIMES))  # fmt: skip
            if plotted > 1:
                ax.legend(fontsize=7)
            ax.set(xlabel="experts per MoE layer", ylabel=label)
            ax.grid(alpha=0.3)
        seeds = max(r["seeds"] for r in by_experts)
        fig.suptitle(f"mean ± std over {seeds} seed{'s' * (seeds > 1)} (error bars)", fontsize=9)
        fig.tight_layout()
        figures["by_experts_seeds.png"] = fig
    # Beside the curves, their difference from the dense mean curve: at a shared scale the
    # curves of a scaling study lie on top of each other; the differences show their order.
    dense = seeds_lib.mean_curve(curves["num_experts=0"]) if "num_experts=0" in curves else None
    fig, axes = plt.subplots(1, 2 if dense else 1, figsize=(13 if dense else 8, 4.5), squeeze=False)
    ax, ax_diff = axes[0][0], (axes[0][1] if dense else None)
    for setting, group in curves.items():
        steps, mean, std = seeds_lib.mean_curve(group)
        label = f"{analysis.trial_label(setting)} ({len(group)} seed{'s' * (len(group) > 1)})"
        # Markers where a curve has few points: one evaluation draws no line, only its marker.
        marker = "o" if len(steps) < 3 else None
        (line,) = ax.plot(steps, mean, "-", marker=marker, ms=4, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        if ax_diff is not None:
            shared = np.isin(steps, dense[0])
            base = dense[1][np.isin(dense[0], steps[shared])]
            diff = mean[shared] - base
            ax_diff.plot(steps[shared], diff, "-", marker=marker, ms=4, color=line.get_color())
            ax_diff.fill_between(
                steps[shared], diff - std[shared], diff + std[shared], color=line.get_color(),
                alpha=0.15,
            )  # fmt: skip
    ax.set(xlabel="step", ylabel="eval loss (nats/token), mean ± std over seeds")
    if ax_diff is not None:
        ax_diff.axhline(0.0, color="gray", lw=0.8, ls="--")
        ax_diff.set(xlabel="step", ylabel="eval loss − dense mean (nats/token)")
        ax_diff.grid(alpha=0.3)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    (ax_diff or ax).legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    figures["eval_curves_seeds.png"] = fig
    return figures


def load_cv_series(records) -> tuple[np.ndarray, np.ndarray]:
    """(steps, coefficient of variation of the experts' loads) from train/expert_load
    [layers, E] per logged step, averaged over the MoE layers."""
    steps, loads = [], []
    for r in records:
        if "train/expert_load" in r:
            load = np.asarray(r["train/expert_load"], np.float64)
            load = load.reshape(-1, load.shape[-1])
            steps.append(r["step"])
            loads.append(np.mean(load.std(-1) / np.maximum(load.mean(-1), 1e-12)))
    return np.asarray(steps), np.asarray(loads)


def balancer_label(moe) -> str:
    """What balances a run, from its `model.moe` config: 'Switch α 0.01', 'bias γ 0.001 +
    sequence-wise 0.0001', 'none'. The study's trial names say this only through overrides of
    defaults ('load_balancing_weight=0.0,...'), which is not what a reader of a plot wants."""
    parts = []
    for key, word in (
        ("bias_update_speed", "bias γ"),
        ("load_balancing_weight", "Switch α"),
        ("sequence_balance_weight", "sequence-wise"),
        ("global_balance_weight", "global-batch"),
    ):
        value = float(moe.get(key, 0.0) or 0.0)
        if value:
            parts.append(f"{word} {value:g}")
    return " + ".join(parts) or "none"


def balance_figure(trials):
    """Load CV, dead experts and dropped tokens over training, mean ± std over seeds per
    setting: how fast and how well each balancer balances. One row of panels per expert count,
    one colour per balancer (the same in every row), so that no panel holds more curves than
    tab10 has colours."""
    import matplotlib.pyplot as plt

    series = {
        "load CV (train)": load_cv_series,
        "dead experts % (train)": lambda rs: _scaled(rs, "train/dead_expert_fraction"),
        "tokens dropped % (train)": lambda rs: _scaled(rs, "train/dropped_fraction"),
    }
    # {expert count: {balancer: [records of each seed]}}
    rows: dict[int, dict[str, list]] = {}
    for t in trials:
        if t["finished"] and any("train/expert_load" in r for r in t["records"]):
            moe = t["config"].model.moe
            by_balancer = rows.setdefault(int(moe.num_experts), {})
            by_balancer.setdefault(balancer_label(moe), []).append(t["records"])
    if not rows:
        return None
    # The control first, then the auxiliary losses, then the bias: the order of the study's table.
    balancers = sorted(
        {b for row in rows.values() for b in row},
        key=lambda b: (b != "none", "bias" in b, b.count("+"), b),
    )
    colours = plt.get_cmap("tab10" if len(balancers) <= 10 else "tab20")
    colour = {b: colours(i % colours.N) for i, b in enumerate(balancers)}
    fig, axes = plt.subplots(
        len(rows), 3, figsize=(15, 3.6 * len(rows)), squeeze=False, sharex=True
    )
    for axes_row, (experts, by_balancer) in zip(axes, sorted(rows.items())):
        for ax, (label, fn) in zip(axes_row, series.items()):
            for balancer, runs in by_balancer.items():
                curves = [fn(records) for records in runs]
                if not all(len(c[0]) for c in curves):
                    continue
                steps, mean, std = seeds_lib.mean_curve(curves)
                c = colour[balancer]
                ax.plot(steps, mean, lw=1.4, color=c, label=balancer)
                ax.fill_between(steps, mean - std, mean + std, color=c, alpha=0.15, lw=0)
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes_row[0].set_title(f"{experts} experts", loc="left", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    seeds = max(len(runs) for row in rows.values() for runs in row.values())
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    order = [b for b in balancers if b in handles]
    fig.legend([handles[b] for b in order], order, loc="upper left", fontsize=8,
               bbox_to_anchor=(1.0, 0.95), title="balancer")  # fmt: skip
    fig.suptitle(f"mean ± std over {seeds} seeds (bands)", fontsize=9)
    fig.tight_layout()
    return fig


def baseline_section(trials) -> list[str]:
    """Unigram entropy, zlib and xz cold, and xz after the training split, on exactly the bytes
    the trials' final evaluations scored (the whole eval split), beside the best trial."""
    whole = [t for t in trials if t.get("eval_scope") == "whole split" and t["final"]]
    if not whole or whole[0]["config"].model.get("arch", "decoder") != "decoder":
        return []
    rivals = scored_text_baselines(resolve(whole[0]["config"]), "split")
    best = min(whole, key=lambda t: t["final"]["final/bits_per_byte"])
    lines = [
        "",
        f"## Baselines on the {best['final']['final/scored_bytes']:,.0f} scored bytes "
        f"(the whole eval split, {best['final']['final/documents']:.0f} documents)",
        "",
        "| code | bits/byte |",
        "|---|---|",
        f"| best trial ({best['name']}) | {best['final']['final/bits_per_byte']:.4f} |",
    ]
    lines += [f"| {name} | {value:.4f} |" for name, value in rivals.items()]
    return lines


def _scaled(records, metric):
    steps, values = analysis.metric_series(records, metric)
    return steps, 100 * values


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sweep_dir = _WORKDIR.value
    trials = analysis.load_sweep(sweep_dir)
    if not trials:
        raise app.UsageError(f"no trial with a config.json under {sweep_dir}.")
    out = os.path.join(sweep_dir, "report")
    os.makedirs(out, exist_ok=True)
    quiet = quiet_step_times(sweep_dir)
    rows = [row(t, quiet) for t in trials]
    write_csv(os.path.join(out, "results.csv"), rows, COLUMNS)
    sections = [f"# Sweep report: {sweep_dir}", "", markdown(rows, COLUMNS)]
    sections += baseline_section(trials)
    figures = {"eval_curves.png": analysis.plot_eval_curves(trials)}

    varied, every, expert_counts = set(), None, set()
    if os.path.exists(os.path.join(sweep_dir, sweeps.SWEEP_FILE)):
        for trial in sweeps.read_sweep_file(sweep_dir)["trials"]:
            varied |= set(trial["overrides"])
            expert_counts.add(trial["overrides"].get("model.moe.num_experts"))
            every = set(trial["overrides"]) if every is None else every & set(trial["overrides"])
    capacity_study = _CAPACITY_EVAL.value == "on" or (
        _CAPACITY_EVAL.value == "auto" and "model.moe.train_capacity_factor" in (every or set())
    )
    if "model.moe.num_experts" in varied and len(expert_counts) > 1:
        figures["loss_vs_experts.png"] = analysis.plot_loss_vs_experts(trials)
        figures["step_time_vs_experts.png"] = analysis.plot_final_vs(
            trials, "model.moe.num_experts", y=step_time_ms, empty_note=NO_STEP_TIMES
        )
    if capacity_study:
        figures["capacity_train.png"] = analysis.plot_capacity_factor(
            trials, group_by="model.moe.num_selected"
        )
        factors = [float(f) for f in _CAPACITY_FACTORS.value]
        cap_rows = capacity_evaluation(trials, factors)
        if cap_rows:
            columns = ("trial", "k", "train_cf", "eval_cf", "eval_loss", "eval_dropped_pct")
            write_csv(os.path.join(out, "capacity_eval.csv"), cap_rows, columns)
            sections += [
                "",
                "## Every checkpoint at every eval capacity factor",
                "",
                markdown(cap_rows, columns),
            ]
            figures["capacity_eval.png"] = plot_capacity_evaluation(cap_rows)
            if any(seeds_lib.setting_name(t["name"]) != t["name"] for t in trials):
                matrix = seeds_lib.capacity_matrix(cap_rows)
                sections += [
                    "",
                    "## Eval loss at every eval capacity factor, mean ± std over seeds",
                    "",
                    markdown(matrix, list(matrix[0])),
                ]
    if any(seeds_lib.setting_name(t["name"]) != t["name"] for t in trials):
        seed_text, seed_figures = seed_report(trials, rows, out)
        sections += ["", seed_text]
        figures.update(seed_figures)
        balance = balance_figure(trials)
        if balance is not None:
            figures["balance_over_training_seeds.png"] = balance
    for name, fig in figures.items():
        fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
        # A vector copy for papers and slides beside each PNG.
        fig.savefig(os.path.join(out, name[: -len(".png")] + ".svg"), bbox_inches="tight")
    sections += ["", "Plots: " + ", ".join(f"report/{n}" for n in figures)]
    text = "\n".join(sections) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cli.run(main)
