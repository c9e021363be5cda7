"""The MoE layer in cached decoding: a step routes one new token per row, and keeps each of its
choices only where a full pass over the whole length would have kept it.

Shape legend: B rows, T cache length (the full length), K choices per token, E experts.

The cache ("cache" collection): `requests` int32[B, T, K], the experts each position asked
for (-1: none), whose shape fixes T; the position comes from the model (`step_index`,
models.decoder.DecodePosition). In a full pass over T positions a causal router places a
(token, choice) in its expert's buffer iff fewer than C choices of earlier tokens in its group
asked for that expert (in-order priority, token-major: routing.assign_slots), with C = the
router's capacity for the group. A step routes its token alone (every choice fits a 1-slot
buffer) and then keeps a choice only if the cached requests of its group leave it a slot.
Groups are rows (group_size None) or runs of group_size positions within a row. Dropless
routing needs no counting. With overflow='next_choice' (routing.place_next_choice) the cache
holds where each earlier choice was placed instead, -1 where it was dropped, and a step places its
token's choices from those counts as the full pass does: a full expert's choice moves to the
token's next-ranked expert with room.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchmoe.moe.routing import RoutingResult, chosen_gates, place_next_choice

Array = jax.Array


def decoding_step(
    layer: nn.Module, router, routing: RoutingResult, B: int, L: int, step_index: Optional[Array]
) -> RoutingResult:
    """The routing of one decoding step of `layer`, made what a full pass would have decided
    (module docstring). The call that creates the cache (`step_index` None) routes the full
    length as usual and only records the cache's shape."""
    K = routing.expert.shape[-1]
    requests = layer.variable("cache", "requests", jnp.zeros, (B, L, K), jnp.int32)
    if step_index is None:  # the call that creates the cache routes the full length as usual
        return routing
    T = requests.value.shape[1]
    S = T if layer.group_size is None else layer.group_size
    if T % S:
        raise ValueError(
            f"cached decoding needs group_size={layer.group_size} to divide the cache length "
            f"{T} (each group a run of positions within one row)."
        )
    i = step_index
    expert = routing.expert[:, 0]  # [B, K]
    asked = routing.slot[:, 0] >= 0  # [B, K]
    record = lambda experts: jax.lax.dynamic_update_slice_in_dim(
        requests.value, experts[:, None], i, axis=1
    )
    capacity = router.capacity(S, train=False)
    next_choice = routing.ranking is not None and capacity is not None
    if not next_choice:
        requests.value = record(jnp.where(asked, expert, -1))
    if capacity is None:
        return routing
    position = jnp.arange(T)
    earlier = (position < i) & (position // S == i // S)  # [T]: this group, before i
    hits = (requests.value[:, :, :, None] == jnp.arange(layer.num_experts)) & earlier[
        None, :, None, None
    ]  # [B, T, K, E]
    counts = jnp.sum(hits, axis=(1, 2), dtype=jnp.int32)  # [B, E]
    if next_choice:
        # The cache holds where earlier choices were placed (a moved choice counts where it
        # went); this token's choices are placed as the full pass places them, from those counts.
        moved, slot, _ = place_next_choice(
            routing.ranking, asked[:, None], capacity, jnp.zeros((B, 1), jnp.int32), counts
        )
        placed = slot[:, 0] >= 0
        requests.value = record(jnp.where(placed, moved[:, 0], -1))
        gate = chosen_gates(routing.scores, moved, layer.gate_norm,
                            router.option("routed_scaling_factor"))  # fmt: skip
        plan = routing.plan.replace(
            expert=moved,
            slot=jnp.where(placed, 0, -1)[:, None].astype(jnp.int32),
            gate=jnp.where(placed[:, None], gate, 0.0),
        )
        return routing.replace(plan=plan)
    kept = asked & (jnp.take_along_axis(counts, expert, axis=1) < capacity)
    plan = routing.plan.replace(
        slot=jnp.where(kept, 0, -1)[:, None].astype(jnp.int32),
        gate=jnp.where(kept[:, None], routing.gate, 0.0),
    )
    return routing.replace(plan=plan)
