"""Weight-only int8 experts: quantize a trained run's expert matrices for evaluation.

An MoE's experts are most of its parameters and all of them sit in memory, though each token
uses K of E. Storing the expert matrices as int8 quarters that memory; the router, attention,
embeddings and any shared expert stay float. The quantization is symmetric and per output
channel (one scale per column of w_in/w_gate [D, F], per column of w_out [F, D]):

    s_o = max_i |w_io| / 127,   q_io = round(w_io / s_o) ∈ [-127, 127],   ŵ_io = q_io · s_o

so |w_io − ŵ_io| ≤ s_o / 2 for every weight (rounding to the nearest multiple of s_o). A channel
of zeros (or so small that max/127 underflows) gets s_o = 1 and q = 0. The layer (`model.moe.expert_quantization='int8'`) keeps q as
int8 arrays `w_*` and s as float32 `w_*_scale` [E, 1, out], and every backend multiplies by q
cast to the compute dtype, then by s on the output channels (experts.StackedExperts): the same
product as with ŵ, never written out.

Hand-written rather than through a quantization library: the expert matrices enter the
backends' own einsums, `ragged_dot` and the blocked scan (experts.block_matmul), where a
library's interception of Flax matmuls does not reach, and this is all the maths there is.

    from switchmoe import quantization
    config8, params8 = quantization.quantize_experts(config, params)
    quantization.quantize_run("runs/demo", "runs/demo_int8")      # a workdir restore_run reads
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from switchmoe.experts import is_expert_matrix
from switchmoe import runs

QMAX = 127


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of w[..., I, O] (the input axis is -2).

    Returns (q int8[..., I, O], scale float32[..., 1, O]) with |w − q·scale| ≤ scale/2."""
    w = np.asarray(w, np.float32)
    step = np.max(np.abs(w), axis=-2, keepdims=True) / QMAX
    scale = np.where(step > 0, step, 1.0).astype(np.float32)  # all zeros (or subnormal): 1
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ŵ = q · scale (what the backends multiply by)."""
    return np.asarray(q, np.float32) * np.asarray(scale, np.float32)


def quantize_experts(
    config: ml_collections.ConfigDict, params: Any
) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of the same model with int8 expert matrices.

    Raises ValueError for a dense model or one already quantized."""
    moe = config.model.moe
    if not moe.num_experts:
        raise ValueError("model.moe.num_experts is 0: a dense model has no experts to quantize.")
    if moe.get("expert_quantization", "none") != "none":
        raise ValueError(
            f"model.moe.expert_quantization={moe.expert_quantization!r}: already quantized."
        )
    flat = traverse_util.flatten_dict(jax.device_get(params))
    out = {}
    for path, leaf in flat.items():
        if is_expert_matrix(path):
            q, scale = quantize_int8(leaf)
            out[path] = q
            out[path[:-1] + (f"{path[-1]}_scale",)] = scale
        else:
            out[path] = np.asarray(leaf)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.moe.expert_quantization = "int8"
    return config, traverse_util.unflatten_dict(out)


def expert_bytes(params: Any) -> dict[str, int]:
    """Bytes the routed experts' arrays hold, read from the arrays themselves.

    {"bytes": values and scales together, "parameters": entries of the expert matrices,
    "bytes_per_parameter": their ratio}."""
    total = count = 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        matrix = path[:-1] + (str(path[-1]).removesuffix("_scale"),)
        if not is_expert_matrix(matrix):
            continue
        total += np.asarray(leaf).nbytes
        if matrix == path:
            count += np.asarray(leaf).size
    return {"bytes": total, "parameters": count, "bytes_per_parameter": total / max(count, 1)}


def quantize_run(source: str, target: str, step: int | None = None) -> str:
    """Writes a workdir at `target` holding `source`'s run (its checkpoint at `step`, default
    the newest intact one) with int8 experts; returns `target`. It restores with
    `runs.restore_run` and evaluates like any run; it cannot be trained further."""
    config, params, restored = runs.restore_run_at(source, step)
    q_config, q_params = quantize_experts(config, params)
    return runs.write_run(
        target, q_config, q_params, step=restored,
        derived_from={"source": source, "step": restored, "method": "int8 experts"},
    )  # fmt: skip
