"""The Switch Transformer studies at CPU scale, on the embedded corpus; one variant per study.

  python -m experiments.sweep --config=configs/studies.py:expert_count --workdir=runs/sweeps/expert_count
  python -m experiments.sweep --config=configs/studies.py:capacity --workdir=runs/sweeps/capacity
  python -m experiments.sweep --config=configs/studies.py:routing --workdir=runs/sweeps/routing
  python -m experiments.sweep --config=configs/studies.py:expert_count_top2 \
      --workdir=runs/sweeps/expert_count_top2 --seeds=0,1,2
  python -m experiments.sweep --config=configs/studies.py:learning_rate_top2 \
      --workdir=runs/sweeps/learning_rate_top2 --seeds=0,1
  python -m experiments.sweep --config=configs/studies.py:capacity_g1024 \
      --workdir=runs/sweeps/capacity_g1024 --seeds=0,1
  python -m experiments.sweep --config=configs/studies.py:diagnosis --workdir=runs/sweeps/diagnosis
  python -m experiments.sweep --config=configs/studies.py:balancing \
      --workdir=runs/sweeps/balancing --seeds=0,1
  python -m experiments.sweep --config=configs/studies.py:granularity \
      --workdir=runs/sweeps/granularity --seeds=0,1
  python -m experiments.sweep --config=configs/studies.py:expert_count_switch \
      --workdir=runs/sweeps/expert_count_switch \
      --finished=experiments/results/expert_count_switch/trials
  python -m experiments.sweep --config=configs/studies.py:expert_count_switch_d64 \
      --workdir=runs/sweeps/expert_count_switch_d64 \
      --finished=experiments/results/expert_count_switch_d64/trials
  python -m experiments.sweep --config=configs/studies.py:capacity_rules \
      --workdir=runs/sweeps/capacity_rules --seeds=0,1
  python -m experiments.sweep --config=configs/studies.py:recipe_2026 \
      --workdir=runs/sweeps/recipe_2026 --seeds=0,1
  python -m experiments.report --workdir=runs/sweeps/expert_count      (likewise for the others)

expert_count  Switch Fig. 4 / Table 9: 1 (dense), 2, 4, 8, 16, 32, 64 experts, top-1, the same
              expert width, so the FLOPs per token are the same and only parameters grow.
expert_count_top2  the same question on the setup the diagnosis chose: 0 (dense) to 128 experts,
              top-2 with normalised gates and half-width experts, routing groups of 1024 tokens;
              run with --seeds=0,1,2.
learning_rate_top2  expert_count_top2's setup at lr 1e-2 and 2e-2 for dense, 8 and 64 experts
              (its own runs are the 3e-3 column); run with --seeds=0,1.
capacity_g1024  the capacity study on routing groups of 1024 tokens (causal top-2), --seeds=0,1.
balancing     the load balancers of 2021 and of 2024 at 16 and 64 experts on expert_count_top2's
              setup: none, Switch's per-group loss, DeepSeek-V3's sequence-wise loss, the
              global-batch loss (Qiu et al. 2025), auxiliary-loss-free bias balancing, and the
              bias with a small sequence-wise loss (DeepSeek-V3's recipe), the bias ten times
              faster (γ 1e-2), and DeepSeek-V3's sigmoid router; --seeds=0,1.
granularity   fine-grained experts (DeepSeekMoE) on expert_count_top2's 8-expert model: each
              expert split into m = 1, 2, 4, 8 experts of width 256/m, top-2m, equal parameters
              and FLOPs; --seeds=0,1.
diagnosis     why top-1 with 64 experts was no better than 8: one change at a time at 8 and 64
              experts (python -m experiments.diagnose --workdir=... tabulates routing health).
capacity      Switch Table 1: top-1 and top-2 trained at capacity factors 0.5, 1.0, 1.25, 2.0;
              the report evaluates each checkpoint at those factors and dropless.
expert_count_switch  Switch Fig. 4 at Switch's protocol: dense, 8 ... 128 experts, top-1 with
              Switch's router, rsqrt schedule, 2,400 steps, whole-split final evaluation; seeds in
              the sweep itself (3 for dense and 64, 2 for the rest; dense also at lr 1e-2). It
              spans sessions (~40 min a trial on 2 cores): --finished keeps each finished trial
              in the repository (committed) and a new workdir starts from those.
expert_count_switch_d64  the same at half the width (d_model 64): the second size of the scaling
              fit (python -m experiments.scaling_fit); 2 seeds.
capacity_rules  Switch Table 1 extended (issue 34): top-1 with Switch's router at training capacity
              factors 1.0 and 1.25, where capacity is counted (per sequence: groups of 128
              tokens; per group of 8 sequences: 1024; per batch: the whole 4,096-token batch of
              this one-device run) crossed with what happens to overflow (drop, next_choice);
              plus drop_priority='probability' (Megatron-Core's rule) as the non-causal ablation;
              --seeds=0,1.
recipe_2026   the 2026 training recipe on expert_count_top2's setup (issue 35, item 6), one change
              at a time: Muon instead of AdamW for dense and 32 experts; multi-token prediction
              (depth 1, λ 0.3) at 32 experts; the first MoE block hash-routed (balanced table),
              the second learned, at 32 experts (DeepSeek-V4's split; the hash block sends a
              token to one expert of half width where top-2 sends it to two: fewer FLOPs there);
              --seeds=0,1. Not run yet.
routing       every router at matched expert FLOPs: Switch top-1, plain top-2, GShard top-2
              (random routing), ST-MoE top-2 + z-loss, expert-choice, noisy top-k, hash (random, balanced), S-BASE, dropless
              top-1, and top-1 with a bfloat16 router (float32 vs bf16 router).
Top-2 trials use experts of half the width (model.moe.expert_d_ff=256) so that two experts cost
what one does in the top-1 trials; the dense blocks keep d_ff=512 throughout.

Measured: EXPERIMENTS.md holds one section per study with its tables and plots ("Load balancing
as the field does it now": no balancer is 0.04-0.07 nats worse; Switch's, sequence-wise and
global-batch losses tie within the spread; the bias ties them at γ 1e-2 but not at 1e-3 in 600
steps. "Fine-grained experts": m = 2, 4, 8 each worse than m = 1 here. "Why 64 experts
were no better than 8: the diagnosis", "Expert-count scaling, top-2 ...", "Capacity-factor sweep
on the expert-count setup", "Routing comparison", and the first top-1 runs).
"""

