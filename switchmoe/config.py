"""The default switchmoe config and its validation.

Every experiment config under configs/ starts from `default_config()` and overrides fields. Each
field has a comment; optional fields are `placeholder`s so the command line can set them
(`--config.model.moe.group_size=256`).

`validate_config` runs before anything is traced or written, and names the setting and the
allowed values in its message.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import ml_collections
from ml_collections import config_dict

from switchmoe import optim, sharding
from switchmoe.data import pipeline as data_pipeline
from switchmoe.data import span_corruption
from switchmoe.data.tokenizers import make_tokenizer
from switchmoe.models.decoder import ATTENTION_BIASES, QK_NORMS, REMAT_POLICIES
from switchmoe.models.factory import sequence_lengths
from switchmoe.moe import experts, routers
from switchmoe.moe.blocks import check_block_routers, moe_views, router_names, router_views
from switchmoe.moe.layer import SETTINGS as MOE_SETTINGS
from switchmoe.moe.layer import MoeLayer
from switchmoe.moe.settings import (  # the one copy of each check
    _one_of,
    _positive,
    check_granularity,
)

OPTIMIZERS = ("adafactor", "adamw", "muon")
SCHEDULES = ("rsqrt", "cosine", "constant")
DTYPES = ("float32", "bfloat16")
ARCHITECTURES = ("decoder", "encoder_decoder")
ATTENTIONS = ("standard", "latent")
# What the evaluation at the end of training scores (switchmoe/data/eval_set.py).
FINAL_EVALS = ("split", "sample")


def default_moe_config() -> ml_collections.ConfigDict:
    """The `model.moe` block: the model-level fields below, then every `MoeLayer` setting with the
    layer's default (documented in MoeLayer's docstring), then every router's own options
    (documented in its module's `options`). One definition each: nothing is restated here."""
    moe = ml_collections.ConfigDict()
    # Experts per MoE layer; 0 makes every block dense (the dense baseline).
    moe.num_experts = 8
    # Hidden width of each expert; None: model.d_ff (the dense blocks' width). Top-2 models at the
    # FLOPs of top-1 ones use half the width.
    moe.expert_d_ff = config_dict.placeholder(int)
    # Every moe_every-th block is an MoE block (Switch/GShard: 2, ST-MoE: 4, all blocks: 1).
    moe.moe_every = 2
    # The MoE blocks as an explicit tuple of block indices (0-based), in place of moe_every:
    # DeepSeek's dense first blocks, Qwen's mlp_only_layers. Decoder-only models.
    moe.moe_layers = config_dict.placeholder(tuple)
    # One router name per MoE block, in block order, in place of `router` for each (DeepSeek-V4:
    # ('hash', 'hash', 'top_k', ...)); None: every MoE block routes with `router`. Each router
    # reads its own options from this block; decoder-only models (switchmoe/moe/blocks.py).
    moe.block_routers = config_dict.placeholder(tuple)
    # Fine-grained experts (DeepSeekMoE): split each expert into `granularity` experts of width
    # F/granularity and route each token to granularity·num_selected of them (the same expert
    # parameters and FLOPs; token-choice routers). 1: ordinary experts.
    moe.granularity = 1
    # Batch prioritized routing in an encoder–decoder's encoder only (its decoder stays causal).
    moe.encoder_batch_prioritized = False
    # Permits a decoder-only LM to be a non-causal routing ablation: routers whose choice for a
    # token depends on later tokens of its group ('expert_choice', 'sbase', or
    # causal_routing=False with k >= 2). Such a run's eval loss is not comparable with a causal
    # model's (later tokens leak into earlier predictions through the routing), and it cannot
    # decode token by token as it trained; its summary and sweep reports say so. On a run whose
    # routing is causal anyway the flag changes nothing (so it may be set for a whole sweep).
    moe.noncausal_ablation = False
    hints = typing.get_type_hints(MoeLayer)
    for f in dataclasses.fields(MoeLayer):
        if f.name in MOE_SETTINGS:
            moe[f.name] = _config_value(f.default, typing.get_args(hints[f.name]))
    for name, option in routers.all_options().items():
        moe[name] = _config_value(option.default, (option.type,))
    return moe


def _config_value(default, types):
    # None defaults become typed placeholders, so the command line can set them.
    return config_dict.placeholder(types[0]) if default is None else default


def default_config() -> ml_collections.ConfigDict:
    """Every setting with its default. The defaults are the CPU size every config in configs/
    starts from (d_model 128, 4 blocks, 4 heads, d_ff 512, 8 experts, 128-token sequences,
    batches of 32, AdamW 3e-3): a config states only what differs."""
    config = ml_collections.ConfigDict()
    # Seed of parameter init and of the per-step dropout/routing keys.
    config.seed = 0
    # Data: corpus, tokenizer, sequence length (switchmoe/data/pipeline.py documents each field).
    config.data = data_pipeline.default_data_config()

    model = config.model = ml_collections.ConfigDict()
    # Architecture: 'decoder' (decoder-only LM, next-token prediction, rotary positions) or
    # 'encoder_decoder' (T5-style, span corruption, relative position buckets).
    model.arch = "decoder"
    # Vocabulary size; None: the tokenizer's (259 + sentinels for bytes).
    model.vocab_size = config_dict.placeholder(int)
    # Model width D.
    model.d_model = 128
    # Transformer blocks (the encoder's, for an encoder–decoder).
    model.num_layers = 4
    # Decoder blocks of an encoder–decoder; None: num_layers.
    model.num_decoder_layers = config_dict.placeholder(int)
    # Encoder–decoder relative attention: buckets per stack and the distance where the last
    # bucket starts (T5: 32 and 128).
    model.relative_attention_num_buckets = 32
    model.relative_attention_max_distance = 128
    # Output logits from the input embedding (tied, T5 v1.0) or a separate kernel (T5 v1.1).
    model.tie_embeddings = True
    # Attention heads.
    model.num_heads = 4
    # Width per head; None: d_model // num_heads.
    model.head_dim = config_dict.placeholder(int)
    # Key/value heads (grouped-query attention: each serves num_heads / num_kv_heads query
    # heads); None: num_heads.
    model.num_kv_heads = config_dict.placeholder(int)
    # Normalisation of queries and keys before the rotary embedding: 'none', 'head' (RMSNorm per
    # head, Qwen3) or 'projection' (RMSNorm over the whole projection, OLMoE).
    model.qk_norm = "none"
    # Attention projections with a bias: 'none', 'qkv' (Qwen2) or 'all' (OLMoE, Qwen3 option).
    model.attention_bias = "none"
    # Base of the rotary embedding's frequencies (10000; Mixtral and Qwen3 use 1e6).
    model.rope_theta = 10000.0
    # YaRN's longer-context rotary embedding (switchmoe/models/rotary.py; DeepSeek-V3: factor 40
    # over 4096 positions, mscale = mscale_all_dim = 1); factor 0: plain rotary.
    yarn = model.yarn = ml_collections.ConfigDict()
    yarn.factor = 0.0
    yarn.original_length = 4096
    yarn.beta_fast = 32.0
    yarn.beta_slow = 1.0
    yarn.mscale = 0.0
    yarn.mscale_all_dim = 0.0
    yarn.truncate = True
    # Causal attention to the newest `sliding_window` positions only (Mistral); 0: all.
    model.sliding_window = 0
    # Epsilon of every RMSNorm (switchmoe and T5: 1e-6; Mixtral, OLMoE, Qwen: 1e-5 or 1e-6).
    model.norm_eps = 1e-6
    # 'standard' (multi-head, grouped key/value heads with num_kv_heads) or 'latent' (DeepSeek's
    # multi-head latent attention, switchmoe/models/latent_attention.py, with the five sizes
    # below; decoder-only).
    model.attention = "standard"
    # Latent attention: the query latent's rank (0: one full query projection), the key-value
    # latent's rank, the no-rope and rope widths of a query/key head, and a value head's width
    # (DeepSeek-V3: 1536, 512, 128, 64, 128).
    model.q_lora_rank = 0
    model.kv_lora_rank = 64
    model.qk_nope_head_dim = 32
    model.qk_rope_head_dim = 16
    model.v_head_dim = 32
    # Hidden width F of the dense FFN and of each expert.
    model.d_ff = 512
    # 'relu', 'gelu', 'swiglu' or 'geglu' (dense FFN and experts alike).
    model.activation = "relu"
    # Dropout on attention probabilities and residual branches.
    model.dropout_rate = 0.0
    # Compute dtype: 'bfloat16' on accelerators, 'float32' on CPU (bf16 matmuls are slow there).
    model.dtype = "float32"
    # Rematerialisation (jax.checkpoint) per block: 'none', 'full' (recompute everything in the
    # backward pass: activation memory of one block) or 'dots' (keep matmul outputs).
    model.remat = "none"
    # Multi-token prediction (DeepSeek-V3): K sequential modules after the decoder, module k
    # predicting the token k + 1 places ahead, trained with weight λ on the mean of their losses
    # (models/mtp.py, training/mtp.py); 0: none. Decoder-only. The reported loss stays the
    # main tokens'; generation and export use the main model.
    model.mtp_depth = 0
    model.mtp_loss_weight = 0.3  # λ (DeepSeek-V3: 0.3 for its first 10T tokens, then 0.1)
    # MoE settings.
    model.moe = default_moe_config()

    opt = config.optimizer = ml_collections.ConfigDict()
    # 'adafactor' (Switch / T5), 'adamw', or 'muon' (orthogonalised momentum on the matrices,
    # expert by expert, AdamW on embeddings, routers, norms and biases: switchmoe/muon.py).
    opt.name = "adamw"
    # Peak learning rate.
    opt.learning_rate = 3e-3
    # Linear warm-up steps.
    opt.warmup_steps = 100
    # After warm-up: 'rsqrt' (T5: lr·sqrt(warmup/step)), 'cosine' (to 10% at the end), 'constant'.
    opt.schedule = "cosine"
    # Decoupled weight decay (AdamW); Adafactor uses it as its weight_decay_rate.
    opt.weight_decay = 0.01
    # Adam β1, β2.
    opt.b1 = 0.9
    opt.b2 = 0.98
    # Clip gradients to this global norm (0 = off).
    opt.grad_clip_norm = 1.0
    # Muon (optimizer.name='muon'): momentum decay, Newton–Schulz steps, and the RMS its
    # updates are scaled to (Liu et al. 2025: 0.2, AdamW's, so learning_rate and weight_decay
    # carry over from AdamW).
    opt.muon_beta = 0.95
    opt.muon_ns_steps = 5
    opt.muon_rms = 0.2
    # Parameters kept at their starting values (fine-tuning, switchmoe/optim.py): 'none',
    # 'moe' (routers and experts), 'non_moe', 'router', 'experts', or 're:<regex>' over
    # '/'-joined parameter paths. Frozen parameters get no update and no optimizer state.
    opt.freeze = "none"

    mesh = config.mesh = ml_collections.ConfigDict()
    # Device mesh (data, expert, model); one axis may be -1 to take the remaining devices. With
    # fixed sizes whose product is below the device count, the first devices are used (one
    # process only). The batch is split over data × expert; experts over expert; hidden widths
    # and attention heads over model.
    mesh.data = 1
    mesh.expert = 1
    mesh.model = 1
    # How MoE layers exchange tokens when mesh.expert > 1: 'shard_map' (explicit all-to-all) or
    # 'jit' (sharding constraints; the partitioner inserts the all-to-alls).
    mesh.expert_parallelism = "shard_map"
    # Logical parameter axis -> mesh axes (switchmoe/sharding.py documents the names).
    mesh.rules = sharding.DEFAULT_RULES

    # Start from another run's parameters: '<workdir>' (its newest intact checkpoint),
    # '<workdir>:<step>', or 'hf:<directory>' (a Hugging Face Switch checkpoint, whose model
    # block `hf_switch.config_from_hf` gives); new optimizer state and data order. A dense run
    # into an MoE config upcycles: each dense FFN is copied into every expert of the MoE layer
    # in its place (switchmoe/training/init_from.py). Only the first start uses it; a resume continues
    # from its own.
    config.init_from = config_dict.placeholder(str)
    # Upcycling: noise added to each expert's copy (std relative to the matrix's), and the
    # fraction of each expert's hidden units re-drawn (Drop-Upcycling; 0.5 in its paper).
    config.upcycle_noise = 0.0
    config.upcycle_reinit_fraction = 0.0
    # Distillation (switchmoe/training/distillation.py): a teacher run '<workdir>[:step]' whose soft
    # targets the student learns beside the labels, loss (1 − w)·CE + w·T²·H(teacher/T,
    # student/T) with w = teacher_weight (Switch §5: 0.25) and T = temperature; the student
    # starts from scratch or from the teacher's non-expert parameters ('non_expert').
    distill = config.distill = ml_collections.ConfigDict()
    distill.teacher = config_dict.placeholder(str)
    distill.teacher_weight = 0.25
    distill.temperature = 1.0
    distill.student_init = "scratch"
    # Global batch size (sequences per step, all devices together).
    config.batch_size = 32
    # Microbatches per optimizer step: the batch is split into this many parts of
    # batch_size / grad_accum_steps rows, run one after another, and their gradients summed, so
    # a batch that does not fit in memory trains as if it did. For a dense model the step equals
    # one step on the whole batch (to float rounding). MoE routing groups live inside a
    # microbatch: with groups longer than a microbatch's rows per device, routing changes.
    config.grad_accum_steps = 1
    # Training steps.
    config.num_train_steps = 1000
    # Write train metrics every N steps.
    config.log_every = 50
    # Evaluate every N steps (and at the end).
    config.eval_every = 250
    # Validation batches per periodic evaluation: the first N batches of the eval sample (whole
    # documents drawn at random, data.eval_sample_fraction of the split's bytes; the same ones
    # every time); 0 = the whole sample. For quick runs.
    config.num_eval_batches = 0
    # What the evaluation at the end of training scores: 'split' (every token of the eval split
    # once, with a bootstrap interval over documents: a run's headline number) or 'sample' (what
    # the periodic evaluations score; quick runs and tests).
    config.final_eval = "split"
    # Save a checkpoint every N steps (and at the end, and when preempted: SIGTERM or SIGINT).
    config.checkpoint_every = 500
    # Also save when this many minutes passed since the last save (0 = off): a long step
    # interval then cannot lose hours to a crash. Every process agrees on the step.
    config.checkpoint_every_minutes = 0.0
    # Checkpoints kept (the newest).
    config.keep_checkpoints = 2
    # A checkpoint write that has not finished after this many seconds stops the run with
    # CheckpointWriteError (a failed write stops it at once). Raise it for a large model on slow
    # storage.
    config.checkpoint_timeout_seconds = 120.0
    # Trace train steps START..START+COUNT-1 with jax.profiler into <workdir>/profile
    # ('START:COUNT', e.g. '10:5'; '' for none): switchmoe/training/profiling.py.
    config.profile_steps = ""
    return config


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the fields it lacks taken from `default_config()`.

    A config.json written before a field was added to switchmoe lacks it; the default is what
    that older version did.
    """

    def merge(values: dict, defaults: dict) -> dict:
        out = dict(values)
        for key, default in defaults.items():
            if key not in out:
                out[key] = default
            elif isinstance(default, dict) and isinstance(out[key], dict):
                out[key] = merge(out[key], default)
        return out

    values = config.to_dict()
    merged = ml_collections.ConfigDict(merge(values, default_config().to_dict()))
    moe = merged.model.moe
    old_moe = values.get("model", {}).get("moe", {})
    if "causal_routing" not in old_moe:
        moe.causal_routing = False  # before the field existed, slots were always rank-major
    if (
        "noncausal_ablation" not in old_moe
        and merged.model.arch == "decoder"
        and noncausal_reason(moe)
    ):
        # Written before decoder-only LMs routed causally by default: what it trained was a
        # non-causal ablation, and it says so when reloaded.
        moe.noncausal_ablation = True
    return merged


def validate_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ValueError naming the bad setting and what is allowed. Touches no file, no device.

    `num_devices` is the number of devices the run has (all processes).
    """
    model, moe, opt = config.model, config.model.moe, config.optimizer
    data_size, expert_size, model_size = sharding.mesh_shape(config.mesh, num_devices)
    batch_shards = data_size * expert_size
    _one_of("mesh.expert_parallelism", config.mesh.expert_parallelism, sharding.EXPERT_PARALLELISM)
    micro = config.get("grad_accum_steps", 1)
    if not (isinstance(micro, int) and not isinstance(micro, bool) and micro >= 1):
        raise ValueError(f"grad_accum_steps must be an integer >= 1; got {micro!r}.")
    data_pipeline.validate_data_config(config.data)
    _one_of("model.arch", model.arch, ARCHITECTURES)
    if model.arch == "encoder_decoder":
        _validate_encoder_decoder(config)
    _one_of("model.dtype", model.dtype, DTYPES)
    _one_of("model.remat", model.get("remat", "none"), REMAT_POLICIES)
    experts.check_activation(model.activation)
    for name in ("d_model", "num_layers", "num_heads", "d_ff"):
        _positive(f"model.{name}", model[name])
    if model.get("head_dim") is None and model.d_model % model.num_heads:
        raise ValueError(
            f"model.d_model={model.d_model} must be divisible by model.num_heads="
            f"{model.num_heads} (or set model.head_dim)."
        )
    if not 0 <= model.dropout_rate < 1:
        raise ValueError(f"model.dropout_rate must be in [0, 1); got {model.dropout_rate}.")
    if model.get("head_dim") is not None:
        _positive("model.head_dim", model.head_dim)
    _check_mtp(config)
    check_attention(config, model_size)
    if model.get("vocab_size") is not None:
        # Only the byte tokenizer's size is known without reading (or training) a model file.
        minimum_vocab = (
            make_tokenizer(config.data).vocab_size if config.data.tokenizer == "byte" else 1
        )
        if not model.vocab_size >= minimum_vocab:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} is below the tokenizer's {minimum_vocab} "
                f"ids (data.tokenizer={config.data.tokenizer!r}); allowed: >= {minimum_vocab}, "
                "or None for the tokenizer's own."
            )
    optim.check_freeze(opt.get("freeze", "none"))
    if not config.get("upcycle_noise", 0.0) >= 0:
        raise ValueError(f"upcycle_noise must be >= 0; got {config.upcycle_noise!r}.")
    if not 0 <= config.get("upcycle_reinit_fraction", 0.0) < 1:
        raise ValueError(
            f"upcycle_reinit_fraction must be in [0, 1); got {config.upcycle_reinit_fraction!r}."
        )
    if not (isinstance(config.seed, int) and config.seed >= 0):
        raise ValueError(f"seed must be an integer >= 0; got {config.seed!r}.")
    if moe.num_experts < 0:
        raise ValueError(f"model.moe.num_experts must be >= 0 (0 = dense); got {moe.num_experts}.")
    if moe.num_experts and moe.get("moe_layers") is not None:
        check_moe_layers(model)
    elif moe.num_experts:
        _positive("model.moe.moe_every", moe.moe_every)
        if moe.moe_every > model.num_layers:
            raise ValueError(
                f"model.moe.moe_every={moe.moe_every} exceeds model.num_layers="
                f"{model.num_layers}: the model would have no MoE layer. Allowed: 1 to "
                f"{model.num_layers}, or model.moe.num_experts=0 for a dense model."
            )
        if moe.get("expert_d_ff") is not None:
            _positive("model.moe.expert_d_ff", moe.expert_d_ff)
        check_block_routers(model)
        table = moe.get("hash_table")
        if "hash" in router_names(moe) and table is not None and len(table) != model.vocab_size:
            raise ValueError(
                f"model.moe.hash_table has {len(table)} entries; it needs one per token id "
                f"(model.vocab_size={model.vocab_size})."
            )
        _one_of("model.moe.router", moe.router, routers.NAMES)
        tokens_per_group = moe.get("group_size") or config.data.seq_len
        for view in router_views(model):  # each router of the MoE blocks (moe/blocks.py)
            check_granularity(view)
            # The layer's own validation, on the layer this config builds (one validator).
            MoeLayer.from_config(view).check_settings("model.moe.", tokens_per_group)
        if moe.batch_prioritized:
            raise ValueError(
                "model.moe.batch_prioritized=True is not allowed in a decoder: it orders tokens "
                "by router confidence over the whole group, so a token's routing would depend on "
                "later tokens. Allowed: False (in-order priority); for an encoder–decoder, "
                "model.moe.encoder_batch_prioritized=True applies it to the encoder only."
            )
        _validate_causal_routing(config)
        if moe.get("encoder_batch_prioritized") and model.arch != "encoder_decoder":
            raise ValueError(
                "model.moe.encoder_batch_prioritized=True needs model.arch='encoder_decoder'; "
                f"got model.arch={model.arch!r} (a decoder-only model has no encoder)."
            )
        lengths = sequence_lengths(config)
        micro = config.get("grad_accum_steps", 1)
        for stack, length in lengths.items():
            tokens_per_shard = config.batch_size // micro // batch_shards * length
            group = moe.get("group_size") or length
            if tokens_per_shard % group:
                raise ValueError(
                    f"model.moe.group_size={group} must divide the tokens per batch shard "
                    f"({'' if stack == 'decoder' and len(lengths) == 1 else stack + ': '}"
                    f"batch_size {config.batch_size} / "
                    f"{f'{micro} microbatches / ' if micro > 1 else ''}{batch_shards} batch shard(s) × "
                    f"{'targets length' if stack == 'decoder' and len(lengths) > 1 else 'data.seq_len'} "
                    f"{length} = {tokens_per_shard}), so that every device routes whole groups."
                )
        if moe.num_experts % expert_size:
            raise ValueError(
                f"model.moe.num_experts={moe.num_experts} must be divisible by mesh.expert="
                f"{expert_size} (each device holds num_experts / mesh.expert experts)."
            )
        if expert_size > 1 and moe.backend == "dropless":
            raise ValueError(
                "mesh.expert > 1 needs model.moe.backend in ('einsum', 'gather'): the dropless "
                "backend would need a ragged all-to-all."
            )
    _one_of("optimizer.name", opt.name, OPTIMIZERS)
    if opt.name == "muon":
        if not 0 <= opt.muon_beta < 1:
            raise ValueError(f"optimizer.muon_beta must be in [0, 1); got {opt.muon_beta!r}.")
        if not (isinstance(opt.muon_ns_steps, int) and opt.muon_ns_steps >= 1):
            raise ValueError(
                f"optimizer.muon_ns_steps must be an int >= 1; got {opt.muon_ns_steps!r}."
            )
        _positive("optimizer.muon_rms", opt.muon_rms)
    _one_of("optimizer.schedule", opt.schedule, SCHEDULES)
    _positive("optimizer.learning_rate", opt.learning_rate)
    if not math.isfinite(opt.learning_rate):
        raise ValueError(f"optimizer.learning_rate must be finite; got {opt.learning_rate!r}.")
    for name in ("weight_decay", "grad_clip_norm"):
        if not opt[name] >= 0:
            raise ValueError(f"optimizer.{name} must be >= 0 (0 = off); got {opt[name]!r}.")
    for name in ("b1", "b2"):
        if not 0 <= opt[name] < 1:
            raise ValueError(f"optimizer.{name} must be in [0, 1); got {opt[name]!r}.")
    if not config.num_eval_batches >= 0:
        raise ValueError(
            f"num_eval_batches must be >= 0 (0 = the whole split); got {config.num_eval_batches!r}."
        )
    _one_of("final_eval", config.get("final_eval", "split"), FINAL_EVALS)
    if opt.warmup_steps < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0; got {opt.warmup_steps}.")
    _positive("batch_size", config.batch_size)
    micro = config.get("grad_accum_steps", 1)
    if micro > 1 and config.batch_size % (micro * batch_shards):
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by grad_accum_steps × batch "
            f"shards = {micro} × {batch_shards} = {micro * batch_shards}: every microbatch "
            "holds the same number of rows on every device."
        )
    if config.batch_size % batch_shards:
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by the number of batch shards "
            f"mesh.data × mesh.expert = {data_size}×{expert_size} = {batch_shards}."
        )
    for name in ("num_train_steps", "log_every", "eval_every", "checkpoint_every"):
        _positive(name, config[name])
    _positive("keep_checkpoints", config.keep_checkpoints)
    minutes = config.get("checkpoint_every_minutes", 0.0)
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes < 0:
        raise ValueError(
            f"checkpoint_every_minutes must be a number >= 0 (0 = off); got {minutes!r}."
        )
    timeout = config.get("checkpoint_timeout_seconds", 120.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"checkpoint_timeout_seconds must be a number > 0; got {timeout!r}.")


