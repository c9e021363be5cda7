"""Switch Transformer (Fedus et al. 2022) as a decoder-only LM: top-1 routing, MoE every other
block, capacity factor 1.25 (train) / 2.0 (eval), load-balancing loss 1e-2, router jitter, and
the paper's reduced initialisation (scale 0.1).

  python -m experiments.train --config=configs/switch.py --workdir=runs/switch
  python -m experiments.param_count --config=configs/switch.py:base128

Variants:
  (none)        CPU-sized, as configs/demo.py but with Switch's jitter and init.
  base8..base128  Switch-Base dimensions (d_model 768, d_ff 3072, 12 heads) in a 12-block
                decoder with a 32k vocabulary, 8/16/32/64/128 experts, for accelerators.
  large128      Switch-Large dimensions (d_model 1024, d_ff 4096, 16 heads, 24 blocks).
Parameter counts: see EXPERIMENTS.md / `experiments.param_count`.

Accelerator presets follow the variant after a comma (switchmoe/presets.py): tpu_v4_32,
tpu_v5p_32, tpu_v5p_64 (TPU chips), gpu_8xh100, gpu_32xh100. Each sets the mesh (experts over
gcd(E, devices) devices, data-parallel over the rest), 256 x 512-token batches, bfloat16, remat
from d_model 1024 up, the dispatch backend for the platform, and C4 streamed through grain:
  python -m experiments.fit --config=configs/switch.py:base128,tpu_v5p_64 --devices=64
  python -m experiments.train --config=configs/switch.py:base128,gpu_8xh100 --workdir=... \
      --config.data.spm_model_path=... --config.data.data_dir=...
Per-device memory of every preset: EXPERIMENTS.md, "Will it fit?".

Measured: its own 2,000-step run not yet. This routing (top-1, cf 1.25/2.0, α 1e-2; without the
jitter and 0.1 init) at 600 steps of the studies' setup: 1.453 nats, 2.097 bits/byte
(EXPERIMENTS.md, "Routing comparison", row "Switch top-1").
"""

from switchmoe import presets
from switchmoe.config import default_config, for_accelerators, set_size, switch_routing


BASE_VARIANTS = {f"base{e}": e for e in (8, 16, 32, 64, 128)}  # Switch-Base's expert counts
VARIANTS = (*BASE_VARIANTS, "large128")


def sized_config(variant=None):
    if variant is not None and variant not in VARIANTS:
        raise ValueError(
            f"configs/switch.py: unknown variant {variant!r}; allowed: {', '.join(VARIANTS)} "
            "(or none, for the CPU size)."
        )
    config = switch_routing(default_config())
    config.model.moe.init_scale = 0.1
    config.num_train_steps = 2000
    if variant in BASE_VARIANTS:
        set_size(
            config,
            d_model=768,
            d_ff=3072,
            num_layers=12,
            num_heads=12,
            num_experts=BASE_VARIANTS[variant],
        )
        for_accelerators(config)
    elif variant == "large128":
        set_size(config, d_model=1024, d_ff=4096, num_layers=24, num_heads=16, num_experts=128)
        for_accelerators(config)
    return config


def get_config(variant=None):
    """The variant, laid out on an accelerator preset when one follows a comma
    ('base128,tpu_v5p_64'; switchmoe/presets.py lists them)."""
    return presets.build(sized_config, variant, "configs/switch.py")
