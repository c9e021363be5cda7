"""Hugging Face Switch Transformers checkpoints in and out, without PyTorch.

    from switchmoe.interop import hf_switch
    config, params = hf_switch.load("switch-base-8")        # a directory: config.json + weights
    hf_switch.save(config, params, "exported")              # the same layout, back out

`load` reads what `SwitchTransformersForConditionalGeneration.save_pretrained` writes and what
the Hub hosts for google/switch-base-8 … 256: `config.json` and `model.safetensors` (or
`model.safetensors.index.json` with its shards), through safetensors' NumPy API (bfloat16
tensors, which NumPy lacks, are read from the file's own header). Downloading is the caller's
business (README, "Hugging Face checkpoints"). The result is switchmoe's T5-style
encoder–decoder (switchmoe/models/encoder_decoder.py) with the same logits, and `save` inverts `load`.

What maps to what (HF weights are torch Linear [out, in]; switchmoe kernels are [in, out]):

  shared.weight [V, D]                                 embed/embedding
  lm_head.weight [V, D] (untied only)                  logits/kernel [D, V]
  {enc,dec}oder.block.i.layer.0.SelfAttention.q|k|v|o  {stack}_i/attention/query|key|value|out
  {enc,dec}oder.block.0.layer.0.SelfAttention          {stack}_position_bias/rel_embedding
    .relative_attention_bias.weight [N, H]               [H, N] (one table per stack)
  decoder.block.i.layer.1.EncDecAttention.*            decoder_i/cross_attention/*
  ….layer.k.layer_norm.weight                          attention_norm | cross_attention_norm |
                                                       ffn_norm /scale
  ….mlp.wi|wo.weight (dense blocks)                    {stack}_i/ffn/w_in [D, F] | w_out [F, D]
  ….mlp.router.classifier.weight [E, D] (and .bias)    {stack}_i/moe/router_kernel [D, E]
  ….mlp.experts.expert_e.wi|wo.weight                  {stack}_i/moe/w_in[e] | w_out[e]
  {enc,dec}oder.final_layer_norm.weight                {encoder,decoder}_norm/scale

Three differences of convention, each converted exactly:
- T5 does not scale attention scores by 1/sqrt(d_kv) (it folds that into the initialisation);
  switchmoe does, so the query kernel is multiplied by sqrt(d_kv) on the way in and divided on
  the way out (exact when d_kv is a power of 4, as 64 is).
- HF places the sparse layers at block indices i with i % step == 1 (step = layers / sparse
  layers; every block when step is 1); switchmoe's `moe_every` places them at (i + 1) % every
  == 0. The two agree for step 1 and 2, which is every released checkpoint; others are refused.
- HF's capacity is a fixed `expert_capacity` slots per expert per sequence; switchmoe's is
  C = max(ceil(S/E · factor), min_capacity) per routing group. The imported config routes each
  sequence as one group with `min_capacity = expert_capacity` and factors that give exactly
  `expert_capacity` at `reference_length` tokens (512, T5's pre-training inputs), so every
  sequence up to that length has HF's capacity and its drops (in-order priority in both; a
  dropped token leaves the layer as 0 in both, as in transformers >= 5). Longer sequences get
  proportionally more slots in switchmoe. Padding differs: HF routes padded encoder positions
  (they can take slots); switchmoe leaves them out.

Only what the HF architecture can express is exported: a top-1 'top_k' router with raw gates
(Switch), relu or tanh-GELU experts without gating, no shared expert, moe_every 1 or 2, RMSNorm
epsilon 1e-6. Anything else raises ValueError naming the setting.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np
from flax import traverse_util

from switchmoe.config import default_config
from switchmoe.models.decoder import head_dim, is_moe_block
from switchmoe.models.encoder_decoder import num_decoder_layers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF activation names -> switchmoe's. switchmoe's "gelu" is jax.nn.gelu, the tanh approximation.
ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
EXPORTED_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_new"}
REFERENCE_LENGTH = 512
# The ids T5 and the released Switch checkpoints use, and HF's defaults for a Switch config.
T5_SPECIAL_IDS = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


# -- Reading safetensors --------------------------------------------------------------------


def _read_bfloat16(path: str, names: list[str]) -> dict[str, np.ndarray]:
    """`names` from a safetensors file as ml_dtypes.bfloat16 arrays, from the file's header (an
    8-byte little-endian length, then JSON {name: {dtype, shape, data_offsets}}, then data)."""
    import ml_dtypes  # noqa: PLC0415  (a JAX dependency)

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        out = {}
        for name in names:
            entry = header[name]
            if entry["dtype"] != "BF16":
                raise ValueError(f"{path}: {name} is {entry['dtype']}, expected BF16")
            start, end = entry["data_offsets"]
            f.seek(8 + length + start)
            data = np.frombuffer(f.read(end - start), dtype=ml_dtypes.bfloat16)
            out[name] = data.reshape(entry["shape"])
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as NumPy (bfloat16 as ml_dtypes.bfloat16)."""
    from safetensors import safe_open  # noqa: PLC0415  (an optional dependency: the hf extra)

    tensors, bf16 = {}, []
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            try:
                tensors[name] = f.get_tensor(name)
            except TypeError:  # NumPy has no bfloat16
                bf16.append(name)
    return {**tensors, **(_read_bfloat16(path, bf16) if bf16 else {})}


