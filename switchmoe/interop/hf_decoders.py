"""The open decoder-only MoE families in and out of Hugging Face's layout, without PyTorch:
Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE.

    from switchmoe.interop import hf_decoders
    config, params = hf_decoders.load("OLMoE-1B-7B")          # config.json + safetensors
    hf_decoders.save(config, params, "exported")               # the same layout, back out

`load` reads what `<Family>ForCausalLM.save_pretrained` writes and what the Hub hosts:
`config.json` and `model.safetensors` (or the shards `model.safetensors.index.json` lists),
float32 or bfloat16 (switchmoe/interop/hf_switch.py reads the files). The result is switchmoe's
decoder-only LM (switchmoe/models/decoder.py) with the same logits: every block pre-norm RMSNorm,
rotary attention with grouped key/value heads, SwiGLU experts behind a softmax top-k router, run
dropless (`backend='dropless'`: the HF models have no capacity; a capacity factor is a setting
away, which is how the routing notebook evaluates them). Parameters are float32.

What maps to what (HF weights are torch Linear [out, in]; switchmoe kernels are [in, out]):

  model.embed_tokens.weight [V, D]               embed/embedding
  lm_head.weight [V, D]                          logits/kernel [D, V]  (untied only)
  model.norm.weight                              final_norm/scale
  layers.i.input_layernorm | post_attention_layernorm
                                                 block_i/attention_norm | ffn_norm /scale
  layers.i.self_attn.q|k|v_proj.weight [H·Dh, D] block_i/attention/query|key|value/kernel [D, H, Dh]
  layers.i.self_attn.q|k|v_proj.bias [H·Dh]      …/bias [H, Dh]
  layers.i.self_attn.o_proj.weight [D, H·Dh]     block_i/attention/out/kernel [H, Dh, D]
  layers.i.self_attn.q_norm|k_norm.weight        block_i/attention/query_norm|key_norm/scale
  layers.i.<moe>.gate.weight [E, D]              block_i/moe/router_kernel [D, E]
  layers.i.<moe>.experts.e.<gate>|<up>|<down>    block_i/moe/w_gate|w_in|w_out [e]
  layers.i.mlp.shared_expert.*                   block_i/moe/shared/w_gate|w_in|w_out
  layers.i.mlp.shared_expert_gate.weight [1, D]  block_i/moe/shared_gate [D]
  layers.i.mlp.gate_proj|up_proj|down_proj       block_i/ffn/w_gate|w_in|w_out (dense blocks)

<moe> is `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down) for Mixtral, `mlp` with
gate_proj, up_proj, down_proj for the others.

Each family's settings map onto switchmoe's, exactly: Mixtral renormalises the top-k gates
(`gate_norm='normalized'`), OLMoE and Qwen by `norm_topk_prob`; OLMoE normalises the whole query
and key projections (`qk_norm='projection'`), Qwen3 each head (`'head'`); Qwen2-MoE has q/k/v
biases and a sigmoid-gated shared expert (`shared_d_ff`, `shared_gate`); Qwen's
`decoder_sparse_step` is `moe_every` and its `mlp_only_layers` become an explicit `moe_layers`.
A setting switchmoe does not build (RoPE scaling, Qwen's per-layer sliding windows, OLMoE's
`clip_qkv`, tied embeddings, another activation, DeepSeek's latent attention) is refused by name
before anything is read or written, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from switchmoe import sharding
from switchmoe.config import default_config
from switchmoe.interop.hf_switch import CONFIG_FILE, WEIGHTS_FILE
from switchmoe.interop.lazy_weights import LazyWeights
from switchmoe.models.decoder import head_dim, is_moe_block
from switchmoe.models.factory import build_model, dummy_inputs, resolve
from switchmoe.moe.balancing import BIAS


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between the families' layouts and settings."""

    model_type: str
    architecture: str
    moe_module: str  # the MoE block's module name under layers.i
    expert_names: tuple[str, str, str]  # HF names of (w_gate, w_in, w_out)
    num_experts_key: str  # written on export; either key is read (transformers 5 renamed some)
    qk_norm: str  # the family's model.qk_norm
    bias_key: Optional[str]  # the config.json key of the attention biases, if any
    bias_kind: str  # what that key switches on: 'qkv' or 'all'
    sparse_step: bool  # has decoder_sparse_step and mlp_only_layers (Qwen)
    shared_expert: bool  # Qwen2-MoE's gated shared expert
    top_k_norm: Optional[str]  # always normalized (Mixtral: "normalized") or by norm_topk_prob


