"""Multi-token prediction (DeepSeek-V3, Liu et al. 2024, §2.2): `model.mtp_depth` = K sequential
modules after the decoder, module k predicting the token k + 1 places ahead of each position.

Shape legend: B batch, L sequence length, D model width, V vocabulary, K the depth.

Module k (1 ≤ k ≤ K) at position i joins the previous depth's representation h^{k-1}_i (h^0: the
decoder's last block output, before its final norm) with the embedding of token t_{i+k}:
  h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]       M_k: [2D, D]
  h^k    = Block_k(h'^k)                                          causal self-attention, FFN
  logits^k_i = OutHead(RMSNorm_k(h^k_i))                          predicts t_{i+k+1}
Emb and OutHead are the decoder's own (shared, as in DeepSeek-V3). Block_k is of the decoder's
last block's kind: an MoE block (with that block's router) when it is one, as DeepSeek-V3's MTP
module is, so its routing, balance losses and statistics join the decoder's MoE layers'.

Position i reads the inputs up to i + k and predicts i + k + 1: causal, like the decoder. The last
k positions have no token k ahead inside the window; they read id 0 and take no expert slot, and
the objective does not score them (training/mtp.py). The modules run whenever the model is not
decoding; generation never runs them and export does not read their parameters (`mtp_<k>`), so
both see the main model. `model.mtp_depth=0` builds exactly the model without this module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from switchmoe.models.normalization import RMSNorm

Array = jax.Array


def ahead(x: Array, k: int, fill=0) -> Array:
    """x[B, L, ...] moved k places to the left along L, the last k positions `fill`: position i
    holds what position i + k held."""
    pad = [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x[:, k:], pad, constant_values=fill)


class MtpModule(nn.Module):
    """Module k of the module docstring: (h^{k-1} [B, L, D], Emb(t_{i+k}) [B, L, D]) ->
    (h^k [B, L, D], RMSNorm_k(h^k): what the output head reads, the block's MoE aux or None).

    `config` is the model block as the module's block sees it (moe/blocks.py: `block_view`);
    `block` the decoder's block class (`decoder.block_class`), `moe` whether it is an MoE block.
    """

    config: ml_collections.ConfigDict
    block: type
    moe: bool
    expert_parallelism: str | None = None

    @nn.compact
    def __call__(self, h, embedded_ahead, positions, deterministic, token_ids, token_mask):
        cfg = self.config
        eps, dtype = cfg.get("norm_eps", 1e-6), jnp.dtype(cfg.dtype)
        joined = jnp.concatenate(
            [
                RMSNorm(eps, dtype=dtype, name="hidden_norm")(h),
                RMSNorm(eps, dtype=dtype, name="embedding_norm")(embedded_ahead),
            ],
            axis=-1,
        )
        # M_k reads both halves: its input axis is not the residual stream's ("embed"), so that
        # rules placing "embed" never name one mesh axis twice; unnamed in the rules: replicated.
        x = nn.DenseGeneral(
            cfg.d_model,
            use_bias=False,
            dtype=dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mtp_joined", "embed")
            ),
            name="projection",
        )(joined)
        h, aux = self.block(
            cfg, self.moe, expert_parallelism=self.expert_parallelism, name="block"
        )(x, positions, None, deterministic, token_ids=token_ids, token_mask=token_mask)
        normed = RMSNorm(eps, dtype=jnp.float32, name="output_norm")(h)
        return h, normed, aux
