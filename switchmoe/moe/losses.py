"""Auxiliary router losses and routing statistics.

Shape legend: G groups, S tokens per group, E experts, K choices per token.

Losses are returned unweighted, one value per MoE layer; the layer multiplies them by their
configured weights and the model sums them into the objective. Statistics are diagnostics only
(no gradient is meant to flow through them) and are what `train/dropped_fraction`,
`train/expert_load` and friends in metrics.jsonl are made of.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _token_weights(shape, mask: Optional[Array]) -> Array:
    """float32[G, S]: 1 for a real token, 0 for a padded one (all ones without a mask)."""
    return jnp.ones(shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def load_balancing_loss(probs: Array, expert: Array, mask: Optional[Array] = None) -> Array:
    """Switch Transformer load-balancing loss, unweighted: E · Σ_i f_i · P_i, averaged over groups.

    f_i is the fraction of the group's (token, choice) pairs whose choice is expert i, counted from
    the router's top-k preferences before capacity and random routing (what the router asked for,
    not what it got). P_i is the mean router probability of expert i over the group. f carries no
    gradient (it comes from an argmax); P does, and pushes probability mass away from experts that
    are asked for too often.

    Normalisation for K > 1: f_i counts each of a token's K choices as 1/K of a token, so Σ_i f_i = 1
    and the loss equals 1 (times its weight α) under perfectly uniform routing for every K.
    flaxformer and transformers count a token once per expert it chose, which makes the uniform
    value K·α; we prefer that the weight means the same thing for top-1 and top-2 models.

    Args:
      probs: float32[G, S, E] router probabilities.
      expert: int32[G, S, K] chosen experts (before capacity).
      mask: optional bool[G, S], False at padded positions: they are left out of f and P, and a
        group holding no real token is left out of the mean over groups.

    Returns:
      float32 scalar; 1 under uniform routing, up to E when every token picks the same expert with
      probability 1.
    """
    E = probs.shape[-1]
    w = _token_weights(probs.shape[:2], mask)  # [G, S]
    n = jnp.sum(w, axis=1)  # [G]
    onehot = jnp.mean(jax.nn.one_hot(expert, E, dtype=jnp.float32), axis=2)  # [G, S, E]
    fraction = jnp.einsum("gs,gse->ge", w, onehot) / jnp.maximum(n, 1.0)[:, None]
    mean_prob = jnp.einsum("gs,gse->ge", w, probs) / jnp.maximum(n, 1.0)[:, None]
    per_group = E * jnp.sum(fraction * mean_prob, axis=-1)
    if mask is None:
        return jnp.mean(per_group)
    has_tokens = (n > 0).astype(jnp.float32)
    return jnp.sum(per_group * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


def sequence_balance_loss(
    probs: Array, expert: Array, sequence_length: int, mask: Optional[Array] = None
) -> Array:
    """DeepSeek-V3's complementary sequence-wise balance loss, unweighted: the Switch loss
    E · Σ_i f_i · P_i computed over each sequence of T tokens instead of each routing group, then
    averaged over sequences (DeepSeek-V3 writes f_i = E/(K·T) · #{t: i in top-K(t)}, which is E
    times this f_i, and P_i over the scores normalised per token, as `probs` are).

    Balancing each sequence, not only the batch, keeps one sequence from sending all its tokens
    to a few experts (and so from overflowing their capacity at inference).

    Args:
      probs: float32[G, S, E]; expert: int32[G, S, K] the router's choices before capacity; the
        G·S tokens are B sequences of T = sequence_length tokens in order (groups are consecutive
        tokens of the [B, T] batch, so a group may hold several sequences or part of one).
      mask: optional bool[G, S]; padded positions are left out (T counts real tokens).
    """
    G, S, E = probs.shape
    B = G * S // sequence_length
    return load_balancing_loss(
        probs.reshape(B, sequence_length, E),
        expert.reshape(B, sequence_length, -1),
        None if mask is None else mask.reshape(B, sequence_length),
    )


def selection_counts(expert: Array, mask: Optional[Array], num_experts: int) -> Array:
    """float32[E]: how many (real token, choice) pairs chose each expert, before capacity.

    What the global-batch loss and the bias balancing count, summed over every group (and then
    over microbatches); no gradient."""
    w = _token_weights(expert.shape[:2], mask)
    onehot = jax.nn.one_hot(expert, num_experts, dtype=jnp.float32)  # [G, S, K, E]
    return jax.lax.stop_gradient(jnp.einsum("gs,gske->e", w, onehot))


def global_balance_loss(
    probs: Array,
    expert: Array,
    mask: Optional[Array] = None,
    *,
    global_counts: Optional[Array] = None,
    global_tokens: Optional[Array] = None,
) -> Array:
    """The global-batch balance loss (Qiu et al. 2025, arXiv 2501.11873), unweighted:
    E · Σ_i f_i · P_i with f_i and P_i counted over the whole global batch instead of each group.

    f_i = (pairs choosing i) / (K · tokens) and P_i = Σ_t p_ti / tokens, both over the real tokens
    of every device, process and accumulation microbatch. Counting f over the global batch lets a
    batch of many domains be balanced while each sequence's tokens concentrate on the experts of
    its domain, which per-group or per-sequence losses forbid.

    Under jit the arrays here are global (every device's groups), so without accumulation the
    counts are exact as they stand. With N accumulation microbatches the step first counts the
    choices of all microbatches (a forward pass) and passes them in: `global_counts` [E] (all
    microbatches' selection_counts) and `global_tokens` (all real tokens / N). Each microbatch's
    loss is then E · Σ_i f_i · (its Σ_t p_ti) / global_tokens, and the mean over microbatches is
    the global-batch loss exactly (f carries no gradient, and the loss is linear in P), however
    the real tokens are spread over the microbatches.

    Args:
      probs: float32[G, S, E]; expert: int32[G, S, K]; mask: optional bool[G, S].
    """
    E = probs.shape[-1]
    w = _token_weights(probs.shape[:2], mask)
    if global_counts is None:
        global_counts = selection_counts(expert, mask, E)
        global_tokens = jnp.sum(w)
    # Every real token makes K choices, so the counts sum to K·tokens: f_i = c_i / Σ_j c_j.
    counts = jax.lax.stop_gradient(global_counts)
    fraction = counts / jnp.maximum(jnp.sum(counts), 1.0)
    prob_sum = jnp.einsum("gs,gse->e", w, probs)
    return E * jnp.sum(fraction * prob_sum) / jnp.maximum(global_tokens, 1.0)


def z_loss(logits: Array, mask: Optional[Array] = None) -> Array:
    """ST-MoE router z-loss, unweighted: mean over (real) tokens of (logsumexp_j h_j)².

    Penalising the log-partition keeps router logits small, so the float32 softmax and exponentials
    stay in their accurate range; ST-MoE reports it as the fix for router-induced training
    instability (weight 1e-3).

    Args:
      logits: float32[G, S, E]; mask: optional bool[G, S], padded positions left out.
    """
    squares = jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return _masked_mean(squares, mask)


def _masked_mean(values: Array, mask: Optional[Array]) -> Array:
    """Mean of values[G, S] over the real tokens (all of them without a mask)."""
    if mask is None:
        return jnp.mean(values)
    w = mask.astype(jnp.float32)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def router_losses(
    logits: Array, probs: Array, expert: Array, mask: Optional[Array] = None
) -> dict[str, Array]:
    """The auxiliary losses every probability-based router reports: load balancing and z-loss."""
    return {
        "load_balancing": load_balancing_loss(probs, expert, mask),
        "z_loss": z_loss(logits, mask),
    }


def routing_stats(
    result, *, requested: Array, overflow: Array, per_rank: bool = True, mask=None
) -> dict[str, Array]:
    """Diagnostics of one layer's routing.

    Args:
      result: a `routing.RoutingResult` (its slot, expert, probs and logits are read).
      requested: bool[G, S, K] pairs that asked for a slot (token-choice: not skipped by random
        routing).
      overflow: bool[G, S, K] requested pairs dropped because their expert was full.
      per_rank: also report the [K] per-choice-rank drop fractions (token-choice routers).
      mask: optional bool[G, S], False at padded positions: they are left out of every
        statistic (a router gives them no slot, so they are neither kept nor dropped).

    Returns (all float32, stop-gradient):
      dropped_fraction: dropped pairs / requested pairs (Switch Table 1's "tokens dropped" for K=1).
      dropped_count: number of dropped pairs.
      dropped_fraction_by_rank: [K] fraction of tokens whose k-th choice was dropped.
      requested_fraction_by_rank: [K] fraction of tokens whose k-th choice asked for a slot (below 1
        for the second rank under GShard random routing).
      unrouted_fraction: tokens with no kept choice; the layer outputs 0 for them.
      expert_load: [E] fraction of kept pairs that went to each expert (1/E when balanced).
      router_entropy: mean over tokens of -Σ_e p_e log p_e (nats; log E when uniform).
      top1_prob: mean over tokens of max_e p_e.
      logit_rms: root mean square of the router logits (what z-loss keeps small).
      dead_expert_fraction: fraction of experts that received under 10% of a uniform share of
        the kept pairs (the "dead experts" of MoE utilisation reports).
      max_expert_share: the largest expert's share of the kept pairs (1/E when balanced).
      expert_load_p10, _p50, _p90: percentiles of the experts' loads in units of the uniform
        share (1 = balanced; NumPy's linear interpolation).
    """
    real = jnp.ones(result.slot.shape[:2], bool) if mask is None else mask  # [G, S]
    kept = (result.slot >= 0) & real[..., None]
    requested, overflow = requested & real[..., None], overflow & real[..., None]
    E = result.probs.shape[-1]
    num_tokens = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
    num_requested = jnp.sum(requested)
    num_dropped = jnp.sum(overflow)
    kept_per_expert = jnp.sum(jax.nn.one_hot(result.expert, E) * kept[..., None], axis=(0, 1, 2))
    probs = result.probs
    token_mean = lambda v: _masked_mean(v, mask)
    stats = {
        "dropped_fraction": num_dropped / jnp.maximum(num_requested, 1),
        "dropped_count": num_dropped.astype(jnp.float32),
        "unrouted_fraction": token_mean(~jnp.any(kept, axis=-1)),
        "expert_load": kept_per_expert / jnp.maximum(jnp.sum(kept_per_expert), 1.0),
        "router_entropy": token_mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), -1)),
        "top1_prob": token_mean(jnp.max(probs, axis=-1)),
        "logit_rms": jnp.sqrt(token_mean(jnp.mean(jnp.square(result.logits), axis=-1))),
    }
    share = stats["expert_load"] * E  # 1 = a uniform share
    stats["dead_expert_fraction"] = jnp.mean(share < 0.1)
    stats["max_expert_share"] = jnp.max(stats["expert_load"])
    for q in (10, 50, 90):
        stats[f"expert_load_p{q}"] = jnp.percentile(share, q)
    if per_rank:
        stats["dropped_fraction_by_rank"] = jnp.sum(overflow, axis=(0, 1)) / num_tokens
        stats["requested_fraction_by_rank"] = jnp.sum(requested, axis=(0, 1)) / num_tokens
    return jax.tree.map(lambda v: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)), stats)
