"""The peer benchmark's runs side by side, each MoE ratio also divided by the dense FFN's ratio.

  python -m experiments.peer_table experiments/results/benchmark/peer_cpu.json \
      experiments/results/benchmark/peer_cpu_repeats/run*.json \
      --out=experiments/results/benchmark/peer_runs.csv

`ratio` (switchmoe's time over Hugging Face's / PyTorch's, < 1: switchmoe faster) depends on how
fast each side's dense matmuls run on the machine of the day (XLA's and PyTorch's GEMMs differ, and
their gap moves with the machine's state). Divided by the same run's dense-FFN ratio, it compares
the MoE machinery alone: > 1 means that, once each side's dense FFN speed is divided out,
switchmoe's MoE layer is slower than Hugging Face's; < 1 that it is faster.
"""

import csv
import json
import os
import sys

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "CSV to write (default: print).")


def rows(paths):
    out = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        ratios = {p["case"]: p["ratio"] for p in run["peer"]}
        dense = ratios["dense"]
        for case, ratio in ratios.items():
            out.append(
                {
                    "run": os.path.basename(path).removesuffix(".json"),
                    "matmul_gflops": round(run["matmul"]["flops_per_s"] / 1e9),
                    "case": case,
                    "ratio": ratio,
                    "ratio_over_dense": None if case == "dense" else ratio / dense,
                }
            )
    return out


def main(argv):
    table = rows(argv[1:])
    handle = open(_OUT.value, "w", newline="") if _OUT.value else sys.stdout
    writer = csv.DictWriter(handle, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    if _OUT.value:
        handle.close()


if __name__ == "__main__":
    app.run(main)
