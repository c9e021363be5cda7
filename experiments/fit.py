"""Will it fit? Per-device memory, FLOPs and all-to-all traffic of a config's train step.

  python -m experiments.fit --config=configs/switch_t5.py:base128,tpu_v5p_64 --devices=64
  python -m experiments.fit --config=configs/demo.py --devices=8 --config.mesh.expert=4

Lowers and compiles the jitted train step for `--devices` fake CPU devices standing in for the
accelerators (the config's mesh fills them; nothing is allocated: parameters, optimizer state
and batch are abstract). Parameter and optimizer-state bytes per device are exact; temporaries,
FLOPs and all-to-all bytes are the CPU compiler's estimates (see switchmoe/training/memory_fit.py for what
carries over to TPU and GPU). `--device_memory_gib` adds a yes/no against that budget;
`--out` writes the numbers as JSON; `--nocompile` skips the compile (exact numbers only);
`--lowering` also says whether the train step lowers for GPU ('cuda') and TPU on that mesh
(jax.export, switchmoe/training/lowering.py): a program that cannot is caught before an
accelerator is borrowed.
"""

import json
import os
import time

from absl import flags
from ml_collections import config_flags

from switchmoe import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant[,preset]]")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices standing in for accelerators.")
_MEMORY = flags.DEFINE_float("device_memory_gib", None, "Memory per device to check against.")
_OUT = flags.DEFINE_string("out", None, "Write the report here as JSON.")
_COMPILE = flags.DEFINE_bool(
    "compile", True, "Compile for the estimates; --nocompile: the exact numbers only (seconds)."
)
_LOWERING = flags.DEFINE_bool(
    "lowering", False, "Also check that the train step lowers for cuda and tpu (seconds)."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    if _DEVICES.value < 1:
        raise ValueError(f"--devices={_DEVICES.value}; allowed: a positive integer")
    # Before JAX starts its backend: fake CPU devices, however many the host has.
    import jax  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    from switchmoe.training import memory_fit  # noqa: PLC0415

    start = time.perf_counter()
    report = memory_fit.fit_report(_CONFIG.value, compile=_COMPILE.value)
    report["compile_seconds"] = time.perf_counter() - start
    print(memory_fit.describe(report, _MEMORY.value))
    if _LOWERING.value:
        from switchmoe.training import lowering  # noqa: PLC0415

        report["lowering"] = lowering.train_step_lowering(_CONFIG.value)
        for platform, reason in report["lowering"].items():
            print(f"lowers for {platform}: {'yes' if reason is None else 'no: ' + reason}")
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
