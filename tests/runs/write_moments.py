"""A checkpoint folder turns read-only at each moment of a save: `python write_moments.py <root>
<moment>` prints that moment's JSON line, then exits (the test bounds how long that takes: a save
that failed in Orbax's background thread used to keep the process from exiting for 20 minutes);
`python write_moments.py <root> --resume` then restarts every moment's run.

The moments, each in its own workdir under <root> with one intact checkpoint (step 10) first:
  idle         between saves: nothing in flight when the folder turns read-only
  after_probe  after the write probe passed, before the step's directory is created
  pending      while the previous save (step 20) is still writing
  at_close     the last save is still writing when the run closes its checkpointer
  stalled      a write that never finishes (Orbax reports it in progress forever)

"Read-only" is what an operator or a full quota does to a folder the trainer is writing: as root
the folder is bind-mounted read-only over itself (files already open stay writable, as they would
after a chmod); otherwise it is chmod-ed 555. Each line holds the exception's message, the step
it names and the seconds the failing call took; a --resume line the steps intact afterwards and
any temporary file left behind.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np

from switchmoe.runs import checkpoints


MOMENTS = ("idle", "after_probe", "pending", "at_close", "stalled")


def freeze(path):
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", path, path], check=True, capture_output=True)
        # The remount fails (busy) while a file opened through the new mount is being written;
        # Orbax's writes are short, so it is retried for up to a second.
        for _ in range(200):
            done = subprocess.run(["mount", "-o", "remount,bind,ro", path], capture_output=True)
            if done.returncode == 0:
                return
            time.sleep(0.005)
        raise OSError(f"could not remount {path} read-only: {done.stderr.decode().strip()}")
    os.chmod(path, 0o555)


def thaw(path):
    if os.geteuid() == 0:
        subprocess.run(["umount", path], check=True, capture_output=True)
    else:
        os.chmod(path, 0o755)


def state(seed):
    rng = np.random.default_rng(seed)
    # Large enough that a save is still writing when save() returns (about 30 MB).
    params = {"w": jnp.asarray(rng.standard_normal((1500, 2500), dtype=np.float32))}
    return params, {"m": jnp.asarray(rng.standard_normal((1500, 2500), dtype=np.float32))}


def moment(root, name):
    workdir = os.path.join(root, name)
    ckpt = checkpoints.Checkpointer(workdir, timeout_seconds=3.0, owner=True)
    ckpt.save(10, *state(10), {"step": 10})
    ckpt.wait_for_pending()
    frozen, in_flight, err, took = ckpt.directory, None, None, None
    try:
        ckpt.save(20, *state(20), {"step": 20})
        if name in ("idle", "after_probe"):
            ckpt.wait_for_pending()
        if name == "after_probe":
            probe = ckpt.check_writable

            def probe_then_freeze(step):
                probe(step)
                freeze(frozen)

            ckpt.check_writable = probe_then_freeze
        else:
            if name == "stalled":
                ckpt.manager.is_saving_in_progress = lambda: True
            freeze(frozen)
        in_flight = ckpt.manager.is_saving_in_progress()
        start = time.monotonic()
        try:
            if name == "at_close":
                ckpt.close()
            else:
                ckpt.save(30, *state(30), {"step": 30})
                ckpt.close()
        except checkpoints.CheckpointWriteError as e:
            err = str(e)
        took = time.monotonic() - start
    finally:
        thaw(frozen)
        # Let the first checkpointer's real background threads end before the next moment (in
        # the stalled moment the save was only reported in progress): a thread still writing at
        # interpreter exit fails on the executor Python has shut down.
        if name == "stalled":
            del ckpt.manager.is_saving_in_progress
        with contextlib.suppress(Exception):
            ckpt.manager.wait_until_finished()
    return {"moment": name, "error": err, "seconds": took, "in_flight": in_flight}


def resumed(root, name):
    """The restarted run of a moment: it lists the intact steps, and its first save removes
    the temporary directories the failed one left."""
    workdir = os.path.join(root, name)
    reopened = checkpoints.Checkpointer(workdir, owner=True)
    steps = reopened.all_steps()
    reopened.save(40, *state(40), {"step": 40})
    reopened.close()
    directory = reopened.directory
    left = sorted(f for f in os.listdir(directory) if "tmp" in f or f.startswith("."))
    return {"moment": name, "steps": steps, "left_behind": left}


if __name__ == "__main__":
    # One moment per process, as a trainer stopped by the error would be (its process exits, and
    # so do Orbax's threads still writing elsewhere in the failed save); then, with --resume,
    # each moment's restart.
    root, what = sys.argv[1], sys.argv[2]
    if what == "--resume":
        for name in MOMENTS:
            print(json.dumps(resumed(root, name)), flush=True)
    else:
        print(json.dumps(moment(root, what)), flush=True)
