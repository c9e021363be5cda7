"""switchmoe: sparse Mixture-of-Experts Transformers in JAX/Flax.

Routing decides, dispatch moves, experts compute. The package reads bottom-up, each folder
importing only the ones before it (tests/test_architecture.py holds the order):

  bootstrap, sharding, distributed   foundations
  data/        corpus, tokenizers, packed batches, what an evaluation scores
  moe/         routing, routers/, losses, balancing, dispatch, experts, expert_parallel,
               settings, layer (the MoE core)
  models/      rotary, normalization, latent_attention, decoder, encoder_decoder, factory
               (the model of a config)
  config, optim, presets             settings and their checks
  runs/        checkpoints, config files, integrity, lock, metrics, restore, summary
  interop/     Hugging Face checkpoints in and out (Switch, Mixtral, OLMoE, Qwen-MoE, DeepSeek-V3)
  training/    trainer, seams, features, init_from, distillation, preemption, memory_fit
  generation, compress/, analysis/, sweeps, cli   tools for a trained run
"""

__version__ = "0.1.0"
