"""Expert-choice routing (Zhou et al. 2022): every expert takes the C tokens it likes best.

Shape legend: G groups, S tokens per group, E experts, C capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from switchmoe.moe import losses as losses_lib
from switchmoe.moe.routers.base import Router
from switchmoe.moe.routing import RoutingResult, build_result

Array = jax.Array


def expert_choice_route(logits: Array, *, capacity: int, mask=None) -> RoutingResult:
    """Expert-choice routing: every expert takes the C tokens of the group it likes best.

    Each expert fills exactly C slots, so load is perfectly balanced by construction and nothing
    "drops" in the token-choice sense; instead a token may be taken by 0..E experts. Its gate for
    expert e is p[s, e] (softmax over experts), as in the paper. Choosing among all S tokens of the
    group means token s's routing depends on tokens after it: not causal, so a decoder can train
    with it but cannot decode autoregressively (the result carries causal=False).

    Returns a RoutingResult with K = E: choice e of a token is expert e, with slot = the token's rank
    among expert e's picks (0 = best), or -1 when expert e did not pick it.

    Args:
      logits: float32[G, S, E].
      capacity: C in [1, S], usually `expert_capacity(S, E, 1, capacity_factor)`.
      mask: optional bool[G, S], False at padded positions: experts rank them below every real
        token whatever they hold, and a pad an expert still picks (C above the real tokens)
        holds no slot.
    """
    G, S, E = logits.shape
    if capacity is None or not 1 <= capacity <= S:
        raise ValueError(
            f"expert-choice routing needs a capacity in [1, tokens_per_group={S}]; got {capacity}."
        )
    probs = jax.nn.softmax(logits, axis=-1)
    # [G, E, C]: the tokens each expert picked, best first (top_k breaks ties by lower index).
    preference = probs if mask is None else jnp.where(mask[..., None], probs, -1.0)
    _, picked = jax.lax.top_k(jnp.swapaxes(preference, 1, 2), capacity)
    g_idx = jnp.arange(G)[:, None, None]
    e_idx = jnp.arange(E)[None, :, None]
    c_idx = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), picked.shape)
    slot = jnp.full((G, S, E), -1, jnp.int32).at[g_idx, picked, e_idx].set(c_idx)
    if mask is not None:
        slot = jnp.where(mask[..., None], slot, -1)
    expert = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
    gate = jnp.where(slot >= 0, probs, 0.0)
    # The load-balancing loss is computed from each token's top-1 preference for reporting; with
    # perfectly balanced slots an expert-choice model normally trains with its weight at 0.
    top1 = jnp.argmax(probs, axis=-1)[..., None].astype(jnp.int32)
    return build_result(
        expert, slot, gate, probs, logits,
        capacity=capacity, causal=False,
        losses=losses_lib.router_losses(logits, probs, top1, mask),
        requested=slot >= 0, overflow=jnp.zeros_like(slot, bool), per_rank=False, mask=mask,
    )  # fmt: skip


class ExpertChoice(Router):
    """Perfectly balanced by construction; not causal (an expert compares all S tokens)."""

    name = "expert_choice"

    @property
    def choices_per_token(self):
        return self.num_experts  # choice e of a token is expert e (slot -1 unless picked)

    @property
    def experts_per_token(self):
        # The capacity factor is the average number of experts per token (Zhou et al. 2022).
        return self.settings.train_capacity_factor

    def noncausal_reason(self):
        return f"model.moe.router={self.name!r} routes on the whole group"

    def preferences(self, result):
        return jnp.argmax(result.probs, axis=-1)[..., None].astype(jnp.int32)  # top-1

    def capacity(self, tokens_per_group, train):
        return self._factor_capacity(tokens_per_group, train, 1)  # whatever the backend

    def route(self, layer, groups, token_ids, keys, train, mask=None, selection_bias=None):
        logits, _ = self.learned_logits(layer, groups, keys)
        return expert_choice_route(
            logits, capacity=self.capacity(groups.shape[1], train), mask=mask
        )
