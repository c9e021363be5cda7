"""The Flax MoE layer: compile-once, precision, grouping, train/eval modes and setting errors."""

import dataclasses
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from switchmoe.moe import routers, routing
from switchmoe.moe.layer import MoeLayer
from switchmoe.moe.routers import top_k

D = 6


def test_jitted_layer_compiles_once_for_equal_shapes():
    layer = MoeLayer(num_experts=4, d_ff=8, num_selected=2)
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    params = layer.init(jax.random.key(1), x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(params, x):
        return layer.apply(params, x)

    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (2, 8, D))
        y, aux = apply(params, x)
        assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


def test_bf16_compute_keeps_router_in_float32_and_params_in_float32():
    layer = MoeLayer(num_experts=4, d_ff=8, num_selected=2, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 8, D)).astype(jnp.bfloat16)
    variables = layer.init(jax.random.key(1), x)
    (y, aux), state = layer.apply(variables, x, mutable=["intermediates"])
    (logits,) = state["intermediates"]["router_logits"]
    (result,) = state["intermediates"]["routing"]
    assert logits.dtype == jnp.float32 and result.probs.dtype == jnp.float32
    assert result.gate.dtype == jnp.float32
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables)))
    # Logits are computed from the bf16 input in float32: equal to the float32 product.
    kernel = nn.meta.unbox(variables)["params"]["router_kernel"]
    expected = np.asarray(x, np.float32).reshape(2, 8, D) @ np.asarray(kernel)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_group_size_routes_each_group_separately():
    # Two sequences of 16, groups of 8: capacity is per group of 8 tokens.
    layer = MoeLayer(num_experts=4, d_ff=8, group_size=8, eval_capacity_factor=0.5, min_capacity=1)
    x = jax.random.normal(jax.random.key(0), (2, 16, D))
    variables = layer.init(jax.random.key(1), x)
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    (r,) = state["intermediates"]["routing"]
    assert r.slot.shape == (4, 8, 1) and r.capacity == 1  # ceil(8/4·0.5) = 1
    kernel = np.asarray(nn.meta.unbox(variables)["params"]["router_kernel"], np.float64)
    probs = ref.softmax(np.asarray(x, np.float64).reshape(4, 8, D) @ kernel)
    _, slot, _ = ref.top_k_route(probs, 1, 1)
    np.testing.assert_array_equal(r.slot, slot)


def test_train_and_eval_capacity_factors():
    layer = MoeLayer(
        num_experts=4, d_ff=8, train_capacity_factor=0.5, eval_capacity_factor=2.0, min_capacity=1
    )
    # C = ceil(K·S/E·factor): ceil(16/4·0.5) = 2 training, ceil(16/4·2) = 8 evaluating.
    assert layer.make_router().capacity(16, train=True) == 2
    assert layer.make_router().capacity(16, train=False) == 8
    dropless = MoeLayer(num_experts=4, d_ff=8, backend="dropless")
    assert (
        dropless.make_router().dropless and dropless.make_router().capacity(16, train=False) is None
    )
    # The capacity rule reads whether the plan is dropless, not the backend's name.
    told = dataclasses.replace(layer.make_router(), dropless=True)
    assert told.settings.backend != "dropless" and told.capacity(16, train=False) is None
    # Expert choice keeps its capacity whatever the backend: ceil(16/4·2) = 8.
    expert_choice = MoeLayer(num_experts=4, d_ff=8, router="expert_choice", backend="dropless")
    assert expert_choice.make_router().capacity(16, train=False) == 8