from switchmoe.config import default_config, switch_routing

EXPERT_COUNTS = (0, 2, 4, 8, 16, 32, 64)  # 0: dense baseline (every block a dense FFN)
CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0)
STUDIES = (
    "expert_count",
    "capacity",
    "routing",
    "diagnosis",
    "expert_count_top2",
    "capacity_g1024",
    "learning_rate_top2",
    "balancing",
    "granularity",
    "expert_count_switch",
    "expert_count_switch_d64",
    "capacity_rules",
    "recipe_2026",
)
# Where capacity is counted, as routing-group sizes of this one-device run (32 sequences of 128
# tokens per batch): one sequence, 8 sequences, the whole batch.
CAPACITY_SCOPES = {"sequence": 128, "group": 1024, "batch": 4096}
CAPACITY_RULE_FACTORS = (1.0, 1.25)
# The setup the diagnosis chose (EXPERIMENTS.md, "Why 64 experts were no better than 8"):
# routing groups of 1024 tokens, top-2 with gates normalised over the two, half-width experts.
SCALING_COUNTS = (0, 2, 4, 8, 16, 32, 64, 128)
# Is the top-2 study's gain a learning-rate artefact? Dense preferred 1e-2 over the studies' 3e-3
# in the diagnosis; these rates (with expert_count_top2's 3e-3 runs) tune each expert count.
LR_COUNTS = (0, 64, 8)  # dense and 64 first: the flagship comparison
LEARNING_RATES = (1e-2, 2e-2)


