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
