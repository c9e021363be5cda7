"""Time the training step of every trial of a sweep, one trial at a time, on a quiet machine.

  python -m experiments.step_time --workdir=runs/sweeps/routing [--steps=20] [--warmup=3]

A sweep's logged tokens/s measure whatever else the machine was doing while each trial trained;
this re-times each trial's jitted train step alone: one device, the trial's own config and data
batches, fresh parameters (the step's cost has static shapes: it does not depend on the weights),
`warmup` steps to compile and settle, then `steps` steps timed one by one with
`block_until_ready`; the median is reported. Writes <workdir>/report/step_times.json, which
`experiments.report` adds to its table as `quiet_step_ms`.
"""

import json
import os
import platform
import statistics
import time

import jax
from absl import app, flags, logging

from switchmoe import analysis, cli, sharding
from switchmoe.analysis import seeds
from switchmoe.data.span_corruption import make_pipeline
from switchmoe.models import resolve
from switchmoe.training.trainer import Trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory written by experiments.sweep.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per trial.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles).")
_ONE_SEED = flags.DEFINE_bool(
    "one_seed_per_setting",
    False,
    "Time one trial per setting of a seed sweep (seeds change values, not shapes, so the step "
    "costs the same) and record it for each of the setting's trials.",
)
flags.mark_flags_as_required(["workdir"])

STEP_TIMES_FILE = os.path.join("report", "step_times.json")


def time_trial(config, steps: int, warmup: int) -> dict:
    config = analysis.single_device_config(resolve(config))
    trainer = Trainer(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
    pipeline = make_pipeline(config)
    params, opt_state = trainer.init()
    stream = pipeline.train_batches()
    batches = [trainer.put_batch(next(stream)) for _ in range(warmup + steps)]
    stream.close()
    times = []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        params, opt_state, metrics = trainer.run_train_step(params, opt_state, batch, step)
        jax.block_until_ready((params, metrics))
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "steps": steps,
        "tokens_per_step": config.batch_size * config.data.seq_len,
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    trials = analysis.load_sweep(_WORKDIR.value)
    if not trials:
        raise app.UsageError(f"no trial with a config.json under {_WORKDIR.value}.")
    results = {
        "machine": {
            "platform": jax.devices()[0].platform,
            "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "trials": {},
    }
    timed: dict[str, dict] = {}
    for trial in trials:
        setting = seeds.setting_name(trial["name"]) if _ONE_SEED.value else trial["name"]
        if setting not in timed:
            timed[setting] = time_trial(trial["config"], _STEPS.value, _WARMUP.value)
            print(
                f"{setting}: {timed[setting]['median_ms']:.1f} ms/step (median of {_STEPS.value})"
            )
        results["trials"][trial["name"]] = {**timed[setting], "timed_as": setting}
    path = os.path.join(_WORKDIR.value, STEP_TIMES_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
