"""Speed and memory of the MoE layer by backend, expert count and capacity factor, against a dense
FFN of the same active parameters per token; and a training step of the demo model against its
dense counterpart. One run, so that every ratio compares numbers taken on the same machine.

  python -m experiments.benchmark --preset=quick          # tiny sizes, seconds (CI smoke test)
  python -m experiments.benchmark --preset=full           # 4,096 tokens, D 512, F 2048, 1..128 E
  python -m experiments.benchmark --preset=peer           # beside Hugging Face's PyTorch layers
  python -m experiments.benchmark --preset=full --dtype=bfloat16 --d_model=768 --d_ff=3072 \
      --tokens=32768                                      # Switch-Base-like sizes on a GPU

Writes <out>.json (machine, versions, settings, every measurement with all its repeat times) and
<out>.md (the tables). Default out: experiments/results/benchmark/<preset>_<platform>.json.

What is measured, for each case:
  - layer: MoeLayer forward+backward (gradients of Σ y·c + aux loss w.r.t. parameters and input),
    with the training capacity factor, each call followed by a call of the dense baseline ("× dense"
    is the median of these paired ratios); the dense baseline is relu(x·W1)·W2 with width k·F,
    i.e. the same active expert parameters per token (the router's D·E are left out);
  - experts only: the same experts' forward+backward on the buffers the backend builds ([E, G·C, D]
    for einsum/gather, the padded blocks for blocked dropless, the sorted rows for ragged_dot);
    routing + dispatch + combine = layer − experts only, reported as a share of the layer;
  - every timed program returns its loss with the gradients (`jax.value_and_grad`): with the
    gradients alone XLA may drop work whose value nothing reads (with `jax.grad` of Σ y·c it
    dropped the dense FFN's second forward matmul, 43.0 instead of 51.6 GFLOP);
  - the compiled program's FLOPs (XLA's cost analysis) must equal the hand count of the
    program (`hand_flops`, within FLOP_TOLERANCE for the elementwise work around the matmuls);
    a case whose program does not is refused, not timed. Programs with loops or custom calls
    (blocked dropless: scans; ragged_dot) are not checkable this way, because XLA counts a loop
    body once; their FLOPs are recorded but not compared;
  - compile time apart (lower + compile), then `warmup` calls, then up to `repeats` timed calls
    (fewer when a case passes --max_seconds_per_case, never fewer than 3); the median is reported;
  - memory: the compiled executable's memory analysis (temp = activations and workspace);
  - FLOP/s: useful expert FLOPs / median time, against a large square matmul timed in this run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from switchmoe import cli
from switchmoe.moe import dispatch
from switchmoe.moe.experts import StackedExperts
from switchmoe.moe.layer import MoeLayer

BACKENDS = ("einsum", "gather", "dropless_ragged_dot", "dropless_blocked")

PRESETS = {
    # Tiny: seconds of compile and run on 2 CPU cores; checks the machinery, not the machine.
    "quick": dict(
        tokens=256,
        group_size=None,
        d_model=32,
        d_ff=64,
        num_selected=1,
        experts=[4],
        capacity_factors=[1.25],
        repeats=3,
        warmup=1,
        matmul_size=256,
        train_steps=3,
        train_size="tiny",
        train_models=["demo", "dense"],
    ),
    # The sizes of the CPU benchmark in BENCHMARKS.md: 4,096 tokens in one routing group, D 512, F 2048.
    "full": dict(
        tokens=4096,
        group_size=None,
        d_model=512,
        d_ff=2048,
        num_selected=1,
        experts=[1, 8, 64, 128],
        capacity_factors=[1.0, 1.25, 2.0],
        repeats=20,
        warmup=2,
        matmul_size=2048,
        train_steps=10,
        train_size="demo",
        train_models=["demo", "demo_dropless", "dense"],
    ),
    # Beside Hugging Face's PyTorch layers (experiments/peer_cases.py): 8 sequences of 512
    # tokens, D 512, F 2048 (Mixtral: top-2 SwiGLU of width 1024), float32. Needs torch and
    # transformers (the test extra).
    "peer": dict(
        tokens=4096,
        group_size=None,
        d_model=512,
        d_ff=2048,
        num_selected=1,
        experts=[],
        capacity_factors=[1.25],
        repeats=10,
        warmup=2,
        matmul_size=2048,
        train_steps=0,
        train_size="demo",
        train_models=[],
        peer_batch=8,
        peer_length=512,
    ),
}

_PRESET = flags.DEFINE_enum("preset", "quick", list(PRESETS), "Sizes and repeats to start from.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_BACKENDS = flags.DEFINE_list("backends", list(BACKENDS), f"Any of {BACKENDS}.")
_EXPERTS = flags.DEFINE_list("experts", None, "Expert counts E (default: the preset's).")
_CAPACITY_FACTORS = flags.DEFINE_list(
    "capacity_factors", None, "Training capacity factors of einsum/gather (default: preset's)."
)
_TOKENS = flags.DEFINE_integer("tokens", None, "Tokens per layer call T (default: preset's).")
_GROUP_SIZE = flags.DEFINE_integer("group_size", None, "Routing group S; default: all tokens.")
_D_MODEL = flags.DEFINE_integer("d_model", None, "Model width D (default: preset's).")
_D_FF = flags.DEFINE_integer("d_ff", None, "Expert hidden width F (default: preset's).")
_NUM_SELECTED = flags.DEFINE_integer("num_selected", None, "Experts per token k (default: 1).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed calls per case, at most.")
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed calls after compiling.")
_MAX_SECONDS = flags.DEFINE_float(
    "max_seconds_per_case", 8.0, "Stop repeating a case after this much timed time (>= 3 calls)."
)
_RAGGED_MAX_EXPERTS = flags.DEFINE_integer(
    "ragged_dot_max_experts",
    None,
    "Skip dropless_ragged_dot above this E. Default: 8 on CPU (XLA:CPU runs ragged_dot like E "
    "dense FFNs: minutes per case at 128 experts), no limit elsewhere.",
)
_BLOCK_SIZE = flags.DEFINE_integer("block_size", None, "Bk of dropless_blocked; default: auto.")
_TRAIN = flags.DEFINE_bool("train", True, "Also time training steps of demo and dense models.")
_OUT = flags.DEFINE_string("out", None, "JSON path; the markdown table goes beside it.")


# ----------------------------------------------------------------------------------------------
# Timing.


def _block(tree):
    return jax.block_until_ready(tree)


def memory_analysis(compiled) -> Optional[dict]:
    """Bytes the compiled executable needs, where the backend reports them (None otherwise)."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):  # not on every backend/version
        return None
    if m is None:
        return None
    names = ("temp", "argument", "output", "alias", "generated_code")
    out = {f"{n}_bytes": getattr(m, f"{n}_size_in_bytes", None) for n in names}
    return {k: int(v) for k, v in out.items() if v is not None}


