"""Switch Transformer (Fedus et al. 2022) and ST-MoE (Zoph et al. 2022) as the papers built them:
T5-style encoder–decoders pre-trained with span corruption (noise density 0.15, mean span 3).

  python -m experiments.train --config=configs/switch_t5.py --workdir=runs/switch_t5
  python -m experiments.param_count --config=configs/switch_t5.py:base128

Variants:
  (none)          CPU-sized Switch encoder–decoder: d_model 128, 4 + 4 blocks, 8 experts top-1
                  every other block, byte tokens with 100 sentinels, 128-token inputs.
  dense           its dense counterpart (every FFN dense: the same FLOPs per token).
  base8..base128  Switch-Base: d_model 768, d_ff 3072, 12 heads, 12 + 12 blocks, MoE every
                  other block, 8/16/32/64/128 experts, ReLU, tied embeddings, 32,128 vocabulary.
  base_dense      T5-Base, the dense counterpart of Switch-Base.
  large128        Switch-Large: d_model 1024, d_ff 4096, 16 heads, 24 + 24 blocks, 128 experts.
  large_dense     T5-Large.
  st_moe_l        ST-MoE-L: d_model 1024, d_ff 2816, 16 heads, 24 + 24 blocks, 32 experts top-2
                  in one block of four, GEGLU, untied embeddings, router z-loss.
  st_moe_l_dense  its dense counterpart.
The paper-sized variants use `for_accelerators` (bf16, Adafactor, 512-token inputs, 256
sequences per batch, a SentencePiece vocabulary: give --config.data.spm_model_path and a TFDS
dataset). Their parameter counts need neither; EXPERIMENTS.md lists them.

Accelerator presets follow the variant after a comma (switchmoe/presets.py): tpu_v4_32,
tpu_v5p_32, tpu_v5p_64 (TPU chips), gpu_8xh100, gpu_32xh100. Each sets the mesh (experts over
gcd(E, devices) devices, data-parallel over the rest), 256 x 512-token batches, bfloat16, remat
from d_model 1024 up, the dispatch backend for the platform, and C4 streamed through grain:
  python -m experiments.fit --config=configs/switch_t5.py:base128,tpu_v5p_64 --devices=64
  python -m experiments.train --config=configs/switch_t5.py:base128,gpu_8xh100 --workdir=... \
      --config.data.spm_model_path=... --config.data.data_dir=...
Per-device memory of every preset: EXPERIMENTS.md, "Will it fit?".

Not measured at today's defaults (an older record, taken with the one-hot einsum backend and
before padding-aware routing, was dropped from here with its timings: no results file held it).
What the shapes alone say: the CPU variant's decoder routes each example's 29 target tokens as one
group, so each expert has 5 slots (ceil(29·1.25/8)) and any imbalance drops; a per-stack group
size is the fix (not built yet).
"""

from switchmoe import presets
from switchmoe.config import (
    default_config,
    for_accelerators,
    set_size,
    st_moe_routing,
    switch_routing,
)

SWITCH_BASE_EXPERTS = (8, 16, 32, 64, 128)
VARIANTS = (
    "dense",
    *(f"base{e}" for e in SWITCH_BASE_EXPERTS),
    "base_dense",
    "large128",
    "large_dense",
    "st_moe_l",
    "st_moe_l_dense",
)


def sized_config(variant=None):
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {VARIANTS}.")
    config = switch_routing(default_config())
    config.model.arch = "encoder_decoder"
    config.data.num_sentinels = 100  # T5's 100 extra ids
    # CPU size: 128-token inputs corrupt to 29-token targets (141 raw tokens, 7 spans).
    # (the default size: d_model 128, 4 blocks per stack, d_ff 512, 8 experts, batches of 32)
    config.num_train_steps = 1500
    config.eval_every = 250
    config.checkpoint_every = 500
    config.num_eval_batches = 16
    if variant is None or variant == "dense":
        if variant == "dense":
            config.model.moe.num_experts = 0
        return config

    base = variant.startswith("base")
    large = variant.startswith("large")
    if variant.startswith("st_moe_l"):
        st_moe_routing(config)
        config.model.tie_embeddings = False
        set_size(config, d_model=1024, d_ff=2816, num_layers=24, num_heads=16, num_experts=32)
    elif large:
        set_size(config, d_model=1024, d_ff=4096, num_layers=24, num_heads=16, num_experts=128)
    elif base:
        experts = 0 if variant == "base_dense" else int(variant[len("base") :])
        set_size(config, d_model=768, d_ff=3072, num_layers=12, num_heads=12, num_experts=experts)
    if variant.endswith("_dense"):
        config.model.moe.num_experts = 0
    return for_accelerators(config)


def get_config(variant=None):
    """The variant, laid out on an accelerator preset when one follows a comma
    ('base128,tpu_v5p_64'; switchmoe/presets.py lists them)."""
    return presets.build(sized_config, variant, "configs/switch_t5.py")