def check_attention(config: ml_collections.ConfigDict, model_size: int = 1) -> None:
    """The attention settings of the open decoder-only families (decoder.SelfAttention);
    `model_size`: the mesh's model axis, over which the heads are split."""
    model = config.model
    kv_heads = model.get("num_kv_heads")
    if kv_heads is not None:
        if not (isinstance(kv_heads, int) and kv_heads >= 1 and model.num_heads % kv_heads == 0):
            allowed = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]
            raise ValueError(
                f"model.num_kv_heads={kv_heads!r} must divide model.num_heads={model.num_heads} "
                f"(each key/value head serves a group of query heads); allowed: {allowed} or "
                "None (= num_heads)."
            )
        if kv_heads % model_size:
            raise ValueError(
                f"model.num_kv_heads={kv_heads} must be divisible by mesh.model={model_size}: "
                "the key/value heads are split over that axis."
            )
    _one_of("model.qk_norm", model.get("qk_norm", "none"), QK_NORMS)
    _one_of("model.attention_bias", model.get("attention_bias", "none"), ATTENTION_BIASES)
    _positive("model.rope_theta", model.get("rope_theta", 10000.0))
    _positive("model.norm_eps", model.get("norm_eps", 1e-6))
    yarn = model.get("yarn") or {}
    factor = yarn.get("factor", 0.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
        raise ValueError(f"model.yarn.factor must be a number >= 0 (0 = off); got {factor!r}.")
    if factor:
        _positive("model.yarn.original_length", yarn.get("original_length"))
        for name in ("beta_fast", "beta_slow"):
            _positive(f"model.yarn.{name}", yarn.get(name))
        for name in ("mscale", "mscale_all_dim"):
            if not yarn.get(name, 0.0) >= 0:
                raise ValueError(f"model.yarn.{name} must be >= 0; got {yarn.get(name)!r}.")
        if model.arch != "decoder":
            raise ValueError("model.yarn applies to rotary positions: model.arch='decoder'.")
    kind = model.get("attention", "standard")
    _one_of("model.attention", kind, ATTENTIONS)
    if kind == "latent":
        if model.arch != "decoder":
            raise ValueError(
                f"model.attention='latent' applies to the decoder-only LM; got model.arch="
                f"{model.arch!r}. Allowed here: 'standard'."
            )
        if not (isinstance(model.q_lora_rank, int) and model.q_lora_rank >= 0):
            raise ValueError(
                f"model.q_lora_rank must be an integer >= 0 (0: a full query projection); "
                f"got {model.q_lora_rank!r}."
            )
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _positive(f"model.{name}", model[name])
        rope_dim = model.qk_rope_head_dim
        if not (isinstance(rope_dim, int) and rope_dim > 0 and rope_dim % 2 == 0):
            raise ValueError(
                f"model.qk_rope_head_dim must be a positive even integer (rotary pairs); got "
                f"{rope_dim!r}."
            )
        unused = [n for n, d in (("num_kv_heads", None), ("qk_norm", "none"),
                                 ("attention_bias", "none"), ("sliding_window", 0))
                  if (model.get(n) or d) != d]  # fmt: skip
        if unused:
            raise ValueError(
                f"model.attention='latent' does not read {', '.join('model.' + n for n in unused)}"
                " (settings of the standard attention); leave them at their defaults."
            )
    window = model.get("sliding_window") or 0
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 0):
        raise ValueError(f"model.sliding_window must be an integer >= 0 (0 = off); got {window!r}.")
    if window and model.arch != "decoder":
        raise ValueError(
            f"model.sliding_window={window} applies to the decoder-only LM (model.arch="
            f"'decoder'); got model.arch={model.arch!r}. Allowed here: 0."
        )


