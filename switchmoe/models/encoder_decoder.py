"""Encoder–decoder MoE Transformer in the T5 style: the architecture of Switch and ST-MoE.

Shape legend: B batch, Le encoder length, Ld decoder length, D model width, H heads,
V vocabulary, N relative-position buckets.

  encoder  embed(inputs) → num_layers pre-norm blocks (bidirectional self-attention, FFN or MoE)
           → RMSNorm
  decoder  embed(decoder_inputs) → num_decoder_layers blocks (causal self-attention, cross-
           attention over the encoder output, FFN or MoE) → RMSNorm → logits (tied or untied)

As in T5: one token embedding for both stacks; positions enter only as a learned bias on the
self-attention scores per (head, relative-position bucket), one table per stack shared by its
layers (bidirectional buckets in the encoder, causal ones in the decoder); cross-attention has
no position bias. Unlike T5 the scores are scaled by 1/sqrt(head_dim) (T5 folds it into init).

MoE layers replace the FFN of every `moe_every`-th block of each stack (Switch: every other,
ST-MoE: one in four). The encoder sees its whole input, so its MoE layers may use
batch-prioritized routing (`model.moe.encoder_batch_prioritized`); the decoder's stay causal
(in-order priority, and with top-2 each token's choices placed before the next token's, see
`routing.assign_slots`) so that decoding one token at a time routes as training did.

The model is split into `encode` and `decode` (methods usable with `Module.apply(...,
method=...)`) so that greedy decoding (generation.GreedyDecoder) runs the encoder once.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from switchmoe.models.decoder import (
    DecodePosition,
    block_class,
    decoding_step,
    embedding,
    is_moe_block,
    logits_head,
    output_logits,
    sum_aux,
)
from switchmoe.models.normalization import RMSNorm

Array = jax.Array


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5's bucket of each relative position (key position - query position), int32.

    Half the buckets hold exact distances 0 .. n/2 - 1; the rest cover distances up to
    `max_distance` on a log scale, and every farther distance shares the last bucket. A
    bidirectional stack gives keys before and after the query separate halves of the buckets;
    a causal one sees only keys at or before the query (later ones fall in bucket 0, masked).
    """
    n = -relative_position  # distance looking back
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    exact = num_buckets // 2
    far = exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
        / math.log(max_distance / exact)
        * (num_buckets - exact)
    ).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return bucket + jnp.where(n < exact, n, far)


