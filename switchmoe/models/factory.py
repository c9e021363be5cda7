"""Building a model from a config: the one place that maps `model.arch` to a Flax module, its
inputs, a dummy batch for init and shape inference, and parameter counts.

Training, `restore_run`, decoding, analysis and the entry points all build models here, so a
notebook that reloads a checkpoint does not import the trainer.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from switchmoe.data import span_corruption
from switchmoe.data.tokenizers import make_tokenizer
from switchmoe.models.decoder import DecoderLM
from switchmoe.models.encoder_decoder import EncoderDecoderLM
from switchmoe.moe import routers
from switchmoe.moe.blocks import block_routers, block_view, check_block_routers, moe_views
from switchmoe.moe.experts import is_expert_matrix
from switchmoe.moe.layer import MoeLayer
from switchmoe.moe.settings import _one_of

# The batch fields each architecture's model reads, in the order of its __call__ arguments.
MODEL_INPUTS = {
    "decoder": ("inputs",),
    "encoder_decoder": ("inputs", "decoder_inputs", "input_mask"),
}


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with derived fields filled in (vocabulary size from the tokenizer)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.get("vocab_size") is None:
        with config.unlocked():
            config.model.vocab_size = make_tokenizer(config.data).vocab_size
    if config.model.moe.num_experts:
        _one_of("model.moe.router", config.model.moe.router, routers.NAMES)
        check_block_routers(config.model)
        with config.unlocked():
            for moe in moe_views(config.model.moe):  # each router of the MoE blocks
                routers.make_router(moe).prepare(config)
    return config


def sequence_lengths(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Tokens per example in each stack: {'decoder': L} or {'encoder': L, 'decoder': T}."""
    if config.model.arch == "encoder_decoder":
        lengths = span_corruption.example_lengths(config.data)
        return {"encoder": config.data.seq_len, "decoder": lengths.targets}
    return {"decoder": config.data.seq_len}


def build_model(
    config: ml_collections.ConfigDict, expert_parallelism: Optional[str] = None
) -> nn.Module:
    """The model of `config` (by `model.arch`); its parameters do not depend on
    `expert_parallelism`."""
    if config.model.get("arch", "decoder") == "encoder_decoder":
        return EncoderDecoderLM(config.model, expert_parallelism=expert_parallelism)
    return DecoderLM(config.model, expert_parallelism=expert_parallelism)


def model_inputs(config: ml_collections.ConfigDict, batch: dict[str, Any]) -> tuple:
    """The positional model arguments of `batch` (see MODEL_INPUTS)."""
    return tuple(batch[name] for name in MODEL_INPUTS[config.model.get("arch", "decoder")])


def model_masks(config: ml_collections.ConfigDict, batch: dict[str, Any]) -> dict[str, Any]:
    """The padding masks of `batch` as the model's keyword arguments: positions whose target is
    not scored are padding to the MoE layers (the encoder's come from `input_mask`)."""
    key = (
        "decoder_mask" if config.model.get("arch", "decoder") == "encoder_decoder" else "token_mask"
    )
    return {key: batch["weights"] > 0}


def init_rows(config: ml_collections.ConfigDict) -> int:
    """The fewest sequences whose tokens split into whole routing groups in every stack.

    The MoE layers reshape [B·L] tokens into groups of `model.moe.group_size`; with groups longer
    than a sequence (e.g. 1024 tokens of 128-token sequences), a one-row init batch cannot.
    """
    group = config.model.moe.get("group_size")
    if not (group and config.model.moe.num_experts):
        return 1
    rows = 1
    for length in sequence_lengths(config).values():
        need = group // math.gcd(group, length)
        rows = rows * need // math.gcd(rows, need)
    return rows


def dummy_inputs(config: ml_collections.ConfigDict, rows: int | None = None) -> tuple:
    """Zero model arguments of `rows` examples (default `init_rows`), for init and eval_shape."""
    rows = init_rows(config) if rows is None else rows
    lengths = sequence_lengths(config)
    shapes = {
        "inputs": (rows, config.data.seq_len),
        "decoder_inputs": (rows, lengths["decoder"]),
        "input_mask": (rows, config.data.seq_len),
    }
    dtypes = {"input_mask": jnp.float32}
    return tuple(
        jnp.zeros(shapes[name], dtypes.get(name, jnp.int32))
        for name in MODEL_INPUTS[config.model.get("arch", "decoder")]
    )


def abstract_params(model: nn.Module, config: ml_collections.ConfigDict) -> Any:
    """Parameter shapes and dtypes, computed without allocating (jax.eval_shape)."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
    return nn.meta.unbox(variables["params"])


def routed_expert_share(model_config: ml_collections.ConfigDict) -> tuple[int, float]:
    """(E, k): the routed experts of each MoE layer and how many of them a token uses, as the
    layer itself counts them (fine-grained experts: m·E and m·k), k averaged over the MoE blocks
    where their routers differ (moe/blocks.py); (0, 0) for a dense model. A routed expert's
    parameters are active for k/E of the tokens (count_params, model FLOPs)."""
    if not model_config.moe.num_experts:
        return 0, 0
    names = block_routers(model_config)
    per_router = {}
    for name in dict.fromkeys(names):
        layer = MoeLayer.from_config(block_view(model_config, name))
        per_router[name] = (layer.num_experts, layer.make_router().experts_per_token)
    E = per_router[names[0]][0]
    k = sum(per_router[n][1] for n in names) / len(names)
    return E, (int(k) if float(k).is_integer() else k)


def is_routed_expert_param(path: tuple) -> bool:
    """A routed expert's matrix (or an int8 layer's channel scales `w_*_scale` of one, which count
    with their matrix); a shared expert (DeepSeekMoE's, "shared") is active for every token."""
    return is_expert_matrix(path[:-1] + (str(path[-1]).removesuffix("_scale"),))


def count_params(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Total parameters, expert parameters, and parameters active per token (top-k experts)."""
    config = resolve(config)
    params = abstract_params(build_model(config), config)
    total = expert = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        n = math.prod(leaf.shape)
        total += n
        if is_routed_expert_param(tuple(getattr(k, "key", None) for k in path)):
            expert += n
    E, k = routed_expert_share(config.model)
    active = total - expert + (int(expert * k // E) if E else 0)
    return {"total": total, "experts": expert, "active_per_token": active}
