"""What every router shares: logits, capacity, slot assignment, and the `RoutingResult` it returns
(a `DispatchPlan` that every backend reads, and the diagnostics beside it). The routers
themselves are in switchmoe/moe/routers/.

Shape legend (used in every docstring of the MoE modules):
  G  routing groups in the batch        S  tokens per group
  E  experts                            C  capacity: slots per expert per group (static int)
  K  choices per token (top-k; E for expert-choice)
  D  model width                        F  expert hidden width

A router answers three questions for every (token, choice) pair, the dispatch plan:
  expert[g, s, k]  which expert the k-th choice of token s is,
  slot[g, s, k]    its position in that expert's buffer of C slots, -1 when it was not placed
                   (dropped for capacity, skipped by random routing, or not picked by the expert),
  gate[g, s, k]    its combine weight, exactly 0 whenever slot is -1.
Dispatch backends turn these into masks (einsum), slot tables (gather) or a sort (dropless); the
router never touches the token vectors themselves, which keeps routing testable against a plain
Python loop and lets any router run with any backend.

Why groups: capacity is counted per group of S tokens rather than per batch, so the cumulative
sums that assign slots stay short (O(S·K·E) per group) and groups can be split across devices
without any communication during routing (GShard §3.2).

Why static capacity: C is a Python int computed from static sizes, so every array has a fixed shape
and XLA compiles the layer once. The price is that tokens beyond an expert's C slots are dropped;
the residual connection around the MoE layer carries them unchanged (Switch §2.2).
"""

from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from switchmoe.moe import losses as losses_lib

Array = jax.Array

# How a token's chosen gates are scaled: the router probabilities as they are (Switch), or
# normalised over the chosen K (GShard, Mixtral).
GATE_NORMS = ("raw", "normalized")


@flax.struct.dataclass
class DispatchPlan:
    """What a dispatch backend reads, and nothing else: where each (token, choice) goes.

    Attributes:
      expert: int32[G, S, K] the expert of each of a token's K choices.
      slot: int32[G, S, K] position of that choice in its expert's buffer, in [0, C); -1 when the
        choice holds no slot. For dropless routing (capacity None) it is the position in the
        expert's unbounded queue and is never -1 for a kept choice.
      gate: float32[G, S, K] combine weight of the choice; 0 wherever slot is -1.
      num_experts: static E (a plan may leave experts empty, so it is not read off the arrays).
      capacity: static Python int C, or None for dropless routing.
    """

    expert: Array
    slot: Array
    gate: Array
    num_experts: int = flax.struct.field(pytree_node=False)
    capacity: Optional[int] = flax.struct.field(pytree_node=False, default=None)

    @property
    def kept(self) -> Array:
        """bool[G, S, K]: the choice holds a slot and contributes to the output."""
        return self.slot >= 0


@flax.struct.dataclass
class RoutingResult:
    """What a router decided for one MoE layer: the dispatch plan, and the diagnostics beside it.

    Attributes:
      plan: the DispatchPlan the backends read (expert, slot, gate, E, C; also readable here as
        `result.expert`, `result.slot`, ...).
      probs: float32[G, S, E] router probabilities (softmax of the logits), read by losses/stats.
      logits: float32[G, S, E] router logits (z-loss and logit-magnitude statistics read these).
      losses: dict of scalar auxiliary losses, unweighted (the layer applies the weights).
      stats: dict of routing statistics (scalars and [E] / [K] vectors), all float32.
      causal: static; False when a token's routing depends on later tokens of its group
        (expert-choice, batch-prioritized routing), which autoregressive decoding cannot allow.
      ranking, scores: see below (overflow='next_choice').
    """

    plan: DispatchPlan
    probs: Array
    logits: Array
    losses: dict[str, Array]
    stats: dict[str, Array]
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    # overflow='next_choice' only (None otherwise): int32[G, S, E] each token's experts best
    # first, and float32[G, S, E] the scores its gates are taken from, so that cached decoding
    # can replay a move with the counts of earlier positions (moe/decoding.py).
    ranking: Optional[Array] = None
    scores: Optional[Array] = None

    expert = property(lambda self: self.plan.expert)
    slot = property(lambda self: self.plan.slot)
    gate = property(lambda self: self.plan.gate)
    num_experts = property(lambda self: self.plan.num_experts)
    capacity = property(lambda self: self.plan.capacity)
    kept = property(lambda self: self.plan.kept)


