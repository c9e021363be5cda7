"""The tiny run of the preemption test (tests/training/test_preemption.py): long enough to be
signalled mid-interval, logging every 5 steps and checkpointing only at the end."""

import os

from tiny import tiny_config


def get_config():
    config = tiny_config(os.environ["SWITCHMOE_TEST_DATA_DIR"], num_train_steps=40)
    config.log_every, config.eval_every, config.checkpoint_every = 5, 40, 40
    config.final_eval = "sample"  # the whole split's evaluation is tested elsewhere
    return config
