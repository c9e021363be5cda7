"""How long the README's first command takes from a fresh clone, measured, with the date.

  python -m experiments.time_fresh_clone --out=experiments/results/fresh_clone

Clones this repository's HEAD into a temporary directory and times, there, `make install` (a new
.venv with switchmoe and its test extra; pip's download cache is whatever this machine has) and
then `make demo` (the corpus if it is not cached yet, training, the final evaluation, the
summary). Writes <out>/fresh_clone.json and fresh_clone.md: both times, the date, the commit,
the machine, the load average before the start (a busy machine is slower: say so), and whether
pip's and switchmoe's data caches were warm. README and configs/demo.py quote these files.
Nothing else should run meanwhile.
"""

import datetime
import json
import os
import platform
import subprocess
import tempfile
import time

from absl import flags

from switchmoe import cli
from switchmoe.analysis.evaluation import REPOSITORY
from switchmoe.data.pipeline import default_data_config, resolve_data_dir

_OUT = flags.DEFINE_string("out", "experiments/results/fresh_clone", "Results directory.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the clone (default: removed at the end).")


def timed(command: list[str], cwd: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return seconds, done.stdout + done.stderr


def main(argv):
    del argv
    root = REPOSITORY
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    pip_cache = os.path.expanduser("~/.cache/pip")
    data_cache = resolve_data_dir(default_data_config())
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },  # fmt: skip
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "pip_cache_warm": os.path.isdir(pip_cache) and bool(os.listdir(pip_cache)),
        "data_cache_warm": os.path.isdir(data_cache) and bool(os.listdir(data_cache)),
    }
    clone = tempfile.mkdtemp(prefix="switchmoe_fresh_")
    subprocess.run(["git", "clone", "--quiet", root, clone], check=True)
    record["install_seconds"], _ = timed(["make", "install"], clone)
    record["demo_seconds"], output = timed(["make", "demo"], clone)
    record["total_seconds"] = record["install_seconds"] + record["demo_seconds"]
    record["demo_last_lines"] = output.strip().splitlines()[-12:]
    for key in ("install_seconds", "demo_seconds", "total_seconds"):
        record[key] = round(record[key], 1)
    if not _KEEP.value:
        subprocess.run(["rm", "-rf", clone], check=True)
    out = os.path.join(root, _OUT.value) if not os.path.isabs(_OUT.value) else _OUT.value
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fresh_clone.json"), "w") as f:
        json.dump(record, f, indent=1)
    minutes = lambda s: f"{int(s // 60)}m{int(round(s % 60)):02d}s"
    warm = lambda w: "warm" if w else "cold"
    table = (
        "| step | took |\n|---|---|\n"
        f"| `make install` (new .venv, test extra; pip cache {warm(record['pip_cache_warm'])}) | "
        f"{minutes(record['install_seconds'])} |\n"
        f"| `make demo` (data cache {warm(record['data_cache_warm'])}) | "
        f"{minutes(record['demo_seconds'])} |\n"
        f"| both, from `git clone` | **{minutes(record['total_seconds'])}** |\n\n"
        f"Measured {record['date']} at commit {commit} on {record['machine']['cpu_count']} CPU "
        f"cores (load average {record['load_average_1min_before']} before the start).\n"
    )
    with open(os.path.join(out, "fresh_clone.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    cli.run(main)
