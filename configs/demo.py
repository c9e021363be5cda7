"""Demo: a small Switch (top-1) byte-level LM on the embedded stdlib corpus, 2 CPU cores.

  make demo        # = python -m experiments.train --config=configs/demo.py --workdir=runs/demo

Reached on this machine (2 CPU cores, 2026-11-24): 800 steps in 4m33s, eval 2.008 bits/byte
(validation unigram entropy 4.677 bits/byte); eval dropped fraction 0.47% at capacity factor 2.0.
"""

from switchmoe.config import default_config


def get_config():
    config = default_config()
    # Small enough for 2 CPU cores: 4 blocks of width 128, MoE in blocks 1 and 3.
    config.model.d_model = 128
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.d_ff = 512
    # Switch: 8 experts, top-1, capacity factor 1.25 in training and 2.0 at evaluation.
    config.model.moe.num_experts = 8
    config.model.moe.num_selected = 1
    config.model.moe.moe_every = 2
    # Index gather/scatter is ~10% faster than one-hot einsum at this size on CPU.
    config.model.moe.backend = "gather"
    config.data.seq_len = 128
    config.batch_size = 32
    config.num_train_steps = 800
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 100
    config.log_every = 50
    config.eval_every = 200
    config.num_eval_batches = 16
    config.checkpoint_every = 200
    return config
