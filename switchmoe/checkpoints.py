"""Every Orbax call of switchmoe lives here, so an Orbax API change touches one file.

Layout of a run's workdir:
  config.json              the resolved config (written once, at the first start)
  metrics.jsonl            one JSON object per logged step
  events.out.tfevents.*    TensorBoard
  checkpoints/<step>/      Orbax items: params, opt_state, meta (JSON: step, data position)

Restores always go into an abstract target (shapes, dtypes and shardings built from the config):
restoring without one fails across device counts and turns optimizer NamedTuples into dicts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def abstract_like(tree: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract arrays), placed with `sharding` if given."""

    def leaf(x):
        s = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Async Orbax checkpoints of (params, opt_state, meta) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "meta")
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Starts an async save; returns once the arrays are copied off the device buffers."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, step: int, params_target: Any, opt_state_target: Any):
        """(params, opt_state, meta) of `step`, placed as the abstract targets say."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target),
                opt_state=ocp.args.StandardRestore(opt_state_target),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.params, restored.opt_state, restored.meta

    def restore_params(self, step: int, params_target: Any) -> Any:
        """Only the parameters (a notebook needs no optimizer state)."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(params_target))
        )
        return restored.params

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written config


def read_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
    """The run's config.json, with fields added to switchmoe since it was written defaulted."""
    from switchmoe.config import with_defaults  # noqa: PLC0415  (config imports the data stack)

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return with_defaults(ml_collections.ConfigDict(json.load(f)))


def has_checkpoint(workdir: str) -> bool:
    return latest_saved_step(workdir) is not None


def latest_saved_step(workdir: str) -> Optional[int]:
    """The newest finished checkpoint's step, read from the directory names (no Orbax manager
    is created, so nothing is written); None without one."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return None
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    return max(steps) if steps else None
