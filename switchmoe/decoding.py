"""Greedy decoding with an encoder–decoder: fill in the sentinels of a span-corrupted input.

    from switchmoe.runs import restore_run
    from switchmoe import decoding
    config, params = restore_run(workdir)
    decoder = decoding.GreedyDecoder(config)
    tokens = decoder(params, batch["inputs"], batch["input_mask"])        # int32 [B, T]
    text = decoder.fill_in(batch["inputs"][0], tokens[0])                 # the completed text

Shape legend: B batch, Le encoder length, T decoded length.

The encoder runs once; the decoder then takes T cached steps (switchmoe/generation.py,
`Seq2SeqGenerator` at temperature 0: static shapes, one compilation), step t writing the argmax
of position t's logits to position t + 1. Its self-attention caches keys and values and its MoE
layers cache which experts earlier positions asked for, so every step equals rerunning the
decoder on the whole prefix (tests/test_encoder_decoder.py checks it against that loop).

Why step t sees exactly what training showed it: self-attention is causal, and the decoder's
MoE layers route in order (batch-prioritized routing is refused there), so a token's expert
and slot depend only on tokens before it in its routing group. Routing groups must be runs of
positions within one decoded row (`model.moe.group_size` None, or dividing T); the model runs in
evaluation mode (eval capacity factor). For sampling (temperature, top-k, top-p) use
`generation.Seq2SeqGenerator` directly.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from switchmoe.data import span_corruption
from switchmoe.generation import Seq2SeqGenerator


class GreedyDecoder:
    """Greedy decoding for the encoder–decoder of `config` (any parameters of that model)."""

    def __init__(self, config: ml_collections.ConfigDict, max_length: int | None = None):
        if config.model.get("arch", "decoder") != "encoder_decoder":
            raise ValueError(
                f"greedy decoding needs model.arch='encoder_decoder'; got {config.model.arch!r}."
            )
        self.generator = Seq2SeqGenerator(config, max_length)
        self.config, self.tokenizer = self.generator.config, self.generator.tokenizer
        self.model = self.generator.model
        # Default: the training targets' length (sentinels, spans and EOS).
        self.max_length = self.generator.max_length
        self.sentinels = [
            self.tokenizer.sentinel_id(i) for i in range(self.tokenizer.num_sentinels)
        ]

    def __call__(self, params: Any, inputs, input_mask=None) -> np.ndarray:
        """Greedy targets int32 [B, T] for inputs [B, Le] (input_mask [B, Le], default all 1)."""
        return self.generator(params, inputs, input_mask)

    def fill_in(self, inputs, targets) -> str:
        """The text of `inputs` with each sentinel replaced by its span from `targets`."""
        tokens = span_corruption.fill_in_sentinels(
            inputs, targets, self.sentinels, self.tokenizer.eos_id
        )
        return self.tokenizer.decode(np.asarray(tokens, np.int64))
