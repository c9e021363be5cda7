"""Making a trained MoE small: distillation into a dense model, expert merging and int8 experts,
side by side on one model with the fraction of the MoE's gain each keeps (Switch §5's measure).

  python -m experiments.sweep --config=configs/studies.py:expert_count_top2 \
      --workdir=runs/sweeps/expert_count_top2 --seeds=0,1,2       # the MoE and dense runs
  python -m experiments.compression_study --sweep=runs/sweeps/expert_count_top2 \
      --workdir=runs/compression --out=experiments/results/compression

The MoE is the expert-count study's 32-expert model (top-2, normalised gates, experts of width
256: the demo's setup; tied with 64 experts for the study's best, at half the parameters), and
the dense baseline that study's dense model of equal active size (d_ff 512), seeds 0, 1, 2; a
trial missing from --sweep is trained there first, exactly as the sweep would. For each seed s,
against MoE seed s and dense seed s:

- `distilled (non-expert init)`, `distilled (scratch)`: the dense model trained 600 steps with
  the MoE as teacher (distill.teacher_weight 0.25, temperature 1, Switch's recipe), starting
  from the teacher's non-expert parameters or from scratch; <workdir>/distill_<init>,seed=<s>.
  Their control, `dense from the MoE's non-expert weights, no teacher`: the non-expert start
  with teacher weight 0 (the teacher is run and logged, and changes nothing).
- `merged E'`: every MoE layer merged to E' = 16, 8, 1 experts (switchmoe/compress/merging.py defaults:
  usage similarity, usage weights, aligned units, output scales; statistics from 8 batches of
  the training split), plus three ablations at E' = 8 (no alignment, no rescaling, router
  similarity); <workdir>/merged_e<E'>[_<ablation>],seed=<s>. No further training.
- `merged to E', then 100 steps`: each merged run fine-tuned 100 steps (init_from the merged
  workdir, AdamW 1e-3, 10 warm-up steps, cosine, a new data order): 0.41M tokens more than the
  other rows had, to see how much of the merge's loss a short recovery buys back; beside the
  same 100 steps from the MoE and from the dense model (`MoE, then 100 steps`, `dense, ...`).
- `int8 experts`: the MoE with weight-only int8 experts (switchmoe/compress/quantization.py).

Every row is evaluated the same way: its run restored from its workdir, the run's own 16
validation batches at eval capacity factor 2.0 (`analysis.evaluation.evaluate_run`). Gain kept
= (L_dense − L) / (L_dense − L_MoE), per seed, then mean ± sample std over the seeds. Sizes are
read from the restored arrays (bytes: every parameter array's nbytes). A rerun skips finished
runs and cached evaluations (<workdir>/evaluations.json). Writes <out>/compression.json and
<out>/compression.md.
"""

from __future__ import annotations

import json
import os
import statistics

from absl import flags

from switchmoe import cli

_SWEEP = flags.DEFINE_string("sweep", None, "The expert_count_top2 sweep's workdir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the study's own runs go.")
_OUT = flags.DEFINE_string("out", None, "Where compression.json and compression.md go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (MoE, dense and student alike).")
_EXPERTS = flags.DEFINE_integer("experts", 32, "The MoE's experts per layer.")
flags.mark_flags_as_required(["sweep", "workdir", "out"])

MERGED = (16, 8, 1)
# Merged models fine-tuned briefly (init_from the merged run): steps, peak learning rate.
TUNE_STEPS, TUNE_LR = 100, 1e-3
ABLATIONS = {  # at E' = 8
    "no_align": {"align": False},
    "no_rescale": {"rescale": False},
    "router_similarity": {"similarity": "router"},
}
DISTILL_INITS = ("non_expert", "scratch")
# The control of the non-expert start: the same start and steps without the teacher (weight 0),
# which separates what the teacher's soft targets add from the head start of its trained
# attention and embeddings.
CONTROL = "non_expert_init_only"


