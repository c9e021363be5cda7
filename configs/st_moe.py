"""ST-MoE (Zoph et al. 2022) as a decoder-only LM: top-2, router z-loss 1e-3 beside the
load-balancing loss 1e-2, MoE in one block of four, GEGLU experts.
Routing is causal (model.moe.causal_routing, the default for a decoder-only LM): each token's
two choices claim slots before the next token's, where the paper's encoder order places every
first choice first, which in a decoder would let later tokens displace earlier second choices.

  python -m experiments.train --config=configs/st_moe.py --workdir=runs/st_moe
  python -m experiments.param_count --config=configs/st_moe.py:large

Variants:
  (none)  CPU-sized (d_model 128, 8 blocks so that two are MoE, 8 experts).
  large   ST-MoE-L dimensions (d_model 1024, d_ff 2816, 16 heads, 32 experts) in a 24-block
          decoder, for accelerators.
  b32     ST-MoE-32B dimensions (d_model 5120, d_ff 20480, 64 heads, 64 experts, 27 blocks).

Accelerator presets follow the variant after a comma (switchmoe/presets.py): tpu_v4_32,
tpu_v5p_32, tpu_v5p_64 (TPU chips), gpu_8xh100, gpu_32xh100. Each sets the mesh (experts over
gcd(E, devices) devices, data-parallel over the rest), 256 x 512-token batches, bfloat16, remat
from d_model 1024 up, the dispatch backend for the platform, and C4 streamed through grain:
  python -m experiments.fit --config=configs/st_moe.py:large,tpu_v5p_64 --devices=64
  python -m experiments.train --config=configs/st_moe.py:large,gpu_8xh100 --workdir=... \
      --config.data.spm_model_path=... --config.data.data_dir=...
Per-device memory of every preset: EXPERIMENTS.md, "Will it fit?".

Measured: its own 2,000-step run not yet. Top-2 with z-loss 1e-3 (MoE every other block, relu
experts, rank-major order: a non-causal ablation) at 600 steps of the studies' setup: 1.433 nats,
router z 0.48 against 10.4 without the z-loss (EXPERIMENTS.md, "Routing comparison", row
"ST-MoE top-2 + z-loss 1e-3 †").
"""

from switchmoe import presets
from switchmoe.config import default_config, for_accelerators, set_size, st_moe_routing


def sized_config(variant=None):
    config = st_moe_routing(default_config())
    config.model.num_layers = 8  # two MoE blocks at one in four
    config.model.d_ff = 384  # GEGLU has 3 matrices: 384 keeps the FFN near relu's 512 in size
    config.num_train_steps = 2000
    if variant == "large":
        set_size(config, d_model=1024, d_ff=2816, num_layers=24, num_heads=16, num_experts=32)
        for_accelerators(config)
    elif variant == "b32":
        set_size(config, d_model=5120, d_ff=20480, num_layers=27, num_heads=64, num_experts=64)
        for_accelerators(config)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; allowed: large, b32.")
    return config


def get_config(variant=None):
    """The variant, laid out on an accelerator preset when one follows a comma
    ('base128,tpu_v5p_64'; switchmoe/presets.py lists them)."""
    return presets.build(sized_config, variant, "configs/st_moe.py")
