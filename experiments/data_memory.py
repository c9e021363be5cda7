"""Peak memory of the input pipeline alone: packed in memory vs streamed with grain.

  python -m experiments.data_memory --config=configs/demo.py --pipeline=stream [--batches=200]
      [--register=tests.synthetic_text] [--config.data.dataset=synthetic_text/mb100]
      [--out=runs/data_memory/stream.json]

Builds (or reuses) the dataset, then reads `--batches` training batches and a full evaluation
pass with no model, and reports the process's peak resident set (ru_maxrss) before and after
reading (VmHWM on Linux): the growth is what the pipeline holds. Use one process per measurement (the peak never
goes down) and data.num_workers=0 (worker processes have their own peaks, reported separately as
`children_peak_mib`, the largest of them). `--register` imports a module that registers a TFDS
builder of your own (the tests' generated dataset is one).
"""

import importlib
import json
import os
import platform
import resource
import time

from absl import flags
from ml_collections import config_flags

from switchmoe import cli
from switchmoe.data import pipeline as data_pipeline
from switchmoe.data.span_corruption import make_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "A switchmoe config file.")
_PIPELINE = flags.DEFINE_enum("pipeline", None, ["packed", "stream"], "Overrides data.pipeline.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Training batches to read.")
_EVAL = flags.DEFINE_integer("eval_batches", 0, "Eval batches to read (0: none; -1: all).")
_REGISTER = flags.DEFINE_multi_string("register", [], "Modules to import first (TFDS builders).")
_OUT = flags.DEFINE_string("out", None, "Write the result here as JSON too.")
flags.mark_flags_as_required(["config"])


def peak_mib(who=resource.RUSAGE_SELF) -> float:
    """Peak resident set in MiB. For this process, Linux's VmHWM: ru_maxrss survives exec and so
    starts at the parent's size when the parent (a test runner) is larger than we are."""
    if who == resource.RUSAGE_SELF and os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def measure(config, batches: int, eval_batches: int) -> dict:
    """Reads the batches; returns peak RSS (MiB) before and after, and what was read."""
    pipeline = make_pipeline(config)
    data_pipeline.prepared_builder(config.data)  # builds the dataset, packs nothing
    before = peak_mib()
    start = time.perf_counter()
    stream = pipeline.train_batches()
    tokens = 0
    for _ in range(batches):
        tokens += int(next(stream)["weights"].sum())
    stream.close()
    if eval_batches:
        for batch in pipeline.eval_batches(None if eval_batches < 0 else eval_batches):
            tokens += int(batch["weights"].sum())
    return {
        "pipeline": config.data.pipeline,
        "dataset": config.data.dataset,
        "batches": batches,
        "eval_batches": eval_batches,
        "batch_size": config.batch_size,
        "seq_len": config.data.seq_len,
        "num_workers": config.data.num_workers,
        "tokens_read": tokens,
        "seconds": time.perf_counter() - start,
        "peak_before_mib": before,
        "peak_after_mib": peak_mib(),
        "growth_mib": peak_mib() - before,
        "children_peak_mib": peak_mib(resource.RUSAGE_CHILDREN),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
    }


def main(argv):
    del argv
    for module in _REGISTER.value:
        importlib.import_module(module)
    config = _CONFIG.value
    if _PIPELINE.value:
        config.data.pipeline = _PIPELINE.value
    result = measure(config, _BATCHES.value, _EVAL.value)
    print(json.dumps(result, indent=1))
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
