"""Sparse upcycling at CPU scale: an upcycled MoE against the dense model trained on, and against
the same MoE from scratch, at equal extra steps (Komatsuzaki et al. 2022, Fig. 2's question).

  python -m experiments.upcycle_study --workdir=runs/upcycling [--seeds=0,1] [--extra_steps=300]

1. `dense`: the studies' dense model (configs/studies.py:expert_count_top2 with 0 experts:
   d_model 128, 4 blocks, d_ff 512), 600 steps; every run below starts after it.
2. For each seed, `extra_steps` more steps of:
   - `dense_continued`   the dense model from its checkpoint (init_from), a fresh schedule;
   - `upcycled`          8 experts of the dense width (512), top-2 with normalised gates, every
                         expert a copy of the dense FFN of its block, a fresh router;
   - `drop_upcycled`     the same with half of each expert's hidden units re-drawn
                         (Drop-Upcycling, reinit fraction 0.5);
   - `moe_scratch`       the same MoE from a random initialisation, `extra_steps` steps only.
   Every run uses the studies' optimizer (AdamW 3e-3, 100 warm-up steps, cosine over its own
   steps). The MoE runs cost ~1.9x the dense FFN FLOPs per token (two experts of the dense
   width): the comparison is at equal steps and data, as in the paper, not at equal FLOPs.
Runs live in <workdir>/<name>_seed<s>; a rerun resumes or skips finished ones. Writes
<workdir>/upcycling.json and upcycling.md (mean ± sample std over seeds of the final eval loss,
each seed's, and each arm's paired difference from the dense model continued on the same seed);
`--report_only` rewrites upcycling.md from upcycling.json.
"""

import json
import os
import statistics

from absl import flags

from switchmoe import cli
from switchmoe.runs import metrics
from switchmoe.sweeps import load_config_module

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the results go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the continued runs.")
_EXTRA = flags.DEFINE_integer("extra_steps", 300, "Steps after the dense model's 600.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Rewrite upcycling.md from the workdir's upcycling.json; train nothing."
)
flags.mark_flags_as_required(["workdir"])

MOE = {
    "model.moe.num_experts": 8,
    "model.moe.num_selected": 2,
    "model.moe.gate_norm": "normalized",
    "model.moe.expert_d_ff": 512,
}
ARMS = {
    "dense_continued": ({}, True),
    "upcycled": (MOE, True),
    "drop_upcycled": ({**MOE, "upcycle_reinit_fraction": 0.5}, True),
    "moe_scratch": (MOE, False),
}


def base_config():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "studies.py")
    config = load_config_module(path).get_config("expert_count_top2")
    config.model.moe.num_experts = 0
    return config


def final_eval(workdir):
    evals = [r for r in metrics.read_metrics(workdir) if "eval/loss" in r]
    return evals[-1]


def main(argv):
    del argv
    from switchmoe.training.trainer import train_and_evaluate  # noqa: PLC0415

    root = os.path.abspath(_WORKDIR.value)
    if _REPORT_ONLY.value:
        with open(os.path.join(root, "upcycling.json")) as f:
            write_table(json.load(f), root)
        return
    dense = os.path.join(root, "dense")
    train_and_evaluate(base_config(), dense)
    results = {"dense": final_eval(dense), "arms": {}, "seeds": list(_SEEDS.value)}
    for name, (overrides, from_dense) in ARMS.items():
        runs = []
        for seed in _SEEDS.value:
            config = base_config()
            config.update_from_flattened_dict(overrides)
            config.seed = int(seed)
            config.data.seed = int(seed) + 1  # new data order after the dense model's
            config.num_train_steps = _EXTRA.value
            config.checkpoint_every = _EXTRA.value
            config.eval_every = _EXTRA.value // 3
            if from_dense:
                config.init_from = dense
            workdir = os.path.join(root, f"{name}_seed{seed}")
            print(f"[{name} seed {seed}]", flush=True)
            train_and_evaluate(config, workdir)
            runs.append(final_eval(workdir))
        results["arms"][name] = runs
    with open(os.path.join(root, "upcycling.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_table(results, root)


def table(results: dict) -> list[str]:
    """The Markdown table of upcycling.md: each arm's final eval loss (mean ± sample std over
    seeds, then per seed) and its paired difference from the dense model continued on the same
    seed's data order."""
    seeds = results.get("seeds") or [str(i) for i in range(len(results["arms"]["dense_continued"]))]
    dense_runs = [r["eval/loss"] for r in results["arms"]["dense_continued"]]
    lines = [
        "| run | extra steps | eval loss (nats), mean ± std | bits/byte | "
        + " | ".join(f"seed {seed}" for seed in seeds)
        + " | − dense continued, per seed | dropped (eval) |",
        "|---|---|---|---|" + "---|" * len(seeds) + "---|---|",
        f"| dense after 600 steps | 0 | {results['dense']['eval/loss']:.4f} | "
        f"{results['dense']['eval/bits_per_byte']:.3f} | " + "– | " * len(seeds) + "– | – |",
    ]
    for name, runs in results["arms"].items():
        losses = [r["eval/loss"] for r in runs]
        spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        bpb = statistics.mean(r["eval/bits_per_byte"] for r in runs)
        drop = [r.get("eval/dropped_fraction") for r in runs]
        drop = f"{100 * statistics.mean(drop):.2f}%" if None not in drop else "–"
        paired = (
            "–"
            if name == "dense_continued"
            else ", ".join(f"{loss - base:+.4f}" for loss, base in zip(losses, dense_runs))
        )
        lines.append(
            f"| {name} | {runs[0]['step']} | {statistics.mean(losses):.4f}{spread} | {bpb:.3f} | "
            + " | ".join(f"{loss:.4f}" for loss in losses)
            + f" | {paired} | {drop} |"
        )
    return lines


def write_table(results: dict, root: str) -> None:
    lines = table(results)
    with open(os.path.join(root, "upcycling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    cli.run(main)
