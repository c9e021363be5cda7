"""Hash layers (Roller et al. 2021): a fixed token-id -> expert table, no router parameters.

Shape legend: G groups, S tokens per group, E experts, V vocabulary.

The table is part of the model's definition, not learned: it lives in the config
(`model.moe.hash_table`, filled when a run starts) and so is saved in config.json, and evaluation,
resumption and `restore_run` all route with the table the run trained with.
  random    expert = a seeded hash of the token id (Roller et al.'s "random hash").
  balanced  greedy packing of the training corpus' token frequencies: tokens in decreasing
            frequency, each to the expert with the fewest tokens so far. The final per-expert
            counts differ by at most the largest single token's count (when the fullest expert
            took its last token it was the emptiest, so max − min ≤ that token's count).
A hash-routed token goes to one expert with gate 1 (the layer output is that expert's output).
The layer's loss weights still apply to the reported load-balancing value, which has no gradient.
"""

from __future__ import annotations

import heapq
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.data.streaming import StreamingPipeline
from switchmoe.moe import losses as losses_lib
from switchmoe.moe.routers.base import Option, Router
from switchmoe.moe.routing import RoutingResult, assign_slots, build_result

Array = jax.Array
HASH_KINDS = ("random", "balanced")


def random_hash_table(vocab_size: int, num_experts: int, seed: int = 0) -> np.ndarray:
    """int32[V]: expert of each token id, from a seeded permutation (near-uniform counts)."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(vocab_size) % num_experts).astype(np.int32)


def balanced_hash_table(token_counts: Sequence[int], num_experts: int) -> np.ndarray:
    """int32[V]: greedy least-loaded assignment of tokens by decreasing frequency."""
    counts = np.asarray(token_counts, np.int64)
    table = np.zeros(len(counts), np.int32)
    heap = [(0, e) for e in range(num_experts)]  # (tokens so far, expert)
    for token in np.argsort(-counts, kind="stable"):
        load, e = heapq.heappop(heap)
        table[token] = e
        heapq.heappush(heap, (load + int(counts[token]), e))
    return table


def hash_route(
    token_ids: Array,
    table: Array,
    num_experts: int,
    *,
    capacity: Optional[int],
    mask: Optional[Array] = None,
) -> RoutingResult:
    """Routes token_ids[G, S] through table[V]: one choice per token, gate 1.

    Tokens of a group claim slots in sequence order (causal). `probs` is the one-hot assignment,
    so the statistics (load, drops) read the same as for learned routers; there are no losses.
    mask: optional bool[G, S]; padded positions ask for no slot and are left out of the counts.
    """
    expert = jnp.asarray(table)[token_ids].astype(jnp.int32)[..., None]  # [G, S, 1]
    G, S, _ = expert.shape
    requested = jnp.ones(expert.shape, bool)
    if mask is not None:
        requested = requested & mask[..., None]
    order = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (G, S))
    slot, overflow = assign_slots(expert, requested, num_experts, capacity, order)
    probs = jax.nn.one_hot(expert[..., 0], num_experts, dtype=jnp.float32)
    # No router parameters, so nothing to train: the load-balancing value (E·Σ f_i², 1 when the
    # table balances this batch) is reported for comparison with learned routers; z-loss is 0.
    losses = {
        "load_balancing": losses_lib.load_balancing_loss(probs, expert, mask),
        "z_loss": jnp.zeros((), jnp.float32),
    }
    return build_result(
        expert, slot, jnp.where(slot >= 0, 1.0, 0.0), probs, jnp.zeros_like(probs),
        capacity=capacity, causal=True, losses=losses, requested=requested, overflow=overflow,
        mask=mask,
    )  # fmt: skip


def table_for_config(config) -> np.ndarray:
    """The token id -> expert table int32[vocab_size] a run of `config` routes with."""
    moe, vocab = config.model.moe, config.model.vocab_size
    if moe.hash_kind == "random":
        return random_hash_table(vocab, moe.num_experts, config.seed)
    objective = LMDataPipeline(config.data, config.batch_size)
    if config.data.get("pipeline", "packed") == "stream":
        # A split too large to pack: the frequencies of its first 2^22 training tokens (the
        # stream's documents are shuffled, so this is a sample of the whole split).
        stream = StreamingPipeline(objective).train_batches()
        counts = np.zeros([vocab], np.int64)
        for _ in range(-(-(2**22) // (config.batch_size * config.data.seq_len))):
            counts += np.bincount(next(stream)["inputs"].ravel(), minlength=vocab)[:vocab]
        stream.close()
        return balanced_hash_table(counts, moe.num_experts)
    windows = objective.packed(config.data.train_split)
    counts = np.bincount(np.asarray(windows.windows, np.int64).ravel(), minlength=vocab)
    return balanced_hash_table(counts[:vocab], moe.num_experts)


class Hash(Router):
    """A fixed token-id table: no router parameters, one expert per token, gate 1; causal."""

    name = "hash"
    options = {
        "hash_kind": Option(
            "random",
            "'random' (seeded hash) or 'balanced' (greedy on training-corpus token "
            "frequencies); the table is computed when the run starts and saved in config.json",
            str,
        ),
        "hash_table": Option(None, "token id -> expert (filled when a run starts)", tuple),
    }

    @property
    def choices_per_token(self):
        return 1

    def streams(self, train):
        return ()  # no logits to jitter

    def check(self, prefix="", tokens_per_group=None):
        super().check(prefix, tokens_per_group)
        kind = self.option("hash_kind")
        if kind not in HASH_KINDS:
            raise ValueError(f"{prefix}hash_kind must be one of {HASH_KINDS}; got {kind!r}.")
        table = self.option("hash_table")
        if table is not None and not all(0 <= int(e) < self.num_experts for e in table):
            raise ValueError(
                f"{prefix}hash_table names experts outside [0, {prefix}num_experts="
                f"{self.num_experts}); got values in [{min(table)}, {max(table)}]."
            )

    def prepare(self, config):
        if config.model.moe.get("hash_table") is None:
            config.model.moe.hash_table = tuple(int(e) for e in table_for_config(config))

    def route(self, layer, groups, token_ids, keys, train, mask=None, selection_bias=None):
        if token_ids is None:
            raise ValueError("router='hash' needs the token ids: call the layer with token_ids.")
        table = self.option("hash_table")
        if table is None:
            raise ValueError(
                "router='hash' needs router_options['hash_table'] (token id -> expert)."
            )
        capacity = self.capacity(groups.shape[1], train)
        return hash_route(
            token_ids, jnp.asarray(table, jnp.int32), self.num_experts, capacity=capacity,
            mask=mask,
        )  # fmt: skip
