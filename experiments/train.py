"""Train an MoE language model from a config; rerun with the same workdir to resume.

  python -m experiments.train --config=configs/demo.py --workdir=runs/demo \
      [--config.model.moe.num_experts=16 ...]

A rerun on a workdir that holds a run trains with that run's recorded config (config.json and its
history) and changes only the settings named on its command line: `--config=configs/demo.py
--config.num_train_steps=2000` continues a run started with other overrides without repeating
them. A named change that alters what the checkpoint stores (the model) is refused.

Writes under the workdir: config.json, metrics.jsonl, TensorBoard events, checkpoints/, and the
final evaluation's per-document sums (final_eval_documents.npz). With --results=DIR, also what the
run reached as a results file (DIR/summary.json, summary.md).
"""

import json
import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from switchmoe import cli, distributed
from switchmoe.runs import checkpoints, config_files
from switchmoe.runs.summary import results_record, results_table, summary
from switchmoe.training.trainer import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:variant])."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if it has checkpoints.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs (jax.distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes)."
)
_RESULTS = flags.DEFINE_string(
    "results",
    None,
    "Also write what the run reached to DIR/summary.json and DIR/summary.md (a results file "
    "the documents include; experiments/results/demo is the demo's).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import time

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    start = time.perf_counter()
    start_step = checkpoints.latest_saved_step(_WORKDIR.value) or 0
    config = _CONFIG.value
    keys = config_files.overridden_keys(sys.argv)
    resumed = None
    if checkpoints.has_checkpoint(_WORKDIR.value):  # a start that saved nothing is a new run
        resumed = config_files.resume_config(_WORKDIR.value, config, keys)
    if resumed is not None:  # a rerun: the recorded settings, and only the ones named here
        config = resumed
        if jax.process_index() == 0:
            named = ", ".join(keys) if keys else "none"
            print(f"Rerun of {_WORKDIR.value}: its recorded config, with the settings given here "
                  f"({named}).", flush=True)  # fmt: skip
    result = train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        seconds = time.perf_counter() - start
        print(summary(config, _WORKDIR.value, result, seconds, start_step))
        if _RESULTS.value:
            record = results_record(config, _WORKDIR.value, result, seconds, start_step)
            os.makedirs(_RESULTS.value, exist_ok=True)
            with open(os.path.join(_RESULTS.value, "summary.json"), "w") as f:
                json.dump(record, f, indent=2)
            with open(os.path.join(_RESULTS.value, "summary.md"), "w") as f:
                f.write(results_table(record) + "\n")
            print(f"Results: {_RESULTS.value}/summary.json, summary.md")


if __name__ == "__main__":
    cli.run(main)