def test_training_mode_randomness_uses_the_dropout_stream():
    layer = MoeLayer(
        num_experts=4,
        d_ff=8,
        num_selected=2,
        random_routing=True,
        jitter_eps=0.01,
        expert_dropout=0.3,
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    variables = layer.init(jax.random.key(1), x)
    y_eval1, _ = layer.apply(variables, x)
    y_eval2, _ = layer.apply(variables, x)
    np.testing.assert_array_equal(y_eval1, y_eval2)
    train = lambda seed: layer.apply(
        variables, x, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    )[0]
    np.testing.assert_array_equal(train(5), train(5))
    assert not np.allclose(train(5), train(6))
    assert not np.allclose(train(5), y_eval1)


def test_layer_output_equals_loop_reference():
    layer = MoeLayer(
        num_experts=4,
        d_ff=8,
        num_selected=2,
        gate_norm="normalized",
        eval_capacity_factor=0.75,
        min_capacity=1,
        activation="swiglu",
    )
    x = jax.random.normal(jax.random.key(2), (2, 8, D))
    variables = layer.init(jax.random.key(3), x)
    y, _ = layer.apply(variables, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(variables)["params"])
    probs = ref.softmax(np.asarray(x, np.float64) @ p["router_kernel"])
    C = ref.capacity(8, 4, 2, 0.75)
    # The layer's default slot order is token-major (causal_routing=True).
    expert, slot, gate = ref.top_k_route(probs, 2, C, "normalized", rank_major=False)
    assert (slot < 0).any()
    expected = ref.moe_output(
        np.asarray(x, np.float64), expert, slot, gate, p["w_in"], p["w_out"], p["w_gate"], "swiglu"
    )
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(num_selected=5), r"num_selected \(k\) must be in \[1, num_experts=4\]; got 5"),
        (dict(train_capacity_factor=0.0), "train_capacity_factor must be > 0; got 0.0"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor must be > 0"),
        (
            dict(backend="megablocks"),
            r"backend must be one of \('auto', 'einsum', 'gather', 'dropless'\)",
        ),
        (
            dict(router="switch"),
            re.escape(f"router must be one of {routers.NAMES}"),
        ),
        (
            dict(activation="tanh"),
            r"activation must be one of \('relu', 'gelu', 'swiglu', 'geglu'\)",
        ),
        (dict(gate_norm="softmax"), "gate_norm must be one of"),
        (
            dict(group_size=5),
            r"group_size must divide the tokens per batch .* = 16\); got group_size=5",
        ),
        (dict(random_routing=True), "random_routing .* needs num_selected >= 2"),
        (dict(expert_dropout=1.0), r"expert_dropout must be in \[0, 1\)"),
        (dict(min_capacity=0), "min_capacity must be >= 1"),
        (
            dict(router_options={"overflow": "spill"}),
            r"overflow must be one of \('drop', 'next_choice'\); got 'spill'",
        ),
        (
            dict(router_options={"drop_priority": "random"}),
            r"drop_priority must be one of \('position', 'probability'\)",
        ),
        (
            dict(backend="dropless", router_options={"overflow": "next_choice"}),
            r"overflow='next_choice' decide what happens at capacity; a dropless backend",
        ),
        (
            dict(router_options={"overflow": "next_choice", "drop_priority": "probability"}),
            "overflow='next_choice' places token by token .* needs drop_priority='position'",
        ),
        (
            dict(num_selected=2, causal_routing=False, router_options={"overflow": "next_choice"}),
            r"with num_selected=2 set causal_routing=True",
        ),
        (
            dict(batch_prioritized=True, router_options={"drop_priority": "probability"}),
            "two priority rules",
        ),
    ],
)
def test_bad_settings_raise_before_compilation(settings, message):
    layer = MoeLayer(num_experts=4, d_ff=8, **settings)
    x = jnp.zeros((2, 8, D))
    with pytest.raises(ValueError, match=message):
        jax.jit(layer.init)(jax.random.key(0), x)  # raised while tracing, before XLA compiles


def test_capacity_routing_matches_routing_function():
    # The layer's capacity and routing equal what the plain functions give for the same logits.
    layer = MoeLayer(
        num_experts=4, d_ff=8, num_selected=2, batch_prioritized=True, eval_capacity_factor=1.0
    )
    x = jax.random.normal(jax.random.key(4), (2, 8, D))
    variables = layer.init(jax.random.key(5), x)
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    (r,) = state["intermediates"]["routing"]
    (logits,) = state["intermediates"]["router_logits"]
    direct = top_k.top_k_route(
        logits,
        num_selected=2,
        capacity=routing.expert_capacity(8, 4, 2, 1.0, 4),
        batch_prioritized=True,
        rank_major=False,  # the layer's default causal_routing=True
    )
    np.testing.assert_array_equal(r.slot, direct.slot)
    assert not r.causal


def test_bfloat16_router_ablation_rounds_the_logits():
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    f32 = MoeLayer(num_experts=4, d_ff=8)
    bf16 = MoeLayer(num_experts=4, d_ff=8, router_dtype="bfloat16")
    variables = f32.init(jax.random.key(1), x)
    _, s32 = f32.apply(variables, x, mutable=["intermediates"])
    _, s16 = bf16.apply(variables, x, mutable=["intermediates"])
    (l32,), (l16,) = s32["intermediates"]["router_logits"], s16["intermediates"]["router_logits"]
    assert l16.dtype == jnp.float32
    # Every bf16 logit is exactly representable in bfloat16 and within its rounding of float32.
    np.testing.assert_array_equal(l16, np.asarray(l16).astype(jnp.bfloat16).astype(np.float32))
    np.testing.assert_allclose(l16, l32, rtol=2**-7, atol=1e-3)
    assert not np.array_equal(l16, l32)
