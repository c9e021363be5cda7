"""The peer cases of `experiments.benchmark --preset=peer`: Hugging Face transformers' PyTorch MoE
layers beside switchmoe at equal shapes, in one run, on shared weights.

  python -m experiments.benchmark --preset=peer      # needs torch and transformers (test extra)

Cases (forward + backward of Σ y·c with respect to the input and every weight, float32):
  dense     a PyTorch FFN relu(x·W1)·W2 (nn.Linear, no bias) against the benchmark's JAX one
  switch_e8, switch_e64
            `SwitchTransformersSparseMLP`: top-1, raw gates, `expert_capacity` slots per expert
            per sequence (ceil(L/E · 1.25)), a dropped token's output 0; against `MoeLayer`
            with one routing group per sequence at capacity factor 1.25, every backend
  mixtral   `MixtralSparseMoeBlock`: top-2 gates renormalised, SwiGLU experts, dropless;
            against `MoeLayer` with gate_norm 'normalized', swiglu, the dropless backend (both
            implementations), every HF experts implementation available (eager, batched_mm,
            grouped_mm), the fastest reported
Before timing, each pair is run forward on the same weights and input and must agree to 1e-4
(the dropless switchmoe backend is compared only where it computes the same thing: Mixtral).
PyTorch runs with as many threads as the machine has cores, as XLA:CPU does.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from switchmoe.moe.layer import MoeLayer

TOLERANCE = 1e-4


def torch_modules():
    import torch  # noqa: PLC0415  (optional: the test extra)
    import transformers  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    return torch, transformers


def time_torch(torch, module_fn: Callable, x, c, warmup: int, repeats: int, max_seconds: float):
    """Median seconds of forward+backward of Σ module_fn(x)·c (gradients to x and weights)."""

    def once():
        x.grad = None
        for p in params:
            p.grad = None
        (module_fn(x) * c).sum().backward()

    params = [p for p in getattr(module_fn, "parameters", lambda: [])()]
    for _ in range(warmup):
        once()
    times = []
    while len(times) < repeats:
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
        if len(times) >= 3 and sum(times) > max_seconds:
            break
    return {"median_s": float(np.median(times)), "times_s": times}


def _ours(layer: MoeLayer, params, x, c, measure: Callable, what: str) -> dict:
    def loss(params, x):
        y, _ = layer.apply({"params": params}, x, deterministic=False)
        return jnp.sum(y.astype(jnp.float32) * c)

    return measure(jax.value_and_grad(loss, argnums=(0, 1)), (params, x), what=what)


def _forward(layer, params, x):
    return np.asarray(layer.apply({"params": params}, x, deterministic=False)[0])


def switch_case(E: int, s: dict, measure: Callable, timing: dict, log) -> dict:
    torch, transformers = torch_modules()
    B, L, D, F = s["peer_batch"], s["peer_length"], s["d_model"], s["d_ff"]
    capacity = math.ceil(L / E * 1.25)
    config = transformers.SwitchTransformersConfig(
        d_model=D, d_ff=F, num_experts=E, expert_capacity=capacity, router_jitter_noise=0.0,
        dropout_rate=0.0, router_bias=False, dense_act_fn="relu",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.models.switch_transformers.modeling_switch_transformers
    peer = hf.SwitchTransformersSparseMLP(config).train()
    x_np = np.random.default_rng(0).normal(size=(B, L, D)).astype(np.float32)
    c_np = np.random.default_rng(1).normal(size=(B, L, D)).astype(np.float32)
    experts = [peer.experts[f"expert_{e}"] for e in range(E)]
    params = {
        "router_kernel": peer.router.classifier.weight.detach().numpy().T,
        "w_in": np.stack([m.wi.weight.detach().numpy().T for m in experts]),
        "w_out": np.stack([m.wo.weight.detach().numpy().T for m in experts]),
    }
    params = jax.tree.map(jnp.asarray, params)
    x, c = jnp.asarray(x_np), jnp.asarray(c_np)
    with torch.no_grad():
        want = peer(torch.tensor(x_np)).numpy()
    record = {"case": f"switch_e{E}", "peer": "SwitchTransformersSparseMLP", "ours": {}}
    for backend in ("einsum", "gather", "dropless"):
        layer = MoeLayer(
            num_experts=E, d_ff=F, num_selected=1, backend=backend, train_capacity_factor=1.25,
            min_capacity=1, group_size=L, load_balancing_weight=0.0,
        )  # fmt: skip
        if backend != "dropless":  # dropless keeps the tokens HF drops: other numbers
            diff = float(np.max(np.abs(_forward(layer, params, x) - want)))
            if diff > TOLERANCE:
                raise ValueError(f"switch E={E} {backend}: outputs differ from HF by {diff:.3g}")
            record.setdefault("max_abs_difference", {})[backend] = diff
        record["ours"][backend] = _ours(
            layer, params, x, c, measure, f"peer switch E={E} {backend}"
        )
    xt = torch.tensor(x_np, requires_grad=True)
    record["peer_timing"] = time_torch(torch, peer, xt, torch.tensor(c_np), **timing)
    record["capacity"] = capacity
    return record


def mixtral_case(s: dict, measure: Callable, timing: dict, log) -> dict:
    torch, transformers = torch_modules()
    B, L, D = s["peer_batch"], s["peer_length"], s["d_model"]
    E, F = 8, s["d_ff"] // 2
    x_np = np.random.default_rng(0).normal(size=(B, L, D)).astype(np.float32)
    c_np = np.random.default_rng(1).normal(size=(B, L, D)).astype(np.float32)
    mixtral = transformers.models.mixtral.modeling_mixtral
    best = None
    timings = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        config = transformers.MixtralConfig(
            hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2,
            router_jitter_noise=0.0, experts_implementation=implementation,
        )  # fmt: skip
        torch.manual_seed(0)
        peer = mixtral.MixtralSparseMoeBlock(config).train()
        with torch.no_grad():  # HF leaves these uninitialised (torch.empty) outside a model
            for p in peer.parameters():
                p.normal_(0.0, 0.02)
        try:
            xt = torch.tensor(x_np, requires_grad=True)
            timings[implementation] = time_torch(torch, peer, xt, torch.tensor(c_np), **timing)
        except Exception as e:  # noqa: BLE001  (an implementation this torch lacks)
            timings[implementation] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            continue
        if best is None:
            best = peer  # all share the seed, so the weights are the same
    with torch.no_grad():
        want = best(torch.tensor(x_np)).numpy()
    gate_up = best.experts.gate_up_proj.detach().numpy()  # [E, 2F, D]: gate rows, then up rows
    params = {
        "router_kernel": best.gate.weight.detach().numpy().T,
        "w_gate": np.transpose(gate_up[:, :F], (0, 2, 1)),
        "w_in": np.transpose(gate_up[:, F:], (0, 2, 1)),
        "w_out": np.transpose(best.experts.down_proj.detach().numpy(), (0, 2, 1)),
    }
    params = jax.tree.map(jnp.asarray, params)
    x, c = jnp.asarray(x_np), jnp.asarray(c_np)
    record = {"case": "mixtral", "peer": "MixtralSparseMoeBlock", "ours": {}, "peer_all": timings}
    for implementation in ("blocked", "ragged_dot"):
        layer = MoeLayer(
            num_experts=E, d_ff=F, num_selected=2, gate_norm="normalized", activation="swiglu",
            backend="dropless", dropless_implementation=implementation, group_size=L,
            load_balancing_weight=0.0,
        )  # fmt: skip
        diff = float(np.max(np.abs(_forward(layer, params, x) - want)))
        if diff > TOLERANCE:
            raise ValueError(f"mixtral dropless {implementation}: outputs differ by {diff:.3g}")
        record.setdefault("max_abs_difference", {})[f"dropless_{implementation}"] = diff
        record["ours"][f"dropless_{implementation}"] = _ours(
            layer, params, x, c, measure, f"peer mixtral {implementation}"
        )
    ok = {k: v for k, v in timings.items() if "median_s" in v}
    fastest = min(ok, key=lambda k: ok[k]["median_s"])
    record["peer"] += f" ({fastest})"
    record["peer_timing"] = ok[fastest]
    return record


def dense_peer(s: dict, jax_dense: dict, timing: dict) -> dict:
    torch, _ = torch_modules()
    B, L, D, F = s["peer_batch"], s["peer_length"], s["d_model"], s["d_ff"]
    torch.manual_seed(0)
    ffn = torch.nn.Sequential(
        torch.nn.Linear(D, F, bias=False), torch.nn.ReLU(), torch.nn.Linear(F, D, bias=False)
    )
    x_np = np.random.default_rng(0).normal(size=(B, L, D)).astype(np.float32)
    xt = torch.tensor(x_np, requires_grad=True)
    c = torch.tensor(np.random.default_rng(1).normal(size=(B, L, D)).astype(np.float32))
    return {
        "case": "dense",
        "peer": "PyTorch FFN (nn.Linear)",
        "peer_timing": time_torch(torch, ffn, xt, c, **timing),
        "ours": {"dense": jax_dense},
    }


def run_peer_cases(s: dict, measure: Callable, dense_record: dict, log) -> list[dict]:
    timing = dict(warmup=s["warmup"], repeats=s["repeats"], max_seconds=s["max_seconds"])
    records = [dense_peer(s, dense_record, timing)]
    for E in (8, 64):
        records.append(switch_case(E, s, measure, timing, log))
    records.append(mixtral_case(s, measure, timing, log))
    for r in records:
        ours = {k: v["median_s"] for k, v in r["ours"].items()}
        best = min(ours, key=ours.get)
        r.update(best=best, best_s=ours[best], ratio=ours[best] / r["peer_timing"]["median_s"])
        log(
            f"peer {r['case']:>10}: {r['peer']} {r['peer_timing']['median_s'] * 1e3:.0f} ms, "
            f"switchmoe {best} {ours[best] * 1e3:.0f} ms, ratio {r['ratio']:.2f}"
        )
    return records


def peer_markdown(records: list[dict]) -> list[str]:
    lines = [
        "",
        "Beside Hugging Face transformers (PyTorch, same threads), forward+backward, shared "
        "weights, outputs checked equal first:",
        "",
        "| case | HF transformers | HF ms | switchmoe best | ms | ratio | every switchmoe backend |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        every = ", ".join(f"{k} {v['median_s'] * 1e3:.0f}" for k, v in r["ours"].items())
        lines.append(
            f"| {r['case']} | {r['peer']} | {r['peer_timing']['median_s'] * 1e3:.0f} | "
            f"{r['best']} | {r['best_s'] * 1e3:.0f} | {r['ratio']:.2f} | {every} |"
        )
    return lines
