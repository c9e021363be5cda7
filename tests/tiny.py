"""A tiny config for end-to-end tests: seconds per run on 2 CPU cores."""

from switchmoe.config import default_config


def tiny_config(data_dir: str, **overrides):
    c = default_config()
    c.data.data_dir = data_dir
    c.data.max_files = 40  # a 40-file corpus builds in about a second
    c.data.seq_len = 32
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.d_ff = 64
    c.model.moe.num_experts = 4
    c.model.moe.moe_every = 2
    c.batch_size = 8
    c.num_train_steps = 20
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 5
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    c.num_eval_batches = 2
    return apply_overrides(c, overrides)


def apply_overrides(config, overrides: dict):
    """Sets dotted keys ({"model.moe.num_experts": 8}) as --config.KEY=VALUE would."""
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def train_straight_and_interrupted(config, tmp_path, stop_at=10, signal_after=None):
    """Trains `config` once straight through and once stopped at `stop_at`, then resumed.

    With `signal_after=N` the run is preempted instead: SIGTERM arrives while it logs step N
    (a multiple of log_every), so it stops after step N + 1 and saves that step (see
    switchmoe/training/preemption.py); `stop_at` is then that step. Returns both workdirs, after
    checking that the interrupted run saved exactly at `stop_at` and that both logged the same
    metrics (timings aside).
    """
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from switchmoe.runs import checkpoints, metrics  # noqa: PLC0415
    from switchmoe.training.preemption import Preempted  # noqa: PLC0415
    from switchmoe.training.trainer import train_and_evaluate  # noqa: PLC0415

    quiet = lambda line: None
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train_and_evaluate(config, straight, log=quiet)
    if signal_after is None:
        train_and_evaluate(config, interrupted, stop_at=stop_at, log=quiet)
    else:

        def preempt(line):
            if line.startswith(f"step {signal_after}/"):
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            train_and_evaluate(config, interrupted, log=preempt)
            raise AssertionError("the signalled run was not preempted")
        except Preempted as e:
            stop_at = e.step
        assert stop_at == signal_after + 1
    assert checkpoints.Checkpointer(interrupted).all_steps() == [stop_at]
    train_and_evaluate(config, interrupted, log=quiet)
    drop_timing = lambda rs: [{k: v for k, v in r.items() if "per_second" not in k} for r in rs]
    assert drop_timing(metrics.read_metrics(straight)) == drop_timing(
        metrics.read_metrics(interrupted)
    )
    return straight, interrupted
