"""T5 span corruption (Raffel et al. 2020, §3.1.4): the pre-training objective of Switch and ST-MoE.

A window of n raw tokens is split into alternating non-noise and noise spans, starting with
non-noise and ending with noise:

  raw      a b c [d e] f g h [i] j k [l m n]          (noise spans in brackets)
  inputs   a b c <s0> f g h <s1> j k <s2> EOS         non-noise, each noise span -> one sentinel
  targets  <s0> d e <s1> i <s2> l m n EOS             each noise span after its sentinel

with num_noise = round(n · noise_density) tokens in num_spans = round(num_noise / mean_span)
spans (both at least 1). The span lengths are a uniformly random composition of num_noise (and
of n - num_noise for the non-noise spans) into num_spans positive parts, as in T5. Sentinel i is
`tokenizer.sentinel_id(i)` (the top of the vocabulary, sentinel 0 last).

Lengths are fixed by n: inputs n - num_noise + num_spans + 1, targets num_noise + num_spans + 1,
so every example of a run has the same shapes (XLA compiles once) and nothing is padded.
`raw_length(inputs_length, ...)` picks the largest n whose inputs fit in the encoder.

Randomness: the span layout of an example is a pure function of a string key (the pipeline
uses the data seed and the example's global position) through the same version-stable hash
permutation as the training order; NumPy's random streams are not used (see pipeline.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from switchmoe.data import pipeline as _pipeline
from switchmoe.data.streaming import StreamingPipeline


@dataclasses.dataclass(frozen=True)
class SpanLengths:
    """The fixed sizes of span corruption of `raw` tokens."""

    raw: int
    num_noise: int
    num_spans: int

    @property
    def inputs(self) -> int:
        return self.raw - self.num_noise + self.num_spans + 1  # + EOS

    @property
    def targets(self) -> int:
        return self.num_noise + self.num_spans + 1  # + EOS


def span_lengths(raw: int, noise_density: float, mean_span_length: float) -> SpanLengths:
    """Noise tokens and spans of a window of `raw` tokens (T5's rounding, both at least 1)."""
    if raw < 2:
        raise ValueError(f"span corruption needs at least 2 raw tokens; got {raw}.")
    num_noise = min(max(int(round(raw * noise_density)), 1), raw - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    return SpanLengths(raw, num_noise, num_spans)


def raw_length(inputs_length: int, noise_density: float, mean_span_length: float) -> SpanLengths:
    """The longest raw window whose corrupted inputs (with EOS) fit in `inputs_length` tokens.

    Corrupted inputs grow with the raw length by at most one token per raw token, so the search
    walks up from `inputs_length` (which corrupts to fewer tokens) until the next length would
    overflow.
    """
    if inputs_length < 3:
        raise ValueError(f"data.seq_len={inputs_length} is too short for span corruption (>= 3).")
    n = 2
    while span_lengths(n + 1, noise_density, mean_span_length).inputs <= inputs_length:
        n += 1
    return span_lengths(n, noise_density, mean_span_length)


def _hash_permutation(key: str, n: int) -> np.ndarray:
    return _pipeline.epoch_permutation(key, 0, n)  # keyed by BLAKE2 of f"{key}/0"


def random_composition(total: int, parts: int, key: str) -> np.ndarray:
    """`parts` positive integers summing to `total`, uniformly over all such compositions.

    Choosing parts - 1 distinct cut points among the total - 1 gaps between items is a
    bijection with compositions, so a uniformly random subset of gaps gives a uniform one.
    """
    if not 1 <= parts <= total:
        raise ValueError(f"cannot split {total} items into {parts} non-empty spans.")
    cuts = np.sort(_hash_permutation(key, total - 1)[: parts - 1]) + 1  # gaps 1..total-1
    edges = np.concatenate([[0], cuts, [total]])
    return np.diff(edges).astype(np.int64)


def noise_mask(lengths: SpanLengths, key: str) -> np.ndarray:
    """bool [raw]: True on noise tokens; spans alternate non-noise, noise, ..., ending in noise."""
    noise = random_composition(lengths.num_noise, lengths.num_spans, f"{key}/noise")
    keep = random_composition(lengths.raw - lengths.num_noise, lengths.num_spans, f"{key}/keep")
    spans = np.stack([keep, noise], axis=1).reshape(-1)  # [2·num_spans]
    is_noise = np.tile([False, True], lengths.num_spans)
    return np.repeat(is_noise, spans)


def corrupt(
    tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 of one raw window `tokens` [n] with noise `mask` [n].

    Each maximal run of noise becomes one sentinel in the inputs; the targets list each run
    after its sentinel. `sentinels[i]` is the id of the i-th sentinel.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    span_index = np.cumsum(starts) - 1  # [n], valid on noise tokens
    if starts.sum() > len(sentinels):
        raise ValueError(f"{int(starts.sum())} noise spans but only {len(sentinels)} sentinels.")
    sentinel_of = np.asarray(sentinels, np.int64)[np.maximum(span_index, 0)]
    # inputs: non-noise tokens, and the sentinel in place of each span's first token.
    inputs = np.where(starts, sentinel_of, tokens)[~mask | starts]
    # targets: every noise token, its span's sentinel first (start positions are repeated once).
    rep = np.repeat(np.flatnonzero(mask), 1 + starts[mask])
    first_copy = np.concatenate([[True], rep[1:] != rep[:-1]])
    targets = np.where(first_copy & starts[rep], sentinel_of[rep], tokens[rep])
    eos = np.array([eos_id], np.int64)
    return (
        np.concatenate([inputs, eos]).astype(np.int32),
        np.concatenate([targets, eos]).astype(np.int32),
    )


def _before_last(tokens: Sequence[int], eos_id: int) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[: len(tokens) - tokens[::-1].index(eos_id) - 1] if eos_id in tokens else tokens


def fill_in_sentinels(
    inputs: Sequence[int], targets: Sequence[int], sentinels: Sequence[int], eos_id: int
) -> list[int]:
    """Inverse of `corrupt`: the raw tokens, with each sentinel of `inputs` replaced by the
    tokens that follow that sentinel in `targets` (up to the next sentinel).

    Each sequence ends at its last EOS (what follows is padding): packed windows cross document
    boundaries, so an EOS inside the text is a token like any other. Works on decoded targets
    too: a sentinel the targets never mention is left in place, so a reader sees what the
    model did not fill in.
    """
    sentinel_set = set(int(s) for s in sentinels)
    spans: dict[int, list[int]] = {}
    current = None
    for t in _before_last(targets, eos_id):
        if t in sentinel_set:
            current = spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in _before_last(inputs, eos_id):
        out.extend(spans.get(t, [t]) if t in sentinel_set else [t])
    return out


def example_lengths(data_config) -> SpanLengths:
    """The span-corruption sizes of `config.data`: encoder inputs fit in `data.seq_len`."""
    return raw_length(
        data_config.seq_len, data_config.noise_density, data_config.mean_noise_span_length
    )


class SpanCorruptionPipeline(_pipeline.LMDataPipeline):
    """Span-corruption batches for an encoder–decoder, from the same packed token stream.

    Windows hold `example_lengths(data).raw` tokens (packed across documents, as for the LM);
    each is corrupted with its own span layout, drawn from (data seed, split, example position):
    a window seen in two epochs is corrupted two ways, an eval window always the same way.

    Batches (rows of this process, b = B / P; L = data.seq_len, T = targets length):
      inputs          int32   [b, L]  corrupted text + EOS, then pad (at most a few positions)
      input_mask      float32 [b, L]  1.0 on real input tokens
      decoder_inputs  int32   [b, T]  BOS, then targets[:-1] (teacher forcing)
      targets         int32   [b, T]  sentinel-delimited noise spans + EOS
      weights         float32 [b, T]  1.0, or 0.0 on the all-pad rows that complete an eval batch
    The eval split's partial last window is dropped (a corrupted example needs a full window).
    """

    keeps_tail = False
    eval_overlap = False

    def __init__(self, data_config, batch_size: int, *, tokenizer=None):
        super().__init__(data_config, batch_size, tokenizer=tokenizer)
        self.lengths = example_lengths(data_config)
        if self.tokenizer.num_sentinels < self.lengths.num_spans:
            raise ValueError(
                f"data.num_sentinels={self.tokenizer.num_sentinels} is below the "
                f"{self.lengths.num_spans} noise spans of an example (data.seq_len={self.seq_len}, "
                f"data.noise_density={data_config.noise_density}, "
                f"data.mean_noise_span_length={data_config.mean_noise_span_length}); "
                f"allowed: >= {self.lengths.num_spans}."
            )
        self.window = self.lengths.raw
        self.sentinels = [self.tokenizer.sentinel_id(i) for i in range(self.lengths.num_spans)]

    def examples(self, windows, lengths, keys) -> _pipeline.Batch:
        b, L, T = len(windows), self.seq_len, self.lengths.targets
        pad, eos = self.tokenizer.pad_id, self.tokenizer.eos_id
        batch = {
            "inputs": np.full([b, L], pad, np.int32),
            "input_mask": np.zeros([b, L], np.float32),
            "decoder_inputs": np.full([b, T], pad, np.int32),
            "targets": np.full([b, T], pad, np.int32),
            "weights": np.zeros([b, T], np.float32),
        }
        for row, (window, length, key) in enumerate(zip(windows, lengths, keys)):
            if length < self.window:  # an all-pad row completing the last eval batch
                continue
            inputs, targets = corrupt(
                window.astype(np.int64), noise_mask(self.lengths, key), self.sentinels, eos
            )
            batch["inputs"][row, : len(inputs)] = inputs
            batch["input_mask"][row, : len(inputs)] = 1.0
            batch["targets"][row] = targets
            batch["decoder_inputs"][row] = np.concatenate([[self.tokenizer.bos_id], targets[:-1]])
            batch["weights"][row] = 1.0
        return batch


def make_pipeline(config, batch_size: int | None = None):
    """The data pipeline of a whole switchmoe config: next-token prediction for the decoder-only
    model, span corruption for the encoder–decoder; packed in memory, or streamed
    (`streaming.StreamingPipeline`) with data.pipeline='stream'."""
    batch_size = config.batch_size if batch_size is None else batch_size
    if config.model.get("arch", "decoder") == "encoder_decoder":
        objective = SpanCorruptionPipeline(config.data, batch_size)
    else:
        objective = _pipeline.LMDataPipeline(config.data, batch_size)
    if config.data.get("pipeline", "packed") == "stream":
        return StreamingPipeline(objective)
    return objective