def _check_mtp(config: ml_collections.ConfigDict) -> None:
    """`model.mtp_depth` and `model.mtp_loss_weight` (multi-token prediction)."""
    model = config.model
    depth, weight = model.get("mtp_depth", 0), model.get("mtp_loss_weight", 0.3)
    if not (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0):
        raise ValueError(f"model.mtp_depth must be an integer >= 0; got {depth!r}.")
    if not depth:
        return
    if model.arch != "decoder":
        raise ValueError(
            f"model.mtp_depth={depth} applies to a decoder-only model; got model.arch="
            f"{model.arch!r}. Allowed here: 0."
        )
    if depth >= config.data.seq_len:
        raise ValueError(
            f"model.mtp_depth={depth} must be below data.seq_len={config.data.seq_len} (depth k "
            "predicts k + 1 tokens ahead inside the window)."
        )
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not (number and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"model.mtp_loss_weight must be a number >= 0; got {weight!r}.")


def check_moe_layers(model: ml_collections.ConfigDict) -> None:
    """`model.moe.moe_layers`: distinct block indices of a decoder-only model."""
    layers = model.moe.moe_layers
    if model.arch != "decoder":
        raise ValueError(
            f"model.moe.moe_layers lists the MoE blocks of a decoder-only model; got model.arch="
            f"{model.arch!r}. Use model.moe.moe_every, or None here."
        )
    ok = isinstance(layers, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < model.num_layers for i in layers
    )
    if not ok or len(set(layers)) != len(layers) or not layers:
        raise ValueError(
            f"model.moe.moe_layers must be distinct block indices in [0, model.num_layers="
            f"{model.num_layers}), at least one; got {layers!r} (or None: model.moe.moe_every "
            "places the MoE blocks)."
        )