def read_weights(directory: str) -> dict[str, np.ndarray]:
    """The tensors of an HF checkpoint directory: model.safetensors, or the shards that
    model.safetensors.index.json lists."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(directory, shard)))
        return tensors
    single = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(
            f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (a PyTorch .bin checkpoint "
            "must first be re-saved as safetensors)."
        )
    return read_safetensors(single)


# -- Configs --------------------------------------------------------------------------------


def hf_sparse_layers(num_layers: int, num_sparse: int) -> list[int]:
    """The block indices HF's SwitchTransformersStack makes sparse (its own rule, including its
    fallback step when num_sparse is 0)."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    return [i for i in range(num_layers) if step > 0 and (i % step == 1 or step == 1)]


def _moe_every(hf: dict) -> int:
    layouts = {}
    for stack, layers, sparse in (
        ("encoder", hf["num_layers"], hf.get("num_sparse_encoder_layers", 0)),
        ("decoder", hf.get("num_decoder_layers") or hf["num_layers"],
         hf.get("num_sparse_decoder_layers", 0)),
    ):  # fmt: skip
        want = hf_sparse_layers(layers, sparse)
        layouts[stack] = want
        for every in (1, 2):
            if [i for i in range(layers) if is_moe_block(i, 1, every)] == want:
                layouts[stack] = every
                break
    if layouts["encoder"] != layouts["decoder"] or not isinstance(layouts["encoder"], int):
        raise ValueError(
            "the checkpoint's sparse layers cannot be expressed with model.moe.moe_every (one "
            f"setting for both stacks; every 1 or 2 matches HF's placement): {layouts}."
        )
    return layouts["encoder"]


def config_from_hf(hf: dict, reference_length: int = REFERENCE_LENGTH) -> ml_collections.ConfigDict:
    """The switchmoe config of an HF SwitchTransformersConfig (config.json as a dict).

    Model settings come from the checkpoint; everything else (data, optimizer, steps) is
    switchmoe's default, for the caller to set. See the module docstring for the capacity rule.
    """
    if hf.get("model_type") not in (None, "switch_transformers"):
        raise ValueError(
            f"config.json has model_type={hf.get('model_type')!r}; expected 'switch_transformers'."
        )
    act = hf.get("dense_act_fn", "relu")
    if act not in ACTIVATIONS:
        raise ValueError(
            f"config.json: dense_act_fn={act!r} has no switchmoe equivalent; allowed: "
            f"{tuple(ACTIVATIONS)}."
        )
    eps = hf.get("layer_norm_epsilon", 1e-6)
    if not math.isclose(eps, 1e-6):
        raise ValueError(f"config.json: layer_norm_epsilon={eps}; switchmoe's RMSNorm uses 1e-6.")
    if hf.get("router_dtype", "float32") != "float32":
        raise ValueError(
            f"config.json: router_dtype={hf['router_dtype']!r}; switchmoe imports float32 routers."
        )
    E, capacity = hf["num_experts"], hf["expert_capacity"]
    config = default_config()
    config.model.arch = "encoder_decoder"
    m = config.model
    m.vocab_size = hf["vocab_size"]
    m.d_model = hf["d_model"]
    m.num_layers = hf["num_layers"]
    m.num_decoder_layers = hf.get("num_decoder_layers") or hf["num_layers"]
    m.num_heads = hf["num_heads"]
    m.head_dim = hf["d_kv"]
    m.d_ff = hf["d_ff"]
    m.activation = ACTIVATIONS[act]
    m.dropout_rate = hf.get("dropout_rate", 0.1)
    m.tie_embeddings = hf.get("tie_word_embeddings", True)
    m.relative_attention_num_buckets = hf.get("relative_attention_num_buckets", 32)
    m.relative_attention_max_distance = hf.get("relative_attention_max_distance", 128)
    moe = m.moe
    moe.num_experts = E
    moe.moe_every = _moe_every(hf)
    moe.router = "top_k"
    moe.num_selected = 1
    moe.gate_norm = "raw"
    moe.group_size = None
    moe.min_capacity = capacity
    moe.train_capacity_factor = moe.eval_capacity_factor = capacity * E / reference_length
    moe.router_bias = bool(hf.get("router_bias", False))
    moe.jitter_eps = hf.get("router_jitter_noise", 0.01)
    moe.load_balancing_weight = hf.get("router_aux_loss_coef", 0.001)
    moe.z_loss_weight = hf.get("router_z_loss_coef", 0.001)
    return config