FAMILIES = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"),
                      "num_local_experts", "none", None, "none", False, False, "normalized"),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                    "num_experts", "projection", "attention_bias", "all", False, False, None),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp",
                        ("gate_proj", "up_proj", "down_proj"), "num_experts", "none", "qkv_bias",
                        "qkv", True, True, None),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp",
                        ("gate_proj", "up_proj", "down_proj"), "num_experts", "head",
                        "attention_bias", "all", True, False, None),
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3ForCausalLM", "mlp",
                          ("gate_proj", "up_proj", "down_proj"), "n_routed_experts", "none", None,
                          "none", False, False, None),
}  # fmt: skip
# Families whose checkpoints are recognised and refused, with what is missing.
NOT_BUILT = {
    "deepseek_v2": "DeepSeek-V2's softmax group routing (the group's best score, not its two "
    "best summed) is not built; DeepSeek-V3's is",
}
EXPERTS = ("w_gate", "w_in", "w_out")


def family_of(hf: dict) -> Family:
    model_type = hf.get("model_type")
    if model_type in NOT_BUILT:
        raise ValueError(f"config.json: model_type={model_type!r}: {NOT_BUILT[model_type]}.")
    if model_type not in FAMILIES:
        raise ValueError(
            f"config.json: model_type={model_type!r}; supported: {tuple(FAMILIES)} (Switch "
            "Transformers: switchmoe.interop.hf_switch)."
        )
    return FAMILIES[model_type]


# -- Configs --------------------------------------------------------------------------------


