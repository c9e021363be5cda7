"""A router per MoE block (switchmoe/moe/blocks.py): one router named for every block is
today's model bit for bit; in a mixed model each block equals a one-router layer with its own
router, on its own input; the backends agree; the parameter count follows each block's k."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from tiny import tiny_config

from switchmoe.config import validate_config
from switchmoe.models import build_model, count_params, dummy_inputs, resolve
from switchmoe.moe.blocks import block_view
from switchmoe.moe.layer import MoeLayer

# Two MoE blocks (moe_every 1): DeepSeek-V4's arrangement in miniature, a fixed hash first and
# learned top-2 scores after, with auxiliary-loss-free bias balancing (kept by the learned block).
MIXED = {
    "model.moe.moe_every": 1,
    "model.moe.num_selected": 2,
    "model.moe.block_routers": ("hash", "top_k"),
    "model.moe.bias_update_speed": 1e-3,
    "model.moe.eval_capacity_factor": 4.0,  # C = k·S: nothing dropped, so backends must agree
}


def config_of(**overrides):
    return resolve(tiny_config("/unused", **overrides))


def init(config, seed=0):
    variables = build_model(config).init(jax.random.key(seed), *dummy_inputs(config))
    return nn.meta.unbox(variables["params"])


def tokens(config, seed=1):
    shape = (2, config.data.seq_len)
    return jax.random.randint(jax.random.key(seed), shape, 0, config.model.vocab_size)


def test_one_router_named_for_every_block_is_todays_model_bitwise():
    today = config_of(**{"model.moe.moe_every": 1})
    named = config_of(**{"model.moe.moe_every": 1, "model.moe.block_routers": ("top_k",) * 2})
    params = init(today)
    assert jax.tree.map(jnp.shape, init(named)) == jax.tree.map(jnp.shape, params)
    jax.tree.map(np.testing.assert_array_equal, init(named), params)
    x = tokens(today)

    def loss_and_grads(config):
        def loss(p):
            logits, aux = build_model(config).apply({"params": p}, x)
            return jnp.mean(logits**2) + aux["loss"]

        return jax.jit(jax.value_and_grad(loss))(params)

    jax.tree.map(np.testing.assert_array_equal, loss_and_grads(named), loss_and_grads(today))


def test_each_block_is_a_one_router_layer_with_its_router():
    config = config_of(**MIXED)
    validate_config(config)
    params = init(config)
    flat = traverse_util.flatten_dict(params)
    # The hash block has no router weights and no selection bias; the learned block has both.
    assert sorted(p[2] for p in flat if p[:2] == ("block_0", "moe")) == ["w_in", "w_out"]
    assert ("block_1", "moe", "selection_bias") in flat
    assert ("block_1", "moe", "router_kernel") in flat

    x = tokens(config)
    apply = lambda p, x: build_model(config).apply(
        {"params": p}, x, deterministic=True, capture_intermediates=True,
        mutable=["intermediates"],
    )  # fmt: skip
    _, state = jax.jit(apply)(params, x)
    inter = state["intermediates"]
    table = np.asarray(config.model.moe.hash_table)
    for block, router in (("block_0", "hash"), ("block_1", "top_k")):
        h = inter[block]["ffn_norm"]["__call__"][0]  # the MoE layer's input
        y = inter[block]["moe"]["__call__"][0][0]
        layer = MoeLayer.from_config(block_view(config.model, router))
        assert layer.router == router
        y_ref, _ = jax.jit(layer.apply)({"params": params[block]["moe"]}, h, token_ids=x)
        np.testing.assert_array_equal(y, y_ref)
        routing = inter[block]["moe"]["routing"][0]
        if router == "hash":  # each token goes to its table entry
            np.testing.assert_array_equal(routing.expert[..., 0], table[np.asarray(x)])
        else:  # learned scores: a softmax over the experts, top-2 taken
            probs = np.asarray(routing.probs)
            assert probs.max() < 1 and np.allclose(probs.sum(-1), 1, atol=1e-5)
            assert routing.expert.shape[-1] == 2


def test_the_backends_agree_on_a_mixed_model():
    config = config_of(**MIXED)
    params = init(config)
    x = tokens(config)
    outputs = {}
    for backend in ("einsum", "gather", "dropless"):
        c = config_of(**{**MIXED, "model.moe.backend": backend})
        outputs[backend], _ = jax.jit(build_model(c).apply)({"params": params}, x)
    np.testing.assert_allclose(outputs["gather"], outputs["einsum"], atol=1e-5)
    np.testing.assert_allclose(outputs["dropless"], outputs["einsum"], atol=1e-5)


def test_active_parameters_follow_each_blocks_router():
    config = config_of(**MIXED)
    shapes = traverse_util.flatten_dict(jax.eval_shape(lambda: init(config)))
    size = lambda path: int(np.prod(shapes[path].shape))
    total = sum(size(p) for p in shapes)
    experts = sum(size(p) for p in shapes if p[1] == "moe" and p[2].startswith("w_"))
    per_block = experts // 2
    E = config.model.moe.num_experts
    # The hash block sends a token to one expert, the top-2 block to two.
    active = total - experts + per_block * 1 // E + per_block * 2 // E
    counts = count_params(config)
    assert counts["total"] == total and counts["experts"] == experts
    assert counts["active_per_token"] == active


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"model.moe.block_routers": ("hash",)},
            r"model.moe.block_routers must name one router per MoE block: 2 for the blocks "
            r"\(0, 1\)",
        ),
        (
            {"model.moe.block_routers": ("hash", "top_two")},
            r"model.moe.block_routers\[1\]='top_two' is not a router; allowed: \('top_k'",
        ),
        (
            {"model.moe.block_routers": ("hash", "hash"), "model.moe.bias_update_speed": 1e-3},
            r"model.moe.bias_update_speed applies to the MoE blocks whose router picks experts",
        ),
        (
            {"model.moe.block_routers": ("hash", "expert_choice")},
            r"model.moe.router='expert_choice' routes on the whole group: not causal",
        ),
        (
            {"model.arch": "encoder_decoder", "model.moe.block_routers": ("hash", "top_k")},
            r"model.moe.block_routers names the routers of a decoder-only model's MoE blocks",
        ),
    ],
)
def test_bad_block_routers_are_refused_with_the_allowed_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(config_of(**{"model.moe.moe_every": 1, **overrides}))