# How far a program's compiled FLOPs may sit from its hand count: the elementwise work around
# the matmuls (activations, the loss, softmax), which the hand count leaves out. At the quick
# preset's D 32 it is about 2%; a dropped matmul of a two-matrix FFN is 1/6 = 17%.
FLOP_TOLERANCE = 0.05


class FlopMismatch(ValueError):
    """A timed program computes other FLOPs than its hand count says: timing it would report
    the speed of a different program."""


def compiled_flops(compiled) -> Optional[float]:
    """XLA's FLOP count of a compiled program (None where the backend does not report it)."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def check_flops(what: str, compiled: Optional[float], expected: Optional[float]) -> None:
    """Raises FlopMismatch unless the compiled FLOPs are the hand count (within the tolerance)."""
    if expected is None or compiled is None:
        return
    if abs(compiled - expected) > FLOP_TOLERANCE * expected:
        raise FlopMismatch(
            f"{what}: the compiled program does {compiled / 1e9:.4g} GFLOP, the hand count is "
            f"{expected / 1e9:.4g} GFLOP ({100 * (compiled / expected - 1):+.1f}%); not timed"
        )


def measure(
    fn: Callable,
    args: tuple,
    warmup: int,
    repeats: int,
    max_seconds: float,
    jitted=None,
    expected_flops: Optional[float] = None,
    what: str = "program",
    baseline: Optional[Callable[[], Any]] = None,
    keep_call: bool = False,
) -> dict:
    """Compile apart, check the FLOPs against `expected_flops` (None: record only), warm up,
    then time up to `repeats` calls; medians in seconds.

    With `baseline` (a call of another compiled program, e.g. the dense FFN's `"call"`), every
    timed call is followed by a timed baseline call, and `ratio_to_baseline` is the median of
    the per-pair ratios. This machine's speed drifts by 10-30% within minutes; a ratio of two
    medians taken minutes apart carries that drift, a paired ratio does not. With `keep_call`
    the record's `"call"` runs this program once more (not JSON: the caller pops it)."""
    t0 = time.perf_counter()
    compiled = (jitted or jax.jit(fn)).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = compiled_flops(compiled)
    check_flops(what, flops, expected_flops)
    call = lambda: _block(compiled(*args))
    for _ in range(warmup):
        call()
        if baseline is not None:
            baseline()
    times, baseline_times = [], []
    while len(times) < repeats:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
        if baseline is not None:
            t = time.perf_counter()
            baseline()
            baseline_times.append(time.perf_counter() - t)
        if len(times) >= 3 and sum(times) + sum(baseline_times) > max_seconds:
            break
    record = {
        "compile_s": compile_s,
        "median_s": float(np.median(times)),
        "min_s": float(np.min(times)),
        "times_s": times,
        "memory": memory_analysis(compiled),
        "compiled_flops": flops,
        "expected_flops": expected_flops,
    }
    if keep_call:
        record["call"] = call
    if baseline is not None:
        record.update(
            baseline_times_s=baseline_times,
            baseline_median_s=float(np.median(baseline_times)),
            ratio_to_baseline=float(np.median(np.divide(times, baseline_times))),
        )
    return record


def matmul_rate(n: int, dtype, warmup: int, repeats: int, max_seconds: float) -> dict:
    """FLOP/s of one [n, n] x [n, n] matmul (2n³ FLOPs): the machine's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    m = measure(
        lambda a, b: a @ b, (a, b), warmup, max(repeats, 5), max_seconds,
        expected_flops=2 * n**3, what=f"matmul {n}",
    )  # fmt: skip
    m["size"] = n
    m["flops_per_s"] = 2 * n**3 / m["median_s"]
    return m


# ----------------------------------------------------------------------------------------------
# The layer cases.


def capacity_layer_flops(backend: str, G: int, S: int, K: int, E: int, C: int, D: int, F: int):
    """Hand count of an einsum/gather MoE layer's forward+backward (relu experts, top-K).

    The experts on the whole [E, G·C, D] buffer (empty slots included), plus the router x·W_r
    (2·D·E per token forward, twice that backward). The einsum backend adds its one-hot
    matmuls: the dispatch x -> [E, C, D] (2·E·C·D per token forward, the same again backward
    for dx: the mask has no gradient), the combine (2·E·C·D forward, twice that backward: to
    the expert outputs and to the combine mask, whose gradient reaches the gates), and the
    masks themselves, contracted over the K choices from [S, K, E] and [S, K, C] one-hots
    (2·K·E·C per token for each mask, and once more backward to the gates). The gather
    backend's index gathers do no FLOPs.
    """
    tokens = G * S
    flops = ffn_flops(E * G * C, D, F) + 6 * tokens * D * E
    if backend == "einsum":
        flops += 10 * tokens * E * C * D + 3 * 2 * tokens * K * E * C
    return flops


def _backend_settings(name: str) -> tuple[str, Optional[str]]:
    """Benchmark backend name -> (MoeLayer.backend, dropless implementation)."""
    if name.startswith("dropless_"):
        return "dropless", name[len("dropless_") :]
    return name, None


def ffn_flops(rows: int, d: int, f: int, matrices: int = 2) -> int:
    """Hand count of an FFN's forward+backward over `rows` rows: each of its `matrices` [D, F]
    matrices (2 for relu/gelu, 3 gated) costs 2·D·F per row forward, and twice that backward
    (input and weight gradients): 3 · 2 · rows · D·F · matrices.

    With rows = T·k routed (token, expert) pairs this is the layer's useful expert work, the
    numerator of every GFLOP/s in the tables: padding, dropped tokens' slots and dispatch are
    not useful work, so backends compare on the same numerator."""
    return 3 * 2 * rows * d * f * matrices


def dense_case(x, d_ff: int, dtype, run: Callable) -> dict:
    """relu(x·W1)·W2 of width d_ff, forward+backward w.r.t. x and the weights; the record
    keeps its `"call"`, the baseline of the layer cases."""
    D = x.shape[-1]
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    w1 = (jax.random.normal(k1, (D, d_ff)) / np.sqrt(D)).astype(dtype)
    w2 = (jax.random.normal(k2, (d_ff, D)) / np.sqrt(d_ff)).astype(dtype)
    c = jax.random.normal(k3, x.shape, jnp.float32)

    def loss(x, w1, w2):
        y = jax.nn.relu(x @ w1) @ w2
        return jnp.sum(y.astype(jnp.float32) * c)

    T, D = x.shape[1], x.shape[2]
    return run(
        jax.value_and_grad(loss, argnums=(0, 1, 2)), (x, w1, w2),
        expected_flops=ffn_flops(T, D, d_ff), what=f"dense FFN d_ff={d_ff}", keep_call=True,
    )  # fmt: skip


def layer_case(
    backend_name: str,
    E: int,
    factor: Optional[float],
    x,
    s: dict,
    dtype,
    run: Callable,
    dense_call: Optional[Callable[[], Any]] = None,
) -> dict:
    """One MoE layer case: the full layer and its experts alone, forward+backward. With
    `dense_call`, the layer's calls alternate with the dense FFN's (`measure`'s baseline)."""
    backend, implementation = _backend_settings(backend_name)
    D = x.shape[2]
    F, k = s["d_ff"], s["num_selected"]
    layer = MoeLayer(
        num_experts=E,
        d_ff=F,
        num_selected=k,
        backend=backend,
        dropless_implementation=implementation,
        block_size=s["block_size"],
        train_capacity_factor=factor or 1.0,
        group_size=s["group_size"],
        dtype=dtype,
    )
    params = nn.meta.unbox(layer.init(jax.random.key(1), x)["params"])
    c = jax.random.normal(jax.random.key(3), x.shape, jnp.float32)

    def loss(params, x):
        y, aux = layer.apply({"params": params}, x, deterministic=False)
        return jnp.sum(y.astype(jnp.float32) * c) + aux["loss"]

    # The routing this input gets, to build the experts' own buffers.
    (_, aux), inter = layer.apply(
        {"params": params}, x, deterministic=False, mutable=["intermediates"]
    )
    routing = inter["intermediates"]["routing"][0]
    G, S, K = routing.expert.shape
    name = f"{backend_name} E={E} cf={factor}"
    expected = None
    if backend != "dropless":
        expected = capacity_layer_flops(backend, G, S, K, E, routing.capacity, D, F)
    record = {
        "layer": run(
            jax.value_and_grad(loss, argnums=(0, 1)),
            (params, x),
            expected_flops=expected,
            what=f"layer {name}",
            baseline=dense_call,
        )  # fmt: skip
    }
    record["dropped_fraction"] = float(aux["stats"]["dropped_fraction"])
    experts = StackedExperts(w_in=params["w_in"], w_out=params["w_out"], dtype=dtype)
    # The index arrays are arguments, not constants: XLA would otherwise fold them into the
    # program (and, for blocked, know at compile time which blocks are padding).
    exp_loss = lambda f: lambda w, a, *idx: jnp.sum(f(w, a, *idx).astype(jnp.float32))
    grad = lambda f: jax.value_and_grad(exp_loss(f), argnums=(0, 1))
    weights = {"w_in": params["w_in"], "w_out": params["w_out"]}
    if backend != "dropless":
        C = routing.capacity
        record["capacity"] = C
        buffer = jax.random.normal(jax.random.key(4), (E, G * C, D), dtype)
        f = lambda w, a: experts.replace(**w)(a)
        record["experts_only"] = run(
            grad(f), (weights, buffer),
            expected_flops=ffn_flops(E * G * C, D, F), what=f"experts only {name}",
        )  # fmt: skip
    elif implementation == "blocked":
        layout = dispatch.block_layout(routing, E, s["block_size"])
        NB = layout.block_expert.shape[0]
        Bk = layout.row_pair.shape[0] // NB
        record.update(block_size=Bk, num_blocks=NB, used_blocks=int(layout.used_blocks))
        blocks = jax.random.normal(jax.random.key(4), (NB, Bk, D), dtype)
        f = lambda w, a, block_expert, used: experts.replace(**w).blocked(a, block_expert, used)
        args = (weights, blocks, layout.block_expert, layout.used_blocks)
        record["experts_only"] = run(grad(f), args)
    else:
        kept = np.asarray(routing.slot).reshape(-1) >= 0
        sizes = np.bincount(np.asarray(routing.expert).reshape(-1)[kept], minlength=E)
        rows = jax.random.normal(jax.random.key(4), (kept.size, D), dtype)
        group_sizes = jnp.asarray(sizes, jnp.int32)
        f = lambda w, a, group_sizes: experts.replace(**w).ragged(a, group_sizes)
        record["experts_only"] = run(grad(f), (weights, rows, group_sizes))
    return record


# ----------------------------------------------------------------------------------------------
# Training steps.


def _load_config(name: str):
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_configs(size: str, dtype: str) -> dict:
    """demo (configs/demo.py, as trained), demo with the dropless backend, and the dense model of
    the same active FLOPs per token (configs/dense.py). `size="tiny"` shrinks all three alike."""
    configs = {"demo": _load_config("demo"), "dense": _load_config("dense")}
    configs["demo_dropless"] = _load_config("demo")
    configs["demo_dropless"].model.moe.backend = "dropless"
    for c in configs.values():
        c.model.vocab_size = 259  # the byte tokenizer's; no corpus is read
        c.model.dtype = dtype
        c.mesh.data = c.mesh.expert = c.mesh.model = 1
        if size == "tiny":
            c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 2, 2
            c.model.d_ff, c.data.seq_len, c.batch_size = 64, 32, 8
            if c.model.moe.num_experts:
                c.model.moe.num_experts = 4
                c.model.moe.group_size = None  # one 32-token sequence per routing group
                if c.model.moe.get("expert_d_ff"):
                    c.model.moe.expert_d_ff = c.model.d_ff // 2  # top-2 at the dense FLOPs
    return configs


def train_case(config) -> tuple[Callable[[], float], dict]:
    """A training step of `config` on one device with synthetic token batches, compiled: (a call
    that runs one step and returns its seconds, the case's record without times)."""
    from switchmoe.models import count_params
    from switchmoe.sharding import make_mesh
    from switchmoe.training.trainer import Trainer

    mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer = Trainer(config, mesh)
    params, opt_state = trainer.init()
    B, L = config.batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (B, L + 1))
    batch = trainer.put_batch(
        {
            "inputs": tokens[:, :-1].astype(np.int32),
            "targets": tokens[:, 1:].astype(np.int32),
            "weights": np.ones((B, L), np.float32),
        }
    )
    step = jnp.asarray(0, jnp.int32)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(params, opt_state, batch, step).compile()
        compile_s = time.perf_counter() - t0
    state = [params, opt_state]

    def one_step() -> float:
        with jax.set_mesh(mesh):
            t = time.perf_counter()
            *new_state, metrics = compiled(*state, batch, step)
            _block(metrics)
            seconds = time.perf_counter() - t
        state[:] = new_state
        return seconds

    counts = count_params(config)
    return one_step, {
        "compile_s": compile_s,
        "memory": memory_analysis(compiled),
        "batch": B,
        "seq_len": L,
        "d_model": config.model.d_model,
        "d_ff": config.model.d_ff,
        "num_layers": config.model.num_layers,
        "num_experts": config.model.moe.num_experts,
        "backend": config.model.moe.backend if config.model.moe.num_experts else None,
        "params_total": counts["total"],
        "params_active_per_token": counts["active_per_token"],
    }


def train_cases(configs: dict, s: dict, log: Callable[[str], Any]) -> list[dict]:
    """Training steps of every model in `configs`, their steps taken in turn (one step of each
    model per round), so that each model's ratio to the dense model pairs steps taken seconds
    apart (see `measure`)."""
    steppers, records = {}, {}
    for name, config in configs.items():
        steppers[name], records[name] = train_case(config)
        records[name].update(model=name, times_s=[])
    for i in range(s["warmup"] + s["train_steps"]):
        for name, one_step in steppers.items():
            seconds = one_step()
            if i >= s["warmup"]:
                records[name]["times_s"].append(seconds)
    dense = records.get("dense")
    for name, r in records.items():
        r["median_s"] = float(np.median(r["times_s"]))
        r["tokens_per_s"] = r["batch"] * r["seq_len"] / r["median_s"]
        if dense is not None:
            r["ratio_to_dense"] = float(np.median(np.divide(r["times_s"], dense["times_s"])))
        log(f"train step {name}: {r['median_s'] * 1e3:.1f} ms (compile {r['compile_s']:.1f} s)")
    return list(records.values())


# ----------------------------------------------------------------------------------------------
# The whole run.


def machine_info() -> dict:
    device = jax.devices()[0]
    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
    }
    try:
        import jaxlib

        versions["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    return {
        "platform": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "system": platform.platform(),
        "versions": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_benchmark(s: dict, log: Callable[[str], Any] = print) -> dict:
    """All measurements of settings `s` (a preset merged with the flags) as one JSON-able dict."""
    dtype = jnp.dtype(s["dtype"])
    reps = dict(warmup=s["warmup"], repeats=s["repeats"], max_seconds=s["max_seconds"])
    run = lambda fn, args, **check: measure(fn, args, **reps, **check)
    started = time.perf_counter()
    result = {"machine": machine_info(), "settings": dict(s), "cases": [], "train": []}

    result["matmul"] = matmul_rate(s["matmul_size"], dtype, **reps)
    peak = result["matmul"]["flops_per_s"]
    log(f"matmul {s['matmul_size']}³ {s['dtype']}: {peak / 1e9:.1f} GFLOP/s")

    T, D, F, k = s["tokens"], s["d_model"], s["d_ff"], s["num_selected"]
    x = jax.random.normal(jax.random.key(0), (1, T, D), dtype)
    useful = ffn_flops(T * k, D, F)
    dense = dense_case(x, k * F, dtype, run)
    dense_call = dense.pop("call")
    dense.update(kind="dense", d_ff=k * F, flops=useful)
    result["dense"] = dense
    dense_s = dense["median_s"]
    log(f"dense FFN d_ff={k * F}: {dense_s * 1e3:.2f} ms")

    ragged_max = s["ragged_dot_max_experts"]
    if ragged_max is None:
        ragged_max = 8 if jax.default_backend() == "cpu" else 1 << 30
    for E in s["experts"]:
        for name in s["backends"]:
            dropless = name.startswith("dropless_")
            for factor in [None] if dropless else s["capacity_factors"]:
                case = {"backend": name, "num_experts": E, "capacity_factor": factor}
                if k > E:
                    continue
                if name == "dropless_ragged_dot" and E > ragged_max:
                    case["skipped"] = f"E={E} > --ragged_dot_max_experts={ragged_max}"
                    result["cases"].append(case)
                    continue
                try:
                    case.update(layer_case(name, E, factor, x, s, dtype, run, dense_call))
                except FlopMismatch as e:
                    case["refused"] = str(e)
                    result["cases"].append(case)
                    log(f"{name:>20} E={E:<4} refused: {e}")
                    continue
                layer_s = case["layer"]["median_s"]
                experts_s = case["experts_only"]["median_s"]
                case.update(
                    time_per_token_s=layer_s / T,
                    # Paired with dense FFN calls in between (see `measure`), not against the
                    # dense median taken at the start of the run.
                    ratio_to_dense=case["layer"]["ratio_to_baseline"],
                    routing_dispatch_share=max(0.0, 1.0 - experts_s / layer_s),
                    useful_flops=useful,
                    achieved_flops_per_s=useful / layer_s,
                    fraction_of_matmul_rate=useful / layer_s / peak,
                )
                result["cases"].append(case)
                log(
                    f"{name:>20} E={E:<4} cf={factor or '-':<5} layer {layer_s * 1e3:9.2f} ms  "
                    f"×dense {case['ratio_to_dense']:6.2f}  routing+dispatch "
                    f"{100 * case['routing_dispatch_share']:5.1f}%  "
                    f"({time.perf_counter() - started:.0f} s)"
                )

    if s.get("peer_batch"):
        from experiments.peer_cases import run_peer_cases  # noqa: PLC0415  (needs torch)

        result["peer"] = run_peer_cases(s, run, dense, log)

    if s["train"] and s["train_models"]:
        configs = train_configs(s["train_size"], s["dtype"])
        result["train"] = train_cases({n: configs[n] for n in s["train_models"]}, s, log)
    result["total_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt(value, spec=".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _mib(memory: Optional[dict], key: str = "temp_bytes") -> Optional[float]:
    if not memory or memory.get(key) is None:
        return None
    return memory[key] / 2**20


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    peak, n = result["matmul"]["flops_per_s"], result["matmul"]["size"]
    dense = result["dense"]
    lines = [
        f"# MoE benchmark: {s['preset']} preset on {m['platform']} ({m['device_kind']}, "
        f"{m['cpu_count']} CPUs), {s['dtype']}",
        "",
        f"jax {m['versions']['jax']}, flax {m['versions']['flax']}, {m['time_utc']}. "
        f"T={s['tokens']} tokens, group S={s['group_size'] or s['tokens']}, D={s['d_model']}, "
        f"F={s['d_ff']}, k={s['num_selected']}. Medians of up to {s['repeats']} calls after "
        f"{s['warmup']} warm-up; compile time apart. Whole run: {result['total_s']:.0f} s.",
        "",
        f"Matmul rate ([{n}, {n}] × [{n}, {n}]): {peak / 1e9:.1f} GFLOP/s. "
        f"Dense FFN (width k·F = {dense['d_ff']}) forward+backward: "
        f"{dense['median_s'] * 1e3:.2f} ms, {1e6 * dense['median_s'] / s['tokens']:.3g} µs/token, "
        f"{dense['flops'] / dense['median_s'] / 1e9:.1f} GFLOP/s "
        f"({100 * dense['flops'] / dense['median_s'] / peak:.0f}% of the matmul rate).",
        "",
        "Layer = MoeLayer forward+backward (router, dispatch, experts, combine, aux loss). "
        "× dense = median over the timed calls of (layer call / the dense FFN call timed right "
        "after it). Routing+dispatch = 1 − experts-only / layer. "
        "Temp = compiled temp memory of the layer's forward+backward. GFLOP/s counts useful expert "
        "FLOPs only (6·T·k·D·F·2).",
        "",
        "| backend | E | cf | C / Bk | layer ms | µs/token | × dense | experts ms | "
        "routing+dispatch | temp MiB | GFLOP/s | % matmul | dropped | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        if "skipped" in c or "refused" in c:
            why = f"skipped: {c['skipped']}" if "skipped" in c else f"refused: {c['refused']}"
            lines.append(f"| {c['backend']} | {c['num_experts']} | - | {why} |" + " |" * 10)
            continue
        slots = c.get("capacity") or (f"Bk {c['block_size']}" if "block_size" in c else "-")
        lines.append(
            "| "
            + " | ".join(
                [
                    c["backend"],
                    str(c["num_experts"]),
                    _fmt(c["capacity_factor"]),
                    str(slots),
                    _fmt(c["layer"]["median_s"] * 1e3, ".4g"),
                    _fmt(c["time_per_token_s"] * 1e6),
                    _fmt(c["ratio_to_dense"], ".2f"),
                    _fmt(c["experts_only"]["median_s"] * 1e3, ".4g"),
                    f"{100 * c['routing_dispatch_share']:.0f}%",
                    _fmt(_mib(c["layer"]["memory"]), ".1f"),
                    _fmt(c["achieved_flops_per_s"] / 1e9, ".1f"),
                    f"{100 * c['fraction_of_matmul_rate']:.0f}%",
                    f"{100 * c['dropped_fraction']:.1f}%",
                    _fmt(c["layer"]["compile_s"], ".2f"),
                ]
            )
            + " |"
        )
    if result.get("peer"):
        from experiments.peer_cases import peer_markdown  # noqa: PLC0415

        lines += peer_markdown(result["peer"])
    if result["train"]:
        lines += [
            "",
            "Training step (one device, synthetic batches; forward, backward, optimizer update; "
            "the models step in turn, and × dense is the median of each round's step time / the "
            "dense model's):",
            "",
            "| model | experts | backend | batch × length | step ms | tokens/s | × dense | "
            "params total | active/token | temp MiB | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["train"]:
            ratio = r.get("ratio_to_dense")
            lines.append(
                f"| {r['model']} | {r['num_experts']} | {r['backend'] or '-'} | "
                f"{r['batch']}×{r['seq_len']} | {r['median_s'] * 1e3:.1f} | "
                f"{r['tokens_per_s']:,.0f} | {_fmt(ratio, '.2f')} | {r['params_total']:,} | "
                f"{r['params_active_per_token']:,} | {_fmt(_mib(r['memory']), '.1f')} | "
                f"{r['compile_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def settings_from_flags() -> dict:
    s = dict(PRESETS[_PRESET.value])
    overrides = {
        "tokens": _TOKENS.value,
        "group_size": _GROUP_SIZE.value,
        "d_model": _D_MODEL.value,
        "d_ff": _D_FF.value,
        "num_selected": _NUM_SELECTED.value,
        "repeats": _REPEATS.value,
        "warmup": _WARMUP.value,
        "experts": None if _EXPERTS.value is None else [int(e) for e in _EXPERTS.value],
        "capacity_factors": (
            None if _CAPACITY_FACTORS.value is None else [float(f) for f in _CAPACITY_FACTORS.value]
        ),
    }
    s.update({key: value for key, value in overrides.items() if value is not None})
    unknown = sorted(set(_BACKENDS.value) - set(BACKENDS))
    if unknown:
        raise app.UsageError(f"--backends: unknown {unknown}; allowed: {BACKENDS}.")
    s.update(
        preset=_PRESET.value,
        dtype=_DTYPE.value,
        backends=list(_BACKENDS.value),
        block_size=_BLOCK_SIZE.value,
        ragged_dot_max_experts=_RAGGED_MAX_EXPERTS.value,
        max_seconds=_MAX_SECONDS.value,
        train=_TRAIN.value,
    )
    if s["group_size"] and s["tokens"] % s["group_size"]:
        raise app.UsageError(f"--group_size={s['group_size']} must divide --tokens={s['tokens']}.")
    return s


def main(argv):
    del argv
    s = settings_from_flags()
    out = _OUT.value or os.path.join(
        "experiments", "results", "benchmark", f"{s['preset']}_{jax.default_backend()}.json"
    )
    result = run_benchmark(s, log=lambda line: print(line, flush=True))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(result))
    print(f"wrote {out} and {md} in {result['total_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
