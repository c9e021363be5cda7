"""Rotary position embeddings (Su et al. 2021), in the rotate-half layout: the first half of a
head's dimensions pairs with the second half, pair i turning by position · theta^(-i/half);
and YaRN's extension of them to longer contexts (Peng et al. 2023), as DeepSeek-V3 uses it.

YaRN, for a factor s over an original context length L0: pair i has wavelength
2π·theta^(2i/d); pairs that turn more than beta_fast times over L0 keep their frequency
(extrapolation), pairs that turn fewer than beta_slow times are slowed by s (interpolation),
and a linear ramp blends the ones between. The rotated queries and keys are scaled by
attention_factor = mscale(s, m) / mscale(s, m_all) (or mscale(s, 1) without both), with
mscale(s, m) = 0.1·m·ln(s) + 1 for s > 1, else 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def frequencies(
    dim: int, base: float, yarn: ml_collections.ConfigDict | dict | None = None
) -> tuple[np.ndarray, float]:
    """(the inverse frequencies float32[dim/2], the attention factor) of rotary dims `dim`;
    `yarn`: None (or factor 0: plain rotary) or the YaRN settings (model.yarn)."""
    half = dim // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) / half)
    if not yarn or not yarn.get("factor"):
        return inv_freq.astype(np.float32), 1.0
    s, original = float(yarn["factor"]), yarn["original_length"]
    fast, slow = yarn.get("beta_fast") or 32.0, yarn.get("beta_slow") or 1.0
    m, m_all = yarn.get("mscale") or 0.0, yarn.get("mscale_all_dim") or 0.0
    factor = yarn_mscale(s, m) / yarn_mscale(s, m_all) if m and m_all else yarn_mscale(s)

    def correction_dim(rotations):  # the pair index that turns `rotations` times over L0
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    extrapolated = 1.0 - ramp
    inv_freq32 = (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
    inv_freq = (1.0 / (s * inv_freq32)) * ramp + (1.0 / inv_freq32) * extrapolated
    return inv_freq.astype(np.float32), float(factor)


def rope(
    x: Array,
    positions: Array,
    base: float = 10000.0,
    yarn: ml_collections.ConfigDict | dict | None = None,
) -> Array:
    """Rotary position embedding on x[B, L, H, Dh], positions int[B, L] (YaRN with `yarn`)."""
    if not yarn or not yarn.get("factor"):
        half = x.shape[-1] // 2
        freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
        scale = 1.0
    else:
        freq, scale = frequencies(x.shape[-1], base, yarn)
    angle = positions[..., None, None].astype(jnp.float32) * freq  # [B, L, 1, half]
    sin, cos = jnp.sin(angle) * scale, jnp.cos(angle) * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