def build_result(
    expert: Array,
    slot: Array,
    gate: Array,
    probs: Array,
    logits: Array,
    *,
    capacity: Optional[int],
    causal: bool,
    losses: dict[str, Array],
    requested: Array,
    overflow: Array,
    per_rank: bool = True,
    mask: Optional[Array] = None,
) -> RoutingResult:
    """A router's RoutingResult with its statistics filled in (losses.routing_stats).

    probs[G, S, E] fixes E. requested/overflow: bool[G, S, K], the choices that asked for a slot
    and those dropped for capacity; only the router knows them (random routing skips,
    expert-choice non-picks). mask: optional bool[G, S], False at padded positions (left out
    of the statistics).
    """
    plan = DispatchPlan(expert, slot, gate, num_experts=probs.shape[-1], capacity=capacity)
    result = RoutingResult(
        plan=plan, probs=probs, logits=logits, losses=losses, stats={}, causal=causal
    )
    stats = losses_lib.routing_stats(
        result, requested=requested, overflow=overflow, per_rank=per_rank, mask=mask
    )
    return result.replace(stats=stats)


# ----------------------------------------------------------------------------------------------
# Capacity.


def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    num_selected: int,
    capacity_factor: Optional[float],
    min_capacity: int = 1,
) -> Optional[int]:
    """Slots per expert per group: C = ceil(K·S/E · capacity_factor), at least `min_capacity`.

    A capacity factor of 1 gives exactly enough slots for perfectly balanced routing; Switch trains
    at 1.0–1.25 and evaluates at a higher factor (2.0) so fewer tokens drop at evaluation. C is also
    capped at S: a token picks an expert at most once, so an expert can never receive more than S
    tokens of a group and slots beyond S would always be empty. `capacity_factor=None` means dropless
    routing and returns None.

    For expert-choice routing call it with num_selected=1: C = ceil(S/E · capacity_factor), where the
    capacity factor is the average number of experts per token (Zhou et al. 2022).
    """
    if capacity_factor is None:
        return None
    if capacity_factor <= 0:
        raise ValueError(
            f"capacity_factor must be > 0 (or None for dropless); got {capacity_factor}."
        )
    if min_capacity < 1:
        raise ValueError(f"min_capacity must be >= 1; got {min_capacity}.")
    capacity = math.ceil(num_selected * tokens_per_group / num_experts * capacity_factor)
    return min(max(capacity, min_capacity), tokens_per_group)


# ----------------------------------------------------------------------------------------------
# Router logits.


