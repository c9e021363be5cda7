"""Damaged checkpoints: found, reported, set aside, and never loaded.

The reference is an undamaged run: a run whose newest checkpoint (step 20) is damaged the way
disks and interrupted copies damage files must resume from step 10 and end with the undamaged
run's final parameters bitwise; `restore_run` must return step 10's parameters with a warning,
and refuse step 20 with a message listing the intact steps.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tiny import tiny_config

from switchmoe.runs import checkpoints, integrity, restore_run
from switchmoe.training.trainer import train_and_evaluate

quiet = lambda line: None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(config, the undamaged run's workdir, a run stopped after its step-20 checkpoint)."""
    root = tmp_path_factory.mktemp("integrity")
    config = tiny_config(str(root / "tfds"), num_train_steps=30, keep_checkpoints=3)
    straight, stopped = str(root / "straight"), str(root / "stopped")
    train_and_evaluate(config, straight, log=quiet)
    train_and_evaluate(config, stopped, stop_at=20, log=quiet)
    assert checkpoints.Checkpointer(stopped).all_steps() == [10, 20]
    return config, straight, stopped


def largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_bytes(path, n=64):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        start = len(data) // 2
        for i in range(start, min(start + n, len(data))):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def empty(directory):
    shutil.rmtree(directory)
    os.makedirs(directory)


DAMAGE = {
    "params_truncated": lambda step: truncate(largest_file(os.path.join(step, "params"))),
    "params_deleted": lambda step: os.remove(largest_file(os.path.join(step, "params"))),
    "params_bit_flipped": lambda step: flip_bytes(largest_file(os.path.join(step, "params"))),
    "opt_state_truncated": lambda step: truncate(largest_file(os.path.join(step, "opt_state"))),
    "metadata_deleted": lambda step: shutil.rmtree(os.path.join(step, "meta")),
    "step_directory_emptied": empty,
}


RESUMED = ("params_bit_flipped", "opt_state_truncated", "metadata_deleted")


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_reported_and_the_run_falls_back(runs, tmp_path, damage):
    config, straight, stopped = runs
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    step_dir = os.path.join(workdir, checkpoints.CHECKPOINT_DIR, "20")
    DAMAGE[damage](step_dir)

    # A notebook never gets damaged parameters: the latest intact step, with a warning. (It
    # reads no optimizer state: with only that damaged, step 20's parameters are intact.)
    if damage.startswith("opt_state"):
        _, params = restore_run(workdir)
        assert leaves_equal(params, restore_run(straight, step=20)[1])
    else:
        with pytest.warns(UserWarning, match="checkpoint 20 is damaged"):
            _, params = restore_run(workdir)
        assert leaves_equal(params, restore_run(straight, step=10)[1])
        with pytest.raises(
            ValueError, match=r"checkpoint 20 is damaged.*Intact checkpoints: \[10\]"
        ):
            restore_run(workdir, step=20)

    # Resuming reports the damage, sets the step aside and reaches the undamaged final state.
    # The trainer reads a step through the same checks as restore_run above, plus the optimizer
    # state's: it resumes here for one damage of each item (the others cost a run each).
    if damage not in RESUMED:
        return
    lines = []
    train_and_evaluate(config, workdir, log=lines.append)
    assert any("checkpoint 20 is damaged" in line for line in lines), lines
    assert any("Falling back to checkpoint 10" in line for line in lines), lines
    assert os.path.isdir(os.path.join(workdir, checkpoints.CHECKPOINT_DIR, "damaged", "20"))
    _, final = restore_run(workdir)
    _, expected = restore_run(straight)
    assert leaves_equal(final, expected)


def test_checksums_see_one_flipped_bit_and_swapped_values():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    base = integrity.checksums({"x": x})
    flipped = x.copy()
    flipped.view(np.uint32)[1, 2] ^= 1 << 7
    swapped = x.copy()
    swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
    assert integrity.checksums({"x": flipped}) != base
    assert integrity.checksums({"x": swapped})["['x']"][0] == base["['x']"][0]  # same sum
    assert integrity.checksums({"x": swapped}) != base  # but not the same weighted sum
    # The sums are the uint32 sums, modulo 2**32, of the values' bits.
    u = x.view(np.uint32).reshape(-1).astype(np.uint64)
    expected = [int(u.sum() % 2**32), int((u * np.arange(1, 13)).sum() % 2**32)]
    assert base["['x']"] == expected


def test_a_workdir_removed_mid_run_stops_it_with_the_path_named(runs, tmp_path):
    config, _, _ = runs
    workdir = str(tmp_path / "gone")

    def remove_at_step_10(line):
        if line.startswith("step 10/"):
            while os.path.exists(workdir):  # an async save may be writing into it
                shutil.rmtree(workdir, ignore_errors=True)

    with pytest.raises(checkpoints.CheckpointWriteError, match=f"cannot write .*{workdir}"):
        train_and_evaluate(
            tiny_config(config.data.data_dir, checkpoint_every=5, log_every=5),
            workdir,
            log=remove_at_step_10,
        )


def can_freeze(tmp_path):
    """Whether write_moments.py can make a folder read-only here (root needs mount rights)."""
    if os.geteuid() != 0:
        return True
    probe = str(tmp_path / "bind_probe")
    os.makedirs(probe)
    done = subprocess.run(["mount", "--bind", probe, probe], capture_output=True)
    if done.returncode == 0:
        subprocess.run(["umount", probe], capture_output=True)
    return done.returncode == 0


def test_a_folder_turned_read_only_at_any_moment_stops_the_save_with_its_step(tmp_path):
    """Each moment of write_moments.py: the failing call raises CheckpointWriteError naming the
    step that failed and the newest intact checkpoint within its bound, earlier checkpoints stay
    intact, the resumed run leaves no temporary directory, and the process exits promptly."""
    if not can_freeze(tmp_path):
        pytest.skip("cannot bind-mount a folder read-only here (root without mount rights)")
    script = os.path.join(os.path.dirname(__file__), "write_moments.py")

    def script_lines(what):
        start = time.monotonic()
        done = subprocess.run([sys.executable, script, str(tmp_path), what], capture_output=True,
                              text=True, timeout=240)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert time.monotonic() - start < 60  # no thread left waiting on a failed save
        return [json.loads(line) for line in done.stdout.splitlines()]

    moments = ("idle", "after_probe", "pending", "at_close", "stalled")
    rows = {name: script_lines(name)[0] for name in moments}
    for row in script_lines("--resume"):
        rows[row["moment"]].update(row)
    failing_step = {"idle": 30, "after_probe": 30, "pending": 20, "at_close": 20, "stalled": 20}
    assert set(rows) == set(failing_step)
    for name, row in rows.items():
        intact = [10, 20] if failing_step[name] == 30 else [10]
        assert row["error"] is not None, name
        assert row["error"].startswith(f"cannot write checkpoint {failing_step[name]} under "), row
        assert f"the latest intact checkpoint: {max(intact)}." in row["error"], row
        assert row["steps"] == intact, row
        assert row["left_behind"] == [], row
        assert row["in_flight"] == (name in ("pending", "at_close", "stalled")), row
        if name == "stalled":
            assert "checkpoint_timeout_seconds=3" in row["error"]
            assert 3.0 <= row["seconds"] < 10.0, row
        else:
            assert row["seconds"] < 3.0, row
