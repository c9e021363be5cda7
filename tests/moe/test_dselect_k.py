"""DSelect-k against a NumPy transcription of Hazimeh et al. 2021 (smooth-step, binary codes,
selector weights, entropy regulariser), and trained end to end."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from switchmoe.moe.routers.dselect_k import dselect_k_route, smooth_step
from switchmoe.runs.metrics import read_metrics
from switchmoe.training.trainer import train_and_evaluate


def np_smooth_step(t, gamma):
    if t <= -gamma / 2:
        return 0.0
    if t >= gamma / 2:
        return 1.0
    return -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5


def np_selector(z, num_experts, gamma):
    """One selector's distribution over the experts, one product per expert code."""
    m = len(z)
    r = np.zeros(num_experts)
    for e in range(num_experts):
        r[e] = 1.0
        for j in range(m):
            s = np_smooth_step(z[j], gamma)
            r[e] *= s if (e >> j) & 1 else 1 - s
    return r / r.sum()  # restricted to the E codes in use; a no-op when E = 2^m


def test_smooth_step_at_hand_computed_points():
    t = jnp.asarray([-2.0, -0.5, 0.0, 0.25, 0.5, 3.0])
    # γ = 1: S(0.25) = -2·0.25³ + 1.5·0.25 + 0.5 = 0.84375.
    np.testing.assert_allclose(smooth_step(t, 1.0), [0, 0, 0.5, 0.84375, 1, 1], atol=1e-7)
    # γ = 2: S(0.5) = -0.25·0.125 + 0.75·0.5 + 0.5 = 0.84375 (the same point of the curve).
    assert float(smooth_step(jnp.asarray(0.5), 2.0)) == pytest.approx(0.84375)


@pytest.mark.parametrize("num_experts,k,gamma", [(4, 1, 1.0), (6, 2, 1.0), (8, 3, 0.5)])
def test_gates_and_entropy_equal_the_papers_formulas(num_experts, k, gamma):
    rng = np.random.default_rng(num_experts + k)
    G, S, E = 2, 5, num_experts
    m = math.ceil(math.log2(E))
    z = rng.normal(scale=0.4, size=(G, S, k, m)).astype(np.float32)
    z[0, 0] = -2.0  # a saturated token: every selector one-hot (on expert 0)
    a = rng.normal(size=(G, S, k)).astype(np.float32)
    r = dselect_k_route(
        jnp.asarray(z), jnp.asarray(a), num_experts=E, capacity=None, gamma=gamma, train=True
    )
    entropy = 0.0
    for g, s in itertools.product(range(G), range(S)):
        w = np.exp(a[g, s] - a[g, s].max())
        w /= w.sum()
        selectors = [np_selector(z[g, s, i], E, gamma) for i in range(k)]
        q = sum(w[i] * selectors[i] for i in range(k))
        np.testing.assert_allclose(r.gate[g, s], q, atol=1e-6)
        entropy += sum(-np.sum(p[p > 0] * np.log(p[p > 0])) for p in selectors)
    assert float(r.losses["selector_entropy"]) == pytest.approx(entropy / (G * S), rel=1e-5)
    np.testing.assert_array_equal(np.asarray(r.slot) >= 0, np.asarray(r.gate) > 0)
    # The saturated token's q puts weight w_i on one expert per selector: k experts at most.
    assert np.count_nonzero(np.asarray(r.gate[0, 0])) <= k

    # At evaluation each selector takes its most likely expert, with gate w_i.
    ev = dselect_k_route(
        jnp.asarray(z), jnp.asarray(a), num_experts=E, capacity=None, gamma=gamma, train=False
    )
    for g, s in itertools.product(range(G), range(S)):
        w = np.exp(a[g, s] - a[g, s].max())
        w /= w.sum()
        picks = [int(np.argmax(np_selector(z[g, s, i], E, gamma))) for i in range(k)]
        np.testing.assert_array_equal(ev.expert[g, s], picks)
        np.testing.assert_allclose(ev.gate[g, s], w, atol=1e-6)
    # Once the selectors are hard, training and evaluation route identically.
    hard_train = np.zeros(E)
    np.add.at(hard_train, np.asarray(ev.expert[0, 0]), np.asarray(ev.gate[0, 0]))
    np.testing.assert_allclose(r.gate[0, 0], hard_train, atol=1e-6)


def test_dselect_k_trains_the_tiny_model(tmp_path):
    config = tiny_config(
        str(tmp_path / "tfds"),
        **{"model.moe.router": "dselect_k", "model.moe.num_selected": 2, "num_train_steps": 30},
    )
    train_and_evaluate(config, str(tmp_path / "run"), log=lambda line: None)
    train = [r for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.3
    assert "train/selector_entropy" in train[-1]