def trial_config(num_experts: int, seed: int):
    """The expert_count_top2 sweep's trial `num_experts=<E>,seed=<s>` (sweeps.py's overrides)."""
    from switchmoe.sweeps import load_config_module  # noqa: PLC0415

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "studies.py")
    config = load_config_module(path).get_config("expert_count_top2")
    config.model.moe.num_experts = num_experts
    config.seed = config.data.seed = seed
    return config


def _rows(E: int) -> list[tuple[str, str]]:
    """(row label, run kind) in table order."""
    rows = [(f"MoE, {E} experts", "moe"), ("dense, trained alone", "dense")]
    rows += [
        (f"distilled ({init.replace('_', '-')} init)", f"distill_{init}") for init in DISTILL_INITS
    ]
    rows.append(("dense from the MoE's non-expert weights, no teacher", f"distill_{CONTROL}"))
    for e in MERGED:
        rows.append((f"merged to {e} expert{'s' if e > 1 else ''}", f"merged_e{e}"))
    for e in MERGED:
        rows.append((f"merged to {e}, then {TUNE_STEPS} steps", f"merged_e{e}_tuned"))
    # Their controls: the same 100 steps from the unmerged MoE and from the dense model.
    rows.append((f"MoE, then {TUNE_STEPS} steps", "moe_tuned"))
    rows.append((f"dense, then {TUNE_STEPS} steps", "dense_tuned"))
    for name in ABLATIONS:
        rows.append((f"merged to 8, {name.replace('_', ' ')}", f"merged_e8_{name}"))
    rows.append(("int8 experts", "int8"))
    return rows


def _make_run(kind: str, seed: int, moe_dir: str, dense_dir: str, root: str) -> str:
    """The workdir of one row's run, made (trained, merged or quantized) unless it exists."""
    from switchmoe.compress import merging, quantization  # noqa: PLC0415
    from switchmoe.runs import checkpoints, config_files
    from switchmoe.training.trainer import train_and_evaluate  # noqa: PLC0415

    if kind == "moe":
        return moe_dir
    if kind == "dense":
        return dense_dir
    workdir = os.path.join(root, f"{kind},seed={seed}")
    if kind.startswith("distill_"):
        config = trial_config(0, seed)
        config.distill.teacher = moe_dir
        init = kind.removeprefix("distill_")
        if init == CONTROL:
            init, config.distill.teacher_weight = "non_expert", 0.0
        config.distill.student_init = init
        train_and_evaluate(config, workdir)  # resumes, or only reports a finished run
        return workdir
    if kind.endswith("_tuned"):
        source = _make_run(kind.removesuffix("_tuned"), seed, moe_dir, dense_dir, root)
        config = config_files.read_config(source)
        config.init_from = source
        config.num_train_steps = config.checkpoint_every = TUNE_STEPS
        config.eval_every = TUNE_STEPS // 2
        config.optimizer.learning_rate, config.optimizer.warmup_steps = TUNE_LR, 10
        config.data.seed = seed + 1  # a data order other than the MoE's
        train_and_evaluate(config, workdir)
        return workdir
    if checkpoints.has_checkpoint(workdir):
        return workdir
    if kind == "int8":
        quantization.quantize_run(moe_dir, workdir)
        return workdir
    target, _, ablation = kind.removeprefix("merged_e").partition("_")
    merging.merge_run(moe_dir, workdir, int(target), **ABLATIONS.get(ablation, {}))
    return workdir


