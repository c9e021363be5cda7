"""A run's parameters evaluated at several eval capacity factors, and dropless.

  python -m experiments.evaluate --workdir=runs/demo --capacity_factors=0.5,1,2 --dropless \
      [--step=N] [--num_batches=0] [--out=runs/demo/capacity.json]

Prints the table of `analysis.evaluate_at_capacities` (eval loss, bits per token and per byte,
dropped fraction; the run's fixed validation batches, as training evaluates) and writes its rows
as JSON (default <workdir>/capacity_eval.json) with the run, the step and the machine. Capacity
decides only which tokens the experts see, so a model trained at one factor evaluates at any
other (Switch §2.2); dropless is what no dropping gives.
"""

import json
import os
import platform

import jax
from absl import flags

from switchmoe import analysis, cli
from switchmoe.runs import checkpoints

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to evaluate.", required=True)
_FACTORS = flags.DEFINE_list(
    "capacity_factors", ["0.5", "1", "1.25", "2"], "Eval capacity factors."
)
_DROPLESS = flags.DEFINE_bool("dropless", True, "Also evaluate dropless (no capacity).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_NUM_BATCHES = flags.DEFINE_integer(
    "num_batches", None, "Validation batches (default: the run's num_eval_batches; 0 = all)."
)
_OUT = flags.DEFINE_string("out", None, "JSON file (default: <workdir>/capacity_eval.json).")


def main(argv):
    del argv
    try:
        factors = [float(f) for f in _FACTORS.value]
    except ValueError:
        raise ValueError(
            f"--capacity_factors={_FACTORS.value!r}: numbers > 0, comma-separated."
        ) from None
    if not all(f > 0 for f in factors):
        raise ValueError(f"--capacity_factors={_FACTORS.value!r}: every factor must be > 0.")
    step = _STEP.value if _STEP.value is not None else checkpoints.latest_saved_step(_WORKDIR.value)
    rows = analysis.evaluate_at_capacities(
        _WORKDIR.value, factors, dropless=_DROPLESS.value, num_batches=_NUM_BATCHES.value,
        step=_STEP.value,
    )  # fmt: skip
    print(analysis.format_capacity_table(rows))
    out = _OUT.value or os.path.join(_WORKDIR.value, "capacity_eval.json")
    record = {
        "workdir": os.path.abspath(_WORKDIR.value),
        "step": step,
        "num_batches": _NUM_BATCHES.value,
        "machine": {"platform": jax.default_backend(), "processor": platform.processor()},
        "rows": rows,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"Wrote {out}.")


if __name__ == "__main__":
    cli.run(main)
