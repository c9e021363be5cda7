"""One-shot device benchmark: what a GPU or TPU host does with switchmoe, in one command, in
about 8 minutes, with MFU per case (issue 36, item 4).

  python -m experiments.device_benchmark                    # on the GPU or TPU host
  python -m experiments.device_benchmark --tiny             # CPU smoke run (the suite runs it)

Writes experiments/results/benchmark/device_<device kind>.json (and .md beside it): the machine
(device kind named), and three parts, each measured as experiments/benchmark.py measures (paired
ratios to the dense FFN or dense model taken in the same run; compile time apart):
  1. top1_capacity: the MoE layer at Switch-Base sizes (D 768, F 3072, E 8 and 64, 16,384
     tokens in one routing group, bfloat16), top-1 at capacity factor 1.25, einsum and gather;
  2. top2_dropless: the same sizes, top-2, the dropless implementations (ragged_dot, blocked);
  3. train: training steps of a Switch-Base-8-shaped decoder (12 blocks, D 768, F 3072, 12
     heads, 8 experts top-1 every other block, 8 sequences of 512 tokens, bfloat16) beside its
     dense counterpart.
A backend that does not lower for this platform (jax.export: switchmoe/training/lowering.py) is
left out with the reason, not timed. MFU = the case's useful FLOPs per second ÷ the chip's dense
bfloat16 peak (training/profiling.py: PEAK_BF16_FLOPS); useful FLOPs are the routed experts'
matmuls for the layers (benchmark.ffn_flops) and PaLM's model FLOPs for the train steps. On a
device kind not in the table (CPU included) MFU is None and the achieved FLOP/s stand alone.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags

from experiments import benchmark
from switchmoe import cli
from switchmoe.moe.layer import MoeLayer
from switchmoe.training import profiling
from switchmoe.training.lowering import lowering_errors

_TINY = flags.DEFINE_bool("tiny", False, "Tiny sizes: a CPU smoke run of the whole machinery.")
# --out is benchmark.py's flag (imported with it): the JSON path, the markdown table beside it.
_OUT = benchmark._OUT

SIZES = dict(tokens=16384, d_model=768, d_ff=3072, experts=[8, 64], matmul_size=4096)
TINY = dict(tokens=256, d_model=32, d_ff=64, experts=[4], matmul_size=256)
PARTS = {
    "top1_capacity": dict(num_selected=1, backends=["einsum", "gather"], capacity_factors=[1.25]),
    "top2_dropless": dict(
        num_selected=2, backends=["dropless_ragged_dot", "dropless_blocked"], capacity_factors=[]
    ),
}


def settings(part: str, tiny: bool) -> dict:
    """benchmark.run_benchmark's settings of one part (no training steps in the layer parts)."""
    s = dict(benchmark.PRESETS["quick" if tiny else "full"])
    s.update(TINY if tiny else SIZES)
    s.update(PARTS[part])
    if tiny:  # one backend per part: the machinery, in seconds (gather's hand FLOP count is
        # refused at these sizes in bfloat16: the converts around 32-wide matmuls are 9% more)
        s["backends"] = s["backends"][:1] if part == "top1_capacity" else s["backends"][1:]
    s.update(
        preset=f"device_{part}",
        dtype="bfloat16",
        group_size=None,
        repeats=3 if tiny else 10,
        warmup=1 if tiny else 2,
        block_size=None,
        ragged_dot_max_experts=None if not tiny else 8,
        max_seconds=2.0 if tiny else 4.0,
        train=False,
    )
    return s


def lowers_here(backend: str, s: dict) -> str | None:
    """None if the backend's layer (forward and backward) lowers for this platform, else why."""
    name, implementation = benchmark._backend_settings(backend)
    x = jax.ShapeDtypeStruct((1, 64, s["d_model"]), jnp.bfloat16)
    layer = MoeLayer(
        num_experts=s["experts"][0], d_ff=s["d_ff"], num_selected=s["num_selected"],
        backend=name, dropless_implementation=implementation, dtype=jnp.bfloat16,
    )  # fmt: skip
    params = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
    loss = lambda p, x: jnp.sum(layer.apply(p, x)[0].astype(jnp.float32))
    platform = jax.default_backend()
    return lowering_errors(jax.value_and_grad(loss), params, x, platforms=[platform])[platform]


