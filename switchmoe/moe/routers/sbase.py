"""S-BASE: balanced token-to-expert assignment by Sinkhorn iterations (Lewis et al. 2021 "BASE
layers"; Clark et al. 2022, "Unified scaling laws for routed language models").

Shape legend: G groups, S tokens per group, E experts; S must be a multiple of E.

BASE layers give every expert exactly S/E tokens of the group and, subject to that, maximise the
total token-expert affinity (the router logits): a linear assignment problem. S-BASE solves it
approximately: a fixed number of Sinkhorn iterations turns exp(logits / temperature) into a plan
whose rows sum to 1 (each token is assigned once) and whose columns sum to S/E (each expert gets
its share); the plan is then rounded greedily — (token, expert) pairs in decreasing plan value,
each taken if the token is unassigned and the expert still has room. Every expert ends with
exactly S/E tokens (a token whose preferred experts are full falls to the next, and E·S/E = S
slots hold all S tokens). At evaluation the router is greedy top-1 (no balancing), as in the
papers.

The gate of a token's expert is its router probability p[e] (softmax over experts), so the router
is trained through the gates as in Switch; the assignment itself carries no gradient.
Cost: the rounding is a sequential scan over the S·E pairs of a group (vmapped over groups), fine
for the CPU-scale groups used here; BASE's auction algorithm is the alternative at scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from switchmoe.moe import losses as losses_lib
from switchmoe.moe.routers.base import Option, Router
from switchmoe.moe.routers.top_k import top_k_route
from switchmoe.moe.routing import RoutingResult, build_result

Array = jax.Array


def sinkhorn_log_plan(scores: Array, num_iters: int, temperature: float = 1.0) -> Array:
    """log of the Sinkhorn plan [G, S, E]: rows sum to 1, columns to S/E (approximately)."""
    G, S, E = scores.shape
    log_col = jnp.log(S / E)

    def step(_, log_p):
        log_p = log_p - jax.nn.logsumexp(log_p, axis=2, keepdims=True)  # rows -> 1
        return log_p - jax.nn.logsumexp(log_p, axis=1, keepdims=True) + log_col  # cols -> S/E

    # Standardised per group, so the temperature does not depend on the logits' scale (small at
    # initialisation, larger later in training).
    scores = scores.astype(jnp.float32)
    mean = jnp.mean(scores, axis=(1, 2), keepdims=True)
    std = jnp.std(scores, axis=(1, 2), keepdims=True)
    log_p = (scores - mean) / (std + 1e-6) / temperature
    return jax.lax.fori_loop(0, num_iters, step, log_p)


def _round_group(log_plan: Array, capacity: int) -> tuple[Array, Array]:
    """Greedy rounding of one group's plan [S, E] -> (expert[S], slot[S])."""
    S, E = log_plan.shape
    order = jnp.argsort(-log_plan.reshape(-1))  # pairs, best first

    def take(state, pair):
        expert, slot, load = state
        s, e = pair // E, pair % E
        ok = (expert[s] < 0) & (load[e] < capacity)
        expert = expert.at[s].set(jnp.where(ok, e, expert[s]))
        slot = slot.at[s].set(jnp.where(ok, load[e], slot[s]))
        load = load.at[e].add(ok.astype(jnp.int32))
        return (expert, slot, load), None

    init = (
        jnp.full((S,), -1, jnp.int32),
        jnp.full((S,), -1, jnp.int32),
        jnp.zeros((E,), jnp.int32),
    )
    (expert, slot, _), _ = jax.lax.scan(take, init, order)
    return expert, slot


def sbase_route(
    logits: Array, *, num_iters: int = 200, temperature: float = 0.02, mask=None
) -> RoutingResult:
    """Balanced top-1 routing of logits[G, S, E]: every expert gets exactly S/E tokens per group.

    Returns a RoutingResult with K = 1, capacity S/E and no dropped token.

    mask: optional bool[G, S], False at padded positions. Their logits enter the balance as zeros
    (whatever the pads hold) and they are rounded after every real token, so they never take a
    real token's slot; then they are given none.
    """
    G, S, E = logits.shape
    if S % E:
        raise ValueError(
            f"S-BASE needs tokens per group ({S}) divisible by num_experts ({E}) so that every "
            "expert can get exactly S/E tokens; adjust model.moe.group_size or num_experts."
        )
    capacity = S // E
    probs = jax.nn.softmax(logits, axis=-1)
    balance_logits = jax.lax.stop_gradient(logits)
    if mask is not None:
        balance_logits = jnp.where(mask[..., None], balance_logits, 0.0)
    log_plan = sinkhorn_log_plan(balance_logits, num_iters, temperature)
    if mask is not None:
        log_plan = jnp.where(mask[..., None], log_plan, -jnp.inf)
    expert, slot = jax.vmap(_round_group, in_axes=(0, None))(log_plan, capacity)
    expert, slot = expert[..., None], slot[..., None]  # [G, S, 1]
    requested = jnp.ones(expert.shape, bool)
    if mask is not None:
        slot = jnp.where(mask[..., None], slot, -1)
        requested = requested & mask[..., None]
    expert = jnp.maximum(expert, 0)  # a pad left unplaced by the rounding: any valid index
    gate = jnp.where(slot >= 0, jnp.take_along_axis(probs, expert, axis=-1), 0.0)
    return build_result(
        expert, slot, gate, probs, logits,
        capacity=capacity, causal=False,  # the balance couples all tokens of the group
        losses=losses_lib.router_losses(logits, probs, expert, mask),
        requested=requested, overflow=jnp.zeros_like(requested), mask=mask,
    )  # fmt: skip


class SBase(Router):
    """Balanced assignment while training, greedy top-1 at evaluation; not causal."""

    name = "sbase"
    options = {
        "sbase_iters": Option(200, "Sinkhorn iterations", int),
        "sbase_temperature": Option(0.02, "Sinkhorn temperature, on standardised logits"),
    }

    @property
    def choices_per_token(self):
        return 1

    def noncausal_reason(self):
        return f"model.moe.router={self.name!r} routes on the whole group"

    def capacity(self, tokens_per_group, train):
        if train:
            return tokens_per_group // self.num_experts  # exactly balanced
        return super().capacity(tokens_per_group, train)

    def check(self, prefix="", tokens_per_group=None):
        super().check(prefix, tokens_per_group)
        if not self.option("sbase_temperature") > 0 or not self.option("sbase_iters") >= 1:
            raise ValueError(
                f"{prefix}sbase_temperature must be > 0 and {prefix}sbase_iters >= 1; got "
                f"{self.option('sbase_temperature')!r} and {self.option('sbase_iters')!r}."
            )
        if tokens_per_group is not None and tokens_per_group % self.num_experts:
            raise ValueError(
                f"{prefix}router='sbase' needs the tokens per routing group ({tokens_per_group}: "
                f"{prefix}group_size, or the sequence length) divisible by {prefix}num_experts="
                f"{self.num_experts} (every expert gets exactly S/E tokens)."
            )

    def route(self, layer, groups, token_ids, keys, train, mask=None, selection_bias=None):
        logits, _ = self.learned_logits(layer, groups, keys)
        if train:
            return sbase_route(
                logits,
                num_iters=self.option("sbase_iters"),
                temperature=self.option("sbase_temperature"),
                mask=mask,
            )
        return top_k_route(
            logits,
            num_selected=1,
            capacity=self.capacity(groups.shape[1], train),
            gate_norm=self.settings.gate_norm,
            rank_major=not self.settings.causal_routing,
            mask=mask,
        )
