"""Reading a finished (or running) run's workdir: one call gives its config and parameters.

    from switchmoe.runs import restore_run
    config, params = restore_run("/path/to/workdir")          # latest checkpoint
    config, params = restore_run("/path/to/workdir", step=500)

Works on whatever devices the caller has: the parameters are restored onto the first local
device, whatever mesh wrote them.

`write_run(workdir, config, params, step)` is the other direction: a run made by a function
rather than by training (merged experts, int8 experts) becomes a workdir that `restore_run`,
the analysis helpers, `init_from` and `experiments.train` read like any other.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from switchmoe import optim
from switchmoe.config import validate_config
from switchmoe.models import abstract_params, build_model, resolve
from switchmoe.runs import checkpoints, config_files, integrity
from switchmoe.runs.metrics import read_metrics  # noqa: F401  (re-exported for notebooks)


def restore_run(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of `workdir`'s checkpoint at `step` (default: the newest intact one).
    `restore_run_at` also returns the step."""
    config, params, _ = restore_run_at(workdir, step)
    return config, params


def restore_run_at(
    workdir: str, step: Optional[int] = None
) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(config, params, step) of `workdir`'s checkpoint at `step` (default: the newest intact one).

    Every restore is verified (saved checksums, the config's shapes, finiteness; see
    switchmoe/runs/integrity.py): with `step=None` a damaged newer checkpoint is skipped with a
    warning naming it; a damaged `step` raises ValueError listing the intact steps. Nothing in
    the workdir is changed.
    """
    config = config_files.read_config(workdir, step=step)
    if config is None:
        raise FileNotFoundError(f"{os.path.join(workdir, config_files.CONFIG_FILE)} not found.")
    ckpt = checkpoints.Checkpointer(workdir)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory}.")
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint at step {step}; available: {sorted(steps)}.")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = checkpoints.abstract_like(abstract_params(build_model(config), config), device)
        if step is not None:
            try:
                return config, ckpt.restore_params(step, target), step
            except integrity.DamagedCheckpoint as e:
                intact = ckpt.intact_steps(target)
                raise ValueError(f"{e}. Intact checkpoints: {intact or 'none'}.") from None
        for candidate in sorted(steps, reverse=True):
            try:
                params = ckpt.restore_params(candidate, target)
            except integrity.DamagedCheckpoint as e:
                warnings.warn(f"{e}; using an earlier checkpoint.", stacklevel=2)
                continue
            return config_files.read_config(workdir, step=candidate), params, candidate
        raise ValueError(f"no intact checkpoint under {ckpt.directory} (steps {sorted(steps)}).")
    finally:
        ckpt.close()


DERIVED_FILE = "derived_from.json"  # how a written run was made (write_run's derived_from)


def write_run(
    workdir: str,
    config: ml_collections.ConfigDict,
    params: Any,
    step: int,
    derived_from: Optional[dict] = None,
) -> str:
    """Writes (config, params) as a run at `workdir` and returns `workdir`.

    The workdir holds config.json, one checkpoint at `step` (the parameters, a fresh optimizer
    state for them, no data iterator state: the batches resume from `step` by their index) and
    `derived_from.json` recording `derived_from`. Training it further continues from `step`
    with `experiments.train` when `num_train_steps` is raised, or starts a new run from it with
    `init_from`. Refuses (ValueError) a workdir that already holds a config or a checkpoint:
    nothing there is overwritten.
    """
    if config_files.read_config(workdir) is not None or checkpoints.has_checkpoint(workdir):
        raise ValueError(f"{workdir} already holds a run; write_run needs a new directory.")
    config = resolve(config)
    validate_config(config)
    target = abstract_params(build_model(config), config)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), target)
    if got != want:
        raise ValueError("params do not have the shapes and dtypes this config's model has.")
    params = jax.tree.map(jnp.asarray, params)
    opt_state = optim.optimizer_for(config).init(params)
    os.makedirs(workdir, exist_ok=True)
    config_files.write_config(workdir, config)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        ckpt.save(step, params, opt_state, {"step": step, "data_step": step})
    finally:
        ckpt.close()
    with open(os.path.join(workdir, DERIVED_FILE), "w") as f:
        json.dump(derived_from or {}, f, indent=1, default=str)
    return workdir
