"""One trainer per workdir: a lock file naming its holder, which a crashed run cannot leave stuck.

Two trainers on one workdir interleave their checkpoints and metrics (seen: both exited 0 with
metrics rows written twice), so `train_and_evaluate` takes `<workdir>/LOCK` before it writes
anything. The file holds the holder's host, process id and that process's start time; it is
created with O_EXCL, so of two trainers starting at once exactly one gets it.

A lock is stale, and is taken over, when its holder ran on this host and that process no longer
exists (or the id now belongs to a process that started later: ids are reused). A lock held from
another host cannot be checked from here, so it is refused with a message saying how to clear it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

LOCK_FILE = "LOCK"


class WorkdirLocked(RuntimeError):
    """Another live trainer holds the workdir."""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start_time: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = _start_time(pid)
    return start_time is None or now is None or now == start_time


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for this process (see module docstring)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.held = False

    def holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as stale below

    def acquire(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile
                self._refuse_if_live(holder, me["host"])
                os.remove(self.path)  # stale: its holder is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise WorkdirLocked(f"could not take {self.path}: another trainer keeps taking it.")

    def _refuse_if_live(self, holder: dict, host: str) -> None:
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return
        if holder.get("host") != host:
            raise WorkdirLocked(
                f"workdir {self.workdir} is held by process {pid} on host {holder.get('host')} "
                f"(since {holder.get('since')}), which cannot be checked from here. If that run "
                f"has ended, delete {self.path}; else use another workdir."
            )
        if _alive(pid, holder.get("start_time")):
            raise WorkdirLocked(
                f"workdir {self.workdir} is held by a running trainer: process {pid} on this host "
                f"(since {holder.get('since')}). Wait for it, stop it, or use another workdir."
            )

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid():
                os.remove(self.path)
            self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def held(workdir: str, take: bool = True):
    """The workdir's lock for the duration of a `with` block; `take=False` (a run's other
    processes, which write nothing of their own) holds nothing."""
    lock = WorkdirLock(workdir)
    if take:
        lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
