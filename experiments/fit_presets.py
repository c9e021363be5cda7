"""`experiments.fit` for every paper-sized config on every accelerator preset, one subprocess each.

  python -m experiments.fit_presets --out=experiments/results/fit [--only=REGEX]

Writes <out>/<config>_<variant>_<preset>.json (skipped when present: a rerun resumes) and
<out>/fit.md, the table EXPERIMENTS.md quotes ("Will it fit?"). Each run compiles the train step
for the preset's device count on fake CPU devices (about a minute for Switch-Base-128 on 64).
"""

import json
import os
import re
import subprocess
import sys

from absl import flags

from switchmoe import cli
from switchmoe.presets import PRESETS

_OUT = flags.DEFINE_string("out", "experiments/results/fit", "Directory of the results.")
_ONLY = flags.DEFINE_string("only", None, "Run only the entries whose name matches this regex.")

# (config file, variant, what it is): the sizes issue 16 names.
CONFIGS = (
    *(("switch_t5", f"base{e}", f"Switch-Base-{e} enc-dec") for e in (8, 16, 32, 64, 128)),
    ("switch_t5", "large128", "Switch-Large-128 enc-dec"),
    ("switch_t5", "st_moe_l", "ST-MoE-L enc-dec"),
    *(("switch", f"base{e}", f"Switch-Base-{e} decoder") for e in (8, 16, 32, 64, 128)),
    ("switch", "large128", "Switch-Large-128 decoder"),
    ("st_moe", "large", "ST-MoE-L decoder"),
    ("gshard", "e128", "GShard e128 decoder"),
)


def name_of(config: str, variant: str, preset: str) -> str:
    return f"{config}_{variant}_{preset}"


def table(out: str) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = [
        "| model | preset | mesh (data×expert) | params GiB | opt GiB | kept for bwd GiB/dev | "
        "temps GiB (CPU est.) | total GiB | fits | TFLOP/step | all-to-all MiB/layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, variant, what in CONFIGS:
        for preset, platform in PRESETS.items():
            path = os.path.join(out, name_of(config, variant, preset) + ".json")
            if not os.path.exists(path):
                continue
            r = json.load(open(path))
            e = r["estimates"]
            total = r["param_bytes"] + r["opt_state_bytes"] + e["temp_bytes"]
            fits = "yes" if total <= platform.memory_gib * 2**30 else "**no**"
            lines.append(
                f"| {what} | {preset} | {r['mesh']['data']}×{r['mesh']['expert']} | "
                f"{gib(r['param_bytes'])} | {gib(r['opt_state_bytes'])} | "
                f"{gib(r['saved_for_backward_bytes'] / r['batch_shards'])} | "
                f"{gib(e['temp_bytes'])} | {gib(total)} | {fits} ({platform.memory_gib:g}) | "
                f"{e['flops_per_step'] / 1e12:.0f} | "
                f"{e['all_to_all_bytes_per_moe_layer'] / 2**20:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    for config, variant, _ in CONFIGS:
        for preset, platform in PRESETS.items():
            name = name_of(config, variant, preset)
            path = os.path.join(_OUT.value, name + ".json")
            if (_ONLY.value and not re.search(_ONLY.value, name)) or os.path.exists(path):
                continue
            print(f"[fit] {name}", flush=True)
            command = [
                sys.executable, "-m", "experiments.fit",
                f"--config=configs/{config}.py:{variant},{preset}",
                f"--devices={platform.devices}", f"--device_memory_gib={platform.memory_gib}",
                f"--out={path}",
            ]  # fmt: skip
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:
                print(run.stdout[-2000:], run.stderr[-4000:], flush=True)
                continue
            print("\n".join(line for line in run.stdout.splitlines() if line.strip()), flush=True)
    with open(os.path.join(_OUT.value, "fit.md"), "w") as f:
        f.write(table(_OUT.value))
    print(f"wrote {os.path.join(_OUT.value, 'fit.md')}")


if __name__ == "__main__":
    cli.run(main)
