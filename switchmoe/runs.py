"""Reading a finished (or running) run's workdir: one call gives its config and parameters.

    from switchmoe.runs import restore_run
    config, params = restore_run("/path/to/workdir")          # latest checkpoint
    config, params = restore_run("/path/to/workdir", step=500)

Works on whatever devices the caller has: the parameters are restored onto the first local
device, whatever mesh wrote them.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import jax
import ml_collections

from switchmoe import checkpoints, integrity
from switchmoe.metrics import read_metrics  # noqa: F401  (re-exported for notebooks)
from switchmoe.models import abstract_params, build_model


def restore_run(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of `workdir`'s checkpoint at `step` (default: the newest intact one).

    Every restore is verified (saved checksums, the config's shapes, finiteness; see
    switchmoe/integrity.py): with `step=None` a damaged newer checkpoint is skipped with a
    warning naming it; a damaged `step` raises ValueError listing the intact steps. Nothing in
    the workdir is changed.
    """
    config = checkpoints.read_config(workdir)
    if config is None:
        raise FileNotFoundError(f"{os.path.join(workdir, checkpoints.CONFIG_FILE)} not found.")
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
                return config, ckpt.restore_params(step, target)
            except integrity.DamagedCheckpoint as e:
                intact = ckpt.intact_steps(target)
                raise ValueError(f"{e}. Intact checkpoints: {intact or 'none'}.") from None
        for candidate in sorted(steps, reverse=True):
            try:
                params = ckpt.restore_params(candidate, target)
            except integrity.DamagedCheckpoint as e:
                warnings.warn(f"{e}; using an earlier checkpoint.", stacklevel=2)
                continue
            return config, params
        raise ValueError(f"no intact checkpoint under {ckpt.directory} (steps {sorted(steps)}).")
    finally:
        ckpt.close()
