"""Experts across 8 fake CPU devices: both expert-parallel paths equal the single-device layer,
training on a mesh equals single-device training, and checkpoints move between meshes."""

import flax.linen as nn
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny import tiny_config

from switchmoe import sharding
from switchmoe.models import resolve
from switchmoe.moe.layer import MoeLayer
from switchmoe.runs import checkpoints, metrics, restore_run
from switchmoe.training.trainer import Trainer, train_and_evaluate

quiet = lambda line: None
D = 6


def mesh_of(data, expert, model):
    return sharding.make_mesh(
        ml_collections.ConfigDict(dict(data=data, expert=expert, model=model))
    )


def test_eight_fake_devices_are_there():
    assert jax.device_count() == 8  # set in conftest.py before JAX initialised


# Every pair of (parallelism, backend, mesh shape) values appears once in these four rows (a
# pairwise covering design: half of the full 2x2x2 product), and each router runs all four.
PAIRWISE = [
    ("jit", "einsum", (2, 4, 1)),
    ("jit", "gather", (2, 2, 2)),
    ("shard_map", "einsum", (2, 2, 2)),
    ("shard_map", "gather", (2, 4, 1)),
]


@pytest.mark.parametrize("parallelism,backend,shape", PAIRWISE)
@pytest.mark.parametrize("router,k", [("top_k", 1), ("top_k", 2), ("expert_choice", 1)])
def test_expert_parallel_layer_equals_single_device(parallelism, backend, shape, router, k):
    check_expert_parallel_layer(parallelism, backend, shape, router, k)


# The capacity rules change only the dispatch plan: each runs once, the two together covering
# both parallelisms and both capacity backends (the loop tests check the plans themselves).
@pytest.mark.parametrize(
    "parallelism,backend,shape,rule",
    [
        ("shard_map", "gather", (2, 4, 1), {"overflow": "next_choice"}),
        ("jit", "einsum", (2, 2, 2), {"drop_priority": "probability"}),
    ],
)
def test_capacity_rules_on_a_mesh_equal_one_device(parallelism, backend, shape, rule):
    check_expert_parallel_layer(parallelism, backend, shape, "top_k", 2, rule)


