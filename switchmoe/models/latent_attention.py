"""Multi-head latent attention (DeepSeek-V2 and V3): keys and values from one low-rank latent.

Shape legend: B batch, L sequence length (T: the cache length), D model width, H heads,
Dn / Dr the no-rope and rope parts of a query/key head, Dv a value head, Rq / Rkv the query and
key-value latent ranks.

  q      = up_q(RMSNorm(down_q(x)))         [B, L, H, Dn + Dr]   (Rq = 0: one projection of x)
  c, k_r = down_kv(x)                       [B, L, Rkv], [B, L, Dr]  (k_r: one head, shared)
  k_n, v = up_kv(RMSNorm(c))                [B, L, H, Dn], [B, L, H, Dv]
  k      = [k_n, rope(k_r) for every head]  q = [q_n, rope(q_r)]
  out    = softmax(q·k / sqrt(Dn + Dr)) v   -> [B, L, D]

What a decoding cache holds is the latent (c after its norm, and rope(k_r)): Rkv + Dr numbers per
position instead of 2·H·Dh, which is the point of the design; each step re-expands the cached
latents into keys and values (T·Rkv·H·(Dn + Dv) per layer and step: cheap beside decoding's other
work at the sizes this runs, and what the absorbed-matrix trick would save at scale).

The latent norms use epsilon 1e-6 whatever `model.norm_eps` is, as DeepSeek's do. The rope
part uses switchmoe's rotate-half layout; DeepSeek's checkpoints rotate interleaved pairs, which
the converter turns into this layout by permuting the rope rows of the projections
(switchmoe/interop/hf_decoders.py), an exact change of basis for both queries and keys.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchmoe.models.normalization import RMSNorm
from switchmoe.models.rotary import rope, yarn_mscale

Array = jax.Array

LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    num_heads: int
    q_lora_rank: int  # Rq; 0: queries from one [D, H, Dn + Dr] projection (DeepSeek-V2-Lite)
    kv_lora_rank: int  # Rkv
    qk_nope_head_dim: int  # Dn
    qk_rope_head_dim: int  # Dr
    v_head_dim: int  # Dv
    rope_theta: float = 10000.0
    yarn: Any = None  # model.yarn as a FrozenDict when its factor is set
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    softmax_scale: float | None = None  # None: 1/sqrt(Dn + Dr)

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array | None,
        deterministic: bool,
        decode: bool = False,
        step_index: Array | None = None,
    ) -> Array:
        """x[B, L, D] -> [B, L, D], causal; decoding as decoder.SelfAttention's (one position per
        row at `step_index`, the cache "cached_latent" [B, T, Rkv] and "cached_rope_key"
        [B, T, Dr])."""
        B, L, D = x.shape
        H, Dn, Dr, Dv = (
            self.num_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
        )

        def dense(name, shape_out, axes, in_axes=-1):
            return nn.DenseGeneral(
                shape_out,
                axis=in_axes,
                dtype=self.dtype,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                name=name,
            )

        if self.q_lora_rank:
            q = dense("query_down", self.q_lora_rank, ("embed", "kv"))(x)
            q = RMSNorm(LATENT_NORM_EPS, self.dtype, name="query_norm")(q)
            q = dense("query_up", (H, Dn + Dr), ("kv", "heads", "kv"))(q)
        else:
            q = dense("query", (H, Dn + Dr), ("embed", "heads", "kv"))(x)
        q_nope, q_rope = q[..., :Dn], rope(q[..., Dn:], positions, self.rope_theta, self.yarn)

        latent = dense("kv_down", self.kv_lora_rank + Dr, ("embed", "kv"))(x)
        c = RMSNorm(LATENT_NORM_EPS, self.dtype, name="kv_norm")(latent[..., : self.kv_lora_rank])
        k_rope = rope(latent[..., None, self.kv_lora_rank :], positions, self.rope_theta, self.yarn)
        k_rope = k_rope[:, :, 0]

        step = decode and step_index is not None
        if decode:
            cached_c = self.variable("cache", "cached_latent", jnp.zeros, c.shape, c.dtype)
            cached_r = self.variable(
                "cache", "cached_rope_key", jnp.zeros, k_rope.shape, k_rope.dtype
            )
        if step:
            if L != 1:
                raise ValueError(f"a decoding step takes one position per row; got {L}")
            i = step_index
            cached_c.value = c = jax.lax.dynamic_update_slice_in_dim(cached_c.value, c, i, 1)
            cached_r.value = k_rope = jax.lax.dynamic_update_slice_in_dim(
                cached_r.value, k_rope, i, 1
            )
        kv = dense("kv_up", (H, Dn + Dv), ("kv", "heads", "kv"))(c)  # [B, T, H, Dn + Dv]
        k_nope, v = kv[..., :Dn], kv[..., Dn:]
        T = k_nope.shape[1]

        scale = self.softmax_scale or (Dn + Dr) ** -0.5
        if self.yarn and self.yarn.get("mscale_all_dim"):
            # DeepSeek scales every query-key dimension by YaRN's mscale twice, the no-rope
            # ones included (the rope ones also carry the rotary attention factor).
            scale *= yarn_mscale(self.yarn["factor"], self.yarn["mscale_all_dim"]) ** 2
        scores = jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + jnp.einsum(
            "bqhd,bkd->bhqk", q_rope, k_rope
        )
        scores = scores.astype(jnp.float32) * scale
        if step:
            allowed = (jnp.arange(T) <= i)[None, None, None, :]
        else:
            allowed = jnp.tril(jnp.ones((1, 1, L, T), bool))
        if mask is not None:
            allowed = allowed & mask
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return dense("out", D, ("heads", "kv", "embed"), in_axes=(-2, -1))(out)
