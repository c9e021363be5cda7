"""A 2-trial sweep of a tiny model, for the sweep/report smoke test (tests/tools/test_sweep.py)."""

import os

from tiny import tiny_config


def get_config():
    config = tiny_config(os.environ["SWITCHMOE_TEST_DATA_DIR"], num_train_steps=6)
    config.log_every, config.eval_every, config.checkpoint_every = 2, 6, 6
    config.final_eval = "sample"  # the whole split's evaluation is tested elsewhere
    return config


def get_sweep():
    return [{"model.moe.train_capacity_factor": f} for f in (0.5, 2.0)]