def _size(config, params) -> dict:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from switchmoe.compress import quantization  # noqa: PLC0415
    from switchmoe.models import count_params  # noqa: PLC0415

    leaves = jax.tree.leaves(jax.device_get(params))
    counts = count_params(config)
    out = {
        "parameters": int(sum(np.size(x) for x in leaves)),
        "bytes": int(sum(np.asarray(x).nbytes for x in leaves)),
        "active_per_token": int(counts["active_per_token"]),
    }
    if config.model.moe.num_experts:
        out["expert_bytes_per_parameter"] = quantization.expert_bytes(params)["bytes_per_parameter"]
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv):
    del argv
    from switchmoe import sweeps  # noqa: PLC0415
    from switchmoe.analysis.evaluation import evaluate_run  # noqa: PLC0415
    from switchmoe.runs import restore_run  # noqa: PLC0415
    from switchmoe.training.trainer import train_and_evaluate  # noqa: PLC0415

    sweep, root = os.path.abspath(_SWEEP.value), os.path.abspath(_WORKDIR.value)
    os.makedirs(root, exist_ok=True)
    cache_path = os.path.join(root, "evaluations.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    E, seeds = _EXPERTS.value, [int(s) for s in _SEEDS.value]
    table = {label: {"kind": kind, "seeds": {}} for label, kind in _rows(E)}
    for seed in seeds:
        moe_dir = os.path.join(sweep, f"num_experts={E},seed={seed}")
        dense_dir = os.path.join(sweep, f"num_experts=0,seed={seed}")
        for e, workdir in ((E, moe_dir), (0, dense_dir)):
            if not sweeps.is_finished(workdir):  # finished trials are only read
                train_and_evaluate(trial_config(e, seed), workdir)
        for label, entry in table.items():
            workdir = _make_run(entry["kind"], seed, moe_dir, dense_dir, root)
            key = f"{entry['kind']},seed={seed}"
            if key not in cache:
                run = restore_run(workdir)  # restored once, for the evaluation and the sizes
                result = evaluate_run(run)
                cache[key] = {"eval_loss": float(result["eval/loss"]),
                              "bits_per_byte": float(result["eval/bits_per_byte"]),
                              "dropped_fraction": float(result.get("eval/dropped_fraction", 0.0)),
                              "workdir": workdir, **_size(*run)}  # fmt: skip
                with open(cache_path, "w") as f:
                    json.dump(cache, f, indent=1)
            entry["seeds"][seed] = cache[key]
    moe_label, dense_label = _rows(E)[0][0], _rows(E)[1][0]
    summary = []
    for label, entry in table.items():
        per_seed = entry["seeds"]
        losses = [per_seed[s]["eval_loss"] for s in seeds]
        kept = [
            (table[dense_label]["seeds"][s]["eval_loss"] - per_seed[s]["eval_loss"])
            / (
                table[dense_label]["seeds"][s]["eval_loss"]
                - table[moe_label]["seeds"][s]["eval_loss"]
            )
            for s in seeds
        ]
        first = per_seed[seeds[0]]
        summary.append({
            "row": label, "kind": entry["kind"],
            "eval_loss": _mean_std(losses),
            "bits_per_byte": _mean_std([per_seed[s]["bits_per_byte"] for s in seeds]),
            "gain_kept": _mean_std(kept),
            "parameters": first["parameters"], "bytes": first["bytes"],
            "active_per_token": first["active_per_token"],
            "expert_bytes_per_parameter": first.get("expert_bytes_per_parameter"),
            "per_seed": per_seed,
        })  # fmt: skip
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "compression.json"), "w") as f:
        json.dump({"experts": E, "seeds": seeds, "rows": summary}, f, indent=1)
    lines = [
        "| model | parameters | bytes | active / token | expert bytes / param | eval loss (nats) "
        "| bits/byte | gain kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        (loss, loss_sd), (bpb, bpb_sd), (kept, kept_sd) = (
            r["eval_loss"], r["bits_per_byte"], r["gain_kept"],
        )  # fmt: skip
        bpp = r["expert_bytes_per_parameter"]
        lines.append(
            f"| {r['row']} | {r['parameters']:,} | {r['bytes'] / 2**20:.2f} MiB | "
            f"{r['active_per_token']:,} | {'–' if bpp is None else f'{bpp:.3f}'} | "
            f"{loss:.4f} ± {loss_sd:.4f} | {bpb:.3f} ± {bpb_sd:.3f} | "
            f"{100 * kept:.0f} ± {100 * kept_sd:.0f} % |"
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(_OUT.value, "compression.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cli.run(main)
