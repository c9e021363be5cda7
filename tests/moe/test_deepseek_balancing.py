"""Load balancing and scoring as DeepSeek-V3 does them — the sequence-wise balance loss, sigmoid
scores, top-k renormalisation, a routed scaling factor — against NumPy transcriptions of the
paper's formulas, through the plain functions and the layer's settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchmoe.moe import losses
from switchmoe.moe.layer import MoeLayer
from switchmoe.moe.routers import top_k


@pytest.mark.parametrize("gate_norm", ["raw", "normalized"])
def test_sigmoid_scores_with_scaling_equal_the_formulas(gate_norm):
    rng = np.random.default_rng(3)
    G, S, E, K = 2, 6, 8, 2
    logits = rng.normal(size=(G, S, E)).astype(np.float32)
    r = top_k.top_k_route(
        jnp.asarray(logits), num_selected=K, capacity=None, gate_norm=gate_norm,
        score_function="sigmoid", routed_scaling_factor=2.5,
    )  # fmt: skip
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    chosen = np.argsort(-s, axis=-1, kind="stable")[..., :K]
    top = np.take_along_axis(s, chosen, axis=-1)
    gates = 2.5 * (top / top.sum(-1, keepdims=True) if gate_norm == "normalized" else top)
    np.testing.assert_array_equal(r.expert, chosen)
    np.testing.assert_allclose(r.gate, gates, rtol=1e-5)
    # Losses and statistics read the scores as a distribution over experts: s / Σ s.
    p = s / s.sum(-1, keepdims=True)
    np.testing.assert_allclose(r.probs, p, rtol=1e-5)
    f = np.stack([np.bincount(chosen[g].ravel(), minlength=E) / (S * K) for g in range(G)])
    expected_lb = np.mean(E * np.sum(f * p.mean(axis=1), axis=-1))
    assert float(r.losses["load_balancing"]) == pytest.approx(expected_lb, rel=1e-5)


def test_the_layer_takes_the_scoring_options_and_refuses_bad_ones():
    x = jax.random.normal(jax.random.key(0), (2, 8, 6))
    options = dict(score_function="sigmoid", routed_scaling_factor=2.5)
    layer = MoeLayer(num_experts=4, d_ff=8, num_selected=2, gate_norm="normalized",
                     router_options=options, eval_capacity_factor=4.0)  # fmt: skip
    params = layer.init(jax.random.key(1), x)
    _, state = layer.apply(params, x, mutable=["intermediates"])
    (r,) = state["intermediates"]["routing"]
    # Normalised over the two and scaled: every token's kept gates sum to 2.5 (nothing drops).
    np.testing.assert_allclose(np.asarray(r.gate).sum(-1), 2.5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"score_function must be one of \('softmax', 'sigmoid'\)"):
        MoeLayer(num_experts=4, d_ff=8, router_options=dict(score_function="tanh")).init(
            jax.random.key(1), x
        )
    with pytest.raises(ValueError, match="routed_scaling_factor must be > 0"):
        MoeLayer(num_experts=4, d_ff=8, router_options=dict(routed_scaling_factor=0.0)).init(
            jax.random.key(1), x
        )


def deepseek_sequence_loss(scores, chosen, T):
    """DeepSeek-V3 eq. (17)-(20): per sequence, f_i = N/(K·T)·#{t: i in top-K(t)},
    P_i = (1/T)·Σ_t s_it/Σ_j s_jt, loss Σ_i f_i·P_i; averaged over sequences."""
    tokens, N = scores.shape
    K = chosen.shape[-1]
    out = []
    for b in range(tokens // T):
        s, c = scores[b * T : (b + 1) * T], chosen[b * T : (b + 1) * T]
        f = np.array([N / (K * T) * sum(i in c[t] for t in range(T)) for i in range(N)])
        P = (s / s.sum(-1, keepdims=True)).mean(0)
        out.append(np.sum(f * P))
    return np.mean(out)


@pytest.mark.parametrize("group_size", [4, 8, 16])  # part of a sequence, one, two sequences
def test_sequence_balance_loss_equals_deepseek_v3(group_size):
    rng = np.random.default_rng(group_size)
    B, T, E, K = 2, 8, 6, 2
    scores = rng.uniform(0.05, 1.0, size=(B * T, E))
    scores[:T, 0] += 3.0  # the first sequence leans on expert 0: it alone is imbalanced
    chosen = np.argsort(-scores, axis=-1)[:, :K]
    probs = (scores / scores.sum(-1, keepdims=True)).reshape(-1, group_size, E)
    got = losses.sequence_balance_loss(
        jnp.asarray(probs, jnp.float32), jnp.asarray(chosen.reshape(-1, group_size, K)), T
    )
    assert float(got) == pytest.approx(deepseek_sequence_loss(scores, chosen, T), rel=1e-5)


def test_the_layer_adds_the_weighted_sequence_loss_to_its_objective():
    x = jax.random.normal(jax.random.key(0), (4, 8, 6))
    settings = dict(num_experts=4, d_ff=8, num_selected=2, group_size=32)
    layer = MoeLayer(**settings)
    params = layer.init(jax.random.key(1), x)
    _, aux = layer.apply(params, x)
    _, weighted = MoeLayer(sequence_balance_weight=1e-2, **settings).apply(params, x)
    seq = float(aux["losses"]["sequence_balance"])
    assert np.isfinite(seq) and seq > 0
    assert float(weighted["loss"]) == pytest.approx(float(aux["loss"]) + 1e-2 * seq, rel=1e-6)
    assert float(weighted["weighted_losses"]["sequence_balance"]) == pytest.approx(1e-2 * seq)
