"""Every program switchmoe runs on an accelerator lowers for GPU ('cuda') and TPU, checked here
without either (switchmoe/training/lowering.py): each dispatch backend and dropless
implementation (forward and gradient, bfloat16), the demo's train step on one device and on a
2x4 mesh by jit shardings and by shard_map, and the CPU-sized Switch encoder–decoder's train
step; and a planted primitive with a CPU lowering only is named for the platforms it lacks."""

import jax
import jax.numpy as jnp
import pytest
from tiny import apply_overrides
from jax.extend import core as jex_core
from jax.interpreters import mlir

from switchmoe.moe.layer import MoeLayer
from switchmoe.sweeps import load_config_module
from switchmoe.training.lowering import PLATFORMS, lowering_errors, train_step_lowering

BACKENDS = [("einsum", None), ("gather", None), ("dropless", "ragged_dot"), ("dropless", "blocked")]


def test_every_backend_lowers_forward_and_backward():
    x = jax.ShapeDtypeStruct((4, 32, 16), jnp.bfloat16)
    for backend, implementation in BACKENDS:
        layer = MoeLayer(
            num_experts=4, d_ff=32, num_selected=2, backend=backend,
            dropless_implementation=implementation, dtype=jnp.bfloat16,
        )  # fmt: skip
        params = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))

        def loss(p, x):
            y, aux = layer.apply(p, x)
            return jnp.sum(y.astype(jnp.float32)) + aux["loss"]

        errors = lowering_errors(jax.value_and_grad(loss), params, x)
        assert errors == {p: None for p in PLATFORMS}, (backend, implementation, errors)


def config(name, **changes):
    c = load_config_module(f"configs/{name}.py").get_config()
    c.model.dtype = "bfloat16"
    c.data.data_dir = "/unused"  # nothing is read: the batch is abstract
    return apply_overrides(c, changes)


@pytest.mark.parametrize(
    "name,changes,devices",
    [
        ("demo", {}, 1),
        # Groups of one sequence, so that each of the 8 batch shards routes whole groups.
        ("demo", {"mesh.data": 2, "mesh.expert": 4, "model.moe.group_size": 128}, 8),
        (
            "demo",
            {
                "mesh.data": 2,
                "mesh.expert": 4,
                "model.moe.group_size": 128,
                "mesh.expert_parallelism": "jit",
            },
            8,
        ),
        ("switch_t5", {}, 1),
    ],
    ids=["demo", "demo_2x4_shard_map", "demo_2x4_jit", "switch_t5"],
)
def test_train_steps_lower(name, changes, devices):
    errors = train_step_lowering(config(name, **changes), jax.devices()[:devices])
    assert errors == {p: None for p in PLATFORMS}, errors


def test_a_program_that_cannot_lower_for_a_platform_is_named():
    # A primitive with a lowering rule for CPU only, like a CPU-only custom call would have.
    cpu_only = jex_core.Primitive("cpu_only_square")
    cpu_only.def_abstract_eval(lambda x: x)
    cpu_only.def_impl(lambda x: x * x)
    mlir.register_lowering(
        cpu_only, mlir.lower_fun(lambda x: x * x, multiple_results=False), platform="cpu"
    )
    x = jax.ShapeDtypeStruct((3,), jnp.float32)
    errors = lowering_errors(lambda x: cpu_only.bind(x) + 1, x, platforms=("cpu", *PLATFORMS))
    assert errors["cpu"] is None
    for platform in PLATFORMS:
        assert errors[platform] is not None and "cpu_only_square" in errors[platform], errors
        assert platform in errors[platform], errors
