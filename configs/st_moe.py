"""ST-MoE (Zoph et al. 2022) as a decoder-only LM: top-2, router z-loss 1e-3 beside the
load-balancing loss 1e-2, MoE in one block of four, GEGLU experts.
Routing is causal (model.moe.causal_routing, the default for a decoder-only LM): each token's
two choices claim slots before the next token's, where the paper's encoder order places every
first choice first, which in a decoder would let later tokens displace earlier second choices.

  python -m experiments.train --config=configs/st_moe.py --workdir=runs/st_moe
  python -m experiments.param_count --config=configs/st_moe.py:large

Result on this machine: not yet trained to its 2,000 steps (about 10 minutes on 2 cores);
configs/demo.py and EXPERIMENTS.md hold runs of the same model family.

Variants:
  (none)  CPU-sized (d_model 128, 8 blocks so that two are MoE, 8 experts).
  large   ST-MoE-L dimensions (d_model 1024, d_ff 2816, 16 heads, 32 experts) in a 24-block
          decoder, for accelerators.
  b32     ST-MoE-32B dimensions (d_model 5120, d_ff 20480, 64 heads, 64 experts, 27 blocks).
"""

from switchmoe.config import default_config, for_accelerators, set_size, st_moe_routing


def get_config(variant=None):
    config = st_moe_routing(default_config())
    config.model.d_model, config.model.num_layers, config.model.num_heads = 128, 8, 4
    config.model.d_ff = 384  # GEGLU has 3 matrices: 384 keeps the FFN near relu's 512 in size
    config.data.seq_len = 128
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
