"""Two processes on localhost (jax.distributed, gloo CPU collectives) train with the experts split
across them, are preempted (one of them gets SIGTERM: both save the step they agree on), resume,
and reproduce the single-process losses."""

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import tiny_config

from switchmoe.data.pipeline import corpus_statistics
from switchmoe.runs import checkpoints, metrics
from switchmoe.training.preemption import PREEMPTED_EXIT, SYNC_EVERY
from switchmoe.training.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {
    "num_train_steps": 12,
    "log_every": 1,
    "eval_every": 12,
    "checkpoint_every": 12,
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
def test_two_processes_preempted_and_resumed_match_one(tmp_path, pipeline):
    data_dir = str(tmp_path / "tfds")
    config = tiny_config(data_dir, **OVERRIDES, **{"data.pipeline": pipeline})
    corpus_statistics(config.data)  # build the corpus before the processes start
    single = str(tmp_path / "single")
    # The reference's training losses are what is compared: its final evaluation scores a sample.
    train_and_evaluate(
        tiny_config(data_dir, **OVERRIDES, **{"data.pipeline": pipeline, "final_eval": "sample"}),
        single,
        log=lambda line: None,
    )

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
    workdir = str(tmp_path / "two")

    def launch():
        port = free_port()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        return [
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
            )  # fmt: skip
            for i in range(2)
        ]

    def finish(procs, head=""):
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=400)[0])
            finally:
                p.kill()
        return [p.returncode for p in procs], [head + outputs[0], outputs[1]]

    # Preempted: SIGTERM to process 1 only, once process 0 has logged step 2. The processes
    # agree at step SYNC_EVERY = 10, both save it and exit with PREEMPTED_EXIT.
    procs = launch()
    head = ""
    for line in procs[0].stdout:
        head += line
        if line.startswith("step 2/"):
            break
    procs[1].send_signal(signal.SIGTERM)
    codes, outputs = finish(procs, head)
    assert codes == [PREEMPTED_EXIT] * 2, outputs[0][-3000:] + outputs[1][-3000:]
    assert checkpoints.Checkpointer(workdir).all_steps() == [SYNC_EVERY]
    # Rerun: both resume from step 10 and finish.
    codes, outputs = finish(launch())
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    losses = lambda w: [r["train/loss"] for r in metrics.read_metrics(w)]
    assert len(losses(workdir)) == OVERRIDES["num_train_steps"]
    # A wrong data position or a lost optimizer state after the resume changes the loss by far
    # more than the collectives' rounding.
    np.testing.assert_allclose(losses(workdir), losses(single), rtol=1e-5)
    # Each process saved its own data iterator state beside the shared checkpoint.
    saved = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(SYNC_EVERY), "data")))
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