def noncausal_reason(moe: ml_collections.ConfigDict) -> str | None:
    """Why an MoE config routes non-causally (a token's routing depends on later tokens), or None:
    the router's answer (switchmoe/routers). Batch prioritized routing is refused in every
    decoder on its own (see validate_config)."""
    for view in moe_views(moe):  # each router of the MoE blocks (moe/blocks.py)
        reason = routers.make_router(view).noncausal_reason()
        if reason:
            return reason
    return None


def is_noncausal_ablation(config: ml_collections.ConfigDict) -> bool:
    """A decoder-only MoE run that routes non-causally (which `noncausal_ablation` permitted).

    The flag permits; what is reported is what the routing does, so one flag over a whole sweep
    marks only its non-causal trials.
    """
    moe = config.model.moe
    return bool(
        moe.num_experts
        and config.model.get("arch", "decoder") == "decoder"
        and moe.get("noncausal_ablation", False)
        and noncausal_reason(moe)
    )


def _validate_causal_routing(config: ml_collections.ConfigDict) -> None:
    moe = config.model.moe
    if config.model.arch != "decoder":
        if moe.get("noncausal_ablation"):
            raise ValueError(
                "model.moe.noncausal_ablation=True applies to a decoder-only LM "
                f"(model.arch='decoder'); got model.arch={config.model.arch!r}, whose decoder "
                "always routes causally."
            )
        return
    reason = noncausal_reason(moe)
    if reason and not moe.get("noncausal_ablation"):
        raise ValueError(
            f"{reason}: not causal, and a decoder-only LM routes causally by default (its eval "
            "loss must not see later tokens, and it must decode as it trained). Allowed: "
            f"model.moe.router in {causal_routers()} with model.moe.causal_routing=True; or set model.moe.noncausal_ablation=True to "
            "train it as a non-causal ablation."
        )


