"""GShard (Lepikhin et al. 2021) MoE as a decoder-only LM: top-2 with gates normalised over the
two, random routing of the second expert (keep if 2·g2 > U), MoE every other block.
Routing is causal (model.moe.causal_routing, the default for a decoder-only LM): each token's
two choices claim slots before the next token's, where the paper's encoder order places every
first choice first, which in a decoder would let later tokens displace earlier second choices.

  python -m experiments.train --config=configs/gshard.py --workdir=runs/gshard
  python -m experiments.param_count --config=configs/gshard.py:e128

Variants:
  (none)           CPU-sized (d_model 128, 4 blocks, 8 experts).
  e128, e512, e2048  GShard's MoE dimensions (d_model 1024, d_ff 8192, 16 heads) in a 12-block
                   decoder, with 128/512/2048 experts, for accelerators.

Accelerator presets follow the variant after a comma (switchmoe/presets.py): tpu_v4_32,
tpu_v5p_32, tpu_v5p_64 (TPU chips), gpu_8xh100, gpu_32xh100. Each sets the mesh (experts over
gcd(E, devices) devices, data-parallel over the rest), 256 x 512-token batches, bfloat16, remat
from d_model 1024 up, the dispatch backend for the platform, and C4 streamed through grain:
  python -m experiments.fit --config=configs/gshard.py:e128,tpu_v5p_64 --devices=64
  python -m experiments.train --config=configs/gshard.py:e128,gpu_8xh100 --workdir=... \
      --config.data.spm_model_path=... --config.data.data_dir=...
Per-device memory of every preset: EXPERIMENTS.md, "Will it fit?".

Measured: its own 2,000-step run not yet. This routing at 600 steps of the studies' setup, in
the rank-major slot order it used before causal routing was the default (a non-causal ablation):
1.424 nats, 2.054 bits/byte (EXPERIMENTS.md, "Routing comparison", row "GShard top-2, random
routing †").
"""

from switchmoe import presets
from switchmoe.config import default_config, for_accelerators, gshard_routing, set_size


def sized_config(variant=None):
    config = gshard_routing(default_config())
    config.num_train_steps = 2000
    if variant in ("e128", "e512", "e2048"):
        set_size(
            config,
            d_model=1024,
            d_ff=8192,
            num_layers=12,
            num_heads=16,
            num_experts=int(variant[1:]),
        )
        for_accelerators(config)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; allowed: e128, e512, e2048.")
    return config


def get_config(variant=None):
    """The variant, laid out on an accelerator preset when one follows a comma
    ('base128,tpu_v5p_64'; switchmoe/presets.py lists them)."""
    return presets.build(sized_config, variant, "configs/gshard.py")