# The expert-count study at Switch's own protocol (EXPERIMENTS.md, "Expert-count scaling at
# Switch's protocol"): top-1 with Switch's router, experts as wide as the dense FFN (equal active
# FLOPs per token), an inverse-square-root schedule that does not depend on the run's length (so
# step t of a run is step t of any longer run: nothing compresses the end), 2,400 steps (4x the
# earlier studies' tokens), groups of 1024 tokens (128 experts keep 10 slots at factor 1.25), the
# whole-split final evaluation. Dense also at its own best rate from the cosine runs (1e-2), so
# the speed-up is measured against the best dense model too, not only at the MoE's rate.
SWITCH_COUNTS = (0, 8, 16, 32, 64, 128)
SWITCH_SEEDS = {0: 3, 64: 3}  # seeds per expert count (2 for the rest)
SWITCH_DENSE_LR = 1e-2


def _switch_protocol_trials():
    rows = [({"model.moe.num_experts": e}, SWITCH_SEEDS.get(e, 2)) for e in SWITCH_COUNTS]
    rows.append(({"model.moe.num_experts": 0, "optimizer.learning_rate": SWITCH_DENSE_LR}, 2))
    # Seed-major order: every setting's seed 0 first, so a partly finished study (it resumes
    # when rerun) already has the whole curve with one seed.
    return [
        {**row, "seed": seed, "data.seed": seed}
        for seed in range(3)
        for row, count in rows
        if seed < count
    ]


def get_config(study="expert_count"):
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; allowed: {STUDIES}.")
    config = default_config()
    # The default size (d_model 128, 4 blocks, d_ff 512, 8 experts, 128-token sequences).
    config.model.moe.num_selected = 1
    config.model.moe.moe_every = 2
    config.model.moe.backend = "gather"
    config.model.moe.train_capacity_factor = 1.25
    config.model.moe.eval_capacity_factor = 2.0
    # 600 steps (2.5M tokens): the demo's curve has left its initial drop by ~300 steps
    # (the first, top-1 demo's eval: 2.63 bits/byte at step 200, 2.25 at 400, 2.01 at 800).
    config.num_train_steps = 600
    config.eval_every = 100
    config.num_eval_batches = 0  # periodic evaluations: the whole eval sample
    config.checkpoint_every = 600
    config.keep_checkpoints = 1
    if study in ("diagnosis", "expert_count_top2", "capacity_g1024", "learning_rate_top2",
                 "balancing", "granularity", "recipe_2026"):  # fmt: skip
        # Routing groups of 8 sequences: the expert-count study's second run showed that
        # 128-token groups leave 64 experts 3 slots each and drop 20% of training tokens.
        config.model.moe.group_size = 1024
    if study in ("expert_count_top2", "learning_rate_top2", "balancing", "granularity",
                 "recipe_2026"):  # fmt: skip
        # Top-2 with normalised gates: two gates sum to 1 whatever E is, where top-1's raw gate
        # is the router probability, ~1/E until the router has learned (diagnosis).
        for key, value in TOP2.items():
            _set(config, key, value)
        config.eval_every = 50  # finer curves for the steps-to-quality speed-up
    if study in ("expert_count_switch", "expert_count_switch_d64"):
        switch_routing(config)
        config.model.moe.init_scale = 0.1
        config.model.moe.group_size = 1024
        config.optimizer.schedule = "rsqrt"
        config.optimizer.warmup_steps = 200
        config.num_train_steps = 2400
        config.eval_every = 100
        config.num_eval_batches = 0  # the whole eval sample (35% of the bytes, whole documents)
        config.checkpoint_every = 400  # a study that spans sessions resumes from here
    if study == "capacity_rules":
        switch_routing(config)
        config.model.moe.init_scale = 0.1
        config.model.moe.group_size = CAPACITY_SCOPES["group"]
    if study == "expert_count_switch_d64":
        # The scaling fit's second size: half the width (d_model 64, d_ff 256, 2 heads of 32),
        # the same depth, data, protocol and expert counts.
        config.model.d_model = 64
        config.model.d_ff = 256
        config.model.num_heads = 2
    return config


def _set(config, dotted_key, value):
    *path, leaf = dotted_key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[leaf] = value


TOP2 = {
    "model.moe.num_selected": 2,
    "model.moe.gate_norm": "normalized",
    "model.moe.expert_d_ff": 256,
}


