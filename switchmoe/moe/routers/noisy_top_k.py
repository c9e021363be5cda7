"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks").

Shape legend: G groups, S tokens per group, E experts, K experts per token.

  H(x)_i = (x·W_g)_i + N(0, 1) · softplus((x·W_noise)_i)
  G(x)   = softmax(KeepTopK(H(x), K))          (zero outside the top K, sums to 1 over them)

The learned noise lets the router explore and, with the load loss below, gives a smooth estimate
of how many tokens each expert would receive. Two auxiliary losses, over all tokens of the batch:
  importance = CV(Σ_x G(x))²                    balances the gate mass per expert,
  load       = CV(Σ_x P(x, ·))²                 balances the expected token count per expert,
  P(x, i)    = Φ(((x·W_g)_i − kth_excluding(H(x), K, i)) / softplus((x·W_noise)_i)),
the probability that expert i stays in the top K if its noise were drawn again (Φ: the standard
normal CDF; kth_excluding: the K-th largest of H(x) without component i). CV² is the population
variance over the mean squared. The paper weighs both by 0.1. Both W_g and W_noise start at zero,
so every expert starts equally likely.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from switchmoe.moe import losses as losses_lib
from switchmoe.moe.routers.base import Option, Router, router_weights
from switchmoe.moe.routers.top_k import token_choice_causal_reason
from switchmoe.moe.routing import RoutingResult, assign_slots, build_result, priority_order

Array = jax.Array


def cv_squared(x: Array, eps: float = 1e-10) -> Array:
    """Squared coefficient of variation of x[E]: var(x) / mean(x)², population variance."""
    return jnp.var(x) / (jnp.square(jnp.mean(x)) + eps)


def load_probability(clean: Array, noisy: Array, noise_std: Array, k: int) -> Array:
    """P(x, i)[G, S, E]: probability that expert i is in the top k under fresh noise.

    kth_excluding(H, k, i) is the k-th largest of H when i is not among the top k, and the
    (k+1)-th largest when it is (removing i moves the threshold down by one place).
    """
    top = jax.lax.top_k(noisy, k + 1)[0]  # [G, S, k+1], descending
    kth, next_after = top[..., k - 1 : k], top[..., k : k + 1]
    in_top_k = noisy >= kth
    threshold = jnp.where(in_top_k, next_after, kth)
    return norm.cdf((clean - threshold) / noise_std)


def noisy_top_k_route(
    clean_logits: Array,
    noise_logits: Array,
    *,
    num_selected: int,
    capacity: Optional[int],
    noise_key: Optional[Array],
    batch_prioritized: bool = False,
    rank_major: bool = True,
    mask: Optional[Array] = None,
) -> RoutingResult:
    """Noisy top-k routing with capacity.

    Args:
      clean_logits: float32[G, S, E] x·W_g.
      noise_logits: float32[G, S, E] x·W_noise (the noise scale is its softplus).
      num_selected: K; needs K < E (the load loss looks at the (K+1)-th value).
      capacity: C, or None for dropless.
      noise_key: PRNG key of the noise, drawn as `jax.random.normal(noise_key, [G, S, E])`;
        None (evaluation) routes on the clean logits.
      batch_prioritized: claim slots by descending top-1 gate (not causal).
      rank_major: slot order across choices (see `routing.assign_slots`).
      mask: optional bool[G, S]; padded positions ask for no slot and are left out of every loss
        (importance and load sum over real tokens only) and statistic.

    Returns:
      A RoutingResult with K choices, gates G(x) over the chosen experts, `probs` = G(x) (zero
      outside the top K) and losses importance, load, z_loss, load_balancing (unweighted).
    """
    G, S, E = clean_logits.shape
    if not 1 <= num_selected < E:
        raise ValueError(
            f"noisy top-k needs num_selected (k) in [1, num_experts={E}); got {num_selected}."
        )
    noise_std = jax.nn.softplus(noise_logits)
    noisy = clean_logits
    if noise_key is not None:
        noisy = clean_logits + jax.random.normal(noise_key, clean_logits.shape) * noise_std
    top_h, expert = jax.lax.top_k(noisy, num_selected)  # [G, S, K]
    expert = expert.astype(jnp.int32)
    gate = jax.nn.softmax(top_h, axis=-1)  # softmax of KeepTopK: zero outside the top K
    gates_full = jnp.sum(jax.nn.one_hot(expert, E) * gate[..., None], axis=-2)  # [G, S, E]

    order = priority_order(gates_full, batch_prioritized)
    requested = jnp.ones(expert.shape, bool)
    real = jnp.ones((G, S), jnp.float32) if mask is None else mask.astype(jnp.float32)
    if mask is not None:
        requested = requested & mask[..., None]
    slot, overflow = assign_slots(expert, requested, E, capacity, order, rank_major)
    kept_gate = jnp.where(slot >= 0, gate, 0.0)

    importance = jnp.einsum("gs,gse->e", real, gates_full)  # Σ_x G(x), [E]
    load_p = load_probability(clean_logits, noisy, noise_std, num_selected)
    load = jnp.einsum("gs,gse->e", real, load_p)
    losses = losses_lib.router_losses(clean_logits, jax.nn.softmax(clean_logits, -1), expert, mask)
    losses.update(importance=cv_squared(importance), load=cv_squared(load))
    return build_result(
        expert, slot, kept_gate, gates_full, clean_logits,
        capacity=capacity, losses=losses,
        causal=not batch_prioritized and (num_selected == 1 or not rank_major or capacity is None),
        requested=requested, overflow=overflow, mask=mask,
    )  # fmt: skip


class NoisyTopK(Router):
    """Shazeer et al. 2017: top-k of noisy scores, learned noise scale, importance/load losses."""

    name = "noisy_top_k"
    supports_batch_prioritized = True
    supports_granularity = True
    options = {
        "importance_weight": Option(0.0, "weight of the importance loss (Shazeer et al.: 0.1)"),
        "load_weight": Option(0.0, "weight of the load loss (Shazeer et al.: 0.1)"),
    }

    def noncausal_reason(self):
        return token_choice_causal_reason(self.settings, self.dropless)

    def streams(self, train):
        return super().streams(train) + (("noise",) if train else ())

    def loss_weights(self):
        return {
            **super().loss_weights(),
            "importance": self.option("importance_weight"),
            "load": self.option("load_weight"),
        }

    def check(self, prefix="", tokens_per_group=None):
        super().check(prefix, tokens_per_group)
        s = self.settings
        for name in ("importance_weight", "load_weight"):
            if not self.option(name) >= 0:
                raise ValueError(f"{prefix}{name} must be >= 0; got {self.option(name)!r}.")
        if s.num_selected >= s.num_experts:
            raise ValueError(
                f"{prefix}router='noisy_top_k' needs {prefix}num_selected < {prefix}num_experts="
                f"{s.num_experts} (its load loss reads the (k+1)-th score); got {s.num_selected}."
            )

    def route(self, layer, groups, token_ids, keys, train, mask=None, selection_bias=None):
        s = self.settings
        # Both weights start at zero (Shazeer et al.): every expert equally likely.
        logits, scores = self.learned_logits(layer, groups, keys, zero_init=True)
        noise_kernel = router_weights(
            layer, "noise_kernel", jax.nn.initializers.zeros, groups.shape[-1], self.num_experts
        )
        return noisy_top_k_route(
            logits,
            scores(noise_kernel, None),
            num_selected=s.num_selected,
            capacity=self.capacity(groups.shape[1], train),
            noise_key=keys.get("noise"),
            batch_prioritized=s.batch_prioritized,
            rank_major=not s.causal_routing,
            mask=mask,
        )
