"""Weight-only int8 expert matrices: the quantization maths and the layer's int8 parameters.

The quantization is symmetric and per output channel (one scale per column of w_in/w_gate
[D, F], per column of w_out [F, D]):

    s_o = max_i |w_io| / 127,   q_io = round(w_io / s_o) ∈ [-127, 127],   ŵ_io = q_io · s_o

so |w_io − ŵ_io| ≤ s_o / 2 for every weight (rounding to the nearest multiple of s_o). A channel
of zeros (or so small that max/127 underflows) gets s_o = 1 and q = 0. A layer with
`expert_quantization='int8'` keeps q as int8 parameters `w_*` and s as float32 `w_*_scale`
[E, 1, out] (`int8_weight`), and every backend multiplies by q cast to the compute dtype, then
by s on the output channels (experts.StackedExperts): the same product as with ŵ, never written
out. Making such a run from a trained one is switchmoe/compress/quantization.py.

Hand-written rather than through a quantization library: the expert matrices enter the
backends' own einsums, `ragged_dot` and the blocked scan (experts.block_matmul), where a
library's interception of Flax matmuls does not reach, and this is all the maths there is.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def refuse_training() -> None:
    raise ValueError(
        "model.moe.expert_quantization='int8' is for evaluation (int8 values take no "
        "gradient): train in float and quantize the trained run (switchmoe.compress.quantization)."
    )


def int8_weight(
    layer: nn.Module, name: str, axes: tuple, shape: tuple
) -> tuple[jax.Array, jax.Array]:
    """The int8 values `name` [E, I, O] and float32 channel scales `name_scale` [E, 1, O] of one
    expert matrix, as parameters of `layer`. Initialised only for their shapes (zeros and ones):
    a quantized layer's values come from compress.quantization.quantize_experts."""
    values = layer.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.int8
    )
    scale = layer.param(
        f"{name}_scale",
        nn.with_logical_partitioning(nn.initializers.ones, (axes[0], None, axes[2])),
        (shape[0], 1, shape[2]),
        jnp.float32,
    )
    return values, scale
