"""Fine-grained experts (DeepSeekMoE): granularity m splits each expert into m experts of width
F/m and routes every token to m·k of them, at the parameters and FLOPs of m = 1 (counted by
hand below), with only the router growing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from switchmoe.config import validate_config
from switchmoe.models import build_model, count_params, dummy_inputs, resolve
from switchmoe.moe.layer import MoeLayer

D, F, E, LAYERS = 32, 64, 4, 4  # tiny_config's width and expert width; 4 blocks, MoE every 2


def config(m, k=2, **overrides):
    c = tiny_config("/nonexistent", **{"model.num_layers": LAYERS, "model.moe.num_selected": k,
                                       "model.moe.granularity": m, **overrides})  # fmt: skip
    c.model.vocab_size = 300  # no tokenizer needed
    return c


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_parameters_and_flops_equal_those_of_m_1(m):
    k, moe_layers = 2, LAYERS // 2
    layer = MoeLayer.from_config(config(m, k).model)
    assert (layer.num_experts, layer.d_ff, layer.num_selected) == (m * E, F // m, m * k)
    # Hand count: m·E experts of two matrices D×(F/m) each = 2·E·D·F whatever m is.
    expert_params = moe_layers * (m * E) * 2 * D * (F // m)
    assert expert_params == moe_layers * 2 * E * D * F
    counts, base = count_params(config(m, k)), count_params(config(1, k))
    assert counts["experts"] == expert_params
    # Only the router grows: D × m·E weights per MoE layer instead of D × E.
    assert counts["total"] - base["total"] == moe_layers * D * E * (m - 1)
    # Active per token: m·k experts of 2·D·F/m weights = k experts of 2·D·F.
    assert counts["active_per_token"] - counts["total"] + counts["experts"] == (
        moe_layers * (m * k) * 2 * D * (F // m)
    )
    assert counts["active_per_token"] - base["active_per_token"] == moe_layers * D * E * (m - 1)
    # Expert FLOPs per token: m·k experts × 2 matmuls × 2·D·(F/m) multiply-adds = 4·k·D·F.
    assert 2 * layer.num_selected * 2 * D * layer.d_ff == 4 * k * D * F
    shapes = jax.eval_shape(lambda: build_model(config(m, k)).init(
        jax.random.key(0), *dummy_inputs(config(m, k))))["params"]  # fmt: skip
    moe = nn.meta.unbox(shapes)["block_1"]["moe"]
    assert moe["w_in"].shape == (m * E, D, F // m) and moe["router_kernel"].shape == (D, m * E)


@pytest.mark.parametrize("m", [2, 4])
def test_each_token_picks_m_times_k_distinct_experts(m):
    layer = MoeLayer.from_config(config(m, k=2).model)
    x = jax.random.normal(jax.random.key(0), (2, 16, D))
    params = layer.init(jax.random.key(1), x)
    _, state = layer.apply(params, x, mutable=["intermediates"])
    (routing,) = state["intermediates"]["routing"]
    expert = np.asarray(routing.expert)
    assert expert.shape[-1] == 2 * m
    for choices in expert.reshape(-1, 2 * m):
        assert len(set(choices.tolist())) == 2 * m
    # The chosen experts are the m·k most probable ones.
    top = np.argsort(-np.asarray(routing.probs), axis=-1, kind="stable")[..., : 2 * m]
    np.testing.assert_array_equal(np.sort(expert, -1), np.sort(top, -1))
    assert jnp.all(jnp.isfinite(layer.apply(params, x)[0]))


def test_bad_granularity_is_refused_with_the_allowed_values():
    with pytest.raises(
        ValueError, match=r"granularity=3 must divide .*d_ff=64.*allowed: \[1, 2, 4"
    ):
        validate_config(resolve(config(3)))
    with pytest.raises(ValueError, match="granularity must be an integer >= 1"):
        validate_config(resolve(config(0)))
    with pytest.raises(ValueError, match="applies to token-choice routers"):
        validate_config(resolve(config(2, k=1, **{"model.moe.router": "hash"})))


def test_fine_grained_experts_combine_with_a_shared_expert():
    shared = {"model.moe.shared_d_ff": 32}
    with_shared, without = count_params(config(4, **shared)), count_params(config(4))
    # The shared FFN (two D×32 matrices per MoE layer) is added whatever m is; active for all.
    extra = (LAYERS // 2) * 2 * D * 32
    assert with_shared["total"] - without["total"] == extra
    assert with_shared["active_per_token"] - without["active_per_token"] == extra
    layer = MoeLayer.from_config(config(4, **shared).model)
    x = jax.random.normal(jax.random.key(0), (2, 16, D))
    params = layer.init(jax.random.key(1), x)
    y, _ = layer.apply(params, x)
    assert "shared" in params["params"] and jnp.all(jnp.isfinite(y))