class RelativePositionBias(nn.Module):
    """Learned per-head bias of each (query, key) pair's relative-position bucket."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool

    @nn.compact
    def __call__(self, query_length: int, key_length: int, query_offset: Array | int = 0) -> Array:
        """-> float32 [1, H, Lq, Lk]; the queries sit at positions query_offset + 0 .. Lq - 1
        (a decoding step: one query at its position, over the whole cache)."""
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("heads", None)),
            (self.num_heads, self.num_buckets),
        )
        queries = jnp.arange(query_length) + query_offset
        relative = jnp.arange(key_length)[None, :] - queries[:, None]
        buckets = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return jnp.take(table, buckets, axis=1)[None].astype(jnp.float32)  # [1, H, Lq, Lk]


def num_decoder_layers(cfg: ml_collections.ConfigDict) -> int:
    return cfg.get("num_decoder_layers") or cfg.num_layers


class EncoderDecoderLM(nn.Module):
    """(inputs[B, Le], decoder_inputs[B, Ld], input_mask[B, Le]) -> logits float32[B, Ld, V], aux.

    `config` is the `model` block of a switchmoe config with arch 'encoder_decoder';
    `expert_parallelism` is None, "jit" or "shard_map" (see switchmoe/moe/expert_parallel.py).
    `aux` sums the MoE losses of both stacks and stacks their statistics per MoE layer, the
    encoder's layers first.
    """

    config: ml_collections.ConfigDict
    expert_parallelism: str | None = None

    def setup(self):
        cfg = self.config
        self.embed = embedding(cfg)
        bias = lambda bidirectional: RelativePositionBias(
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            cfg.num_heads,
            bidirectional,
        )
        self.encoder_position_bias = bias(True)
        self.decoder_position_bias = bias(False)
        E, every = cfg.moe.num_experts, cfg.moe.moe_every
        self.encoder_blocks = [
            block_class(cfg)(
                cfg,
                is_moe_block(i, E, every),
                causal=False,
                expert_parallelism=self.expert_parallelism,
                rotary=False,
                batch_prioritized=cfg.moe.get("encoder_batch_prioritized", False),
                name=f"encoder_{i}",
            )
            for i in range(cfg.num_layers)
        ]
        self.decoder_blocks = [
            block_class(cfg)(
                cfg,
                is_moe_block(i, E, every),
                causal=True,
                expert_parallelism=self.expert_parallelism,
                cross_attention=True,
                rotary=False,
                force_causal_routing=True,
                name=f"decoder_{i}",
            )
            for i in range(num_decoder_layers(cfg))
        ]
        self.encoder_norm = RMSNorm(dtype=jnp.dtype(cfg.dtype))
        self.decoder_norm = RMSNorm(dtype=jnp.float32)
        self.decode_position = DecodePosition()
        self.logits = logits_head(cfg)

    def encode(self, inputs: Array, input_mask: Array | None = None, deterministic: bool = True):
        """-> (encoded[B, Le, D], aux of the encoder's MoE layers, as a list)."""
        if input_mask is None:
            input_mask = jnp.ones(inputs.shape, jnp.float32)
        L = inputs.shape[1]
        mask = (input_mask[:, None, :, None] > 0) & (input_mask[:, None, None, :] > 0)
        bias = self.encoder_position_bias(L, L)
        x, auxes = self.embed(inputs), []
        for block in self.encoder_blocks:
            x, aux = block(
                x, None, mask, deterministic, token_ids=inputs, bias=bias,
                token_mask=input_mask > 0,
            )  # fmt: skip
            auxes += [aux] if aux is not None else []
        return self.encoder_norm(x), auxes

    def decode(
        self,
        encoded: Array,
        input_mask: Array | None,
        decoder_inputs: Array,
        deterministic: bool = True,
        decoder_mask: Array | None = None,
        decode: bool = False,
    ):
        """-> (logits float32[B, Ld, V], aux of the decoder's MoE layers, as a list).

        decoder_mask: optional bool[B, Ld], False at target positions that are not scored
        (padding); the decoder's MoE layers leave them out.
        decode: cached decoding (switchmoe/generation.py), "cache" mutable: the first call, on
        decoder_inputs[B, T], creates the cache for T positions; each later call takes
        decoder_inputs[B, 1] at the next position (model.DecodePosition)."""
        B, Le = encoded.shape[:2]
        if input_mask is None:
            input_mask = jnp.ones((B, Le), jnp.float32)
        L = decoder_inputs.shape[1]
        cross_mask = jnp.broadcast_to(input_mask[:, None, None, :] > 0, (B, 1, L, Le))
        index, T = self.decode_position(decoder_inputs) if decode else (None, L)
        if index is None:
            bias = self.decoder_position_bias(L, L)
        else:  # a decoding step: its one query over the whole cache
            bias = self.decoder_position_bias(1, T, query_offset=index)  # [1, H, 1, T]
        x, auxes = self.embed(decoder_inputs), []
        for block in self.decoder_blocks:
            x, aux = block(
                x,
                None,
                None,
                deterministic,
                token_ids=decoder_inputs,
                bias=bias,
                encoded=encoded,
                encoded_mask=cross_mask,
                token_mask=decoder_mask,
                **decoding_step(decode, index),
            )
            auxes += [aux] if aux is not None else []
        x = self.decoder_norm(x)
        return output_logits(self.config, self.embed, self.logits, x), auxes

    def __call__(
        self,
        inputs: Array,
        decoder_inputs: Array,
        input_mask: Array | None = None,
        deterministic: bool = True,
        decoder_mask: Array | None = None,
    ):
        encoded, encoder_aux = self.encode(inputs, input_mask, deterministic)
        logits, decoder_aux = self.decode(
            encoded, input_mask, decoder_inputs, deterministic, decoder_mask
        )
        return logits, sum_aux(encoder_aux + decoder_aux)
