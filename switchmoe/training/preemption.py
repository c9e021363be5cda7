"""Preemption: SIGTERM and SIGINT (how TPU spot VMs, Kubernetes and SLURM stop a job, and
Ctrl-C) make the trainer finish the step it is on, save a checkpoint of that step, wait for the
save to complete, and stop by raising `Preempted`; the entry points then exit with status
`PREEMPTED_EXIT` (75, sysexits' EX_TEMPFAIL: try again later). Rerunning the same command
resumes from that step, and the resumed run equals an uninterrupted one bitwise: the metrics
of the steps since the last logged row (whose mean the next row reports) are saved in the
checkpoint's metadata and restored with it.

Every process of a multi-process run must stop at the same step, or their collectives would
deadlock and their checkpoints disagree. A signal only sets a flag in the process that got it;
every `SYNC_EVERY` steps the processes all-gather their flags (one int32[2] collective) and all
stop at that step if any process has one. The all-gather blocks the host until the device has
finished the step, which costs the overlap of dispatch and compute, hence not every step: a
multi-process run stops within SYNC_EVERY steps of the signal (a single process, which needs no
agreement, stops after the step it is on). JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`) would agree too, but only on what the
coordination service's own SIGTERM notifier saw (not Ctrl-C, and not with a Python handler
installed). The same gather agrees on the time-based checkpoint (`checkpoint_every_minutes`),
whose clocks differ between processes.

A second signal while the step finishes or the checkpoint is written is ignored, with a line
saying so: the save completes. (Orbax writes a checkpoint into a temporary directory and renames
it when complete, so even SIGKILL leaves the earlier checkpoints intact.)
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

PREEMPTED_EXIT = 75  # sysexits.h EX_TEMPFAIL: the job may be retried (rerun resumes)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
PENDING_KEY = "pending_metrics"  # in a checkpoint's metadata: the metrics not yet logged
SYNC_EVERY = 10  # steps between the processes' agreements of a multi-process run


class Preempted(Exception):
    """The run stopped on a signal after saving the step it was on."""

    def __init__(self, signal_name: str, step: int, workdir: str):
        self.step = step
        super().__init__(
            f"{signal_name}: stopped after step {step}, saved as a checkpoint under {workdir}; "
            "rerun the same command to resume from it."
        )


class PreemptionWatch:
    """`with PreemptionWatch(log, minutes) as watch:` catches SIGTERM and SIGINT for the block
    (main thread only: elsewhere signals cannot be caught, and nothing changes). `check()` at
    each step boundary says, identically on every process, whether to stop and whether the
    time-based checkpoint is due."""

    def __init__(self, log: Callable[[str], None], checkpoint_minutes: float = 0.0):
        self.log = log
        self.interval = 60.0 * checkpoint_minutes
        self.last_save = time.monotonic()
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self.log(f"{name}: finishing this step, saving it, then stopping.")
        else:
            self.log(
                f"{name} again: ignored until the checkpoint is saved (SIGKILL stops at once)."
            )

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "signal on another process"

    def check(self, step: int) -> tuple[bool, bool]:
        """(stop now, the time-based checkpoint is due) after `step`, the same on every
        process."""
        multi = jax.process_count() > 1
        if multi and step % SYNC_EVERY:
            return False, False
        flags = np.array(
            [self.received is not None,
             self.interval > 0 and time.monotonic() - self.last_save >= self.interval],
            np.int32,
        )  # fmt: skip
        if multi:
            flags = np.max(np.asarray(multihost_utils.process_allgather(flags)), axis=0)
        return bool(flags[0]), bool(flags[1])

    def saved(self) -> None:
        self.last_save = time.monotonic()


def pending_to_json(pending: list[dict[str, Any]]) -> dict:
    """The host values of the steps' metrics not yet logged, as JSON (exact: every float32 is a
    float64, which JSON writes and reads back exactly)."""
    host = jax.device_get(pending)
    if not host:
        return {"steps": []}
    dtypes = {k: str(np.asarray(v).dtype) for k, v in host[0].items()}
    steps = [{k: np.asarray(v).tolist() for k, v in row.items()} for row in host]
    return {"dtypes": dtypes, "steps": steps}


def pending_from_json(saved: dict | None) -> list[dict[str, np.ndarray]]:
    if not saved or not saved.get("steps"):
        return []
    dtypes = saved["dtypes"]
    return [{k: np.asarray(v, dtypes[k]) for k, v in row.items()} for row in saved["steps"]]
