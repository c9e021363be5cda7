"""Routers against brute-force per-token loops (tests/references.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from switchmoe.moe import routing
from switchmoe.moe.routers import expert_choice, top_k


def skewed_logits(seed, G=3, S=24, E=4, scale=2.0):
    """Random logits with a per-expert bias so that some experts overflow at low capacity."""
    rng = np.random.default_rng(seed)
    bias = np.linspace(0.0, 1.5, E)
    return jnp.asarray(rng.normal(size=(G, S, E)) * scale + bias, jnp.float32)


def test_capacity_formula_by_hand():
    # C = ceil(k·S/E·factor), at least min_capacity, at most S.
    assert routing.expert_capacity(16, 4, 2, 1.25) == 10  # 2·16/4·1.25 = 10
    assert routing.expert_capacity(16, 4, 1, 1.0) == 4
    assert routing.expert_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert routing.expert_capacity(16, 8, 1, 0.5, min_capacity=4) == 4  # 1 -> raised to 4
    assert routing.expert_capacity(16, 2, 2, 4.0) == 16  # 64 -> capped at S
    assert routing.expert_capacity(16, 4, 1, None) is None
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        routing.expert_capacity(16, 4, 1, 0.0)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("batch_prioritized", [False, True])
@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("gate_norm", ["raw", "normalized"])
@pytest.mark.parametrize("rank_major", [True, False])
def test_top_k_equals_per_token_loop(k, batch_prioritized, factor, gate_norm, rank_major):
    logits = skewed_logits(seed=k * 100 + int(factor * 10))
    G, S, E = logits.shape
    C = routing.expert_capacity(S, E, k, factor)
    result = top_k.top_k_route(
        logits,
        num_selected=k,
        capacity=C,
        gate_norm=gate_norm,
        batch_prioritized=batch_prioritized,
        rank_major=rank_major,
    )
    probs = ref.softmax(np.asarray(logits, np.float64))
    expert, slot, gate = ref.top_k_route(
        probs, k, C, gate_norm, batch_prioritized, rank_major=rank_major
    )
    np.testing.assert_array_equal(result.expert, expert)
    np.testing.assert_array_equal(result.slot, slot)
    np.testing.assert_allclose(result.gate, gate, rtol=1e-5, atol=1e-7)
    if factor == 0.5:
        assert (slot < 0).any(), "the low-capacity case must overflow, or the test proves nothing"
    assert result.causal == (not batch_prioritized and (k == 1 or not rank_major))


@pytest.mark.parametrize("k,gate_norm", [(1, "raw"), (2, "normalized"), (2, "raw")])
@pytest.mark.parametrize("factor", [0.5, 1.0])
@pytest.mark.parametrize("rule", ["next_choice", "probability", "next_choice_bpr"])
def test_overflow_and_drop_priority_equal_the_per_token_loop(k, gate_norm, factor, rule):
    """overflow='next_choice' and drop_priority='probability' against the loop: which pairs are
    kept, in which expert and slot, with which gate; with padding (the last positions of every
    group ask for nothing) and, for k = 2, random routing skipping some second choices."""
    logits = skewed_logits(seed=7 + k + int(factor * 10), S=20, E=5)
    G, S, E = logits.shape
    C = routing.expert_capacity(S, E, k, factor)
    mask = np.ones((G, S), bool)
    mask[:, -3:] = False
    keep_second = np.random.default_rng(k).random((G, S)) < 0.7 if k == 2 else None
    key = None
    if keep_second is not None:  # replay the loop's skips through the router's random routing
        key = jax.random.key(5)
        probs = ref.softmax(np.asarray(logits, np.float64))
        top2 = np.sort(probs, axis=-1)[..., ::-1][..., :2]
        g2 = top2[..., 1] / top2.sum(-1)
        u = np.asarray(jax.random.uniform(key, (G, S), jnp.float32))
        keep_second = u < g2 / 0.5
    overflow = "next_choice" if rule.startswith("next_choice") else "drop"
    priority = "probability" if rule == "probability" else "position"
    bpr = rule.endswith("bpr")
    result = top_k.top_k_route(
        logits, num_selected=k, capacity=C, gate_norm=gate_norm, rank_major=False,
        random_routing_key=key, mask=jnp.asarray(mask), overflow=overflow,
        drop_priority=priority, batch_prioritized=bpr,
    )  # fmt: skip
    probs = ref.softmax(np.asarray(logits, np.float64))
    expert, slot, gate = ref.top_k_route(
        probs, k, C, gate_norm, bpr, keep_second, rank_major=False, overflow=overflow,
        drop_priority=priority, mask=mask,
    )  # fmt: skip
    np.testing.assert_array_equal(result.slot, slot)
    kept = slot >= 0
    np.testing.assert_array_equal(np.where(kept, result.expert, -1), np.where(kept, expert, -1))
    np.testing.assert_allclose(result.gate, gate, rtol=1e-5, atol=1e-7)
    assert (np.asarray(result.slot)[~mask] == -1).all()
    C_used = np.zeros((G, E), int)
    for g, s_, r in zip(*np.nonzero(kept)):
        C_used[g, expert[g, s_, r]] += 1
    assert C_used.max() <= C
    for g in range(G):  # a token never holds one expert twice
        for s_ in range(S):
            held = [expert[g, s_, r] for r in range(k) if kept[g, s_, r]]
            assert len(held) == len(set(held))
    if overflow == "next_choice" and factor == 0.5:
        moved = kept & (expert != np.asarray(ref.top_k_route(probs, k, None)[0]))
        assert moved.any(), "some choice must move, or the test proves nothing"
        asked = mask[..., None] & (np.ones_like(kept) if keep_second is None else
                                   np.stack([np.ones_like(keep_second), keep_second], -1))  # fmt: skip
        np.testing.assert_allclose(result.stats["moved_fraction"], moved.sum() / asked.sum(),
                                   rtol=1e-6)  # fmt: skip
    if factor == 0.5 and overflow == "drop":
        assert ((slot < 0) & mask[..., None]).any(), "the low-capacity case must drop"
    assert result.causal == (priority == "position" and not bpr)


def test_next_choice_and_probability_priority_by_hand():
    # One group, two experts, capacity 1, four tokens all preferring expert 0: token 0 takes
    # expert 0, token 1 moves to expert 1, tokens 2 and 3 find both full and drop.
    logits = jnp.asarray([[[3.0, 1.0], [2.0, 1.0], [2.5, 0.0], [1.0, 0.5]]], jnp.float32)
    r = top_k.top_k_route(logits, num_selected=1, capacity=1, overflow="next_choice")
    np.testing.assert_array_equal(r.slot[0, :, 0], [0, 0, -1, -1])
    np.testing.assert_array_equal(r.expert[0, :2, 0], [0, 1])
    p1 = float(jax.nn.softmax(logits[0, 1])[1])
    np.testing.assert_allclose(r.gate[0, :, 0], [float(jax.nn.softmax(logits[0, 0])[0]), p1, 0, 0],
                               rtol=1e-6)  # fmt: skip
    # Megatron's probability priority keeps the most confident token instead of the first.
    by_prob = top_k.top_k_route(logits, num_selected=1, capacity=1, drop_priority="probability")
    np.testing.assert_array_equal(by_prob.slot[0, :, 0], [-1, -1, 0, -1])  # p0: .88 .73 .92 .62


def test_batch_prioritized_drops_the_least_confident_tokens():
    # One expert, capacity 2, four tokens: in-order keeps tokens 0 and 1; BPR keeps the two most
    # confident (3 and 2).
    logits = jnp.asarray([[[0.1, 0.0], [0.2, 0.0], [3.0, 0.0], [5.0, 0.0]]], jnp.float32)
    in_order = top_k.top_k_route(logits, num_selected=1, capacity=2)
    bpr = top_k.top_k_route(logits, num_selected=1, capacity=2, batch_prioritized=True)
    np.testing.assert_array_equal(in_order.slot[0, :, 0], [0, 1, -1, -1])
    np.testing.assert_array_equal(bpr.slot[0, :, 0], [-1, -1, 1, 0])


def test_first_choices_placed_before_second_choices():
    # Token 0 picks (expert 1, then 0); token 1 picks (expert 0, then 1). With one slot per expert,
    # token 1's first choice of expert 0 must beat token 0's second choice, despite token order.
    logits = jnp.asarray([[[1.0, 2.0], [2.0, 1.0]]], jnp.float32)
    r = top_k.top_k_route(logits, num_selected=2, capacity=1)
    np.testing.assert_array_equal(r.expert[0], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(r.slot[0], [[0, -1], [0, -1]])
    np.testing.assert_array_equal(r.stats["dropped_fraction_by_rank"], [0.0, 1.0])


@pytest.mark.parametrize("batch_prioritized", [False, True])
def test_gshard_random_routing_equals_loop(batch_prioritized):
    logits = skewed_logits(seed=7, scale=1.0)
    G, S, E = logits.shape
    C = routing.expert_capacity(S, E, 2, 1.0)
    key = jax.random.key(3)
    r = top_k.top_k_route(
        logits,
        num_selected=2,
        capacity=C,
        gate_norm="normalized",
        batch_prioritized=batch_prioritized,
        random_routing_key=key,
    )
    probs = ref.softmax(np.asarray(logits, np.float64))
    top2 = -np.sort(-probs, axis=-1)[..., :2]
    g2 = top2[..., 1] / top2.sum(-1)
    u = np.asarray(jax.random.uniform(key, (G, S), jnp.float32))  # the documented draw
    keep = u < 2 * g2  # GShard: keep the second expert if 2·g2 > U
    assert 0 < keep.mean() < 1
    expert, slot, gate = ref.top_k_route(probs, 2, C, "normalized", batch_prioritized, keep)
    np.testing.assert_array_equal(r.slot, slot)
    np.testing.assert_allclose(r.gate, gate, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.stats["requested_fraction_by_rank"], [1.0, keep.mean()], rtol=1e-6)
    # Same key, same decisions; another key, other decisions.
    same = dict(
        num_selected=2, capacity=C, gate_norm="normalized", batch_prioritized=batch_prioritized
    )
    again = top_k.top_k_route(logits, random_routing_key=key, **same)
    other = top_k.top_k_route(logits, random_routing_key=jax.random.key(4), **same)
    np.testing.assert_array_equal(again.slot, r.slot)
    assert (other.slot[..., 1] != r.slot[..., 1]).any()


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_expert_choice_equals_per_expert_loop(factor):
    logits = skewed_logits(seed=11)
    G, S, E = logits.shape
    C = routing.expert_capacity(S, E, 1, factor)
    r = expert_choice.expert_choice_route(logits, capacity=C)
    probs = ref.softmax(np.asarray(logits, np.float64))
    slot, gate = ref.expert_choice_route(probs, C)
    np.testing.assert_array_equal(r.slot, slot)
    np.testing.assert_allclose(r.gate, gate, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(r.expert, np.broadcast_to(np.arange(E), (G, S, E)))
    assert not r.causal
    # Every expert fills exactly C slots: perfectly balanced.
    np.testing.assert_array_equal((r.slot >= 0).sum(axis=1), np.full((G, E), C))


def test_in_order_routing_is_causal():
    # Changing the last tokens of a group must not change earlier tokens' slots.
    logits = skewed_logits(seed=5, G=1, S=16)
    changed = logits.at[:, 12:].set(-logits[:, 12:] + 3.0)
    for k in (1, 2):
        a = top_k.top_k_route(logits, num_selected=k, capacity=3)
        b = top_k.top_k_route(changed, num_selected=k, capacity=3)
        if k == 1:
            np.testing.assert_array_equal(a.slot[:, :12], b.slot[:, :12])
        else:
            # With K=2 in GShard's rank-major order, later tokens' first choices are placed before
            # earlier second choices, so only the first choices are causal...
            np.testing.assert_array_equal(a.slot[:, :12, 0], b.slot[:, :12, 0])
            assert not np.array_equal(a.slot[:, :12, 1], b.slot[:, :12, 1])
            assert not a.causal
            # ...token-major order (causal_routing) makes every choice causal.
            a, b = (
                top_k.top_k_route(x, num_selected=k, capacity=3, rank_major=False)
                for x in (logits, changed)
            )
            np.testing.assert_array_equal(a.slot[:, :12], b.slot[:, :12])
            assert a.causal


def test_router_logits_are_float32_and_jitter_is_bounded():
    x = jnp.ones((2, 5, 3), jnp.bfloat16)
    kernel = jnp.eye(3, dtype=jnp.bfloat16)
    logits = routing.router_logits(x, kernel)
    assert logits.dtype == jnp.float32
    jittered = routing.router_logits(x, kernel, jitter_key=jax.random.key(0), jitter_eps=0.01)
    assert jittered.dtype == jnp.float32
    ratio = np.asarray(jittered)  # x = 1 and W = I, so the logits are the jitter factors
    assert ratio.min() >= 0.99 and ratio.max() <= 1.01 and ratio.std() > 1e-3


def test_bad_settings_name_the_setting():
    logits = skewed_logits(seed=0)
    with pytest.raises(ValueError, match=r"num_selected \(k\) must be in \[1, num_experts=4\]"):
        top_k.top_k_route(logits, num_selected=5, capacity=4)
    with pytest.raises(ValueError, match=r"gate_norm must be one of \('raw', 'normalized'\)"):
        top_k.top_k_route(logits, num_selected=1, capacity=4, gate_norm="softmax")
    with pytest.raises(ValueError, match="expert-choice routing needs a capacity"):
        expert_choice.expert_choice_route(logits, capacity=100)
