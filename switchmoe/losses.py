"""Auxiliary router losses and routing statistics.

Shape legend: G groups, S tokens per group, E experts, K choices per token.

Losses are returned unweighted, one value per MoE layer; the layer multiplies them by their
configured weights and the model sums them into the objective. Statistics are diagnostics only
(no gradient is meant to flow through them) and are what `train/dropped_fraction`,
`train/expert_load` and friends in metrics.jsonl are made of.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def load_balancing_loss(probs: Array, expert: Array) -> Array:
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

    Returns:
      float32 scalar; 1 under uniform routing, up to E when every token picks the same expert with
      probability 1.
    """
    E = probs.shape[-1]
    fraction = jnp.mean(jax.nn.one_hot(expert, E, dtype=jnp.float32), axis=(1, 2))  # [G, E]
    mean_prob = jnp.mean(probs, axis=1)  # [G, E]
    return jnp.mean(E * jnp.sum(fraction * mean_prob, axis=-1))


def sequence_balance_loss(probs: Array, expert: Array, sequence_length: int) -> Array:
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
    """
    G, S, E = probs.shape
    B = G * S // sequence_length
    return load_balancing_loss(
        probs.reshape(B, sequence_length, E), expert.reshape(B, sequence_length, -1)
    )


def z_loss(logits: Array) -> Array:
    """ST-MoE router z-loss, unweighted: mean over tokens of (logsumexp_j h_j)².

    Penalising the log-partition keeps router logits small, so the float32 softmax and exponentials
    stay in their accurate range; ST-MoE reports it as the fix for router-induced training
    instability (weight 1e-3).

    Args:
      logits: float32[G, S, E].
    """
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def router_losses(logits: Array, probs: Array, expert: Array) -> dict[str, Array]:
    """The auxiliary losses every probability-based router reports: load balancing and z-loss."""
    return {"load_balancing": load_balancing_loss(probs, expert), "z_loss": z_loss(logits)}


def routing_stats(
    result, *, requested: Array, overflow: Array, per_rank: bool = True
) -> dict[str, Array]:
    """Diagnostics of one layer's routing.

    Args:
      result: a `routing.RoutingResult` (its slot, expert, probs and logits are read).
      requested: bool[G, S, K] pairs that asked for a slot (token-choice: not skipped by random
        routing).
      overflow: bool[G, S, K] requested pairs dropped because their expert was full.
      per_rank: also report the [K] per-choice-rank drop fractions (token-choice routers).

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
    kept = result.slot >= 0
    E = result.probs.shape[-1]
    num_tokens = kept.shape[0] * kept.shape[1]
    num_requested = jnp.sum(requested)
    num_dropped = jnp.sum(overflow)
    kept_per_expert = jnp.sum(jax.nn.one_hot(result.expert, E) * kept[..., None], axis=(0, 1, 2))
    probs = result.probs
    stats = {
        "dropped_fraction": num_dropped / jnp.maximum(num_requested, 1),
        "dropped_count": num_dropped.astype(jnp.float32),
        "unrouted_fraction": jnp.mean(~jnp.any(kept, axis=-1)),
        "expert_load": kept_per_expert / jnp.maximum(jnp.sum(kept_per_expert), 1.0),
        "router_entropy": jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)),
        "top1_prob": jnp.mean(jnp.max(probs, axis=-1)),
        "logit_rms": jnp.sqrt(jnp.mean(jnp.square(result.logits))),
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