def router_logits(
    x: Array,
    kernel: Array,
    bias: Optional[Array] = None,
    *,
    jitter_key: Optional[Array] = None,
    jitter_eps: float = 0.0,
    dtype: jnp.dtype = jnp.float32,
) -> Array:
    """Router logits h = x·W_r (+ b), always in float32 ("selective precision", Switch §2.4).

    The softmax over experts and the top-k that follows are sensitive to rounding: in bfloat16 two
    experts whose logits differ by less than ~1% of their magnitude tie, and the exponentials in the
    softmax and z-loss overflow early. The router matmul is a tiny share of the layer's FLOPs
    (E columns against the experts' 2·F), so it is computed in float32 whatever the compute dtype.

    Args:
      x: [G, S, D] tokens, any float dtype.
      kernel: [D, E] router weights.
      bias: optional [E].
      jitter_key: PRNG key for multiplicative jitter x ← x·U(1-ε, 1+ε) (Switch, ε=1e-2), applied
        to the router's input only; None (evaluation) disables it.
      jitter_eps: ε.
      dtype: precision of the matmul; float32 unless ablating selective precision (bfloat16
        rounds inputs and weights to 8 mantissa bits; the result is returned as float32).

    Returns:
      float32[G, S, E] logits.
    """
    x = x.astype(jnp.float32)
    if jitter_key is not None and jitter_eps > 0:
        x = x * jax.random.uniform(
            jitter_key, x.shape, jnp.float32, minval=1.0 - jitter_eps, maxval=1.0 + jitter_eps
        )
    logits = jnp.einsum(
        "gsd,de->gse",
        x.astype(dtype),
        kernel.astype(dtype),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    # The ablation also rounds the logits themselves, as a bf16 router would produce them.
    return logits.astype(dtype).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Slot assignment shared by token-choice routers.


def priority_order(probs: Array, batch_prioritized: bool) -> Array:
    """int32[G, S]: the order in which a group's tokens claim slots.

    In-order priority (Switch, GShard) lets earlier tokens go first; with one choice per token (or
    token-major slots, see `assign_slots`) a token's slot then depends only on the tokens before
    it: causal, safe for decoders. Batch Prioritized Routing (V-MoE, Riquelme
    et al. 2021) lets the tokens the router is most confident about go first — by their top-1
    probability, the same order for every choice rank — so at low capacity the dropped tokens are
    the ones the router cared least about. It looks at the whole group, so it is not causal.
    """
    G, S, _ = probs.shape
    if not batch_prioritized:
        return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (G, S))
    # Stable sort: equal confidences keep sequence order, so ties break the same way as in-order.
    return jnp.argsort(-jnp.max(probs, axis=-1), axis=-1, stable=True).astype(jnp.int32)


def assign_slots(
    expert: Array,
    requested: Array,
    num_experts: int,
    capacity: Optional[int],
    order: Array,
    rank_major: bool = True,
) -> tuple[Array, Array]:
    """Places every requested (token, choice) pair in its expert's buffer.

    Rank-major (GShard, the default): all tokens' first choices are placed before any second
    choice, so a token's backup expert never evicts another token's preferred one; within a rank,
    tokens claim slots in `order`. With K >= 2 this is not causal: whether an early token's second
    choice fits depends on how many later tokens chose that expert first. Token-major
    (`rank_major=False`): each token places all its choices before the next token in `order`
    does; with in-order priority every slot depends only on earlier tokens (decoders).
    The position of a pair is the number of pairs ahead of it (in that order) that asked for the same
    expert: one cumulative sum over the flattened [K·S] sequence of one-hot expert masks.

    Args:
      expert: int32[G, S, K] the chosen experts.
      requested: bool[G, S, K] pairs that ask for a slot (False: skipped by random routing).
      num_experts: E.
      capacity: C, or None to place everything (dropless).
      order: int32[G, S] priority order of tokens (a permutation of 0..S-1 per group).
      rank_major: first choices of all tokens before second choices (True), or token by token.

    Returns:
      slot: int32[G, S, K], -1 where not requested or over capacity.
      overflow: bool[G, S, K], requested but over capacity (the dropped pairs).
    """
    G, S, K = expert.shape
    # Gather into priority order, then flatten rank-major [G, K, S] or token-major [G, S, K].
    take = lambda a: jnp.take_along_axis(a, order[:, :, None], axis=1)
    flatten = lambda a: (jnp.swapaxes(a, 1, 2) if rank_major else a).reshape(G, K * S)
    expert_o, requested_o = flatten(take(expert)), flatten(take(requested))
    onehot = jax.nn.one_hot(expert_o, num_experts, dtype=jnp.int32) * requested_o[..., None]
    # [G, K·S, E] running count of pairs per expert; the pair's own position is count - 1.
    position = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)
    fits = requested_o if capacity is None else requested_o & (position < capacity)
    slot_o = jnp.where(fits, position, -1).astype(jnp.int32)
    overflow_o = requested_o & ~fits
    # Back to token order: undo the flattening, then scatter rows back through the permutation.
    unflatten = lambda a: (
        jnp.swapaxes(a.reshape(G, K, S), 1, 2) if rank_major else a.reshape(G, S, K)
    )
    inverse = jnp.argsort(order, axis=-1)
    untake = lambda a: jnp.take_along_axis(a, inverse[:, :, None], axis=1)
    return untake(unflatten(slot_o)), untake(unflatten(overflow_o))