def _exportable(config: ml_collections.ConfigDict) -> None:
    m, moe = config.model, config.model.moe
    problems = []
    if m.get("arch") != "encoder_decoder":
        problems.append(f"model.arch={m.get('arch')!r} (allowed: 'encoder_decoder')")
    if m.activation not in EXPORTED_ACTIVATIONS:
        problems.append(f"model.activation={m.activation!r} (allowed: relu, gelu)")
    for name, allowed in (("num_kv_heads", None), ("qk_norm", "none"), ("attention_bias", "none"),
                          ("norm_eps", 1e-6)):  # fmt: skip
        value = m.get(name, allowed)
        if value != allowed and not (name == "num_kv_heads" and value == m.num_heads):
            problems.append(f"model.{name}={value!r} (allowed: {allowed!r})")
    if moe.num_experts:
        if moe.router != "top_k" or moe.num_selected != 1 or moe.get("granularity", 1) != 1:
            problems.append(
                f"model.moe.router={moe.router!r}, num_selected={moe.num_selected}, granularity="
                f"{moe.get('granularity', 1)} (allowed: 'top_k', 1, 1: Switch's top-1)"
            )
        if moe.get("block_routers") is not None:
            problems.append(
                f"model.moe.block_routers={tuple(moe.block_routers)} (allowed: None, one router)"
            )
        if moe.num_selected == 1 and moe.gate_norm != "raw":
            problems.append(f"model.moe.gate_norm={moe.gate_norm!r} (allowed: 'raw')")
        if moe.moe_every not in (1, 2):
            problems.append(f"model.moe.moe_every={moe.moe_every} (allowed: 1, 2)")
        if moe.shared_d_ff:
            problems.append(f"model.moe.shared_d_ff={moe.shared_d_ff} (allowed: 0)")
        if moe.bias_update_speed:
            problems.append("model.moe.bias_update_speed (a selection bias HF cannot hold)")
        if (moe.get("expert_d_ff") or m.d_ff) != m.d_ff:
            problems.append(
                f"model.moe.expert_d_ff={moe.expert_d_ff} (HF experts have model.d_ff={m.d_ff})"
            )
    if problems:
        raise ValueError(
            "Hugging Face's SwitchTransformers cannot express: " + "; ".join(problems) + "."
        )


