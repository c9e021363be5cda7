"""Dense baseline: the demo/switch model with every block dense (model.moe.num_experts=0).

With top-1 routing an MoE token passes through one expert of width d_ff, so the dense model with
the same d_ff has the same active parameters (and FLOPs) per token, minus the tiny router.

  python -m experiments.train --config=configs/dense.py --workdir=runs/dense

Variants:
  (none)  matches configs/demo.py (d_model 128, d_ff 512): compare with the demo run.
  top2    d_ff 1024: the active parameters of a top-2 model with d_ff 512 experts.
  base    T5-Base dimensions in a 12-block decoder (Switch-Base's dense counterpart).

Accelerator presets follow the variant after a comma (switchmoe/presets.py): tpu_v4_32,
tpu_v5p_32, tpu_v5p_64 (TPU chips), gpu_8xh100, gpu_32xh100. Each sets the mesh (experts over
gcd(E, devices) devices, data-parallel over the rest), 256 x 512-token batches, bfloat16, remat
from d_model 1024 up, the dispatch backend for the platform, and C4 streamed through grain:
  python -m experiments.fit --config=configs/dense.py:base,tpu_v5p_64 --devices=64
  python -m experiments.train --config=configs/dense.py:base,gpu_8xh100 --workdir=... \
      --config.data.spm_model_path=... --config.data.data_dir=...
Per-device memory of every preset: EXPERIMENTS.md, "Will it fit?".

Reached on this machine (2 CPU cores, 2026-12-01, shared with a background sweep, so the wall
time is not its own): 800 steps, eval 1.4010 nats = 2.021 bits/byte on the 65,531 validation bytes
the demo also scores (zlib -9 2.037, xz -9 1.923), against the demo's 1.942 with 32 experts
(top-2, half-width experts: the same active parameters per token). One seed each; EXPERIMENTS.md,
"Expert-count scaling, top-2", gives the seed spread (about 0.005 nats).
"""

from switchmoe import presets
from switchmoe.config import default_config, for_accelerators, set_size


def sized_config(variant=None):
    config = default_config()
    config.model.moe.num_experts = 0
    config.num_train_steps = 800
    config.eval_every = 200
    config.checkpoint_every = 200
    if variant == "top2":
        config.model.d_ff = 1024
    elif variant == "base":
        set_size(config, d_model=768, d_ff=3072, num_layers=12, num_heads=12, num_experts=0)
        for_accelerators(config)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; allowed: top2, base.")
    return config


def get_config(variant=None):
    """The variant, laid out on an accelerator preset when one follows a comma
    ('base128,tpu_v5p_64'; switchmoe/presets.py lists them)."""
    return presets.build(sized_config, variant, "configs/dense.py")