def _rope(hf: dict) -> tuple[float, Optional[dict]]:
    """(the rotary base, model.yarn's values or None), refusing scalings other than YaRN
    (transformers 5 writes `rope_parameters`; earlier versions `rope_theta` and `rope_scaling`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if scaling and params.get("rope_type", "default") == "default":
        params = {**params, **scaling}
        params.setdefault("rope_type", scaling.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn" or params.get("attention_factor") is not None:
        raise ValueError(
            f"config.json: RoPE scaling {params!r} is not built in switchmoe (built: the plain "
            "rotary embedding and YaRN with its attention factor derived from mscale)."
        )
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or hf["max_position_embeddings"] / original
    yarn = {
        "factor": float(factor), "original_length": int(original),
        "beta_fast": float(params.get("beta_fast") or 32.0),
        "beta_slow": float(params.get("beta_slow") or 1.0),
        "mscale": float(params.get("mscale") or 0.0),
        "mscale_all_dim": float(params.get("mscale_all_dim") or 0.0),
        "truncate": bool(params.get("truncate", True)),
    }  # fmt: skip
    return theta, yarn


def num_experts(hf: dict) -> int:
    return hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts") or 0


def rope_order(dim: int) -> np.ndarray:
    """DeepSeek's interleaved rotary pairs (0, 1), (2, 3), … as switchmoe's halves: the even
    dimensions first, then the odd ones (an exact change of basis, applied to the rows that
    make both the queries' and the keys' rope parts)."""
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def _refuse(hf: dict, family: Family) -> None:
    """Raises ValueError naming every setting of `hf` that switchmoe does not build."""
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (built: 'silu', SwiGLU experts)")
    if hf.get("tie_word_embeddings", False):
        problems.append(
            "tie_word_embeddings=True (switchmoe's tied logits are scaled by 1/sqrt(D); HF's "
            "are not)"
        )
    if family.model_type == "deepseek_v3":
        if hf.get("attention_bias"):
            problems.append("attention_bias=True (latent attention without biases is built)")
        if hf.get("n_group", 1) > 1 and num_experts(hf) % hf["n_group"]:
            problems.append(f"n_group={hf['n_group']} not dividing the experts")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            problems.append(f"scoring_func={hf['scoring_func']!r} (built: 'sigmoid')")
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            problems.append(f"topk_method={hf['topk_method']!r} (built: 'noaux_tc')")
    if hf.get("clip_qkv") is not None:
        problems.append(f"clip_qkv={hf['clip_qkv']!r} (built: None)")
    if hf.get("use_sliding_window"):
        problems.append("use_sliding_window=True (per-layer sliding windows are not built)")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds - {"full_attention"} and family.model_type != "mixtral":
        problems.append(f"layer_types={sorted(kinds)} (built: full_attention)")
    if family.shared_expert and not hf.get("shared_expert_intermediate_size"):
        problems.append("shared_expert_intermediate_size=0 (a Qwen2-MoE has a shared expert)")
    if not num_experts(hf):
        problems.append("no experts (num_experts or num_local_experts is 0 or missing)")
    elif hf.get("num_experts_per_tok", 1) > num_experts(hf):
        problems.append("num_experts_per_tok exceeds the number of experts")
    try:
        _rope(hf)
    except ValueError as e:
        problems.append(str(e).removeprefix("config.json: ").rstrip("."))
    if problems:
        raise ValueError(
            f"config.json ({family.model_type}): switchmoe does not build "
            + "; ".join(problems)
            + ". Nothing was read."
        )


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """The switchmoe config of an HF config.json (as a dict) of a supported family.

    Model settings come from the checkpoint; data, optimizer and steps are switchmoe's defaults,
    for the caller to set (with the byte tokenizer a vocabulary below 259 ids does not validate:
    set data.tokenizer to the model's SentencePiece file)."""
    family = family_of(hf)
    _refuse(hf, family)
    config = default_config()
    m = config.model
    m.arch = "decoder"
    m.vocab_size = hf["vocab_size"]
    m.d_model = hf["hidden_size"]
    m.num_layers = hf["num_hidden_layers"]
    m.num_heads = hf["num_attention_heads"]
    m.num_kv_heads = hf.get("num_key_value_heads") or m.num_heads
    m.head_dim = hf.get("head_dim") or m.d_model // m.num_heads
    m.d_ff = hf["intermediate_size"]
    m.activation = "swiglu"
    m.dropout_rate = 0.0
    m.tie_embeddings = False
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.rope_theta, yarn = _rope(hf)
    if yarn:
        m.yarn.update(yarn)
    m.qk_norm = family.qk_norm
    m.attention_bias = family.bias_kind if family.bias_key and hf.get(family.bias_key) else "none"
    if family.model_type == "qwen2_moe" and "qkv_bias" not in hf:
        m.attention_bias = "qkv"  # before transformers 5 Qwen2-MoE always had them
    m.sliding_window = int(hf.get("sliding_window") or 0) if family.model_type == "mixtral" else 0
    moe = m.moe
    moe.num_experts = num_experts(hf)
    moe.num_selected = hf["num_experts_per_tok"]
    moe.router = "top_k"
    moe.score_function = "softmax"
    moe.gate_norm = family.top_k_norm or (
        "normalized" if hf.get("norm_topk_prob", False) else "raw"
    )
    moe.expert_d_ff = hf.get("moe_intermediate_size") or m.d_ff
    moe.backend = "dropless"
    moe.router_bias = False
    moe.jitter_eps = float(hf.get("router_jitter_noise", 0.0) or 0.0)
    moe.load_balancing_weight = float(hf.get("router_aux_loss_coef", 0.0) or 0.0)
    moe.z_loss_weight = float(hf.get("router_z_loss_coef", 0.0) or 0.0)
    moe.moe_every = 1
    if family.sparse_step:
        moe.moe_every = hf.get("decoder_sparse_step", 1) or 1
        only_dense = set(hf.get("mlp_only_layers") or [])
        if only_dense:
            moe.moe_layers = tuple(
                i for i in range(m.num_layers)
                if i not in only_dense and (i + 1) % moe.moe_every == 0
            )  # fmt: skip
            moe.moe_every = 1
    if family.shared_expert:
        moe.shared_d_ff = hf["shared_expert_intermediate_size"]
        moe.shared_gate = True
    if family.model_type == "deepseek_v3":
        _deepseek_settings(hf, config)
    return config


def _deepseek_settings(hf: dict, config: ml_collections.ConfigDict) -> None:
    """DeepSeek-V3: latent attention, sigmoid scores with a selection bias, group-limited
    top-k, routed scaling, shared experts without a gate, dense first blocks."""
    m, moe = config.model, config.model.moe
    m.attention = "latent"
    m.num_kv_heads = None
    m.head_dim = None
    m.q_lora_rank = hf.get("q_lora_rank") or 0
    m.kv_lora_rank = hf["kv_lora_rank"]
    m.qk_nope_head_dim = hf["qk_nope_head_dim"]
    m.qk_rope_head_dim = hf["qk_rope_head_dim"]
    m.v_head_dim = hf["v_head_dim"]
    moe.score_function = "sigmoid"
    moe.gate_norm = "normalized" if hf.get("norm_topk_prob", True) else "raw"
    moe.routed_scaling_factor = float(hf.get("routed_scaling_factor", 1.0))
    moe.expert_groups = hf.get("n_group") or 1
    moe.groups_selected = hf.get("topk_group") or 1
    # The checkpoint's e_score_correction_bias is switchmoe's selection bias, which exists with
    # bias balancing on: DeepSeek-V3's update speed (the paper's gamma; HF's config has none).
    moe.bias_update_speed = 1e-3
    moe.load_balancing_weight = 0.0
    moe.sequence_balance_weight = 1e-4  # DeepSeek-V3's complementary sequence-wise loss
    shared = hf.get("n_shared_experts") or 0
    moe.shared_d_ff = shared * moe.expert_d_ff
    first_dense = hf.get("first_k_dense_replace") or 0
    moe.moe_layers = tuple(range(first_dense, m.num_layers)) if first_dense else None
    moe.moe_every = 1


def moe_blocks(config: ml_collections.ConfigDict) -> list[int]:
    moe = config.model.moe
    return [
        i for i in range(config.model.num_layers)
        if is_moe_block(i, moe.num_experts, moe.moe_every, moe.get("moe_layers"))
    ]  # fmt: skip


def infer_model_type(config: ml_collections.ConfigDict) -> str:
    """The family a switchmoe config is written as when `save` is not told: OLMoE for
    projection q/k norms, Qwen3-MoE for per-head ones, Qwen2-MoE for a gated shared expert,
    Mixtral otherwise."""
    m = config.model
    if m.get("attention", "standard") == "latent":
        return "deepseek_v3"
    if m.get("qk_norm", "none") == "projection":
        return "olmoe"
    if m.get("qk_norm", "none") == "head":
        return "qwen3_moe"
    if m.moe.get("shared_gate"):
        return "qwen2_moe"
    return "mixtral"


def _exportable(config: ml_collections.ConfigDict, family: Family) -> None:
    m, moe = config.model, config.model.moe
    deepseek = family.model_type == "deepseek_v3"
    problems = []
    want = lambda name, value, allowed: problems.append(
        f"{name}={value!r} (allowed: {allowed})"
    )  # fmt: skip
    if m.get("arch") != "decoder":
        want("model.arch", m.get("arch"), "'decoder'")
    if m.activation != "swiglu":
        want("model.activation", m.activation, "'swiglu'")
    if m.get("tie_embeddings", True):
        want("model.tie_embeddings", True, "False")
    attention = m.get("attention", "standard")
    if attention != ("latent" if deepseek else "standard"):
        want("model.attention", attention, "'latent'" if deepseek else "'standard'")
    if m.get("qk_norm", "none") != family.qk_norm:
        want("model.qk_norm", m.get("qk_norm", "none"), repr(family.qk_norm))
    bias = m.get("attention_bias", "none")
    if bias not in ("none", family.bias_kind if family.bias_key else "none"):
        allowed = "'none'" + (f", {family.bias_kind!r}" if family.bias_key else "")
        want("model.attention_bias", bias, allowed)
    if (m.get("sliding_window") or 0) and family.model_type != "mixtral":
        want("model.sliding_window", m.sliding_window, "0")
    if not moe.num_experts:
        want("model.moe.num_experts", 0, ">= 1")
    scores = "sigmoid" if deepseek else "softmax"
    if moe.router != "top_k" or moe.get("score_function", "softmax") != scores:
        want("model.moe.router", moe.router, f"'top_k' with {scores} scores")
    if moe.get("block_routers") is not None:
        want("model.moe.block_routers", tuple(moe.block_routers), "None (one router for all)")
    if moe.get("granularity", 1) != 1:
        want("model.moe.granularity", moe.granularity, "1")
    if family.top_k_norm and moe.gate_norm != family.top_k_norm:
        want("model.moe.gate_norm", moe.gate_norm, repr(family.top_k_norm))
    if not deepseek:
        if moe.get("routed_scaling_factor", 1.0) != 1.0:
            want("model.moe.routed_scaling_factor", moe.routed_scaling_factor, "1.0")
        if moe.get("expert_groups", 1) != 1:
            want("model.moe.expert_groups", moe.expert_groups, "1")
        if moe.bias_update_speed:
            problems.append("a selection bias (model.moe.bias_update_speed; HF's router has none)")
    if moe.router_bias:
        want("model.moe.router_bias", True, "False")
    if deepseek:
        width = moe.get("expert_d_ff") or m.d_ff
        if moe.shared_d_ff % width or moe.get("shared_gate"):
            want("model.moe.shared_d_ff/shared_gate", (moe.shared_d_ff, moe.get("shared_gate")),
                 f"a multiple of the expert width {width}, ungated")  # fmt: skip
        blocks = moe_blocks(config)
        if blocks != list(range(m.num_layers - len(blocks), m.num_layers)):
            want("the MoE blocks", blocks, "the last blocks after the first dense ones")
    else:
        if bool(moe.shared_d_ff) != family.shared_expert or (
            family.shared_expert and not moe.get("shared_gate")
        ):
            want("model.moe.shared_d_ff/shared_gate", (moe.shared_d_ff, moe.get("shared_gate")),
                 "a gated shared expert" if family.shared_expert else "no shared expert")  # fmt: skip
        if not family.sparse_step and len(moe_blocks(config)) != m.num_layers:
            want("the MoE blocks", moe_blocks(config), "every block")
    if problems:
        raise ValueError(
            f"Hugging Face's {family.model_type} cannot express: " + "; ".join(problems) + "."
        )


def _rope_parameters(m: ml_collections.ConfigDict) -> dict:
    theta = m.get("rope_theta", 10000.0)
    yarn = m.get("yarn") or {}
    if not yarn.get("factor"):
        return {"rope_type": "default", "rope_theta": theta}
    return {
        "rope_type": "yarn", "rope_theta": theta, "factor": yarn["factor"],
        "original_max_position_embeddings": yarn["original_length"],
        "beta_fast": yarn["beta_fast"], "beta_slow": yarn["beta_slow"],
        "mscale": yarn["mscale"] or None, "mscale_all_dim": yarn["mscale_all_dim"] or None,
        "truncate": yarn["truncate"],
    }  # fmt: skip


def hf_config(config: ml_collections.ConfigDict, model_type: Optional[str] = None) -> dict:
    """The HF config.json of a switchmoe decoder config, as `model_type` (default:
    `infer_model_type`)."""
    family = FAMILIES[model_type or infer_model_type(config)]
    _exportable(config, family)
    m, moe = config.model, config.model.moe
    expert_width = moe.get("expert_d_ff") or m.d_ff
    dense_width = m.d_ff if family.sparse_step or family.model_type == "deepseek_v3" else None
    out = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": dense_width or expert_width,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.get("num_kv_heads") or m.num_heads,
        "head_dim": head_dim(m),
        "hidden_act": "silu",
        "rms_norm_eps": m.get("norm_eps", 1e-6),
        "rope_parameters": _rope_parameters(m),
        "tie_word_embeddings": False,
        "max_position_embeddings": max(config.data.seq_len, 4096),
        "attention_dropout": 0.0,
        family.num_experts_key: moe.num_experts,
        "num_experts_per_tok": moe.num_selected,
        "router_aux_loss_coef": moe.load_balancing_weight,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if family.model_type == "mixtral":
        out["sliding_window"] = m.get("sliding_window") or None
        out["router_jitter_noise"] = moe.jitter_eps
    else:
        out["norm_topk_prob"] = moe.gate_norm == "normalized"
        out["moe_intermediate_size"] = expert_width
    if family.bias_key:
        out[family.bias_key] = m.get("attention_bias", "none") != "none"
    if family.model_type == "olmoe":
        out["router_z_loss_coef"] = moe.z_loss_weight
        out["clip_qkv"] = None
    if family.sparse_step:
        blocks = moe_blocks(config)
        every = moe.moe_every if moe.get("moe_layers") is None else 1
        out["decoder_sparse_step"] = every
        out["mlp_only_layers"] = [
            i for i in range(m.num_layers) if (i + 1) % every == 0 and i not in blocks
        ]
        out["use_sliding_window"] = False
    if family.shared_expert:
        out["shared_expert_intermediate_size"] = moe.shared_d_ff
    if family.model_type == "deepseek_v3":
        del out["head_dim"]  # DeepSeek's config derives it (the rope width)
        out.update(
            q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
            v_head_dim=m.v_head_dim, rope_interleave=True, attention_bias=False,
            n_shared_experts=moe.shared_d_ff // expert_width,
            routed_scaling_factor=moe.routed_scaling_factor,
            n_group=moe.expert_groups, topk_group=moe.groups_selected,
            first_k_dense_replace=m.num_layers - len(moe_blocks(config)),
            num_nextn_predict_layers=0,
        )  # fmt: skip
    return out


# -- Parameters -----------------------------------------------------------------------------


def _table(config: ml_collections.ConfigDict, family: Family) -> list[tuple]:
    """(HF name or list of names, switchmoe path, how it converts[, rope offset]), for every
    tensor.

    Conversions: 'copy'; 'linear' (W[out, in] <-> kernel[in, out]); 'heads_in' (a projection
    into heads [H·X, in] <-> [in, H, X]); 'heads_bias' ([H·X] <-> [H, X]); 'heads_out' (out of
    heads [D, H·X] <-> [H, X, D]); 'experts' (E Linear weights <-> one stack [E, in, out]);
    'row' ([1, D] <-> [D]). A rope offset r: the last axis's entries r .. r + Dr are DeepSeek's
    interleaved rotary pairs, reordered into halves (rope_order)."""
    m, moe = config.model, config.model.moe
    rows = [
        ("model.embed_tokens.weight", ("embed", "embedding"), "copy"),
        ("lm_head.weight", ("logits", "kernel"), "linear"),
        ("model.norm.weight", ("final_norm", "scale"), "copy"),
    ]
    blocks = set(moe_blocks(config))
    gate, up, down = family.expert_names
    latent = m.get("attention", "standard") == "latent"
    for i in range(m.num_layers):
        hf, ours = f"model.layers.{i}", f"block_{i}"
        a = f"{hf}.self_attn"
        rows += [
            (f"{hf}.input_layernorm.weight", (ours, "attention_norm", "scale"), "copy"),
            (f"{hf}.post_attention_layernorm.weight", (ours, "ffn_norm", "scale"), "copy"),
        ]
        if latent:
            att, dn, rkv = (ours, "attention"), m.qk_nope_head_dim, m.kv_lora_rank
            if m.q_lora_rank:
                rows += [
                    (f"{a}.q_a_proj.weight", (*att, "query_down", "kernel"), "linear"),
                    (f"{a}.q_a_layernorm.weight", (*att, "query_norm", "scale"), "copy"),
                    (f"{a}.q_b_proj.weight", (*att, "query_up", "kernel"), "heads_in", dn),
                ]
            else:
                rows.append((f"{a}.q_proj.weight", (*att, "query", "kernel"), "heads_in", dn))
            rows += [
                (f"{a}.kv_a_proj_with_mqa.weight", (*att, "kv_down", "kernel"), "linear", rkv),
                (f"{a}.kv_a_layernorm.weight", (*att, "kv_norm", "scale"), "copy"),
                (f"{a}.kv_b_proj.weight", (*att, "kv_up", "kernel"), "heads_in"),
                (f"{a}.o_proj.weight", (*att, "out", "kernel"), "heads_out"),
            ]
        else:
            for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
                rows.append((f"{a}.{p}_proj.weight", (ours, "attention", name, "kernel"),
                             "heads_in"))  # fmt: skip
                if m.get("attention_bias", "none") != "none":
                    rows.append((f"{a}.{p}_proj.bias", (ours, "attention", name, "bias"),
                                 "heads_bias"))  # fmt: skip
            rows.append((f"{a}.o_proj.weight", (ours, "attention", "out", "kernel"), "heads_out"))
            if m.get("attention_bias", "none") == "all":
                rows.append((f"{a}.o_proj.bias", (ours, "attention", "out", "bias"), "copy"))
            if m.get("qk_norm", "none") != "none":
                for p, name in (("q", "query_norm"), ("k", "key_norm")):
                    rows.append((f"{a}.{p}_norm.weight", (ours, "attention", name, "scale"),
                                 "copy"))  # fmt: skip
        if i in blocks:
            x = f"{hf}.{family.moe_module}"
            rows.append((f"{x}.gate.weight", (ours, "moe", "router_kernel"), "linear"))
            if moe.bias_update_speed:
                rows.append((f"{x}.gate.e_score_correction_bias", (ours, "moe", BIAS), "copy"))
            for name, hf_name in zip(EXPERTS, (gate, up, down)):
                names = [f"{x}.experts.{e}.{hf_name}.weight" for e in range(moe.num_experts)]
                rows.append((names, (ours, "moe", name), "experts"))
            if moe.shared_d_ff:
                shared = "shared_experts" if latent else "shared_expert"
                for name, hf_name in zip(EXPERTS, ("gate_proj", "up_proj", "down_proj")):
                    rows.append((f"{x}.{shared}.{hf_name}.weight",
                                 (ours, "moe", "shared", name), "linear"))  # fmt: skip
                if moe.get("shared_gate"):
                    rows.append((f"{x}.shared_expert_gate.weight", (ours, "moe", "shared_gate"),
                                 "row"))  # fmt: skip
        else:
            for name, hf_name in zip(EXPERTS, ("gate_proj", "up_proj", "down_proj")):
                rows.append((f"{hf}.mlp.{hf_name}.weight", (ours, "ffn", name), "linear"))
    return rows


def _heads(config: ml_collections.ConfigDict, path: tuple) -> int:
    m = config.model
    if path[-2] in ("key", "value"):
        return m.get("num_kv_heads") or m.num_heads
    return m.num_heads


def _reorder_rope(value: np.ndarray, offset: int, dim: int, inverse: bool) -> np.ndarray:
    order = rope_order(dim)
    order = np.argsort(order) if inverse else order
    out = value.copy()
    out[..., offset : offset + dim] = value[..., offset + order]
    return out


def leaf_readers(
    tensors: Mapping[str, np.ndarray],
    config: ml_collections.ConfigDict,
    model_type: Optional[str] = None,
) -> dict[tuple, tuple[tuple[int, ...], Callable[[Any], np.ndarray]]]:
    """path -> (shape, read), `read(index)` converting only what `index` (a tuple of slices of the
    switchmoe leaf, or None: all of it) needs: a stacked expert leaf reads only the experts and
    rows of its slice (from memory-mapped tensors, LazyWeights, nothing else is touched); any
    other leaf is converted whole (one HF tensor), then sliced.

    Raises KeyError naming a missing tensor and ValueError naming a tensor the model does not
    use (a layout this converter does not know is never half-read). Tensors of blocks past
    num_hidden_layers (DeepSeek-V3's multi-token-prediction module, which transformers drops
    too) are left out."""
    family = FAMILIES[model_type or infer_model_type(config)]
    latent = config.model.get("attention", "standard") == "latent"
    f32 = lambda name: np.asarray(tensors[name], np.float32)
    readers, used = {}, set()
    for hf, path, kind, *rope in _table(config, family):
        names = hf if isinstance(hf, list) else [hf]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"the checkpoint has no tensor {missing[0]!r} ({family.model_type}).")
        used.update(names)
        if kind == "experts":  # HF [out, in] per expert -> [E, in, out], read by slice
            out_dim, in_dim = tensors[names[0]].shape

            def read(index, names=names):
                e, i, o = index or (slice(None),) * 3
                return np.stack([np.asarray(tensors[n][o, i], np.float32).T for n in names[e]])

            readers[path] = ((len(names), in_dim, out_dim), read)
            continue
        heads = _heads(config, path)
        shape = _convert_in(np.empty(tensors[hf].shape, np.float32), kind, heads).shape

        def read(index, hf=hf, kind=kind, heads=heads, rope=rope):
            value = _convert_in(f32(hf), kind, heads)
            if rope and latent:
                value = _reorder_rope(value, rope[0], config.model.qk_rope_head_dim, inverse=False)
            return value if index is None else value[index]

        readers[path] = (shape, read)
    past = lambda name: name.startswith("model.layers.") and int(
        name.split(".")[2]
    ) >= config.model.num_layers  # fmt: skip
    unused = sorted(n for n in set(tensors) - used - {"model.rotary_emb.inv_freq"} if not past(n))
    if unused:
        raise ValueError(
            f"the checkpoint holds tensors this {family.model_type} config does not use, e.g. "
            f"{unused[0]!r} ({len(unused)} in all): its config.json and weights disagree."
        )
    return readers