def check_expert_parallel_layer(parallelism, backend, shape, router, k, router_options=None):
    settings = dict(
        num_experts=8,
        d_ff=8,
        num_selected=k,
        router=router,
        backend=backend,
        eval_capacity_factor=0.5,
        min_capacity=1,
        activation="swiglu",
        router_options=flax.core.FrozenDict(router_options or {}),
    )
    reference = MoeLayer(**settings)
    layer = MoeLayer(**settings, expert_parallelism=parallelism)
    x = jax.random.normal(jax.random.key(0), (8, 16, D))  # 8 groups of 16 tokens
    variables = reference.init(jax.random.key(1), x)
    params = nn.meta.unbox(variables)

    loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)[0]))
    y_ref, aux_ref = reference.apply(params, x)
    grads_ref = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    if router == "top_k":
        assert float(aux_ref["stats"]["dropped_fraction"]) > 0.2  # overflow included

    mesh = mesh_of(*shape)
    placement = nn.meta.unbox(
        sharding.param_shardings(
            jax.eval_shape(layer.init, jax.random.key(1), x), mesh, sharding.DEFAULT_RULES
        )
    )
    params_sharded = jax.device_put(params, placement)
    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        y, aux = jax.jit(layer.apply)(params_sharded, x_sharded)
        grads = jax.jit(jax.grad(loss(layer), argnums=(0, 1)))(params_sharded, x_sharded)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        aux["stats"]["dropped_fraction"], aux_ref["stats"]["dropped_fraction"]
    )
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parallelism", ["jit", "shard_map"])
def test_compiled_program_has_all_to_alls_and_sharded_experts(parallelism):
    layer = MoeLayer(num_experts=8, d_ff=16, expert_parallelism=parallelism)
    x = jax.random.normal(jax.random.key(0), (8, 16, D))
    mesh = mesh_of(2, 4, 1)
    abstract = jax.eval_shape(layer.init, jax.random.key(1), x)
    placement = nn.meta.unbox(sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES))
    params = jax.device_put(nn.meta.unbox(layer.init(jax.random.key(1), x)), placement)
    x = jax.device_put(x, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        forward = jax.jit(layer.apply).lower(params, x).compile().as_text()
        loss = lambda p, x: jnp.sum(layer.apply(p, x)[0])
        backward = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    count = lambda hlo: sum(line.count(" all-to-all(") for line in hlo.splitlines())
    assert count(forward) == 2  # to the experts and back
    # The gradient program exchanges the cotangents too (3 all-to-alls seen with jax 0.10.2 on
    # both paths: XLA shares one between the forward pair and its transpose).
    assert count(backward) > count(forward)
    w_in = params["params"]["w_in"]  # [E, D, F] = [8, 6, 16]
    for shard in w_in.addressable_shards:
        assert shard.data.shape == (2, D, 16)  # 8 experts / 4 expert shards
    assert w_in.addressable_shards[0].data.nbytes * 4 == w_in.nbytes


def test_training_on_a_mesh_equals_single_device_training(data_dir, tmp_path):
    overrides = {
        "num_train_steps": 6,
        "log_every": 1,
        "eval_every": 6,
        "checkpoint_every": 6,
        "model.moe.num_experts": 8,
        "model.moe.num_selected": 2,
        "model.moe.train_capacity_factor": 0.75,
        # Both blocks MoE, each with its own router: a fixed hash, then learned top-2.
        "model.moe.moe_every": 1,
        "model.moe.block_routers": ("hash", "top_k"),
    }
    single = str(tmp_path / "single")
    train_and_evaluate(tiny_config(data_dir, **overrides), single, log=quiet)
    losses = lambda workdir: [r["train/loss"] for r in metrics.read_metrics(workdir)]
    for parallelism in ("shard_map", "jit"):
        meshed = str(tmp_path / parallelism)
        config = tiny_config(
            data_dir,
            **overrides,
            **{"mesh.data": 2, "mesh.expert": 4, "mesh.expert_parallelism": parallelism},
        )
        train_and_evaluate(config, meshed, log=quiet)
        np.testing.assert_allclose(losses(meshed), losses(single), rtol=1e-5)


def test_checkpoints_move_between_meshes(data_dir, tmp_path):
    base = {
        "num_train_steps": 4,
        "checkpoint_every": 4,
        "eval_every": 4,
        "model.moe.num_experts": 8,
    }
    on_eight = str(tmp_path / "eight")
    train_and_evaluate(
        tiny_config(data_dir, **base, **{"mesh.data": 2, "mesh.expert": 4}), on_eight, log=quiet
    )
    _, expected = restore_run(on_eight)  # the notebook call: one plain device
    assert {d for p in jax.tree.leaves(expected) for d in p.devices()} == {jax.devices()[0]}
    for shape in [(1, 1, 1), (1, 2, 1), (2, 2, 1), (1, 4, 2)]:
        config = resolve(
            tiny_config(
                data_dir, **base, **dict(zip(("mesh.data", "mesh.expert", "mesh.model"), shape))
            )
        )
        trainer = Trainer(config, sharding.make_mesh(config.mesh))
        params, _, _ = checkpoints.Checkpointer(on_eight).restore(4, *trainer.abstract_state())
        assert len({d for p in jax.tree.leaves(params) for d in p.devices()}) == np.prod(shape)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)

    # Written on one device, restored onto eight.
    on_one = str(tmp_path / "one")
    train_and_evaluate(tiny_config(data_dir, **base), on_one, log=quiet)
    _, expected = restore_run(on_one)
    config = resolve(tiny_config(data_dir, **base, **{"mesh.data": 2, "mesh.expert": 4}))
    trainer = Trainer(config, sharding.make_mesh(config.mesh))
    params, _, _ = checkpoints.Checkpointer(on_one).restore(4, *trainer.abstract_state())
    w_in = params["block_1"]["moe"]["w_in"]
    assert len(w_in.devices()) == 8 and w_in.addressable_shards[0].data.shape[0] == 2
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"mesh.expert": 3, "model.moe.num_experts": 4},
            r"model.moe.num_experts=4 must be divisible by mesh.expert=3",
        ),
        (
            {"mesh.data": 4, "mesh.expert": 4},
            r"mesh data×expert×model = 4×4×1 = 16 needs more devices "
            r"than the 8 available",
        ),
        (
            {"mesh.data": -1, "mesh.model": 3},
            r"8 devices are not divisible by the fixed axes' product 3",
        ),
        (
            {"mesh.data": 8, "batch_size": 8, "model.moe.group_size": 64},
            r"model.moe.group_size=64 must divide the tokens per batch shard \(batch_size 8 / 8 batch "
            r"shard\(s\) × data.seq_len 32 = 32\)",
        ),
        (
            {"mesh.expert": 2, "model.moe.backend": "dropless"},
            r"mesh.expert > 1 needs model.moe.backend",
        ),
        ({"mesh.expert_parallelism": "pjit"}, r"mesh.expert_parallelism must be one of \('jit', "),
    ],
)
def test_mesh_errors_name_the_setting(data_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(data_dir, **overrides), str(tmp_path / "run"), log=quiet)
    assert not (tmp_path / "run").exists()
