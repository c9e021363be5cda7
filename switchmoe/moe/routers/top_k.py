"""Token-choice top-k routing: Switch (k = 1), GShard and ST-MoE (k = 2), general k.

Shape legend: G groups, S tokens per group, E experts, K choices per token, C capacity.

Each token picks its K most probable experts; the experts' buffers take them in priority order
until full (`routing.assign_slots`). GShard's random routing may skip a token's second choice.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from switchmoe.moe import losses as losses_lib
from switchmoe.moe.routers.base import Option, Router
from switchmoe.moe.routing import (
    DROP_PRIORITIES,
    GATE_NORMS,
    OVERFLOW_RULES,
    RoutingResult,
    assign_slots,
    assign_slots_by_score,
    build_result,
    chosen_gates,
    place_next_choice,
    priority_order,
)

Array = jax.Array


def gshard_keep_second(key: Array, second_gate: Array, threshold: float = 0.5) -> Array:
    """bool[G, S]: GShard random routing of the second expert.

    The second choice is kept with probability min(1, g2 / threshold), g2 being its gate normalised
    over the top-2. GShard's rule "keep if 2·g2 > U(0,1)" is threshold 0.5: a second expert with
    half the weight is always used, one with a tiny weight is mostly skipped, which saves capacity
    for first choices. The uniforms are `jax.random.uniform(key, second_gate.shape)`.
    """
    u = jax.random.uniform(key, second_gate.shape, jnp.float32)
    return u < second_gate / threshold


def top_k_route(
    logits: Array,
    *,
    num_selected: int,
    capacity: Optional[int],
    gate_norm: str = "raw",
    batch_prioritized: bool = False,
    random_routing_key: Optional[Array] = None,
    random_routing_threshold: float = 0.5,
    rank_major: bool = True,
    score_function: str = "softmax",
    routed_scaling_factor: float = 1.0,
    selection_bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    expert_groups: int = 1,
    groups_selected: int = 1,
    overflow: str = "drop",
    drop_priority: str = "position",
) -> RoutingResult:
    """Token-choice routing: each token picks its K highest-scoring experts, subject to capacity.

    Args:
      logits: float32[G, S, E] router logits.
      num_selected: K (1 = Switch, 2 = GShard / ST-MoE).
      capacity: C from `expert_capacity`, or None for dropless routing (nothing dropped).
      gate_norm: "raw" uses p[e] as the gate (Switch; the router learns through the gate's scale);
        "normalized" divides the K chosen probabilities by their sum (GShard top-2, Mixtral).
        Normalisation happens before capacity: a token whose second choice drops keeps its first
        gate unchanged, as in GShard, rather than being scaled up to 1.
      batch_prioritized: claim slots by descending top-1 probability instead of sequence order.
      random_routing_key: if given and K >= 2, GShard random routing decides whether each token's
        second choice is used at all (`gshard_keep_second`). None (evaluation) keeps all K choices.
      random_routing_threshold: see `gshard_keep_second`.
      rank_major: slot order across choices (see `assign_slots`); False makes in-order routing
        causal for K >= 2.
      score_function: "softmax" over experts (Switch, GShard) or an independent "sigmoid" per
        expert (DeepSeek-V3, usually with gate_norm="normalized"). With sigmoid scores the losses
        and statistics read them normalised over the experts, s_e / Σ s, as a distribution.
      routed_scaling_factor: multiplies the gates after normalisation (DeepSeek-V3: 2.5), so
        that normalised gates do not shrink the routed experts' output against a shared expert.
      selection_bias: optional float32[E] added to the logits (softmax) or the sigmoid scores for
        choosing the top K only; the gates are the unbiased scores of the chosen experts (DeepSeek-V3's auxiliary-loss-free
        balancing, see switchmoe/moe/balancing.py).
      expert_groups, groups_selected: DeepSeek-V3's group-limited routing (sigmoid scores): the
        E experts form `expert_groups` groups of E/n; a group scores the sum of its two best
        choice scores (with the selection bias), and a token's K experts come from its
        `groups_selected` best groups only. 1: no groups.
      mask: optional bool[G, S], False at padded positions: they ask for no slot (so they take
        none from real tokens) and are left out of the losses and statistics.
      overflow: "drop" (Switch, GShard) or "next_choice": a choice whose expert is full moves
        to the token's next-ranked expert with a free slot (routing.place_next_choice; token by
        token, whatever rank_major says), its gate that expert's score, normalised over the
        token's final K experts when gate_norm="normalized".
      drop_priority: "position" (slots in priority order) or "probability": each expert keeps
        the C pairs with the highest score (routing.assign_slots_by_score; not causal).

    Returns:
      A RoutingResult with K choices per token.
    """
    G, S, E = logits.shape
    if not 1 <= num_selected <= E:
        raise ValueError(f"num_selected (k) must be in [1, num_experts={E}]; got {num_selected}.")
    if gate_norm not in GATE_NORMS:
        raise ValueError(f"gate_norm must be one of {GATE_NORMS}; got {gate_norm!r}.")
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(
            f"score_function must be one of {SCORE_FUNCTIONS}; got {score_function!r}."
        )
    if score_function == "softmax":
        scores = probs = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    if overflow not in OVERFLOW_RULES:
        raise ValueError(f"overflow must be one of {OVERFLOW_RULES}; got {overflow!r}.")
    if drop_priority not in DROP_PRIORITIES:
        raise ValueError(f"drop_priority must be one of {DROP_PRIORITIES}; got {drop_priority!r}.")
    ranked = scores
    if selection_bias is not None or expert_groups > 1:
        # DeepSeek-V3 adds the bias to its sigmoid scores. A softmax's top K are the logits' top
        # K, and its probabilities scale as 1/E, so there the bias is added to the logits: one
        # update speed then means the same at every E.
        ranked = logits if score_function == "softmax" and selection_bias is not None else scores
        if selection_bias is not None:
            ranked = ranked + selection_bias.astype(ranked.dtype)
        if expert_groups > 1:
            ranked = limit_to_best_groups(ranked, expert_groups, groups_selected)
    next_choice = overflow == "next_choice" and capacity is not None
    ranking = None
    if next_choice:  # the whole ranking: where an overflowing choice looks next
        ranking = jax.lax.top_k(ranked, E)[1].astype(jnp.int32)
        expert = ranking[..., :num_selected]
    else:
        expert = jax.lax.top_k(ranked, num_selected)[1].astype(jnp.int32)  # descending
    asked = expert
    top_p = jnp.take_along_axis(scores, expert, axis=-1)  # [G, S, K]
    gate = chosen_gates(scores, expert, gate_norm, routed_scaling_factor)

    requested = jnp.ones((G, S, num_selected), bool)
    if random_routing_key is not None and num_selected >= 2:
        # GShard's g2 is the second gate normalised over the top-2, whatever gate_norm says.
        g2 = top_p[..., 1] / (top_p[..., 0] + top_p[..., 1])
        keep2 = gshard_keep_second(random_routing_key, g2, random_routing_threshold)
        requested = requested.at[..., 1].set(keep2)
    if mask is not None:
        requested = requested & mask[..., None]

    order = priority_order(probs, batch_prioritized)
    by_score = drop_priority == "probability" and capacity is not None
    if next_choice:
        expert, slot, dropped = place_next_choice(ranking, requested, capacity, order)
        gate = chosen_gates(scores, expert, gate_norm, routed_scaling_factor)
    elif by_score:
        slot, dropped = assign_slots_by_score(expert, top_p, requested, E, capacity)
    else:
        slot, dropped = assign_slots(expert, requested, E, capacity, order, rank_major)
    gate = jnp.where(slot >= 0, gate, 0.0)
    token_major = num_selected == 1 or not rank_major or capacity is None or next_choice
    causal = not batch_prioritized and not by_score and token_major
    result = build_result(
        expert, slot, gate, probs, logits,
        capacity=capacity, causal=causal,
        # The balance losses count what the router asked for, before any move.
        losses=losses_lib.router_losses(logits, probs, asked, mask),
        requested=requested, overflow=dropped, mask=mask,
    )  # fmt: skip
    if next_choice:
        # moved_fraction: requested pairs placed in another expert than the one they asked for
        # (the drops they were spared); dropped_fraction counts those placed nowhere.
        moved = requested & (slot >= 0) & (expert != asked)
        stats = dict(result.stats)
        stats["moved_fraction"] = jax.lax.stop_gradient(
            jnp.sum(moved) / jnp.maximum(jnp.sum(requested), 1)
        ).astype(jnp.float32)
        result = result.replace(ranking=ranking, scores=scores, stats=stats)
    return result


SCORE_FUNCTIONS = ("softmax", "sigmoid")


def limit_to_best_groups(choice: Array, num_groups: int, groups_selected: int) -> Array:
    """choice[G, S, E] with the experts outside each token's `groups_selected` best groups set
    to -inf (DeepSeek-V3: the experts in `num_groups` consecutive groups of E/n, a group scored
    by the sum of its two highest choice scores)."""
    G, S, E = choice.shape
    grouped = choice.reshape(G, S, num_groups, E // num_groups)
    group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [G, S, n]
    _, best = jax.lax.top_k(group_score, groups_selected)  # [G, S, groups_selected]
    chosen = jnp.any(best[..., None] == jnp.arange(num_groups), axis=-2)  # [G, S, n]
    allowed = jnp.repeat(chosen, E // num_groups, axis=-1)
    return jnp.where(allowed, choice, -jnp.inf)


def token_choice_causal_reason(settings, dropless: bool) -> Optional[str]:
    """Why a token-choice router over these settings is not causal, or None.

    Batch prioritized routing is refused in every decoder on its own (config validation)."""
    rank_major = not settings.causal_routing and settings.num_selected >= 2
    if rank_major and not dropless:  # with no capacity, the slot order drops nothing
        return (
            f"model.moe.causal_routing=False with num_selected={settings.num_selected} places "
            "every first choice before any second choice, so later tokens can displace an "
            "earlier token's second choice"
        )
    return None


class TopK(Router):
    """Switch / GShard / ST-MoE token choice over the router's softmax."""

    name = "top_k"
    supports_batch_prioritized = True
    supports_granularity = True
    options = {
        "score_function": Option(
            "softmax",
            "'softmax' over experts (Switch, GShard) or 'sigmoid' per expert (DeepSeek-V3, with "
            "gate_norm='normalized')",
            str,
        ),
        "routed_scaling_factor": Option(
            1.0, "multiplies the routed experts' gates after normalisation (DeepSeek-V3: 2.5)"
        ),
        "expert_groups": Option(
            1,
            "group-limited routing (DeepSeek-V3: 8): the experts in this many groups, a token's "
            "top-k chosen inside its best groups only (sigmoid scores); 1: no groups",
            int,
        ),
        "groups_selected": Option(
            1, "the groups a token chooses from with expert_groups > 1 (DeepSeek-V3: 4)", int
        ),
        "overflow": Option(
            "drop",
            "a choice whose expert is full: 'drop' it (Switch) or 'next_choice': move it to the "
            "token's next-ranked expert with a free slot (token by token, causal)",
            str,
        ),
        "drop_priority": Option(
            "position",
            "which pairs a full expert keeps: 'position' (earlier first; causal) or "
            "'probability' (highest router score first, Megatron-Core's default; not causal)",
            str,
        ),
    }

    def noncausal_reason(self):
        if self.option("drop_priority") == "probability" and not self.dropless:
            return (
                "model.moe.drop_priority='probability' lets a later token with a higher router "
                "score take an earlier token's slot"
            )
        if self.option("overflow") == "next_choice":
            return None  # placed token by token whatever causal_routing says (check refuses it)
        return token_choice_causal_reason(self.settings, self.dropless)

    def preferences(self, result):
        # With overflow='next_choice' result.expert holds where choices went; the balance
        # losses count what the router asked for, its top K.
        if result.ranking is not None:
            return result.ranking[..., : result.expert.shape[-1]]
        return result.expert

    def streams(self, train):
        extra = ("random_routing",) if train and self.settings.random_routing else ()
        return super().streams(train) + extra

    def check(self, prefix="", tokens_per_group=None):
        super().check(prefix, tokens_per_group)
        s = self.settings
        if s.gate_norm not in GATE_NORMS:
            raise ValueError(f"{prefix}gate_norm must be one of {GATE_NORMS}; got {s.gate_norm!r}.")
        if self.option("score_function") not in SCORE_FUNCTIONS:
            raise ValueError(
                f"{prefix}score_function must be one of {SCORE_FUNCTIONS}; "
                f"got {self.option('score_function')!r}."
            )
        if not self.option("routed_scaling_factor") > 0:
            raise ValueError(
                f"{prefix}routed_scaling_factor must be > 0; "
                f"got {self.option('routed_scaling_factor')!r}."
            )
        if s.random_routing and s.num_selected < 2:
            raise ValueError(
                f"{prefix}random_routing (GShard second-expert routing) needs "
                f"{prefix}num_selected >= 2; got {prefix}num_selected={s.num_selected}."
            )
        self._check_groups(prefix)
        self._check_capacity_rules(prefix)

    def _check_capacity_rules(self, prefix):
        s = self.settings
        overflow, priority = self.option("overflow"), self.option("drop_priority")
        if overflow not in OVERFLOW_RULES:
            raise ValueError(f"{prefix}overflow must be one of {OVERFLOW_RULES}; got {overflow!r}.")
        if priority not in DROP_PRIORITIES:
            raise ValueError(
                f"{prefix}drop_priority must be one of {DROP_PRIORITIES}; got {priority!r}."
            )
        changed = [f"{prefix}{n}={v!r}" for n, v in (("overflow", overflow),
                   ("drop_priority", priority)) if v != self.options[n].default]  # fmt: skip
        if changed and self.dropless:
            raise ValueError(
                f"{' and '.join(changed)} decide what happens at capacity; a dropless backend "
                f"({prefix}backend={s.backend!r}) has none. Allowed with it: overflow='drop', "
                "drop_priority='position'."
            )
        if overflow == "next_choice":
            if priority != "position":
                raise ValueError(
                    f"{prefix}overflow='next_choice' places token by token in position order; "
                    f"it needs {prefix}drop_priority='position' (got {priority!r})."
                )
            if s.num_selected >= 2 and not s.causal_routing:
                raise ValueError(
                    f"{prefix}overflow='next_choice' places each token's choices before the next "
                    f"token's (token-major); with num_selected={s.num_selected} set "
                    f"{prefix}causal_routing=True (got False: rank-major slots)."
                )
            if self.option("expert_groups") > 1:
                raise ValueError(
                    f"{prefix}overflow='next_choice' would move choices outside a token's expert "
                    f"groups; allowed with {prefix}expert_groups > 1: overflow='drop'."
                )
        if priority == "probability" and s.batch_prioritized:
            raise ValueError(
                f"{prefix}drop_priority='probability' and {prefix}batch_prioritized=True are two "
                "priority rules; choose one."
            )

    def _check_groups(self, prefix):
        n, m = self.option("expert_groups"), self.option("groups_selected")
        E, k = self.settings.num_experts, self.settings.num_selected
        if n == 1:
            return
        valid = [d for d in range(2, E // 2 + 1) if E % d == 0]
        if not (isinstance(n, int) and n in valid):
            raise ValueError(
                f"{prefix}expert_groups={n!r} must divide {prefix}num_experts={E} into groups of "
                f"at least 2 experts; allowed: 1 (no groups) or {valid}."
            )
        if self.option("score_function") != "sigmoid":
            raise ValueError(
                f"{prefix}expert_groups={n} (DeepSeek-V3's group-limited routing) scores groups "
                f"by sigmoid scores: set {prefix}score_function='sigmoid'."
            )
        if not (isinstance(m, int) and 1 <= m <= n and k <= m * (E // n)):
            raise ValueError(
                f"{prefix}groups_selected={m!r} must be in [1, {n}] and leave at least "
                f"num_selected={k} experts to choose from ({E // n} per group)."
            )

    supports_selection_bias = True

    def route(self, layer, groups, token_ids, keys, train, mask=None, selection_bias=None):
        s = self.settings
        logits, _ = self.learned_logits(layer, groups, keys)
        return top_k_route(
            logits,
            num_selected=s.num_selected,
            capacity=self.capacity(groups.shape[1], train),
            gate_norm=s.gate_norm,
            batch_prioritized=s.batch_prioritized,
            random_routing_key=keys.get("random_routing"),
            random_routing_threshold=s.random_routing_threshold,
            rank_major=not s.causal_routing,
            score_function=self.option("score_function"),
            routed_scaling_factor=self.option("routed_scaling_factor"),
            selection_bias=selection_bias,
            mask=mask,
            expert_groups=self.option("expert_groups"),
            groups_selected=self.option("groups_selected"),
            overflow=self.option("overflow"),
            drop_priority=self.option("drop_priority"),
        )
