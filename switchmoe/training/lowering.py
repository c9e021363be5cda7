"""Does a program lower for the accelerators switchmoe is written for, on a machine without them?

`jax.export` lowers a jitted function to StableHLO for a named platform ('cuda', 'tpu') with no
such device present: every primitive needs a lowering rule for that platform (a Pallas kernel
written for one backend, a CPU-only custom call or a host-side library call has none), and the
shardings must be valid for the mesh. `train_step_lowering` does it for a config's whole train
step (forward, backward, optimizer, on the config's mesh of fake CPU devices), from abstract
parameters, optimizer state and batch as `memory_fit` builds them: nothing is allocated.

What it checks and what it does not: lowering, not compilation. XLA's own passes for the device,
autotuning, memory limits and the kernels' speed need the device itself (the device benchmark).
The suite runs it for every dispatch backend, both expert-parallel paths and two configs' train
steps (tests/test_lowering.py).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax import export

from switchmoe import sharding
from switchmoe.config import validate_config
from switchmoe.models import resolve
from switchmoe.training import features
from switchmoe.training.memory_fit import batch_spec
from switchmoe.training.trainer import Trainer

PLATFORMS = ("cuda", "tpu")


def lowering_errors(
    fn: Callable, *args: Any, platforms: Sequence[str] = PLATFORMS
) -> dict[str, Optional[str]]:
    """{platform: None if jax.jit(fn) lowers there for `args` (arrays or ShapeDtypeStructs),
    else the reason (the error's type and first line)}. One export per platform, so that a
    failure names its platform."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    out = {}
    for platform in platforms:
        try:
            export.export(jitted, platforms=[platform])(*args)
            out[platform] = None
        except Exception as e:  # noqa: BLE001  (any failure to lower is the answer)
            out[platform] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return out


def train_step_lowering(
    config: ml_collections.ConfigDict, devices=None, platforms: Sequence[str] = PLATFORMS
) -> dict[str, Optional[str]]:
    """`lowering_errors` of the config's train step on its mesh over `devices` (default: all)."""
    devices = jax.devices() if devices is None else devices
    config = resolve(config)
    validate_config(config, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    trainer = Trainer(config, mesh, objective=features.objective_for(config, abstract=True))
    params, opt_state = trainer.abstract_state()
    batch = batch_spec(config, trainer.batch_sharding)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    with jax.set_mesh(mesh):
        return lowering_errors(
            trainer.train_step, params, opt_state, batch, step, *trainer.objective.inputs,
            platforms=platforms,
        )  # fmt: skip