def causal_routers() -> tuple[str, ...]:
    """The routers that route causally at their default settings (asked of each router)."""
    return tuple(
        name
        for name in routers.NAMES
        if routers.make_router(_default_moe_with(name)).noncausal_reason() is None
    )


def _default_moe_with(router: str) -> ml_collections.ConfigDict:
    moe = default_moe_config()
    moe.router = router
    return moe


def _validate_encoder_decoder(config: ml_collections.ConfigDict) -> None:
    model = config.model
    if model.get("num_decoder_layers") is not None:
        _positive("model.num_decoder_layers", model.num_decoder_layers)
    _positive("model.relative_attention_num_buckets", model.relative_attention_num_buckets)
    if model.relative_attention_num_buckets < 4 or model.relative_attention_num_buckets % 2:
        raise ValueError(
            "model.relative_attention_num_buckets must be an even number >= 4 (half per "
            f"direction, half of those exact); got {model.relative_attention_num_buckets}."
        )
    if model.relative_attention_max_distance <= model.relative_attention_num_buckets // 2:
        raise ValueError(
            "model.relative_attention_max_distance must exceed half the buckets "
            f"({model.relative_attention_num_buckets // 2}); "
            f"got {model.relative_attention_max_distance}."
        )
    if model.moe.num_experts and model.moe.router not in causal_routers():
        raise ValueError(
            f"model.moe.router={model.moe.router!r} is not causal (it routes on the whole group), "
            "and an encoder–decoder's decoder must be, to decode as it trained; allowed here: "
            f"{causal_routers()}."
        )
    if model.moe.num_experts and model.moe.get("drop_priority", "position") != "position":
        raise ValueError(
            f"model.moe.drop_priority={model.moe.drop_priority!r} is not causal (a later token "
            "with a higher score takes an earlier one's slot), and an encoder–decoder's decoder "
            "must be, to decode as it trained; allowed here: 'position' (an encoder-only "
            "setting is not built; model.moe.encoder_batch_prioritized=True gives the encoder "
            "BPR's confidence order)."
        )
    lengths = span_corruption.example_lengths(config.data)
    if config.data.num_sentinels < lengths.num_spans:
        raise ValueError(
            f"data.num_sentinels={config.data.num_sentinels} is below the {lengths.num_spans} "
            f"noise spans of a span-corruption example (data.seq_len={config.data.seq_len}, "
            f"data.noise_density={config.data.noise_density}, data.mean_noise_span_length="
            f"{config.data.mean_noise_span_length}); allowed: >= {lengths.num_spans}."
        )


