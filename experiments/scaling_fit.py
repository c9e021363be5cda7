"""Fit the routed scaling law of Clark et al. (2022) to expert-count sweeps, with intervals.

  python -m experiments.scaling_fit \
      --sweeps=runs/sweeps/expert_count_switch,runs/sweeps/expert_count_switch_d64 \
      --out=experiments/results/scaling_fit

Reads every finished trial of the sweeps (its config and `final_eval_documents.npz`, the whole
eval split's per-document losses), takes N = active non-embedding parameters and E = experts per
MoE layer (1 for dense), fits log L = a·log N + b·log Ê + c·log N·log Ê + d in both forms (Ê = E,
and their saturating Ê), with 95% bootstrap intervals over documents and seeds
(switchmoe/analysis/scaling_law.py), prints them beside Clark et al.'s coefficients, and the
expert count past which doubling the experts gains less than --min_gain nats at each size.
Writes fit.json and fit.md under --out. Needs at least two model sizes.
"""

import json
import math
import os

import jax
import numpy as np
from absl import app, flags, logging

from switchmoe import cli
from switchmoe.analysis import load_sweep
from switchmoe.analysis import scaling_law as sl
from switchmoe.models import abstract_params, build_model, count_params, resolve
from switchmoe.runs.metrics import FINAL_DOCUMENTS_FILE

_SWEEPS = flags.DEFINE_list("sweeps", None, "Sweep directories (expert-count studies).")
_OUT = flags.DEFINE_string("out", None, "Directory for fit.json and fit.md (default: print only).")
_RESAMPLES = flags.DEFINE_integer("resamples", 500, "Bootstrap resamples.")
_MIN_GAIN = flags.DEFINE_float(
    "min_gain", 0.005, "Gain (nats) below which another doubling of the experts 'stops paying'."
)
flags.mark_flags_as_required(["sweeps"])


def non_embedding_active(config) -> int:
    """Parameters active per token, less the token embedding (tied with the output here)."""
    config = resolve(config)
    params = abstract_params(build_model(config), config)
    embedding = sum(
        math.prod(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if getattr(path[0], "key", None) == "embed"
    )
    return count_params(config)["active_per_token"] - embedding


def load_runs(sweep_dirs) -> list[sl.Run]:
    runs, sizes = [], {}
    for sweep in sweep_dirs:
        for trial in load_sweep(sweep):
            path = os.path.join(trial["workdir"], FINAL_DOCUMENTS_FILE)
            if not (trial["finished"] and os.path.exists(path)):
                continue
            config = trial["config"]
            key = (config.model.d_model, config.model.num_layers, config.model.d_ff)
            if key not in sizes:
                sizes[key] = non_embedding_active(config)
            sums = np.load(path)
            runs.append(
                sl.Run(
                    params=float(sizes[key]),
                    experts=max(1, int(config.model.moe.num_experts)),
                    seed=int(config.seed),
                    doc_loss=np.asarray(sums["loss"], np.float64),
                    doc_tokens=np.asarray(sums["tokens"], np.float64),
                )
            )
    return runs


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    runs = load_runs(_SWEEPS.value)
    if len({r.params for r in runs}) < 2:
        raise app.UsageError(
            f"--sweeps hold {len(runs)} finished runs with {FINAL_DOCUMENTS_FILE} at "
            f"{len({r.params for r in runs})} model size(s); the fit needs two sizes or more."
        )
    result = sl.report(runs, _RESAMPLES.value, _MIN_GAIN.value)
    text = sl.markdown(result)
    print(text)
    if _OUT.value:
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "fit.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(_OUT.value, "fit.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    cli.run(main)