# What happens to a (token, choice) pair that finds its expert full: it is dropped (Switch,
# GShard), or it moves to the token's next-ranked expert that still has a free slot
# (`place_next_choice`).
OVERFLOW_RULES = ("drop", "next_choice")
# Which pairs an expert keeps when more ask than it has slots: the earliest in priority order
# (`position`: causal with in-order priority), or those it scores highest (`probability`:
# Megatron-Core's default drop policy; it looks at the whole group, so it is not causal).
DROP_PRIORITIES = ("position", "probability")


def place_next_choice(
    ranking: Array,
    requested: Array,
    capacity: int,
    order: Array,
    used: Optional[Array] = None,
) -> tuple[Array, Array, Array]:
    """Token-by-token placement where a choice that finds its expert full moves to the token's
    next-ranked expert that still has a free slot (overflow='next_choice').

    Tokens claim slots in `order`, each placing its K choices in rank order before the next
    token does (token-major, so with in-order priority a token's placement depends only on the
    tokens before it: causal). Choice k asks for ranking[k]; if that expert holds C pairs
    already, the choice takes the first expert in the token's ranking past its own K choices
    (ranks K, K+1, ...) that has room and that no other choice of this token holds; if none has
    room it is dropped. A token never holds one expert twice, and no expert exceeds C.

    The placement is sequential (a moved choice takes a slot a later token could have had), so
    it is a scan over the S positions: S steps of O(K·E) work per group, where `assign_slots`
    is one cumulative sum. That is the price of the rule; the MoE layer's FLOPs do not change.

    Args:
      ranking: int32[G, S, E] each token's experts, best first (the router's ranking).
      requested: bool[G, S, K] the choices that ask for a slot (False: random routing skipped
        it, or a padded position).
      capacity: C.
      order: int32[G, S] priority order of tokens.
      used: optional int32[G, E] slots already taken per expert (cached decoding: the earlier
        positions of the group); default none.

    Returns:
      expert: int32[G, S, K] where each choice went (its asked expert when it was dropped or
        not requested).
      slot: int32[G, S, K] its position in that expert's buffer, -1 when not placed.
      overflow: bool[G, S, K] requested but placed nowhere (the dropped pairs).
    """
    G, S, E = ranking.shape
    K = requested.shape[-1]
    take = lambda a: jnp.take_along_axis(a, order.reshape(G, S, 1), axis=1)
    ranking_o, requested_o = take(ranking).astype(jnp.int32), take(requested)
    used = jnp.zeros((G, E), jnp.int32) if used is None else used.astype(jnp.int32)
    pick = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]  # a[G, E] at i[G]

    def step(used, xs):
        rank, asked = xs  # [G, E], [G, K]
        held = jnp.any(jax.nn.one_hot(rank[:, :K], E, dtype=bool), axis=1)  # [G, E] own K
        experts, slots, dropped = [], [], []
        for k in range(K):
            want = rank[:, k]
            room = used < capacity  # [G, E]
            fits = asked[:, k] & pick(room, want)
            # Free experts in this token's rank order, its own K choices and moves excluded.
            free_ranked = jnp.take_along_axis(room & ~held, rank, axis=1)
            alternative = pick(rank, jnp.argmax(free_ranked, axis=1))
            move = asked[:, k] & ~fits & jnp.any(free_ranked, axis=1)
            final = jnp.where(move, alternative, want)
            placed = fits | move
            slots.append(jnp.where(placed, pick(used, final), -1))
            used = used + jax.nn.one_hot(final, E, dtype=jnp.int32) * placed[:, None]
            held = held | (jax.nn.one_hot(alternative, E, dtype=bool) & move[:, None])
            experts.append(final)
            dropped.append(asked[:, k] & ~placed)
        return used, (jnp.stack(experts, -1), jnp.stack(slots, -1), jnp.stack(dropped, -1))

    xs = (jnp.swapaxes(ranking_o, 0, 1), jnp.swapaxes(requested_o, 0, 1))  # scan over S
    _, outs = jax.lax.scan(step, used, xs)
    inverse = jnp.argsort(order, axis=-1)
    back = lambda a: jnp.take_along_axis(jnp.swapaxes(a, 0, 1), inverse[:, :, None], axis=1)
    expert, slot, overflow = (back(a) for a in outs)
    return expert.astype(jnp.int32), slot.astype(jnp.int32), overflow