def hf_config(
    config: ml_collections.ConfigDict,
    reference_length: int = REFERENCE_LENGTH,
    special_ids: Optional[Mapping[str, int]] = None,
) -> dict:
    """The HF config.json of a switchmoe encoder–decoder config (see `_exportable`), with
    `special_ids` (default: T5's pad 0, EOS 1 and decoder start 0; `hf.save` passes the run's)."""
    _exportable(config)
    m, moe = config.model, config.model.moe
    E = moe.num_experts
    layers, dec_layers = m.num_layers, num_decoder_layers(m)
    sparse = lambda n: sum(is_moe_block(i, E, moe.moe_every) for i in range(n))
    factor = moe.eval_capacity_factor
    return {
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "model_type": "switch_transformers",
        "vocab_size": m.vocab_size,
        "d_model": m.d_model,
        "d_kv": head_dim(m),
        "d_ff": m.d_ff,
        "num_layers": layers,
        "num_decoder_layers": dec_layers,
        "num_heads": m.num_heads,
        "num_experts": max(E, 1),
        "num_sparse_encoder_layers": sparse(layers),
        "num_sparse_decoder_layers": sparse(dec_layers),
        # HF's fixed slots per sequence: switchmoe's capacity for a reference_length sequence.
        "expert_capacity": max(
            math.ceil(round(reference_length / max(E, 1) * factor, 6)), moe.min_capacity
        ),
        "router_bias": bool(moe.router_bias),
        "router_jitter_noise": moe.jitter_eps,
        "router_dtype": "float32",
        "router_ignore_padding_tokens": False,
        "router_z_loss_coef": moe.z_loss_weight,
        "router_aux_loss_coef": moe.load_balancing_weight,
        "relative_attention_num_buckets": m.relative_attention_num_buckets,
        "relative_attention_max_distance": m.relative_attention_max_distance,
        "dropout_rate": m.dropout_rate,
        "layer_norm_epsilon": 1e-6,
        "dense_act_fn": EXPORTED_ACTIVATIONS[m.activation],
        "tie_word_embeddings": bool(m.tie_embeddings),
        "is_encoder_decoder": True,
        **(T5_SPECIAL_IDS if special_ids is None else special_ids),
    }


# -- Parameters -----------------------------------------------------------------------------

_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}


def _layer_names(stack: str, i: int, moe: bool) -> dict[str, str]:
    """HF prefix of each sub-layer of block i -> switchmoe's name for it."""
    hf = f"{stack}.block.{i}.layer"
    names = {f"{hf}.0.SelfAttention": "attention", f"{hf}.0.layer_norm": "attention_norm"}
    ff = 1
    if stack == "decoder":
        names |= {f"{hf}.1.EncDecAttention": "cross_attention",
                  f"{hf}.1.layer_norm": "cross_attention_norm"}  # fmt: skip
        ff = 2
    names |= {f"{hf}.{ff}.layer_norm": "ffn_norm", f"{hf}.{ff}.mlp": "moe" if moe else "ffn"}
    return names


