"""Demo: a small top-2 MoE byte-level LM on the embedded stdlib corpus, 2 CPU cores.

  make demo        # = python -m experiments.train --config=configs/demo.py --workdir=runs/demo

32 experts per MoE layer, two per token with gates normalised over the two (GShard), experts of
half the dense width so that a token costs what it costs in the dense model: the setup on which
this project's expert-count study finds quality improving with the number of experts
(EXPERIMENTS.md, "Expert-count scaling"). Switch's top-1 with raw gates needs far longer runs
for many experts to pay off (EXPERIMENTS.md, "the diagnosis").

Reached (experiments/results/demo/summary.json, 2 CPU cores): 1.902 bits/byte [1.776, 2.056]
on the whole validation split (35 documents, 619,314 bytes), where zlib -9 needs 2.016, xz -9
1.735 and xz -9 after reading the training split 1.419 (unigram entropy 4.521); eval dropped
fraction 1.03% at capacity factor 2.0. From a fresh clone on 2026-12-07, `make install` took
1m25s and `make demo` 10m24s on this 2-core machine class
(experiments/results/fresh_clone/fresh_clone.json; `python -m experiments.time_fresh_clone`).
"""

from switchmoe.config import default_config


def get_config():
    config = default_config()
    # The default size (switchmoe/config.py), small enough for 2 CPU cores: 4 blocks of width
    # 128 and d_ff 512, 128-token sequences, batches of 32; MoE in blocks 1 and 3.
    # 32 experts, top-2, capacity factor 1.25 in training and 2.0 at evaluation.
    config.model.moe.num_experts = 32
    config.model.moe.num_selected = 2
    config.model.moe.gate_norm = "normalized"
    config.model.moe.expert_d_ff = 256
    # Routing groups of 8 sequences: with 32 experts, one 128-token sequence would give each
    # expert 10 slots, and small groups drop more tokens for the same imbalance.
    config.model.moe.group_size = 1024
    # Index gather/scatter is ~10% faster than one-hot einsum at this size on CPU.
    config.model.moe.backend = "gather"
    config.num_train_steps = 800
    config.eval_every = 200
    config.checkpoint_every = 200
    return config
