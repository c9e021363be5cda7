"""Decoder-only MoE Transformer language model (GShard decoder, GLaM, Switch-style LM).

Shape legend: B batch, L sequence length, D model width, H heads, Dh head width, V vocabulary.

Pre-norm blocks (RMSNorm → causal self-attention → residual; RMSNorm → FFN → residual) with
rotary position embeddings. Every `moe_every`-th block replaces its dense FFN with a `MoeLayer`
(Switch/GShard: every other block, ST-MoE: one in four) or the blocks `moe_layers` lists, each
routed by `model.moe.router` or by its own entry of `model.moe.block_routers` (moe/blocks.py);
with `num_experts == 0` every block is dense, which is the dense baseline. Dropped tokens leave the MoE layer as zeros and the residual
connection carries them to the next block unchanged.

Precision: parameters are float32; matmuls run in `dtype` (bfloat16 on accelerators); norms,
softmaxes, the router and the output logits are float32.
"""

from __future__ import annotations

from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from switchmoe.models.latent_attention import LatentAttention
from switchmoe.models.mtp import MtpModule, ahead
from switchmoe.models.normalization import RMSNorm
from switchmoe.models.rotary import rope
from switchmoe.moe.experts import DenseFFN
from switchmoe.moe.blocks import block_routers, block_view, is_moe_block
from switchmoe.moe.layer import MoeLayer

Array = jax.Array


# What `model.qk_norm` normalises before the rotary embedding: nothing, each head's query and key
# (RMSNorm over Dh, one scale [Dh] shared by the heads: Qwen3) or the whole query and key
# projections (RMSNorm over H·Dh and Hkv·Dh: OLMoE).
QK_NORMS = ("none", "head", "projection")
# Which attention projections carry a bias (`model.attention_bias`): none, the query, key and
# value projections (Qwen2), or all four (OLMoE and Qwen3's `attention_bias`).
ATTENTION_BIASES = ("none", "qkv", "all")


