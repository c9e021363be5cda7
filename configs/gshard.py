"""GShard (Lepikhin et al. 2021) MoE as a decoder-only LM: top-2 with gates normalised over the
two, random routing of the second expert (keep if 2·g2 > U), MoE every other block.
Routing is causal (model.moe.causal_routing, the default for a decoder-only LM): each token's
two choices claim slots before the next token's, where the paper's encoder order places every
first choice first, which in a decoder would let later tokens displace earlier second choices.

  python -m experiments.train --config=configs/gshard.py --workdir=runs/gshard
  python -m experiments.param_count --config=configs/gshard.py:e128

Result on this machine: not yet trained to its 2,000 steps (about 10 minutes on 2 cores);
configs/demo.py and EXPERIMENTS.md hold runs of the same model family.

Variants:
  (none)           CPU-sized (d_model 128, 4 blocks, 8 experts).
  e128, e512, e2048  GShard's MoE dimensions (d_model 1024, d_ff 8192, 16 heads) in a 12-block
                   decoder, with 128/512/2048 experts, for accelerators.
"""

from switchmoe.config import default_config, for_accelerators, set_size


def get_config(variant=None):
    config = default_config()
    moe = config.model.moe
    moe.num_selected = 2
    moe.gate_norm = "normalized"
    moe.random_routing = True
    moe.random_routing_threshold = 0.5
    moe.moe_every = 2
    moe.train_capacity_factor = 1.25
    moe.eval_capacity_factor = 2.0
    moe.load_balancing_weight = 1e-2
    config.model.d_model, config.model.num_layers, config.model.num_heads = 128, 4, 4
    config.model.d_ff = 512
    config.data.seq_len = 128
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
