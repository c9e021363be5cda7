"""Every Orbax call of switchmoe lives here, so an Orbax API change touches one file.

Layout of a run's workdir:
  config.json              the resolved config (written once, at the first start;
                           switchmoe/runs/config_files.py reads and writes it)
  config_history.jsonl     settings a later start changed (allowed on resume), with the step
                           of the first checkpoint trained under them
  metrics.jsonl            one JSON object per logged step
  events.out.tfevents.*    TensorBoard
  checkpoints/<step>/      Orbax items: params, opt_state, meta (JSON: step, data position,
                           the checksums of every array; see switchmoe/runs/integrity.py) and data
                           (the data iterator's state, one JSON file per process, written by
                           grain's Orbax handler)
  checkpoints/damaged/     steps found damaged on resume, set aside

Restores always go into an abstract target (shapes, dtypes and shardings built from the config):
restoring without one fails across device counts and turns optimizer NamedTuples into dicts.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from switchmoe.runs import integrity

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged"  # under checkpoints/: steps found damaged, set aside
ITEMS = ("params", "opt_state", "meta", "data")
# How long a checkpoint write may take before the run stops with CheckpointWriteError (the
# config's `checkpoint_timeout_seconds`). A failed write raises at once; this bounds only a write
# that stalls (a hung network mount). Orbax's own default is 20 minutes, during which a trainer
# whose save failed in a background thread could not even exit.
DEFAULT_TIMEOUT_SECONDS = 120.0


def abstract_like(tree: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract arrays), placed with `sharding` if given."""

    def leaf(x):
        s = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(leaf, tree)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written: the directory, the step and the latest intact one."""


class Checkpointer:
    """Async Orbax checkpoints of (params, opt_state, meta) under `workdir/checkpoints`.

    A save returns once the arrays are off the device and writes in a background thread. Every
    wait for that thread is bounded by `timeout_seconds`, and its failure surfaces in the main
    thread as CheckpointWriteError naming the step that failed, at the next save or at close().
    Step directories are created in the main thread (Orbax creates them in the background by
    default, and a creation that fails there leaves threads waiting for a signal that never comes:
    the process then cannot exit for 20 minutes). `owner=True` (the trainer, holding the
    workdir's lock) also removes the temporary directories an interrupted save left behind; a
    reader must not, since the run it reads may be writing one.
    """

    def __init__(
        self,
        workdir: str,
        keep: int = 2,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        owner: bool = False,
    ):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.timeout_seconds = float(timeout_seconds)
        self._pending: Optional[int] = None  # the step whose async save may still be writing
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=owner,
            async_options=ocp.AsyncOptions(
                timeout_secs=max(1, math.ceil(self.timeout_seconds)),
                create_directories_asynchronously=False,
            ),
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=self._options, item_names=ITEMS
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, params: Any, opt_state: Any, meta: dict, data_state: dict | None = None
    ) -> None:
        """Starts an async save; returns once the arrays are copied off the device buffers.

        The metadata item carries every array's checksums (integrity.checksums), verified by
        every restore. `data_state`: this process's data iterator state (`get_state()` of the
        pipeline's `train_batches`), taken now, before the iterator moves on."""
        meta = {
            **meta,
            "checksums": {
                "params": integrity.checksums(params),
                "opt_state": integrity.checksums(opt_state),
            },
        }
        self.wait_for_pending()
        self.check_writable(step)
        self._pending = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave(meta),
                    **(
                        {"data": grain.checkpoint.CheckpointSave(_IteratorState(data_state))}
                        if data_state is not None
                        else {}
                    ),
                ),
            )
        except Exception as e:  # noqa: BLE001  (whatever Orbax or the file system raises)
            self._pending = None
            raise self._write_error(step, e) from e

    def wait_for_pending(self) -> None:
        """Waits, at most `timeout_seconds`, for the save in flight; raises CheckpointWriteError
        naming its step if it failed or did not finish in time."""
        step, self._pending = self._pending, None
        if step is None:
            return
        deadline = time.monotonic() + self.timeout_seconds
        while self.manager.is_saving_in_progress():
            if time.monotonic() > deadline:
                raise self._write_error(
                    step,
                    TimeoutError(
                        f"the write did not finish within checkpoint_timeout_seconds="
                        f"{self.timeout_seconds:g}"
                    ),
                )
            time.sleep(0.02)
        try:
            # The threads are done: this returns at once, raising what the save's finalize
            # thread caught (check_for_errors alone sees only the commit thread's errors).
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(step, e) from e

    def check_writable(self, step: int) -> None:
        """Raises CheckpointWriteError when the previous async save failed or the directory can
        no longer be written (removed, read-only, full), before the step's save starts."""
        try:
            self.manager.check_for_errors()
            if not os.path.isdir(self.directory):
                raise FileNotFoundError(f"{self.directory} no longer exists")
            probe = os.path.join(self.directory, f".write_probe.{os.getpid()}")
            try:
                with open(probe, "w") as f:
                    f.write("ok")
            finally:  # a full disk creates the file and fails its write: never leave it behind
                with contextlib.suppress(OSError):
                    os.remove(probe)
        except Exception as e:  # noqa: BLE001
            raise self._write_error(step, e) from e

    def _write_error(self, step: int, cause: BaseException) -> "CheckpointWriteError":
        try:
            intact = latest_saved_step(os.path.dirname(self.directory))
        except OSError:
            intact = None
        return CheckpointWriteError(
            f"cannot write checkpoint {step} under {self.directory} ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0][:200] if str(cause) else ''}); the latest intact "
            f"checkpoint: {intact if intact is not None else 'none'}. Training stopped."
        )

    def _restore_item(self, step: int, item: str, args) -> Any:
        try:
            return getattr(
                self.manager.restore(step, args=ocp.args.Composite(**{item: args})), item
            )
        except Exception as e:  # noqa: BLE001  (TensorStore, JSON, missing files: all damage)
            problem = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise integrity.DamagedCheckpoint(
                step, item, f"cannot be read ({type(e).__name__}: {problem})"
            ) from e

    def restore_meta(self, step: int) -> dict:
        meta = self._restore_item(step, "meta", ocp.args.JsonRestore())
        if not isinstance(meta, dict) or "step" not in meta:
            raise integrity.DamagedCheckpoint(step, "meta", "no step recorded")
        return meta

    def restore(self, step: int, params_target: Any, opt_state_target: Any):
        """(params, opt_state, meta) of `step`, placed as the abstract targets say, verified
        against the saved checksums, the targets' shapes and finiteness.

        Raises integrity.DamagedCheckpoint (the step, the item, what is wrong)."""
        meta = self.restore_meta(step)
        sums = meta.get("checksums") or {}
        params = self.restore_params(step, params_target, meta)
        opt_state = self._restore_item(
            step, "opt_state", ocp.args.StandardRestore(opt_state_target)
        )
        integrity.verify(step, "opt_state", opt_state, sums.get("opt_state"), opt_state_target)
        data_state = self.restore_data_state(step)
        if data_state is not None:
            meta = {**meta, "data_state": data_state}
        return params, opt_state, meta

    def restore_data_state(self, step: int) -> Optional[dict]:
        """This process's data iterator state saved with `step`, or None (none was saved:
        checkpoints written before the item existed)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
            return None
        received = _IteratorState(None)
        self._restore_item(step, "data", grain.checkpoint.CheckpointRestore(received))
        if not isinstance(received.state, dict):
            raise integrity.DamagedCheckpoint(step, "data", "no iterator state recorded")
        return received.state

    def restore_params(self, step: int, params_target: Any, meta: Optional[dict] = None) -> Any:
        """Only the parameters (a notebook needs no optimizer state), verified like `restore`."""
        meta = self.restore_meta(step) if meta is None else meta
        params = self._restore_item(step, "params", ocp.args.StandardRestore(params_target))
        sums = meta.get("checksums") or {}
        integrity.verify(step, "params", params, sums.get("params"), params_target)
        return params

    def restore_latest(self, params_target: Any, opt_state_target: Any, log=print):
        """(step, params, opt_state, meta) of the newest intact checkpoint, or None without one.

        A damaged newer step is reported through `log` and moved aside to
        `checkpoints/damaged/<step>` (kept for inspection, no longer a step the run resumes
        from or saves over); raises DamagedCheckpoint when no step is intact."""
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                params, opt_state, meta = self.restore(step, params_target, opt_state_target)
            except integrity.DamagedCheckpoint as e:
                damaged.append(e)
                log(f"{e}; trying an earlier checkpoint.")
                continue
            if damaged:
                self._set_aside([e.step for e in damaged])
                log(f"Falling back to checkpoint {step}, the newest intact one.")
            return step, params, opt_state, meta
        if damaged:
            raise integrity.DamagedCheckpoint(
                damaged[-1].step, damaged[-1].item,
                f"no intact checkpoint under {self.directory} (steps "
                f"{', '.join(str(e.step) for e in damaged)} are all damaged; the newest: "
                f"{damaged[0]})",
            )  # fmt: skip
        return None

    def intact_steps(self, params_target: Any) -> list[int]:
        """The steps whose parameters restore intact (slow: reads every checkpoint)."""
        intact = []
        for step in self.all_steps():
            try:
                self.restore_params(step, params_target)
                intact.append(step)
            except integrity.DamagedCheckpoint:
                pass
        return sorted(intact)

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps to checkpoints/damaged/ (the lead process only) and reopens the
        manager so that it no longer lists them."""
        if jax.process_index() == 0:
            aside = os.path.join(self.directory, DAMAGED_DIR)
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, str(step))
                suffix = 1
                while os.path.exists(target):
                    target, suffix = os.path.join(aside, f"{step}.{suffix}"), suffix + 1
                os.replace(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("switchmoe: damaged checkpoints set aside")
        self.manager.close()
        self.manager = ocp.CheckpointManager(
            self.directory, options=self._options, item_names=ITEMS
        )

    def close(self) -> None:
        """Waits (bounded) for the save in flight; raises CheckpointWriteError if it failed."""
        # On a failure, Orbax's close is skipped: it would wait on the failed or stalled thread
        # again (those threads end on their own within the same timeout).
        self.wait_for_pending()
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self.manager.latest_step() or 0, e) from e


class _IteratorState(grain.DatasetIterator):
    """A state already taken, in the shape grain's Orbax handler saves and restores: the
    handler calls get_state() on save and set_state() on restore."""

    def __init__(self, state: Optional[dict]):
        super().__init__()
        self.state = state

    def __next__(self):
        raise StopIteration

    def get_state(self) -> dict:
        return self.state

    def set_state(self, state: dict) -> None:
        self.state = state


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
