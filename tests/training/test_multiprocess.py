"""Two processes on localhost (jax.distributed, gloo CPU collectives) train with the experts split
across them and reproduce the single-process losses."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import tiny_config

from switchmoe.data.pipeline import corpus_statistics
from switchmoe.runs import metrics
from switchmoe.training.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {
    "num_train_steps": 4,
    "log_every": 1,
    "eval_every": 4,
    "checkpoint_every": 4,
    "model.moe.num_experts": 4,
    "model.moe.num_selected": 2,
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flag_value(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


# The streaming pipeline only: it is the one whose per-process state the checkpoints must keep,
# and the packed pipeline's per-process slices are tested without processes (test_data.py:
# test_process_slices_concatenate_to_the_global_batch). Each variant costs ~45 s of the suite.
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["stream"])
def test_two_processes_match_one(tmp_path, pipeline):
    data_dir = str(tmp_path / "tfds")
    config = tiny_config(data_dir, **OVERRIDES, **{"data.pipeline": pipeline})
    corpus_statistics(config.data)  # build the corpus before the processes start
    single = str(tmp_path / "single")
    train_and_evaluate(config, single, log=lambda line: None)

    # Each process has 2 CPU devices; mesh expert=4 puts 1 expert per device, 2 per process.
    settings = {
        **OVERRIDES,
        "data.data_dir": data_dir,
        "data.max_files": 40,
        "data.seq_len": 32,
        "model.d_model": 32,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.d_ff": 64,
        "batch_size": 8,
        "optimizer.learning_rate": 1e-2,
        "optimizer.warmup_steps": 5,
        "num_eval_batches": 2,
        "mesh.expert": 4,
        # The demo's routing settings back to the tiny config's (top-2 is set by OVERRIDES).
        "model.moe.gate_norm": "raw",
        "model.moe.expert_d_ff": 64,
        "model.moe.group_size": 32,
        "data.pipeline": pipeline,
    }
    port = free_port()
    workdir = str(tmp_path / "two")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.train",
                "--config=configs/demo.py",
                f"--workdir={workdir}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ]
            + [f"--config.{k}={flag_value(v)}" for k, v in settings.items()],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=400)[0])
        finally:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    losses = lambda w: [r["train/loss"] for r in metrics.read_metrics(w)]
    assert len(losses(workdir)) == 4
    np.testing.assert_allclose(losses(workdir), losses(single), rtol=1e-5)
    # Each process saved its own data iterator state beside the shared checkpoint.
    saved = sorted(os.listdir(os.path.join(workdir, "checkpoints", "4", "data")))
    assert [f for f in saved if f.endswith(".json")] == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_auto_leaves_the_cluster_to_jax_distributed(monkeypatch):
    from switchmoe import distributed  # noqa: PLC0415

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setenv("SWITCHMOE_COORDINATOR_ADDRESS", "auto")
    assert distributed.initialize() is False  # one process here: jax found no other host
    assert calls == [((), {})]
