"""Auxiliary losses and routing statistics against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from switchmoe.moe import losses
from switchmoe.moe.layer import MoeLayer
from switchmoe.moe.routers import hash as hash_routing
from switchmoe.moe.routers import top_k


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_is_one_under_uniform_routing(k):
    # Uniform probabilities: P_i = 1/E, so E·Σ f_i·P_i = Σ f_i = 1 whatever the choices.
    G, S, E = 2, 16, 4
    result = top_k.top_k_route(jnp.zeros((G, S, E)), num_selected=k, capacity=None)
    assert float(result.losses["load_balancing"]) == pytest.approx(1.0, abs=1e-6)
    # Uniform hard choices too: token s picks experts s mod E (and s+1 mod E), probs uniform.
    expert = (np.arange(S)[:, None] + np.arange(k)[None, :]) % E
    probs = jnp.full((G, S, E), 1.0 / E)
    loss = losses.load_balancing_loss(probs, jnp.broadcast_to(expert, (G, S, k)))
    assert float(loss) == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_equals_formula_and_grows_with_imbalance():
    rng = np.random.default_rng(0)
    G, S, E, k = 3, 20, 5, 2
    logits = rng.normal(size=(G, S, E))
    probs = ref.softmax(logits)
    expert = np.argsort(-probs, axis=-1)[..., :k]
    # Per group: f_i = (choices to i)/(S·k), P_i = mean prob; E·Σ f_i·P_i; mean over groups.
    expected = np.mean(
        [
            E * sum((expert[g] == i).sum() / (S * k) * probs[g, :, i].mean() for i in range(E))
            for g in range(G)
        ]
    )
    got = top_k.top_k_route(jnp.asarray(logits, jnp.float32), num_selected=k, capacity=None).losses[
        "load_balancing"
    ]
    assert float(got) == pytest.approx(expected, rel=1e-5)

    # Concentrate more and more probability on expert 0: the loss rises towards E.
    values = []
    for strength in [0.0, 1.0, 2.0, 4.0, 8.0, 30.0]:
        skew = jnp.zeros((1, S, E)).at[..., 0].set(strength)
        jitter = jnp.asarray(rng.normal(size=(1, S, E)) * 0.01, jnp.float32)
        r = top_k.top_k_route(skew + jitter, num_selected=1, capacity=None)
        values.append(float(r.losses["load_balancing"]))
    assert values[0] == pytest.approx(1.0, abs=0.02)
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] == pytest.approx(E, rel=1e-3)


def test_z_loss_equals_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 7, 6)) * 3
    expected = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    assert float(losses.z_loss(jnp.asarray(logits, jnp.float32))) == pytest.approx(
        expected, rel=1e-5
    )


def test_statistics_equal_counts_from_the_routing_result():
    rng = np.random.default_rng(2)
    G, S, E, k = 2, 16, 4, 2
    logits = jnp.asarray(rng.normal(size=(G, S, E)) * 2 + np.linspace(0, 2, E), jnp.float32)
    C = 3
    r = top_k.top_k_route(logits, num_selected=k, capacity=C)
    slot, expert = np.asarray(r.slot), np.asarray(r.expert)
    probs = ref.softmax(np.asarray(logits, np.float64))
    dropped = slot < 0  # no random routing: every choice was requested
    assert dropped.any()
    s = jax.tree.map(np.asarray, r.stats)
    assert s["dropped_count"] == dropped.sum()
    assert s["dropped_fraction"] == pytest.approx(dropped.mean())
    np.testing.assert_allclose(s["dropped_fraction_by_rank"], dropped.mean(axis=(0, 1)))
    load = np.array([((expert == e) & ~dropped).sum() for e in range(E)]) / (~dropped).sum()
    np.testing.assert_allclose(s["expert_load"], load, rtol=1e-6)
    assert s["unrouted_fraction"] == pytest.approx(dropped.all(-1).mean())
    assert s["router_entropy"] == pytest.approx(np.mean(-(probs * np.log(probs)).sum(-1)), rel=1e-5)
    assert s["top1_prob"] == pytest.approx(probs.max(-1).mean(), rel=1e-5)


def test_utilisation_statistics_from_hand_counted_loads():
    # 16 tokens through a fixed table to 4 experts: 10, 5, 1 and 0 of them (nothing dropped).
    token_ids = jnp.asarray([[0] * 10 + [1] * 5 + [2]])
    table = jnp.asarray([0, 1, 2, 3], jnp.int32)
    stats = hash_routing.hash_route(token_ids, table, 4, capacity=None).stats
    share = np.asarray([10, 5, 1, 0]) / 16 * 4  # in uniform shares: 2.5, 1.25, 0.25, 0
    assert float(stats["dead_expert_fraction"]) == 0.25  # only the empty expert is under 0.1
    assert float(stats["max_expert_share"]) == pytest.approx(10 / 16)
    for q in (10, 50, 90):
        assert float(stats[f"expert_load_p{q}"]) == pytest.approx(np.percentile(share, q))


def test_gradients_reach_the_router_through_gates_and_losses():
    layer = MoeLayer(num_experts=4, d_ff=8, num_selected=2, z_loss_weight=1e-3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 6))
    params = layer.init(jax.random.key(1), x)["params"]

    def objective(p, which):
        y, aux = layer.apply({"params": p}, x)
        return jnp.sum(y**2) if which == "output" else aux["loss"]

    for which in ("output", "aux"):
        grads = jax.grad(objective)(params, which)
        g = np.asarray(grads["router_kernel"].value)
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-6, which