def set_size(config, *, d_model, d_ff, num_layers, num_heads, num_experts, vocab_size=None):
    """Sets a config's model dimensions (used by the paper-sized variants in configs/)."""
    m = config.model
    m.d_model, m.d_ff, m.num_layers, m.num_heads = d_model, d_ff, num_layers, num_heads
    m.moe.num_experts = num_experts
    if vocab_size is not None:
        m.vocab_size = vocab_size
    return config


def switch_routing(config):
    """Switch Transformer's routing (Fedus et al. 2022): top-1 in every other block, capacity
    factor 1.25 (train) / 2.0 (eval), load-balancing loss 1e-2, router jitter 1e-2, router init
    scaled by 0.1."""
    moe = config.model.moe
    moe.num_selected = 1
    moe.moe_every = 2
    moe.train_capacity_factor = 1.25
    moe.eval_capacity_factor = 2.0
    moe.load_balancing_weight = 1e-2
    moe.jitter_eps = 1e-2
    moe.router_init_scale = 0.1
    return config


def gshard_routing(config):
    """GShard's MoE layers (Lepikhin et al. 2021): top-2 with gates normalised over the two,
    random routing of the second expert (kept when U < 2·g2), MoE every other block, capacity
    factor 1.25 / 2.0, load-balancing loss 1e-2."""
    moe = config.model.moe
    moe.num_selected = 2
    moe.gate_norm = "normalized"
    moe.random_routing = True
    moe.random_routing_threshold = 0.5
    moe.moe_every = 2
    moe.train_capacity_factor = 1.25
    moe.eval_capacity_factor = 2.0
    moe.load_balancing_weight = 1e-2
    return config


