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
from typing import Any, Optional

import ml_collections
import numpy as np
from flax import traverse_util

from switchmoe.config import default_config
from switchmoe.interop.hf_switch import CONFIG_FILE, WEIGHTS_FILE, read_weights
from switchmoe.models.decoder import head_dim, is_moe_block


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
}  # fmt: skip
# Families whose checkpoints are recognised and refused, with what is missing.
NOT_BUILT = {
    "deepseek_v3": "multi-head latent attention and group-limited routing are not built yet",
    "deepseek_v2": "multi-head latent attention and group-limited routing are not built yet",
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


def _rope_theta(hf: dict) -> float:
    """The rotary base, refusing any scaling (transformers 5 writes `rope_parameters`; earlier
    versions `rope_theta` and `rope_scaling`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = params.get("rope_type", "default")
    if kind != "default" or (
        scaling and scaling.get("rope_type", scaling.get("type")) != "default"
    ):
        shown = params if kind != "default" else scaling
        raise ValueError(
            f"config.json: RoPE scaling {shown!r} is not built in switchmoe (its rotary embedding "
            "is the unscaled one: rope_type 'default')."
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def num_experts(hf: dict) -> int:
    return hf.get("num_local_experts") or hf.get("num_experts") or 0


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
        _rope_theta(hf)
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
    m.rope_theta = _rope_theta(hf)
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
    return config


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
    if m.get("qk_norm", "none") == "projection":
        return "olmoe"
    if m.get("qk_norm", "none") == "head":
        return "qwen3_moe"
    if m.moe.get("shared_gate"):
        return "qwen2_moe"
    return "mixtral"


def _exportable(config: ml_collections.ConfigDict, family: Family) -> None:
    m, moe = config.model, config.model.moe
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
    if moe.router != "top_k" or moe.get("score_function", "softmax") != "softmax":
        want("model.moe.router", moe.router, "'top_k' with softmax scores")
    if moe.get("granularity", 1) != 1:
        want("model.moe.granularity", moe.granularity, "1")
    if family.top_k_norm and moe.gate_norm != family.top_k_norm:
        want("model.moe.gate_norm", moe.gate_norm, repr(family.top_k_norm))
    if moe.get("routed_scaling_factor", 1.0) != 1.0:
        want("model.moe.routed_scaling_factor", moe.routed_scaling_factor, "1.0")
    if moe.router_bias or moe.bias_update_speed:
        problems.append("a router bias or a selection bias (HF's routers have neither)")
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


def hf_config(config: ml_collections.ConfigDict, model_type: Optional[str] = None) -> dict:
    """The HF config.json of a switchmoe decoder config, as `model_type` (default:
    `infer_model_type`)."""
    family = FAMILIES[model_type or infer_model_type(config)]
    _exportable(config, family)
    m, moe = config.model, config.model.moe
    out = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff if family.sparse_step else moe.get("expert_d_ff") or m.d_ff,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.get("num_kv_heads") or m.num_heads,
        "head_dim": head_dim(m),
        "hidden_act": "silu",
        "rms_norm_eps": m.get("norm_eps", 1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": m.get("rope_theta", 10000.0)},
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
        out["moe_intermediate_size"] = moe.get("expert_d_ff") or m.d_ff
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
    return out


# -- Parameters -----------------------------------------------------------------------------


def _table(config: ml_collections.ConfigDict, family: Family) -> list[tuple[Any, tuple, str]]:
    """(HF name or list of names, switchmoe path, how it converts), for every tensor.

    Conversions: 'copy'; 'linear' (W[out, in] <-> kernel[in, out]); 'heads_in' (a q/k/v
    projection [H·Dh, D] <-> [D, H, Dh]); 'heads_bias' ([H·Dh] <-> [H, Dh]); 'heads_out' (the
    output projection [D, H·Dh] <-> [H, Dh, D]); 'experts' (E Linear weights <-> one stack
    [E, in, out]); 'row' ([1, D] <-> [D])."""
    m, moe = config.model, config.model.moe
    rows = [
        ("model.embed_tokens.weight", ("embed", "embedding"), "copy"),
        ("lm_head.weight", ("logits", "kernel"), "linear"),
        ("model.norm.weight", ("final_norm", "scale"), "copy"),
    ]
    blocks = set(moe_blocks(config))
    gate, up, down = family.expert_names
    for i in range(m.num_layers):
        hf, ours = f"model.layers.{i}", f"block_{i}"
        rows += [
            (f"{hf}.input_layernorm.weight", (ours, "attention_norm", "scale"), "copy"),
            (f"{hf}.post_attention_layernorm.weight", (ours, "ffn_norm", "scale"), "copy"),
        ]
        for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
            rows.append((f"{hf}.self_attn.{p}_proj.weight", (ours, "attention", name, "kernel"),
                         "heads_in"))  # fmt: skip
            if m.get("attention_bias", "none") != "none":
                rows.append((f"{hf}.self_attn.{p}_proj.bias", (ours, "attention", name, "bias"),
                             "heads_bias"))  # fmt: skip
        rows.append((f"{hf}.self_attn.o_proj.weight", (ours, "attention", "out", "kernel"),
                     "heads_out"))  # fmt: skip
        if m.get("attention_bias", "none") == "all":
            rows.append((f"{hf}.self_attn.o_proj.bias", (ours, "attention", "out", "bias"),
                         "copy"))  # fmt: skip
        if m.get("qk_norm", "none") != "none":
            for p, name in (("q", "query_norm"), ("k", "key_norm")):
                rows.append((f"{hf}.self_attn.{p}_norm.weight",
                             (ours, "attention", name, "scale"), "copy"))  # fmt: skip
        if i in blocks:
            x = f"{hf}.{family.moe_module}"
            rows.append((f"{x}.gate.weight", (ours, "moe", "router_kernel"), "linear"))
            for name, hf_name in zip(EXPERTS, (gate, up, down)):
                names = [f"{x}.experts.{e}.{hf_name}.weight" for e in range(moe.num_experts)]
                rows.append((names, (ours, "moe", name), "experts"))
            if moe.shared_d_ff:
                for name, hf_name in zip(EXPERTS, ("gate_proj", "up_proj", "down_proj")):
                    rows.append((f"{x}.shared_expert.{hf_name}.weight",
                                 (ours, "moe", "shared", name), "linear"))  # fmt: skip
                if moe.get("shared_gate"):
                    rows.append((f"{x}.shared_expert_gate.weight", (ours, "moe", "shared_gate"),
                                 "row"))  # fmt: skip
        else:
            for name, hf_name in zip(EXPERTS, ("gate_proj", "up_proj", "down_proj")):
                rows.append((f"{hf}.mlp.{hf_name}.weight", (ours, "ffn", name), "linear"))
    return rows


def params_from_hf(
    tensors: dict[str, np.ndarray],
    config: ml_collections.ConfigDict,
    model_type: Optional[str] = None,
) -> dict:
    """switchmoe parameters (float32 NumPy, nested dicts) from an HF state dict.

    Raises KeyError naming a missing tensor and ValueError naming a tensor the model does not
    use (a layout this converter does not know is never half-read)."""
    family = FAMILIES[model_type or infer_model_type(config)]
    m = config.model
    H, Hkv, Dh, D = m.num_heads, m.get("num_kv_heads") or m.num_heads, head_dim(m), m.d_model
    f32 = lambda name: np.asarray(tensors[name], np.float32)
    flat, used = {}, set()
    for hf, path, kind in _table(config, family):
        names = hf if isinstance(hf, list) else [hf]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"the checkpoint has no tensor {missing[0]!r} ({family.model_type}).")
        used.update(names)
        heads = H if path[-2] in ("query", "out") else Hkv
        if kind == "copy":
            value = f32(hf)
        elif kind == "linear":
            value = f32(hf).T
        elif kind == "heads_in":
            value = f32(hf).T.reshape(D, heads, Dh)
        elif kind == "heads_bias":
            value = f32(hf).reshape(heads, Dh)
        elif kind == "heads_out":
            value = f32(hf).T.reshape(H, Dh, D)
        elif kind == "experts":
            value = np.stack([f32(n).T for n in names])
        else:  # row
            value = f32(hf)[0]
        flat[path] = value
    unused = sorted(set(tensors) - used - {"model.rotary_emb.inv_freq"})
    if unused:
        raise ValueError(
            f"the checkpoint holds tensors this {family.model_type} config does not use, e.g. "
            f"{unused[0]!r} ({len(unused)} in all): its config.json and weights disagree."
        )
    return traverse_util.unflatten_dict(flat)


def params_to_hf(
    params: Any, config: ml_collections.ConfigDict, model_type: Optional[str] = None
) -> dict[str, np.ndarray]:
    """The HF state dict (float32 NumPy) of switchmoe parameters; inverts `params_from_hf`."""
    family = FAMILIES[model_type or infer_model_type(config)]
    _exportable(config, family)
    m = config.model
    H, Hkv, Dh, D = m.num_heads, m.get("num_kv_heads") or m.num_heads, head_dim(m), m.d_model
    flat = traverse_util.flatten_dict(params)
    out = {}
    for hf, path, kind in _table(config, family):
        value = np.asarray(flat[path], np.float32)
        heads = H if path[-2] in ("query", "out") else Hkv
        if kind == "copy":
            out[hf] = value
        elif kind == "linear":
            out[hf] = value.T
        elif kind == "heads_in":
            out[hf] = value.reshape(D, heads * Dh).T
        elif kind == "heads_bias":
            out[hf] = value.reshape(heads * Dh)
        elif kind == "heads_out":
            out[hf] = value.reshape(H * Dh, D).T
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
    return config, params_from_hf(read_weights(directory), config, hf["model_type"])


def save(
    config: ml_collections.ConfigDict,
    params: Any,
    directory: str,
    model_type: Optional[str] = None,
    max_shard_bytes: Optional[int] = None,
) -> None:
    """Writes config.json and safetensors that `<Family>ForCausalLM.from_pretrained(directory)`
    loads: one model.safetensors, or shards of at most `max_shard_bytes` with their index."""
    from safetensors.numpy import save_file  # noqa: PLC0415  (an optional dependency)

    tensors = params_to_hf(params, config, model_type)  # checks before anything is written
    hf = hf_config(config, model_type)
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


def is_decoder_checkpoint(directory: str) -> bool:
    """Whether `directory`'s config.json names one of FAMILIES (or NOT_BUILT, to be refused)."""
    try:
        model_type = read_hf_config(directory).get("model_type")
    except (OSError, ValueError):
        return False
    return model_type in FAMILIES or model_type in NOT_BUILT
