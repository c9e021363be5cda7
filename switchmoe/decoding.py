"""Greedy decoding with an encoder–decoder: fill in the sentinels of a span-corrupted input.

    from switchmoe.runs import restore_run
    from switchmoe import decoding
    config, params = restore_run(workdir)
    decoder = decoding.GreedyDecoder(config)
    tokens = decoder(params, batch["inputs"], batch["input_mask"])        # int32 [B, T]
    text = decoder.fill_in(batch["inputs"][0], tokens[0])                 # the completed text

Shape legend: B batch, Le encoder length, T decoded length.

The encoder runs once; the decoder then runs T times on a fixed [B, T] buffer (static shapes,
one compilation), step t reading the logits at position t and writing its argmax to position
t + 1. There is no key/value cache: each step recomputes the prefix, O(T²) work, which is
what a CPU-sized model can afford and keeps the model code free of decoding state.

Why step t sees exactly what training showed it: self-attention is causal, and the decoder's
MoE layers route in order (batch-prioritized routing is refused there), so a token's expert
and slot depend only on tokens before it in its routing group. With `model.moe.group_size`
spanning several sequences, a group holds earlier rows' later positions too, which during
decoding are still placeholders; use the default (one group per sequence) to decode exactly
as the model was evaluated. The model runs in evaluation mode (eval capacity factor).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from switchmoe.config import sequence_lengths
from switchmoe.data import span_corruption
from switchmoe.data.tokenizers import make_tokenizer
from switchmoe.models import build_model


class GreedyDecoder:
    """Greedy decoding for the encoder–decoder of `config` (any parameters of that model)."""

    def __init__(self, config: ml_collections.ConfigDict, max_length: int | None = None):
        if config.model.get("arch", "decoder") != "encoder_decoder":
            raise ValueError(
                f"greedy decoding needs model.arch='encoder_decoder'; got {config.model.arch!r}."
            )
        self.config = config
        self.model = build_model(config)
        self.tokenizer = make_tokenizer(config.data)
        # Default: the training targets' length (sentinels, spans and EOS).
        self.max_length = max_length or sequence_lengths(config)["decoder"]
        self.sentinels = [
            self.tokenizer.sentinel_id(i) for i in range(self.tokenizer.num_sentinels)
        ]
        self._decode = jax.jit(self._greedy)

    def _greedy(self, params: Any, inputs: jax.Array, input_mask: jax.Array) -> jax.Array:
        variables = {"params": params}
        encoded, _ = self.model.apply(
            variables, inputs, input_mask, method=self.model.encode, deterministic=True
        )
        B, T = inputs.shape[0], self.max_length
        pad, bos, eos = self.tokenizer.pad_id, self.tokenizer.bos_id, self.tokenizer.eos_id

        def step(t, state):
            decoder_inputs, out, done = state
            logits, _ = self.model.apply(
                variables,
                encoded,
                input_mask,
                decoder_inputs,
                method=self.model.decode,
                deterministic=True,
            )
            token = jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)
            token = jnp.where(done, pad, token)  # after EOS: padding
            out = out.at[:, t].set(token)
            decoder_inputs = jax.lax.dynamic_update_slice_in_dim(
                decoder_inputs, token[:, None], jnp.minimum(t + 1, T - 1), axis=1
            )
            return decoder_inputs, out, done | (token == eos)

        decoder_inputs = jnp.full((B, T), pad, jnp.int32).at[:, 0].set(bos)
        out = jnp.full((B, T), pad, jnp.int32)
        _, out, _ = jax.lax.fori_loop(0, T, step, (decoder_inputs, out, jnp.zeros(B, bool)))
        return out

    def __call__(self, params: Any, inputs, input_mask=None) -> np.ndarray:
        """Greedy targets int32 [B, T] for inputs [B, Le] (input_mask [B, Le], default all 1)."""
        inputs = jnp.asarray(inputs, jnp.int32)
        if input_mask is None:
            input_mask = jnp.ones(inputs.shape, jnp.float32)
        return np.asarray(self._decode(params, inputs, jnp.asarray(input_mask, jnp.float32)))

    def fill_in(self, inputs, targets) -> str:
        """The text of `inputs` with each sentinel replaced by its span from `targets`."""
        tokens = span_corruption.fill_in_sentinels(
            inputs, targets, self.sentinels, self.tokenizer.eos_id
        )
        return self.tokenizer.decode(np.asarray(tokens, np.int64))
