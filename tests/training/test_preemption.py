"""Preemption: SIGTERM in the middle of a checkpoint interval saves the step the run is on and
exits with status 75; rerunning resumes from it, and the run then equals an uninterrupted one
bitwise (parameters, optimizer state and every metrics row, timings aside). A second SIGTERM
during the save is ignored. The reference is the same config trained straight through here.
"""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
from preempt_config import get_config

from switchmoe.models import resolve
from switchmoe.runs import checkpoints, metrics, restore_run
from switchmoe.runs.workdir_lock import LOCK_FILE
from switchmoe.sharding import make_mesh
from switchmoe.training.preemption import PREEMPTED_EXIT
from switchmoe.training.trainer import Trainer, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


def test_sigterm_saves_the_step_it_is_on_and_the_resumed_run_equals_an_uninterrupted_one(
    data_dir, tmp_path, monkeypatch
):
    env = {**os.environ, "SWITCHMOE_TEST_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([HERE, os.path.join(ROOT, "tests")])}  # fmt: skip
    preempted = str(tmp_path / "preempted")
    child = subprocess.Popen(
        [sys.executable, "-m", "experiments.train",
         f"--config={os.path.join(HERE, 'preempt_config.py')}", f"--workdir={preempted}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in child.stdout:  # signal once the run is well under way, between log rows
        if line.startswith("step 20/"):
            break
    child.send_signal(signal.SIGTERM)
    child.send_signal(signal.SIGTERM)  # a second signal, during the step or the save
    _, err = child.communicate(timeout=300)
    assert child.returncode == PREEMPTED_EXIT, err
    assert "preempted: SIGTERM: stopped after step" in err
    (step,) = checkpoints.Checkpointer(preempted).all_steps()
    assert 20 <= step < 40
    assert not os.path.exists(os.path.join(preempted, LOCK_FILE))

    monkeypatch.setenv("SWITCHMOE_TEST_DATA_DIR", data_dir)
    config = get_config()
    quiet = lambda line: None
    train_and_evaluate(config, preempted, log=quiet)
    straight = str(tmp_path / "straight")
    train_and_evaluate(config, straight, log=quiet)

    drop_timing = lambda rs: [{k: v for k, v in r.items() if "per_second" not in k} for r in rs]
    assert drop_timing(metrics.read_metrics(preempted)) == drop_timing(
        metrics.read_metrics(straight)
    )
    config = resolve(config)
    trainer = Trainer(config, make_mesh(config.mesh))
    states = [
        checkpoints.Checkpointer(w).restore(40, *trainer.abstract_state())[:2]
        for w in (preempted, straight)
    ]
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(a, b)
    assert restore_run(preempted)[0].num_train_steps == 40
