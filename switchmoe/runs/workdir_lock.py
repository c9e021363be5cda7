"""One trainer per workdir: a lock that names its holder, which a crashed run cannot leave stuck
and two trainers starting at the same instant cannot both take.

Two trainers on one workdir interleave their checkpoints and metrics (seen: both exited 0 with
metrics rows written twice), so `train_and_evaluate` takes `<workdir>/LOCK` before it writes
anything.

How: the trainer opens LOCK and holds an exclusive `flock` on it for the run's life; the kernel
grants it to exactly one process and drops it when that process exits, however it exits. The
holder then writes its host, process id and that process's start time into the file, for the
message a refused trainer prints. A file whose name no longer points at the locked inode (its
holder released it, unlinking the name, between our open and our flock) is not the lock: the
acquirer checks and retries. This replaces creating the file with O_EXCL and writing its content
after, which let a second trainer read an empty file in between, take it for stale and delete a
live lock (both trainers held it in 28 of 200 simultaneous starts).

A trainer that gets the flock still reads what the file says, for two holders that do not
flock: a trainer of an older switchmoe (a live process named there on this host: refused), and a
run on another host whose file system does not share locks (refused with a message saying how
to clear it, since a process elsewhere cannot be checked from here). A file naming a process of
this host that no longer exists (or whose id now belongs to a later process) is stale and taken.
A holder's details may be missing for an instant after it takes the lock: a refused trainer
waits up to `GRACE_SECONDS` for them before it reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

LOCK_FILE = "LOCK"
GRACE_SECONDS = 1.0


class WorkdirLocked(RuntimeError):
    """Another live trainer holds the workdir."""


class WorkdirWriteError(OSError):
    """A workdir file cannot be written (read-only folder, full disk): the message names the
    file; the OS error is its cause."""

    @classmethod
    def of(cls, path: str, error: OSError, what: str = "") -> "WorkdirWriteError":
        reason = error.strerror or str(error)
        return cls(f"cannot write {path} ({reason}){what}")


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
        self._fd: int | None = None

    def holder(self) -> dict | None:
        """What the lock file says (None: no file; {}: empty or unreadable)."""
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as e:
            if isinstance(e, WorkdirWriteError):
                raise
            raise WorkdirWriteError.of(self.path, e, ": the workdir must be writable") from e

    def _acquire(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
            except BlockingIOError:
                os.close(fd)
                taken = False
            if not taken:  # outside the handler: the refusal is not "raised from" EAGAIN
                self._refuse_locked()
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)  # released and unlinked meanwhile: open the new file
                continue
            try:
                self._refuse_if_live(self.holder() or {}, me["host"])
            except WorkdirLocked:
                os.close(fd)
                raise
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
                os.fsync(fd)
            except OSError:
                os.remove(self.path)  # ours (we hold the flock): leave nothing behind
                os.close(fd)
                raise
            self._fd, self.held = fd, True
            return
        raise WorkdirLocked(f"could not take {self.path}: another trainer keeps taking it.")

    def _refuse_locked(self) -> None:
        """Another process holds the flock: refuse, naming it once it has written its details."""
        deadline = time.monotonic() + GRACE_SECONDS
        holder = self.holder() or {}
        while not holder.get("pid") and time.monotonic() < deadline:
            time.sleep(0.05)
            holder = self.holder() or {}
        if holder.get("pid"):
            where = "this host" if holder.get("host") == socket.gethostname() else holder["host"]
            raise self._held_by(holder, where)
        raise WorkdirLocked(
            f"workdir {self.workdir} is held by a running trainer (it has not written its "
            "details yet). Wait for it, stop it, or use another workdir."
        )

    def _refuse_if_live(self, holder: dict, host: str) -> None:
        """What the file says, once we hold the flock (module docstring)."""
        pid = holder.get("pid")
        if not isinstance(pid, int) or (holder.get("host") == host and pid == os.getpid()):
            return
        if holder.get("host") != host:
            raise WorkdirLocked(
                f"workdir {self.workdir} is held by process {pid} on host {holder.get('host')} "
                f"(since {holder.get('since')}), which cannot be checked from here. If that run "
                f"has ended, delete {self.path}; else use another workdir."
            )
        if _alive(pid, holder.get("start_time")):
            raise self._held_by(holder, "this host")

    def _held_by(self, holder: dict, where: str) -> WorkdirLocked:
        return WorkdirLocked(
            f"workdir {self.workdir} is held by a running trainer: process {holder['pid']} on "
            f"{where} (since {holder.get('since')}). Wait for it, stop it, or use another workdir."
        )

    def release(self) -> None:
        """Unlinks the file, then drops the flock (in that order, so that whoever opened the old
        file sees it is no longer the lock)."""
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            os.close(self._fd)
            self._fd, self.held = None, False

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