def train_configs(tiny: bool) -> dict:
    """The Switch-Base-8-shaped decoder and its dense counterpart (tiny: benchmark's tiny sizes)."""
    configs = benchmark.train_configs("tiny" if tiny else "demo", "bfloat16")
    moe, dense = configs["demo"], configs["dense"]
    if not tiny:
        for c in (moe, dense):
            c.model.d_model, c.model.d_ff, c.model.num_heads, c.model.num_layers = 768, 3072, 12, 12
            c.data.seq_len, c.batch_size = 512, 8
        moe.model.moe.num_experts = 8
    moe.model.moe.num_selected, moe.model.moe.gate_norm = 1, "raw"  # Switch's top-1
    moe.model.moe.expert_d_ff = None  # experts as wide as the dense FFN: equal active FLOPs
    moe.model.moe.moe_every, moe.model.moe.group_size = 2, None
    moe.model.moe.train_capacity_factor = 1.25
    return {"switch_base8": moe, "dense": dense}


def with_mfu(record: dict, flops_per_s: float, peak: float | None) -> dict:
    record["mfu"] = None if peak is None else flops_per_s / peak
    return record


def main(argv):
    del argv
    tiny = _TINY.value
    started = time.perf_counter()
    machine = benchmark.machine_info()
    peak = profiling.peak_flops(machine["device_kind"])
    log = lambda line: print(line, flush=True)
    log(f"{machine['platform']} ({machine['device_kind']}): bf16 peak "
        f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")  # fmt: skip
    result = {"machine": machine, "peak_bf16_flops": peak, "parts": {}, "not_lowered": {}}
    for part in PARTS:
        s = settings(part, tiny)
        for backend in list(s["backends"]):
            reason = lowers_here(backend, s)
            if reason is not None:
                s["backends"].remove(backend)
                result["not_lowered"][backend] = reason
                log(f"{backend}: does not lower here ({reason}); not timed")
        measured = benchmark.run_benchmark(s, log=log)
        for case in measured["cases"]:
            if "achieved_flops_per_s" in case:
                with_mfu(case, case["achieved_flops_per_s"], peak)
                log(f"{part} {case['backend']} E={case['num_experts']}: × dense "
                    f"{case['ratio_to_dense']:.2f}, MFU {_pct(case['mfu'])}")  # fmt: skip
        dense = measured["dense"]
        with_mfu(dense, dense["flops"] / dense["median_s"], peak)
        result["parts"][part] = measured

    steps = dict(warmup=1 if tiny else 2, train_steps=2 if tiny else 10)
    configs = train_configs(tiny)
    train = benchmark.train_cases(configs, steps, log)
    for record in train:
        per_step = profiling.model_flops_per_example(configs[record["model"]]) * record["batch"]
        record["model_flops_per_step"] = per_step
        with_mfu(record, per_step / record["median_s"], peak)
        log(f"train {record['model']}: × dense {record.get('ratio_to_dense', 1):.2f}, "
            f"MFU {_pct(record['mfu'])}")  # fmt: skip
    result["train"] = train
    result["total_s"] = time.perf_counter() - started

    kind = machine["device_kind"].replace(" ", "_").replace("/", "_")
    out = _OUT.value or os.path.join("experiments", "results", "benchmark", f"device_{kind}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(result))
    print(f"wrote {out} in {result['total_s']:.0f} s", file=sys.stderr)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Device benchmark: {m['device_kind']} ({m['platform']}), bfloat16",
        "",
        f"jax {m['versions']['jax']}, {m['time_utc']}; whole run {result['total_s']:.0f} s. "
        "MFU against the chip's dense bf16 peak "
        + (
            "(unknown for this device)."
            if result["peak_bf16_flops"] is None
            else f"({result['peak_bf16_flops'] / 1e12:.0f} TFLOP/s)."
        ),  # fmt: skip
        "",
        "| part | case | E | median ms | × dense | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, measured in result["parts"].items():
        d = measured["dense"]
        lines.append(f"| {part} | dense FFN | - | {d['median_s'] * 1e3:.2f} | 1 | "
                     f"{d['flops'] / d['median_s'] / 1e12:.3g} | {_pct(d['mfu'])} |")  # fmt: skip
        for c in measured["cases"]:
            if "achieved_flops_per_s" not in c:
                continue
            lines.append(
                f"| {part} | {c['backend']} | {c['num_experts']} | "
                f"{c['layer']['median_s'] * 1e3:.2f} | {c['ratio_to_dense']:.2f} | "
                f"{c['achieved_flops_per_s'] / 1e12:.3g} | {_pct(c['mfu'])} |"
            )
    for r in result["train"]:
        lines.append(
            f"| train | {r['model']} | {r['num_experts'] or '-'} | {r['median_s'] * 1e3:.1f} | "
            f"{r.get('ratio_to_dense', 1):.2f} | "
            f"{r['model_flops_per_step'] / r['median_s'] / 1e12:.3g} | {_pct(r['mfu'])} |"
        )
    for backend, reason in result["not_lowered"].items():
        lines += ["", f"Not lowered here: {backend}: {reason}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.run(main)
