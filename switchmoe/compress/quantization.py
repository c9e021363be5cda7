"""Quantize a trained run's expert matrices to int8, for evaluation.

An MoE's experts are most of its parameters and all of them sit in memory, though each token
uses K of E. Storing the expert matrices as int8 quarters that memory; the router, attention,
embeddings and any shared expert stay float. The maths (symmetric, per output channel) and the
layer's int8 parameters are switchmoe/moe/int8.py; this module makes an int8 run of a float one.

    from switchmoe.compress import quantization
    config8, params8 = quantization.quantize_experts(config, params)
    quantization.quantize_run("runs/demo", "runs/demo_int8")      # a workdir restore_run reads
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from switchmoe import runs
from switchmoe.moe.experts import is_expert_matrix
from switchmoe.moe.int8 import QMAX, dequantize, quantize_int8  # noqa: F401  (the maths: moe/int8.py)


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
