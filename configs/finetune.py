"""Fine-tuning a trained MoE run with ST-MoE's recipe (Zoph et al. 2022, §4 and Switch §4.3).

  make demo    # the run to start from: runs/demo
  python -m experiments.train --config=configs/finetune.py --workdir=runs/demo_ft
  python -m experiments.train --config=configs/finetune.py:all --workdir=runs/demo_ft_all
  python -m experiments.sweep --config=configs/finetune.py --workdir=runs/sweeps/finetune \
      --seeds=0,1 --config.init_from=$PWD/runs/demo      # every freeze pattern, 2 seeds

The demo's model, started from runs/demo (`--config.init_from=WORKDIR[:STEP]` for another), on a
small task where an MoE overfits: half of the validation split (files the demo never trained on),
evaluated on the other half (the whole half at the end of the run; the measured numbers in
EXPERIMENTS.md scored only its first 33 KB, before that was fixed). ST-MoE's and Switch's
findings, as settings:
  - freezing the MoE layers (routers and experts) fine-tunes almost as well as updating
    everything, and is cheaper: optimizer.freeze='moe' (the variant `all` updates everything);
  - sparse models want more dropout inside the experts than elsewhere: expert dropout 0.4 with
    0.1 on the dense layers (Switch Table 4's best);
  - sparse models prefer smaller batches and higher learning rates than dense ones: batches of 16
    (half the pre-training batch), a constant 1e-3 after 20 warm-up steps;
  - the balance losses stay on (their weights are the pre-training ones).

Reached: see EXPERIMENTS.md, "Fine-tuning and upcycling".
"""

import os

from switchmoe.sweeps import load_config_module


def get_config(variant=None):
    if variant not in (None, "all"):
        raise ValueError(f"configs/finetune.py: unknown variant {variant!r}; allowed: all.")
    config = load_config_module(os.path.join(os.path.dirname(__file__), "demo.py")).get_config()
    config.init_from = "runs/demo"
    config.data.train_split = "validation[:50%]"
    config.data.eval_split = "validation[50%:]"
    config.optimizer.freeze = "none" if variant == "all" else "moe"
    config.model.dropout_rate = 0.1
    config.model.moe.expert_dropout = 0.4
    config.batch_size = 16
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 20
    config.num_train_steps = 300
    config.eval_every = 100
    config.checkpoint_every = 100
    return config


def get_sweep():
    """ST-MoE's Table 6 question at CPU scale: which parameters to update when fine-tuning."""
    return [
        {"optimizer.freeze": "re:."},  # nothing updated: the pre-trained model's loss
        {"optimizer.freeze": "none"},
        {"optimizer.freeze": "moe"},  # update the non-MoE parameters only
        {"optimizer.freeze": "non_moe"},  # update the MoE parameters only
        {"optimizer.freeze": "none", "model.moe.load_balancing_weight": 0.0},  # no balancing
        # A tenth of the learning rate (the first runs all ended worse than they started).
        {"optimizer.freeze": "none", "optimizer.learning_rate": 1e-4},
        {"optimizer.freeze": "moe", "optimizer.learning_rate": 1e-4},
    ]