def chosen_gates(
    scores: Array, expert: Array, gate_norm: str, routed_scaling_factor: float = 1.0
) -> Array:
    """float32[G, S, K] the gates of the chosen experts: their scores ("raw"), or normalised over
    the K ("normalized"), times the routed scaling factor. Normalisation happens before
    capacity: a dropped choice's score stays in the sum (GShard)."""
    top = jnp.take_along_axis(scores, expert, axis=-1)
    gate = top / jnp.sum(top, axis=-1, keepdims=True) if gate_norm == "normalized" else top
    return gate * routed_scaling_factor if routed_scaling_factor != 1.0 else gate


def assign_slots_by_score(
    expert: Array, score: Array, requested: Array, num_experts: int, capacity: int
) -> tuple[Array, Array]:
    """Slots by score (drop_priority='probability', Megatron-Core's drop policy): each expert
    keeps the C requested pairs with the highest `score` among those asking for it, its slot
    the pair's rank there (ties: earlier position, then lower choice rank). Not causal: a later
    token with a higher score takes an earlier token's slot.

    Args:
      expert: int32[G, S, K]; score: float32[G, S, K] the router's probability of each pair's
        expert; requested: bool[G, S, K]; num_experts: E; capacity: C.

    Returns:
      slot: int32[G, S, K], -1 where not requested or not among its expert's top C.
      overflow: bool[G, S, K], requested but not kept.
    """
    G, S, K = expert.shape
    N = S * K
    e = expert.reshape(G, N)
    # Unrequested pairs sort last within their expert: they take no rank from requested ones.
    key = jnp.where(requested, score, -jnp.inf).reshape(G, N)
    by_score = jnp.argsort(-key, axis=-1, stable=True)  # stable: ties keep (position, rank)
    by_expert = jnp.argsort(jnp.take_along_axis(e, by_score, axis=-1), axis=-1, stable=True)
    perm = jnp.take_along_axis(by_score, by_expert, axis=-1)  # expert-major, best score first
    counts = jnp.sum(jax.nn.one_hot(e, num_experts, dtype=jnp.int32), axis=1)  # [G, E]
    starts = jnp.cumsum(counts, axis=-1) - counts
    sorted_e = jnp.take_along_axis(e, perm, axis=-1)
    rank_sorted = jnp.arange(N) - jnp.take_along_axis(starts, sorted_e, axis=-1)
    rank = jnp.zeros((G, N), jnp.int32).at[jnp.arange(G)[:, None], perm].set(rank_sorted)
    rank = rank.reshape(G, S, K)
    fits = requested & (rank < capacity)
    return jnp.where(fits, rank, -1).astype(jnp.int32), requested & ~fits


def group_tokens(x: Array, group_size: Optional[int]) -> Array:
    """x[B, L, D] -> [G, S, D]: routing groups of S = group_size tokens (None: each sequence
    one group, S = L), which must divide the B·L tokens."""
    B, L, D = x.shape
    S = L if group_size is None else group_size
    if S < 1 or (B * L) % S:
        raise ValueError(
            f"group_size must divide the tokens per batch (batch {B} × length {L} = "
            f"{B * L}); got group_size={S}."
        )
    return x.reshape(B * L // S, S, D)
