"""A checkpoint folder turns read-only at each moment of a save: `python write_moments.py <root>`
prints one JSON line per moment, then exits (the test bounds how long that takes: a save that
failed in Orbax's background thread used to keep the process from exiting for 20 minutes).

The moments, each in its own workdir under <root> with one intact checkpoint (step 10) first:
  idle         between saves: nothing in flight when the folder turns read-only
  after_probe  after the write probe passed, before the step's directory is created
  pending      while the previous save (step 20) is still writing
  at_close     the last save is still writing when the run closes its checkpointer
  stalled      a write that never finishes (Orbax reports it in progress forever)

"Read-only" is what an operator or a full quota does to a folder the trainer is writing: as root
the folder is bind-mounted read-only over itself (files already open stay writable, as they would
after a chmod); otherwise it is chmod-ed 555. Each line holds the exception's message, the step
it names, the seconds the failing call took and the steps intact afterwards.
"""

import json
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np

from switchmoe.runs import checkpoints


def freeze(path):
    if os.geteuid() == 0:
        for args in (["--bind", path, path], ["-o", "remount,bind,ro", path]):
            subprocess.run(["mount", *args], check=True, capture_output=True)
    else:
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
    # The resumed run: it lists the intact steps, and its first save removes the temporary
    # directories the failed one left.
    reopened = checkpoints.Checkpointer(workdir, owner=True)
    steps = reopened.all_steps()
    reopened.save(40, *state(40), {"step": 40})
    reopened.close()
    left = sorted(f for f in os.listdir(frozen) if "tmp" in f or f.startswith("."))
    return {"moment": name, "error": err, "seconds": took, "in_flight": in_flight,
            "steps": steps, "left_behind": left}  # fmt: skip


if __name__ == "__main__":
    for name in ("idle", "after_probe", "pending", "at_close", "stalled"):
        print(json.dumps(moment(sys.argv[1], name)), flush=True)