def _convert_in(w: np.ndarray, kind: str, heads: int) -> np.ndarray:
    if kind == "copy":
        return w
    if kind == "linear":
        return w.T
    if kind == "heads_in":  # [H·X, in] -> [in, H, X]
        return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)
    if kind == "heads_bias":
        return w.reshape(heads, -1)
    if kind == "heads_out":  # [D, H·X] -> [H, X, D]
        return w.T.reshape(heads, w.shape[1] // heads, w.shape[0])
    return w[0]  # row


def params_from_hf(
    tensors: Mapping[str, np.ndarray],
    config: ml_collections.ConfigDict,
    model_type: Optional[str] = None,
) -> dict:
    """switchmoe parameters (float32 NumPy, nested dicts) from an HF state dict (see
    `leaf_readers` for what is refused)."""
    readers = leaf_readers(tensors, config, model_type)
    return traverse_util.unflatten_dict({path: read(None) for path, (_, read) in readers.items()})


def load_onto_mesh(
    directory: str, mesh: jax.sharding.Mesh, rules: Optional[tuple] = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) with every parameter placed on `mesh` by the config's logical axis rules
    (experts split over the "expert" axis) as it is read (`place_on_mesh`). `rules`: default the
    config's (`mesh.rules`)."""
    hf = read_hf_config(directory)
    config = config_from_hf(hf)
    resolved = resolve(config)
    boxed = jax.eval_shape(
        lambda: build_model(resolved).init(jax.random.key(0), *dummy_inputs(resolved))
    )["params"]
    shardings = sharding.param_shardings(
        boxed, mesh, rules or sharding.logical_rules(resolved.mesh)
    )
    return config, place_on_mesh(directory, config, shardings, hf["model_type"])


def place_on_mesh(
    directory: str, config: ml_collections.ConfigDict, shardings: Any, model_type: str
) -> dict:
    """The parameters of the checkpoint at `directory`, each leaf placed with its sharding (a
    tree like the parameters) as it is read from the memory-mapped files: a routed expert stack
    per device (the experts that device holds, nothing else), any other leaf as one HF tensor
    converted once and copied to each device's slice. The host holds one leaf's conversion (for
    the expert stacks, one device's experts) at a time."""
    flat = traverse_util.flatten_dict(shardings)
    readers = leaf_readers(LazyWeights(directory), config, model_type)
    placed = {}
    for path, (shape, read) in readers.items():
        per_device = path[-1] in EXPERTS and "moe" in path and "shared" not in path
        placed[path] = _place(shape, flat[path], read, per_device)
    return traverse_util.unflatten_dict(placed)


def _place(shape, where: jax.sharding.Sharding, read, per_device: bool) -> jax.Array:
    """The leaf on `where`'s devices, each device's slice copied from a host array that is
    released once copied (may_alias=False: on CPU devices JAX would otherwise keep the host
    array as the device buffer, which is fine, but hides what staging costs)."""
    whole = None if per_device else read(None)
    shards = [
        jax.device_put(read(index) if per_device else whole[index], device, may_alias=False)
        for device, index in where.addressable_devices_indices_map(shape).items()
    ]
    return jax.make_array_from_single_device_arrays(shape, where, shards)


def params_to_hf(
    params: Any, config: ml_collections.ConfigDict, model_type: Optional[str] = None
) -> dict[str, np.ndarray]:
    """The HF state dict (float32 NumPy) of switchmoe parameters; inverts `params_from_hf`."""
    family = FAMILIES[model_type or infer_model_type(config)]
    _exportable(config, family)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for hf, path, kind, *rope in _table(config, family):
        value = np.asarray(flat[path], np.float32)
        if rope and config.model.get("attention", "standard") == "latent":
            value = _reorder_rope(value, rope[0], config.model.qk_rope_head_dim, inverse=True)
        if kind == "copy":
            out[hf] = value
        elif kind == "linear":
            out[hf] = value.T
        elif kind in ("heads_in", "heads_bias"):
            out[hf] = value.reshape(value.shape[0], -1).T if kind == "heads_in" else value.ravel()
        elif kind == "heads_out":
            out[hf] = value.reshape(-1, value.shape[-1]).T
        elif kind == "experts":
            for e, name in enumerate(hf):
                out[name] = value[e].T
        else:  # row
            out[hf] = value[None]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# -- Directories ----------------------------------------------------------------------------


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (a Hugging Face model directory has one).")
    with open(path) as f:
        return json.load(f)


def load(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of an HF checkpoint directory of a supported family; the config is
    checked (and refused by name) before any weight is read."""
    hf = read_hf_config(directory)
    config = config_from_hf(hf)
    return config, params_from_hf(LazyWeights(directory), config, hf["model_type"])


def save(
    config: ml_collections.ConfigDict,
    params: Any,
    directory: str,
    model_type: Optional[str] = None,
    max_shard_bytes: Optional[int] = None,
    special_ids: Optional[Mapping[str, int]] = None,
) -> None:
    """Writes config.json and safetensors that `<Family>ForCausalLM.from_pretrained(directory)`
    loads: one model.safetensors, or shards of at most `max_shard_bytes` with their index.
    config.json carries `special_ids` (pad/bos/eos; `hf.save` passes the run's) when given."""
    from safetensors.numpy import save_file  # noqa: PLC0415  (an optional dependency)

    tensors = params_to_hf(params, config, model_type)  # checks before anything is written
    hf = {**hf_config(config, model_type), **(special_ids or {})}
    os.makedirs(directory, exist_ok=True)
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    else:
        shards, size = [[]], 0
        for name in sorted(tensors):
            if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += tensors[name].nbytes
        n = len(shards)
        weight_map = {}
        for k, names in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            save_file({name: tensors[name] for name in names}, os.path.join(directory, file),
                      metadata={"format": "pt"})  # fmt: skip
            weight_map.update({name: file for name in names})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2)


def weight_files(directory: str) -> list[str]:
    """The safetensors files (and shard index) of a checkpoint directory, sorted."""
    return sorted(
        f for f in os.listdir(directory)
        if f.endswith(".safetensors") or f == "model.safetensors.index.json"
    )  # fmt: skip


def is_decoder_checkpoint(directory: str) -> bool:
    """Whether `directory`'s config.json names one of FAMILIES (or NOT_BUILT, to be refused)."""
    try:
        model_type = read_hf_config(directory).get("model_type")
    except (OSError, ValueError):
        return False
    return model_type in FAMILIES or model_type in NOT_BUILT