def st_moe_routing(config):
    """ST-MoE's MoE layers (Zoph et al. 2022): top-2 with normalised gates in one block of four,
    capacity factor 1.25 / 2.0, load-balancing loss 1e-2 and router z-loss 1e-3, GEGLU experts."""
    moe = config.model.moe
    moe.num_selected = 2
    moe.gate_norm = "normalized"
    moe.moe_every = 4
    moe.train_capacity_factor = 1.25
    moe.eval_capacity_factor = 2.0
    moe.load_balancing_weight = 1e-2
    moe.z_loss_weight = 1e-3
    config.model.activation = "geglu"
    return config


def for_accelerators(config):
    """Settings of the papers' runs on TPU/GPU: bf16 compute, Adafactor with an rsqrt schedule,
    512-token sequences, 256 sequences per batch, a 32k SentencePiece vocabulary (T5's 32128).

    The SentencePiece model path must be given (--config.data.spm_model_path=...), with a public
    TFDS dataset (--config.data.dataset=c4/en:3.1.0); parameter counts need neither.
    """
    config.model.dtype = "bfloat16"
    config.model.vocab_size = 32128
    config.data.tokenizer = "sentencepiece"
    config.data.dataset = "c4/en"
    config.data.seq_len = 512
    config.batch_size = 256
    config.optimizer.name = "adafactor"
    config.optimizer.schedule = "rsqrt"
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 10_000
    config.optimizer.weight_decay = 0.0
    config.num_train_steps = 100_000
    config.log_every = 100
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    return config