def params_from_hf(tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
    """switchmoe parameters (nested dict of float32 NumPy arrays) from HF tensors.

    Every tensor must be used and every parameter found: a leftover or a missing name raises
    ValueError naming it."""
    m = config.model
    H, dk, E = m.num_heads, head_dim(m), m.moe.num_experts
    left = dict(tensors)

    def take(name: str) -> np.ndarray:
        if name not in left:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return np.asarray(left.pop(name), np.float32)

    # One embedding for both stacks, as in T5. transformers >= 5 with tie_word_embeddings=False
    # gives each stack its own copy, which switchmoe can hold only when the copies are equal.
    copies = {
        name: left.pop(name)
        for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        if name in left
    }
    if not copies:
        raise ValueError("the checkpoint has no shared.weight (or *.embed_tokens.weight)")
    embedding = next(iter(copies.values()))
    differ = [name for name, value in copies.items() if not np.array_equal(value, embedding)]
    if differ:
        raise ValueError(
            f"the checkpoint's token embeddings {sorted(copies)} are not all equal ({differ} "
            "differ): switchmoe's encoder–decoder shares one embedding between its stacks."
        )
    flat = {("embed", "embedding"): np.asarray(embedding, np.float32)}
    if m.tie_embeddings:
        left.pop("lm_head.weight", None)  # saved by some versions as a copy of shared.weight
    else:
        flat[("logits", "kernel")] = take("lm_head.weight").T
    for stack, n in (("encoder", m.num_layers), ("decoder", num_decoder_layers(m))):
        rel = take(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        flat[(f"{stack}_position_bias", "rel_embedding")] = rel.T
        flat[(f"{stack}_norm", "scale")] = take(f"{stack}.final_layer_norm.weight")
        for i in range(n):
            block = f"{stack}_{i}"
            for hf, ours in _layer_names(stack, i, is_moe_block(i, E, m.moe.moe_every)).items():
                if ours.endswith("norm"):
                    flat[(block, ours, "scale")] = take(f"{hf}.weight")
                elif ours.endswith("attention"):
                    for a, name in _ATTENTION.items():
                        w = take(f"{hf}.{a}.weight")
                        if a == "o":
                            flat[(block, ours, name, "kernel")] = w.T.reshape(H, dk, -1)
                            continue
                        kernel = w.T.reshape(-1, H, dk)
                        flat[(block, ours, name, "kernel")] = (
                            kernel * np.float32(math.sqrt(dk)) if a == "q" else kernel
                        )
                elif ours == "ffn":
                    flat[(block, "ffn", "w_in")] = take(f"{hf}.wi.weight").T
                    flat[(block, "ffn", "w_out")] = take(f"{hf}.wo.weight").T
                else:
                    flat[(block, "moe", "router_kernel")] = take(f"{hf}.router.classifier.weight").T
                    if m.moe.router_bias:
                        flat[(block, "moe", "router_bias")] = take(f"{hf}.router.classifier.bias")
                    experts = [f"{hf}.experts.expert_{e}" for e in range(E)]
                    flat[(block, "moe", "w_in")] = np.stack(
                        [take(f"{x}.wi.weight").T for x in experts]
                    )
                    flat[(block, "moe", "w_out")] = np.stack(
                        [take(f"{x}.wo.weight").T for x in experts]
                    )
    if left:
        raise ValueError(f"the checkpoint has tensors this config does not use: {sorted(left)}")
    return traverse_util.unflatten_dict(flat)


def params_to_hf(params: Any, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """HF tensors (float32, contiguous) from switchmoe parameters: the inverse of
    `params_from_hf`."""
    _exportable(config)
    m = config.model
    dk, E = head_dim(m), m.moe.num_experts
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    # Each stack's copy too: transformers >= 5 reads them as separate weights when untied.
    out = {
        name: flat[("embed", "embedding")]
        for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    }
    if not m.tie_embeddings:
        out["lm_head.weight"] = flat[("logits", "kernel")].T
    for stack, n in (("encoder", m.num_layers), ("decoder", num_decoder_layers(m))):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[rel] = flat[(f"{stack}_position_bias", "rel_embedding")].T
        out[f"{stack}.final_layer_norm.weight"] = flat[(f"{stack}_norm", "scale")]
        for i in range(n):
            block = f"{stack}_{i}"
            for hf, ours in _layer_names(stack, i, is_moe_block(i, E, m.moe.moe_every)).items():
                if ours.endswith("norm"):
                    out[f"{hf}.weight"] = flat[(block, ours, "scale")]
                elif ours.endswith("attention"):
                    for a, name in _ATTENTION.items():
                        kernel = flat[(block, ours, name, "kernel")]
                        if a == "o":
                            out[f"{hf}.o.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
                            continue
                        if a == "q":
                            kernel = kernel / np.float32(math.sqrt(dk))
                        out[f"{hf}.{a}.weight"] = kernel.reshape(kernel.shape[0], -1).T
                elif ours == "ffn":
                    out[f"{hf}.wi.weight"] = flat[(block, "ffn", "w_in")].T
                    out[f"{hf}.wo.weight"] = flat[(block, "ffn", "w_out")].T
                else:
                    out[f"{hf}.router.classifier.weight"] = flat[(block, "moe", "router_kernel")].T
                    if m.moe.router_bias:
                        out[f"{hf}.router.classifier.bias"] = flat[(block, "moe", "router_bias")]
                    for e in range(E):
                        x = f"{hf}.experts.expert_{e}"
                        out[f"{x}.wi.weight"] = flat[(block, "moe", "w_in")][e].T
                        out[f"{x}.wo.weight"] = flat[(block, "moe", "w_out")][e].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# -- Directories ----------------------------------------------------------------------------


def load(
    directory: str, reference_length: int = REFERENCE_LENGTH
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of an HF Switch Transformers checkpoint directory."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = config_from_hf(json.load(f), reference_length)
    return config, params_from_hf(read_weights(directory), config)


def save(
    config: ml_collections.ConfigDict,
    params: Any,
    directory: str,
    reference_length: int = REFERENCE_LENGTH,
    special_ids: Optional[Mapping[str, int]] = None,
) -> None:
    """Writes config.json (with `special_ids`, see hf_config) and model.safetensors that
    `SwitchTransformersForConditionalGeneration.from_pretrained(directory)` loads."""
    from safetensors.numpy import save_file  # noqa: PLC0415  (an optional dependency)

    tensors = params_to_hf(params, config)  # checks exportability before anything is written
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(hf_config(config, reference_length, special_ids), f, indent=2)