# Load balancing (issue: balancing as the field does it now). Each balancer alone at Switch's
# weight 1e-2, so that the losses differ only in what they count over; the bias at DeepSeek-V3's
# update speed 1e-3, alone and with their small sequence-wise loss (1e-4), and DeepSeek-V3's
# router as a whole (sigmoid scores).
NO_SWITCH_LOSS = {"model.moe.load_balancing_weight": 0.0}
BALANCERS = [
    NO_SWITCH_LOSS,  # no balancing at all: the control
    {},  # Switch's loss per routing group (1,024 tokens), α = 1e-2
    {**NO_SWITCH_LOSS, "model.moe.sequence_balance_weight": 1e-2},
    {**NO_SWITCH_LOSS, "model.moe.global_balance_weight": 1e-2},
    {**NO_SWITCH_LOSS, "model.moe.bias_update_speed": 1e-3},
    {
        **NO_SWITCH_LOSS,
        "model.moe.bias_update_speed": 1e-3,
        "model.moe.sequence_balance_weight": 1e-4,
    },
    # 600 steps are few for γ = 1e-3 (the bias moves at most 0.6 logits): ten times faster.
    {**NO_SWITCH_LOSS, "model.moe.bias_update_speed": 1e-2},
    # DeepSeek-V3's router as a whole: sigmoid scores normalised over the chosen experts, the
    # bias on the scores, and the small sequence-wise loss.
    {
        **NO_SWITCH_LOSS,
        "model.moe.score_function": "sigmoid",
        "model.moe.bias_update_speed": 1e-3,
        "model.moe.sequence_balance_weight": 1e-4,
    },
]
BALANCING_COUNTS = (16, 64)
GRANULARITIES = (1, 2, 4, 8)


# Routing comparison at matched expert FLOPs per token (issue: the rest of the routing literature).
ROUTING_TRIALS = [
    {"model.moe.router": "top_k", "model.moe.num_selected": 1},  # Switch
    {**TOP2},  # top-2, no random routing and no z-loss: the control for the next two
    {**TOP2, "model.moe.random_routing": True},  # GShard
    {**TOP2, "model.moe.z_loss_weight": 1e-3},  # ST-MoE
    {
        "model.moe.router": "expert_choice",
        "model.moe.train_capacity_factor": 1.0,
        "model.moe.eval_capacity_factor": 1.0,
        "model.moe.noncausal_ablation": True,
    },  # one expert per token on average; not causal, so an ablation in this decoder-only LM
    {
        "model.moe.router": "noisy_top_k",
        "model.moe.num_selected": 2,
        "model.moe.expert_d_ff": 256,
        "model.moe.load_balancing_weight": 0.0,
        "model.moe.importance_weight": 0.1,
        "model.moe.load_weight": 0.1,
    },  # Shazeer et al. 2017
    {"model.moe.router": "hash", "model.moe.hash_kind": "random"},
    {"model.moe.router": "hash", "model.moe.hash_kind": "balanced"},
    {"model.moe.router": "sbase", "model.moe.noncausal_ablation": True},  # not causal either
    {"model.moe.router": "top_k", "model.moe.backend": "dropless"},
    {"model.moe.router": "top_k", "model.moe.router_dtype": "bfloat16"},  # selective precision off
]


# The 2026 recipe (issue 35), each change alone against its AdamW / top-2 everywhere baseline.
MUON = {"optimizer.name": "muon"}
RECIPE_TRIALS = [
    {"model.moe.num_experts": 0},
    {"model.moe.num_experts": 0, **MUON},
    {"model.moe.num_experts": 32},
    {"model.moe.num_experts": 32, **MUON},
    {"model.moe.num_experts": 32, "model.mtp_depth": 1},
    {"model.moe.num_experts": 32, "model.moe.block_routers": ("hash", "top_k"),
     "model.moe.hash_kind": "balanced"},
]  # fmt: skip


# A SentencePiece vocabulary trained on the corpus' training split (switchmoe/data/spm_training.py).
SUBWORD = {"data.tokenizer": "sentencepiece", "data.spm_vocab_size": 4096}


