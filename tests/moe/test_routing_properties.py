"""Routing invariants on random inputs (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from switchmoe.moe import routing
from switchmoe.moe.routers import expert_choice, top_k

# Few distinct shapes keep the number of XLA compilations (and the test time) small; the values,
# capacities, k and priorities vary freely.
shapes = st.sampled_from([(1, 8, 2), (2, 12, 4), (3, 16, 8)])


@settings(max_examples=25, deadline=None)
@given(
    shape=shapes,
    k=st.integers(1, 3),
    factor=st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0]),
    batch_prioritized=st.booleans(),
    random_routing=st.booleans(),
    scale=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**16),
)
def test_token_choice_invariants(shape, k, factor, batch_prioritized, random_routing, scale, seed):
    G, S, E = shape
    k = min(k, E)
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)
    C = routing.expert_capacity(S, E, k, factor)
    key = jax.random.key(seed) if random_routing else None
    r = top_k.top_k_route(
        logits,
        num_selected=k,
        capacity=C,
        batch_prioritized=batch_prioritized,
        random_routing_key=key,
    )
    expert, slot, gate = np.asarray(r.expert), np.asarray(r.slot), np.asarray(r.gate)
    kept = slot >= 0
    assert (slot < C).all()
    # No slot holds two tokens.
    for g in range(G):
        pairs = [
            (expert[g, s, j], slot[g, s, j]) for s in range(S) for j in range(k) if kept[g, s, j]
        ]
        assert len(pairs) == len(set(pairs))
        # Each expert's kept slots are exactly 0..n-1: no holes, so capacity is never wasted.
        for e in range(E):
            used = sorted(sl for ex, sl in pairs if ex == e)
            assert used == list(range(len(used)))
    # No token occupies two slots of one expert: its K choices are distinct experts.
    for g in range(G):
        for s in range(S):
            assert len(set(expert[g, s])) == k
    # Gates: non-negative, positive exactly where kept.
    assert (gate >= 0).all() and (gate[kept] > 0).all() and (gate[~kept] == 0).all()
    # Reported drops equal actual drops: requested choices that got no slot. Under random routing
    # the skipped second choices are recomputed from the documented draw (GShard: keep if U < 2·g2).
    requested = np.ones_like(kept)
    if random_routing and k >= 2:
        p = np.asarray(jax.nn.softmax(logits, axis=-1))
        top2 = -np.sort(-p, axis=-1)[..., :2]
        u = np.asarray(jax.random.uniform(key, (G, S), jnp.float32))
        requested[..., 1] = u < 2 * top2[..., 1] / top2.sum(-1)
    dropped = requested & ~kept
    assert float(r.stats["dropped_count"]) == dropped.sum()
    # A token drops only when its expert is full.
    for g, s, j in zip(*np.nonzero(dropped)):
        assert ((expert[g] == expert[g, s, j]) & kept[g]).sum() == C


@settings(max_examples=20, deadline=None)
@given(shape=shapes, factor=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**16))
def test_expert_choice_invariants(shape, factor, seed):
    G, S, E = shape
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    C = routing.expert_capacity(S, E, 1, factor)
    r = expert_choice.expert_choice_route(logits, capacity=C)
    slot, gate, probs = np.asarray(r.slot), np.asarray(r.gate), np.asarray(r.probs)
    for g in range(G):
        for e in range(E):
            assert sorted(slot[g, slot[g, :, e] >= 0, e]) == list(range(C))
            # The picked tokens are the C most probable for this expert.
            picked = probs[g, slot[g, :, e] >= 0, e]
            others = probs[g, slot[g, :, e] < 0, e]
            assert others.size == 0 or picked.min() >= others.max()
    assert (gate >= 0).all() and (gate[slot < 0] == 0).all()
    assert float(r.stats["dropped_count"]) == 0