class SelfAttention(nn.Module):
    """Multi-head attention, softmax in float32: causal self-attention with rotary positions
    (the decoder-only LM), or, with `rotary=False`, attention over `kv` with an additive
    position `bias` (T5's relative buckets; encoder–decoder self- and cross-attention).

    Grouped-query attention: `num_kv_heads` Hkv < H key/value heads, query head h reading
    key/value head h // (H/Hkv) (Ainslie et al. 2023; Mixtral, Qwen). `qk_norm` (QK_NORMS),
    `attention_bias` (ATTENTION_BIASES), `rope_theta` (the rotary base) and `sliding_window`
    (a query attends to the `sliding_window` newest positions, itself included; 0: all) are the
    settings the open decoder-only MoE families use.

    With `decode=True` a causal self-attention reads and writes a key/value cache (collection
    "cache": `cached_key` and `cached_value` [B, T, Hkv, Dh]): the first call, on the full [B, T]
    length (`step_index` None), only creates it (switchmoe/generation.py initialises it as
    zeros from its shapes); each later call takes one position per row, writes its key and
    value at `step_index` (the model's DecodePosition) and attends to positions 0..step_index,
    as the causal mask does in a full pass.
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    causal: bool = True
    dtype: Any = jnp.float32
    rotary: bool = True
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    qk_norm: str = "none"
    attention_bias: str = "none"
    sliding_window: int = 0
    norm_eps: float = 1e-6
    yarn: Any = None  # a FrozenDict of model.yarn when its factor is set (rotary.frequencies)

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array | None,
        mask: Array | None,
        deterministic: bool,
        kv: Array | None = None,
        bias: Array | None = None,
        decode: bool = False,
        step_index: Array | None = None,
    ):
        """x[B, Lq, D] -> [B, Lq, D], attending to kv[B, Lk, D] (default x).

        mask: optional bool[B, 1, Lq, Lk] of allowed attention; bias: float32[1|B, H, Lq, Lk]
        (one decoding step: [1|B, H, 1, T] over the whole cache).
        """
        D = x.shape[-1]
        H, Dh = self.num_heads, self.head_dim
        Hkv = self.num_kv_heads or H
        kv = x if kv is None else kv

        def dense(name, axes, shape_out, in_axes=-1, use_bias=False, bias_axes=()):
            return nn.DenseGeneral(
                shape_out,
                axis=in_axes,
                dtype=self.dtype,
                use_bias=use_bias,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_axes),
                name=name,
            )

        qkv_bias = self.attention_bias in ("qkv", "all")
        projection = lambda name, heads, inputs: dense(
            name, ("embed", "heads", "kv"), (heads, Dh), use_bias=qkv_bias,
            bias_axes=("heads", "kv"),
        )(inputs)  # fmt: skip
        q = projection("query", H, x)
        k = projection("key", Hkv, kv)
        v = projection("value", Hkv, kv)
        if self.qk_norm != "none":
            norm = lambda name, t: RMSNorm(self.norm_eps, self.dtype, name=name)(
                t if self.qk_norm == "head" else t.reshape(*t.shape[:-2], -1)
            ).reshape(t.shape)
            q, k = norm("query_norm", q), norm("key_norm", k)
        if self.rotary:
            q = rope(q, positions, self.rope_theta, self.yarn)
            k = rope(k, positions, self.rope_theta, self.yarn)
        step = decode and self.causal and step_index is not None
        if decode and self.causal:
            cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if step:
            if x.shape[1] != 1:
                raise ValueError(f"a decoding step takes one position per row; got {x.shape[1]}")
            i = step_index
            cached_k.value = k = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k, i, 1)
            cached_v.value = v = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v, i, 1)
        B, Lq, Lk = x.shape[0], x.shape[1], k.shape[1]
        if Hkv == H:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        else:  # query heads in Hkv groups of H/Hkv, each group reading one key/value head
            qg = q.reshape(B, Lq, Hkv, H // Hkv, Dh)
            scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k).reshape(B, H, Lq, Lk)
        scores = scores.astype(jnp.float32) / jnp.sqrt(Dh)
        if bias is not None:
            scores = scores + bias
        allowed = jnp.ones((1, 1, Lq, Lk), bool)
        query_pos = jnp.arange(Lq)[:, None]
        if step:  # the cached positions so far: row i of the causal mask
            allowed = (jnp.arange(Lk) <= i)[None, None, None, :]
            query_pos = i
        elif self.causal:
            allowed = jnp.tril(allowed)
        if self.sliding_window:
            allowed = allowed & (query_pos - jnp.arange(Lk)[None, :] < self.sliding_window)
        if mask is not None:
            allowed = allowed & mask
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
        if Hkv == H:
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            pg = probs.reshape(B, Hkv, H // Hkv, Lq, Lk)
            out = jnp.einsum("bhgqk,bkhd->bqhgd", pg, v).reshape(B, Lq, H, Dh)
        out_bias = self.attention_bias == "all"
        return dense(
            "out", ("heads", "kv", "embed"), D, in_axes=(-2, -1), use_bias=out_bias,
            bias_axes=("embed",),
        )(out)  # fmt: skip


class DecodePosition(nn.Module):
    """Where a decoding step is, the one position counter of a model's cache: `tokens` int32[B, T]
    (the tokens fed so far, whose shape fixes the cache length T) and `index` (the next
    position). The call that creates the cache (tokens[B, T]) returns (None, T); a step
    (tokens[B, 1]) records its tokens and returns (its position, T), which the model hands to
    every block as `step_index`."""

    @nn.compact
    def __call__(self, tokens: Array) -> tuple[Array | None, int]:
        step = self.has_variable("cache", "tokens")
        fed = self.variable("cache", "tokens", jnp.zeros, tokens.shape, jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not step:
            return None, tokens.shape[1]
        i = index.value
        fed.value = jax.lax.dynamic_update_slice_in_dim(fed.value, tokens.astype(jnp.int32), i, 1)
        index.value = i + 1
        return i, fed.value.shape[1]


class Block(nn.Module):
    """One pre-norm Transformer block: self-attention, optional cross-attention (an
    encoder–decoder's decoder), then a dense FFN or, with `moe`, an MoE layer.

    `causal` blocks (decoders) refuse batch-prioritized routing: it orders a group's tokens by
    router confidence, so a token's expert would depend on later tokens. `batch_prioritized`
    overrides `config.moe.batch_prioritized` for this block (the encoder's MoE layers);
    `force_causal_routing` gives the MoE layer token-major slots whatever
    `config.moe.causal_routing` says (an encoder–decoder's decoder, which greedy decoding needs).
    """

    config: ml_collections.ConfigDict
    moe: bool
    causal: bool = True
    expert_parallelism: str | None = None
    cross_attention: bool = False
    rotary: bool = True
    batch_prioritized: bool | None = None
    force_causal_routing: bool = False

    @nn.compact
    def __call__(
        self,
        x,
        positions,
        mask,
        deterministic,
        token_ids=None,
        *,
        bias=None,
        encoded=None,
        encoded_mask=None,
        token_mask=None,
        decode=False,
        step_index=None,
    ):
        """x[B, L, D] -> (x[B, L, D], MoE aux or None).

        bias: self-attention position bias [1, H, L, L]; encoded[B, Le, D] and
        encoded_mask bool[B, 1, L, Le]: the encoder output a cross-attention block reads;
        token_mask: optional bool[B, L], False at padded positions (the MoE layer's `mask`);
        decode: cached decoding (switchmoe/generation.py): the self-attention and the MoE layer
        create their "cache" variables (step_index None) or, at position step_index, read and
        update them. Cross-attention recomputes its
        keys and values from `encoded` at every step (Le·D² per layer and step, small beside
        decoding's other work at the sizes this runs; a cache would also have to be filled
        before the first step).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        eps = cfg.get("norm_eps", 1e-6)
        attention = lambda name: SelfAttention(
            cfg.num_heads,
            head_dim(cfg),
            cfg.dropout_rate,
            self.causal and name == "attention",
            dtype,
            rotary=self.rotary,
            name=name,
            **attention_settings(cfg),
        )
        h = RMSNorm(eps, dtype=dtype, name="attention_norm")(x)
        if cfg.get("attention", "standard") == "latent":
            h = latent_attention(cfg, dtype)(
                h, positions, mask, deterministic, decode=decode, step_index=step_index
            )
        else:
            h = attention("attention")(
                h, positions, mask, deterministic, bias=bias, decode=decode, step_index=step_index
            )
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        if self.cross_attention:
            h = RMSNorm(eps, dtype=dtype, name="cross_attention_norm")(x)
            h = attention("cross_attention")(h, None, encoded_mask, deterministic, kv=encoded)
            x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = RMSNorm(eps, dtype=dtype, name="ffn_norm")(x)
        aux = None
        if self.moe:
            overrides = {}
            if self.batch_prioritized is not None:
                overrides["batch_prioritized"] = self.batch_prioritized
            if self.force_causal_routing:
                overrides["causal_routing"] = True
            if self.causal and overrides.get("batch_prioritized", cfg.moe.batch_prioritized):
                raise ValueError(
                    f"{self.name}: batch_prioritized routing is not allowed in a decoder (causal) "
                    "block: it orders tokens by router confidence over the whole group, so a "
                    "token's routing would depend on later tokens. Allowed: in-order priority "
                    "(False); in an encoder–decoder, model.moe.encoder_batch_prioritized=True "
                    "uses it in the encoder only."
                )
            h, aux = MoeLayer.from_config(
                cfg,
                dtype=dtype,
                expert_parallelism=self.expert_parallelism,
                name="moe",
                **overrides,
            )(
                h, deterministic=deterministic, token_ids=token_ids, mask=token_mask,
                decode=decode, step_index=step_index,
            )  # fmt: skip
        else:
            h = DenseFFN(cfg.d_ff, cfg.activation, dtype, name="ffn")(h)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return x, aux


# Rematerialisation of a block's activations in the backward pass (jax.checkpoint), by name:
# "none" keeps them all; "full" keeps only each block's input and recomputes the rest (one more
# forward of compute, activation memory O(one block)); "dots" keeps the matmul outputs without
# batch dimensions and recomputes the cheap elementwise work around them.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block_class(cfg: ml_collections.ConfigDict) -> type[nn.Module]:
    """`Block`, or `Block` under nn.remat with the policy `model.remat` names. What the MoE
    layers sow (their loads) is an output of the forward pass: recomputation in the backward
    pass does not count it again (tests/moe/test_global_balance.py)."""
    name = cfg.get("remat", "none")
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {tuple(REMAT_POLICIES)}; got {name!r}.")
    if name == "none":
        return Block
    # Argument 4 (counting self) is `deterministic`, a Python bool that selects code paths.
    return nn.remat(Block, static_argnums=(4,), policy=REMAT_POLICIES[name])


def decoding_step(decode: bool, step_index: Array | None) -> dict:
    """The decoding keywords for a Block, only when decoding: nn.remat traces keyword arguments,
    and training (the only place remat applies) then never sees them. Generation builds its
    model without remat (switchmoe/generation.py)."""
    return {"decode": True, "step_index": step_index} if decode else {}


def head_dim(cfg: ml_collections.ConfigDict) -> int:
    return cfg.head_dim if cfg.get("head_dim") else cfg.d_model // cfg.num_heads


def latent_attention(cfg: ml_collections.ConfigDict, dtype) -> LatentAttention:
    """The multi-head latent attention of a `model` block with attention='latent'."""
    return LatentAttention(
        num_heads=cfg.num_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        rope_theta=cfg.get("rope_theta", 10000.0),
        yarn=yarn_settings(cfg),
        dropout_rate=cfg.dropout_rate,
        dtype=dtype,
        name="attention",
    )


def yarn_settings(cfg: ml_collections.ConfigDict) -> flax.core.FrozenDict | None:
    """model.yarn as a module field (hashable), or None when its factor is 0 (plain rotary)."""
    yarn = cfg.get("yarn")
    if not yarn or not yarn.get("factor"):
        return None
    return flax.core.FrozenDict(yarn.to_dict())


def attention_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The SelfAttention settings a `model` block sets beyond heads and widths (defaults for a
    config written before they existed)."""
    return {
        "num_kv_heads": cfg.get("num_kv_heads"),
        "rope_theta": cfg.get("rope_theta", 10000.0),
        "qk_norm": cfg.get("qk_norm", "none"),
        "attention_bias": cfg.get("attention_bias", "none"),
        "sliding_window": cfg.get("sliding_window") or 0,
        "norm_eps": cfg.get("norm_eps", 1e-6),
        "yarn": yarn_settings(cfg),
    }


def sum_aux(auxes: list[dict]) -> dict[str, Any]:
    """Combines the per-layer MoE aux dicts: losses summed, statistics stacked per layer.

    Returns {"loss": scalar, "losses" and "weighted_losses": {name: scalar sum}, "stats": {name:
    [num_moe_layers, ...]}} or zeros / empty dicts for a dense model.

    Blocks with different routers (model.moe.block_routers) may report different things: a loss
    or statistic one block's router does not report counts 0 there, and per-choice vectors [K]
    are padded with 0 to the largest K (a hash block's second choice requested, moved and
    dropped nothing). With one router every layer reports the same names and shapes.
    """
    if not auxes:
        return {"loss": jnp.zeros(()), "losses": {}, "weighted_losses": {}, "stats": {}}

    def total(key):
        names = dict.fromkeys(name for a in auxes for name in a[key])
        return {name: sum(a[key][name] for a in auxes if name in a[key]) for name in names}

    return {
        "loss": sum(a["loss"] for a in auxes),
        "losses": total("losses"),
        "weighted_losses": total("weighted_losses"),
        "stats": _stack_stats([a["stats"] for a in auxes]),
    }


def _stack_stats(per_layer: list[dict[str, Array]]) -> dict[str, Array]:
    out = {}
    for name in dict.fromkeys(name for stats in per_layer for name in stats):
        values = [stats.get(name) for stats in per_layer]
        shape = max((v.shape for v in values if v is not None), key=lambda s: s[-1:])

        def filled(v):
            if v is None:
                return jnp.zeros(shape, jnp.float32)
            pad = [(0, 0)] * (v.ndim - 1) + [(0, shape[-1] - v.shape[-1])] if v.ndim else []
            return jnp.pad(v, pad) if pad and pad[-1][1] else v

        out[name] = jnp.stack([filled(v) for v in values])
    return out


class DecoderLM(nn.Module):
    """Decoder-only MoE language model: tokens[B, L] -> logits float32[B, L, V], aux.

    `config` is the `model` block of a switchmoe config (see switchmoe/config.py);
    `expert_parallelism` is None, "jit" or "shard_map" (see switchmoe/moe/expert_parallel.py).
    """

    config: ml_collections.ConfigDict
    expert_parallelism: str | None = None

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        deterministic: bool = True,
        token_mask: Array | None = None,
        decode: bool = False,
    ):
        """token_mask: optional bool[B, L], False at positions whose prediction is not scored
        (the padded tail of a sequence); the MoE layers leave them out (MoeLayer's `mask`).

        decode: cached decoding (switchmoe/generation.py), with the "cache" collection mutable.
        The first call, on tokens[B, T], creates a cache for T positions; each later call takes
        tokens[B, 1] at the next position and returns its logits [B, 1, V].

        Returns (logits float32[B, L, V], aux: `sum_aux`'s, plus "mtp_logits" float32[K, B, L, V]
        with `model.mtp_depth` K > 0 when not decoding: depth k's prediction at position i is of
        token i + k + 1, models/mtp.py).
        """
        cfg = self.config
        embed = embedding(cfg)
        x = embed(tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        index = None
        if decode:
            index, _ = DecodePosition(name="decode_position")(tokens)
            if index is not None:
                positions = jnp.broadcast_to(index, tokens.shape)
        auxes = []
        routers = iter(block_routers(cfg))  # each MoE block's router (moe/blocks.py)
        for i in range(cfg.num_layers):
            moe = is_moe_block(i, cfg.moe.num_experts, cfg.moe.moe_every, cfg.moe.get("moe_layers"))
            block = block_class(cfg)(
                block_view(cfg, next(routers)) if moe else cfg,
                moe,
                expert_parallelism=self.expert_parallelism,
                name=f"block_{i}",
            )
            x, aux = block(
                x, positions, None, deterministic, token_ids=tokens, token_mask=token_mask,
                **decoding_step(decode, index),
            )  # fmt: skip
            if aux is not None:
                auxes.append(aux)
        head = logits_head(cfg)
        final = RMSNorm(cfg.get("norm_eps", 1e-6), dtype=jnp.float32, name="final_norm")(x)
        logits = output_logits(cfg, embed, head, final)
        predictions = []
        if cfg.get("mtp_depth", 0) and not decode:  # multi-token prediction (models/mtp.py)
            last = cfg.num_layers - 1
            moe = is_moe_block(
                last, cfg.moe.num_experts, cfg.moe.moe_every, cfg.moe.get("moe_layers")
            )
            view = block_view(cfg, block_routers(cfg)[-1]) if moe else cfg
            real = jnp.ones(tokens.shape, bool) if token_mask is None else token_mask
            h = x
            for k in range(1, cfg.mtp_depth + 1):
                ids = ahead(tokens, k)
                module = MtpModule(
                    view, block_class(cfg), moe, self.expert_parallelism, name=f"mtp_{k}"
                )
                h, normed, aux = module(
                    h, embed(ids), positions, deterministic, ids, ahead(real, k, False)
                )
                predictions.append(output_logits(cfg, embed, head, normed))
                if aux is not None:
                    auxes.append(aux)
        aux = sum_aux(auxes)
        if predictions:
            aux["mtp_logits"] = jnp.stack(predictions)  # [K, B, L, V]: depth k at index k - 1
        return logits, aux


def embedding(cfg: ml_collections.ConfigDict) -> nn.Embed:
    """The token embedding [V, D] (shared by an encoder–decoder's two stacks, as in T5)."""
    return nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")
        ),
        dtype=jnp.dtype(cfg.dtype),
        name="embed",
    )


def logits_head(cfg: ml_collections.ConfigDict) -> nn.Module | None:
    """The untied output kernel [D, V] ("logits"), or None with `model.tie_embeddings`."""
    if cfg.get("tie_embeddings", True):
        return None
    return nn.DenseGeneral(
        cfg.vocab_size,
        dtype=jnp.dtype(cfg.dtype),
        use_bias=False,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "vocab")
        ),
        name="logits",
    )


def output_logits(cfg, embed: nn.Embed, head: nn.Module | None, x: Array) -> Array:
    """Logits float32[B, L, V] from final hidden states x[B, L, D].

    Tied (`model.tie_embeddings`, T5 v1.0): the input embedding, scaled by 1/sqrt(D) so that the
    initial logits are O(1). Untied (T5 v1.1): `head`, a separate kernel [D, V].
    """
    x = x.astype(jnp.dtype(cfg.dtype))
    if head is None:
        return embed.attend(x).astype(jnp.float32) / jnp.sqrt(cfg.d_model)
    return head(x).astype(jnp.float32)