# Why 64 experts are no better than 8 (or dense) at 600 steps: each row changes one thing from
# the base (groups of 1024 tokens, lr 3e-3, MoE every other block, α 1e-2, 600 steps, bytes).
# Dense (num_experts=0) joins the rows whose change also applies to a dense model.
def _diagnosis_trials():
    rows = [
        ({}, (0, 8, 64)),  # the base
        ({"seed": 1, "data.seed": 1}, (0, 8, 64)),  # a second seed: the spread
        # Top-1 gates normalised over the one choice are 1: the expert output is not scaled by
        # the router probability (which is ~1/E while a 64-expert router is near uniform).
        ({"model.moe.gate_norm": "normalized"}, (8, 64)),
        # GShard's top-2 with gates normalised over the two (they sum to 1 at any E), experts of
        # half the width so that the FLOPs per token stay the dense model's.
        (TOP2, (8, 64)),
        # A fixed token-id -> expert table, balanced on corpus frequencies: experts specialise
        # from step 0 instead of waiting for a router to form clusters.
        ({"model.moe.router": "hash", "model.moe.hash_kind": "balanced"}, (8, 64)),
        (SUBWORD, (0, 8, 64)),  # 4k SentencePiece pieces: ~3.3 bytes of text per token
        ({"optimizer.learning_rate": 1e-3}, (0, 8, 64)),
        ({"optimizer.learning_rate": 1e-2}, (0, 8, 64)),
        ({"model.moe.load_balancing_weight": 1e-1}, (8, 64)),
        ({"model.moe.backend": "dropless"}, (8, 64)),  # no token dropped in training
        ({"model.moe.moe_every": 1}, (8, 64)),
        ({"num_train_steps": 1800}, (0, 8, 64)),  # 3× the training tokens
    ]
    return [{"model.moe.num_experts": e, **change} for change, counts in rows for e in counts]


def get_sweep(study="expert_count"):
    if study == "diagnosis":
        return _diagnosis_trials()
    if study == "expert_count_top2":
        return [{"model.moe.num_experts": e} for e in SCALING_COUNTS]
    if study == "expert_count_switch":
        return _switch_protocol_trials()
    if study == "expert_count_switch_d64":
        # Two seeds of every count: the fit's intervals resample them.
        trials = _switch_protocol_trials()
        return [t for t in trials if t["seed"] < 2 and "optimizer.learning_rate" not in t]
    if study == "capacity_g1024":
        return get_sweep("capacity")
    if study == "learning_rate_top2":
        return [
            {"model.moe.num_experts": e, "optimizer.learning_rate": lr}
            for e in LR_COUNTS
            for lr in LEARNING_RATES
        ]
    if study == "balancing":
        return [{"model.moe.num_experts": e, **b} for b in BALANCERS for e in BALANCING_COUNTS]
    if study == "granularity":
        return [{"model.moe.num_experts": 8, "model.moe.granularity": m} for m in GRANULARITIES]
    if study == "expert_count":
        return [{"model.moe.num_experts": e} for e in EXPERT_COUNTS]
    if study == "capacity":
        return [
            {**top, "model.moe.train_capacity_factor": factor}
            for top in ({"model.moe.num_selected": 1}, TOP2)
            for factor in CAPACITY_FACTORS
        ]
    if study == "routing":
        return ROUTING_TRIALS
    if study == "recipe_2026":
        return RECIPE_TRIALS
    if study == "capacity_rules":
        trials = [
            {"model.moe.train_capacity_factor": factor, "model.moe.group_size": size,
             "model.moe.overflow": overflow}
            for factor in CAPACITY_RULE_FACTORS
            for size in CAPACITY_SCOPES.values()
            for overflow in ("drop", "next_choice")
        ]  # fmt: skip
        # Megatron-Core's probability priority: not causal, so an ablation in this decoder.
        return trials + [
            {"model.moe.train_capacity_factor": factor, "model.moe.drop_priority": "probability",
             "model.moe.noncausal_ablation": True}
            for factor in CAPACITY_RULE_FACTORS
        ]  # fmt: skip
    raise ValueError(f"unknown study {study!r}; allowed: {STUDIES}.")
