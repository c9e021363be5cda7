"""Router scoring as DeepSeek-V3 does it (sigmoid scores, top-k renormalisation, a routed scaling
factor) against a NumPy transcription, through the router function and the layer's options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchmoe.moe_layer import MoeLayer
from switchmoe.routers import top_k


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
