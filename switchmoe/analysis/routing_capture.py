"""Routing capture: run a restored model on validation batches and keep, per MoE layer, each
token's expert, whether it was kept, and the router probabilities.

Shape legend: M MoE layers, N sequences, L sequence length, E experts."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from switchmoe.analysis.evaluation import Run, load_run, single_device_config
from switchmoe.analysis.source_kinds import NUM_BYTES, token_kind_of_ids
from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.models import build_model
from switchmoe.moe.blocks import router_of_block


@dataclasses.dataclass
class RoutingCapture:
    """Where the router sent every token of some validation windows, per MoE layer.

    The first choice of a token is its most probable expert (top-k: choice 0; expert-choice: the
    argmax of its probabilities); `kept` says whether that choice got a slot at the run's eval
    capacity factor.

    Attributes:
      tokens: int32 [N, L] input ids (bytes 0..255 for the byte tokenizer; 256+ are specials).
      targets: int32 [N, L] the next ids (tokens shifted by one). Consecutive windows are
        consecutive text except that each window's last target is no row's input: the text of
        rows r, r+1 is tokens[r], targets[r, -1], tokens[r + 1].
      kinds: int8 [N, L] `KINDS` code of each input byte, or None for non-byte tokenizers.
      layers: the M MoE layers' module names, in depth order ('block_1', 'block_3', ...).
      expert: int32 [M, N, L] first-choice expert of each token.
      kept: bool [M, N, L] that choice was placed in the expert's buffer (not dropped).
      probs: float32 [M, N, L, E] router probabilities.
    """

    tokens: np.ndarray
    targets: np.ndarray
    kinds: Optional[np.ndarray]
    layers: tuple[str, ...]
    expert: np.ndarray
    kept: np.ndarray
    probs: np.ndarray

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def valid(self) -> np.ndarray:
        """bool [N, L]: byte tokens (not pad, bos, eos or sentinels)."""
        return self.tokens < NUM_BYTES


def _block_index(name: str) -> tuple:
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]) if digits else -1, name)


def routing_fn(config: ml_collections.ConfigDict):
    """A jitted (params, inputs[B, L]) -> {layer: (expert[B, L], kept[B, L], probs[B, L, E])}.

    Runs the model in evaluation mode with `mutable=['intermediates']` and reads the
    `RoutingResult` each MoE layer sows under 'routing'.
    """
    model = build_model(config)
    model_config = config.model

    def run(params, inputs):
        _, state = model.apply(
            {"params": params}, inputs, deterministic=True, mutable=["intermediates"]
        )
        flat = flax.traverse_util.flatten_dict(state["intermediates"])
        out = {}
        for path, values in flat.items():
            if path[-1] != "routing":
                continue
            result = values[-1]  # sow keeps a tuple of the values sown
            B, L = inputs.shape
            index = int(path[0].rsplit("_", 1)[-1])  # the block's name, "block_<i>"
            if router_of_block(model_config, index) == "expert_choice":  # K = E: choice e = e
                first = jnp.argmax(result.probs, axis=-1)
                kept = jnp.take_along_axis(result.kept, first[..., None], axis=-1)[..., 0]
            else:  # top-k: choice 0 is the most probable expert
                first, kept = result.expert[..., 0], result.kept[..., 0]
            E = result.probs.shape[-1]
            out[path[0]] = (
                first.reshape(B, L),  # groups [G, S] are the flattened [B, L] in order
                kept.reshape(B, L),
                result.probs.reshape(B, L, E),
            )
        return out

    return jax.jit(run)


def capture_routing(
    run: Run,
    num_batches: int = 4,
    step: Optional[int] = None,
    pipeline: Optional[LMDataPipeline] = None,
) -> RoutingCapture:
    """Routes the first `num_batches` eval batches and records each token's first choice.

    The batches are the run's own periodic eval batches (the eval sample's windows, batch size and
    groups), so `kept` reflects the run's eval capacity factor. Kinds are computed on the
    whole documents the windows come from, so a window that starts inside a docstring is still
    classified as string.

    Args:
      run: a workdir or a (config, params) pair.
      num_batches: validation batches of `batch_size` windows each.
      step: checkpoint step when `run` is a workdir.
      pipeline: an `LMDataPipeline` of the run's data config to reuse (it caches eval sets).
    """
    config, params = load_run(run, step)
    if not config.model.moe.num_experts:
        raise ValueError("model.moe.num_experts is 0: a dense model has no router to capture.")
    if config.model.get("arch", "decoder") != "decoder":
        raise ValueError(
            f"capture_routing reads decoder-only runs (model.arch='decoder'); got "
            f"{config.model.arch!r}. For an encoder–decoder, sow-read 'routing' from "
            "model.apply(..., mutable=['intermediates']) on span-corruption batches."
        )
    config = single_device_config(config)
    pipeline = pipeline or LMDataPipeline(config.data, config.batch_size)
    # The windows the run's periodic evaluation scores (switchmoe/data/eval_set.py): whole
    # documents drawn at random, in windows that overlap by one token (stride L).
    eval_windows = pipeline.eval_set("sample").windows
    B, width = config.batch_size, config.data.seq_len + 1
    L = width - 1
    n = min(num_batches * B, len(eval_windows))
    windows = np.asarray(eval_windows[:n], np.int32)

    kinds = None
    if config.data.tokenizer == "byte":
        # Classify the windows' token stream up to the end of the last document (at most ~1M
        # more tokens), so that it is classified whole: tokenize needs the rest of a string to
        # know it is one.
        more = np.asarray(eval_windows[: min(len(eval_windows), n + 2**20 // L)], np.int32)
        stream = np.concatenate([more[0]] + [w[1:] for w in more[1:]])
        head, tail = stream[: n * L + 1], stream[n * L + 1 :]
        specials = np.flatnonzero(tail >= NUM_BYTES)
        tail = tail[: specials[0]] if len(specials) else tail
        classified = token_kind_of_ids(np.concatenate([head, tail]))
        kinds = classified[np.arange(n)[:, None] * L + np.arange(L)[None, :]]

    route = routing_fn(config)
    device = jax.local_devices()[0]
    params = jax.device_put(params, device)
    per_layer: dict[str, list] = {}
    pad = pipeline.tokenizer.pad_id
    for start in range(0, n, B):
        rows = windows[start : start + B, :-1]
        batch = np.full((B, width - 1), pad, np.int32)  # one compiled shape: pad the last batch
        batch[: len(rows)] = rows
        out = jax.device_get(route(params, jax.device_put(batch, device)))
        for name, arrays in out.items():
            per_layer.setdefault(name, []).append([a[: len(rows)] for a in arrays])
    layers = tuple(sorted(per_layer, key=_block_index))
    stack = lambda i: np.stack([np.concatenate([b[i] for b in per_layer[l]]) for l in layers])
    return RoutingCapture(
        tokens=windows[:, :-1],
        targets=windows[:, 1:],
        kinds=kinds,
        layers=layers,
        expert=stack(0).astype(np.int32),
        kept=stack(1).astype(bool),
        probs=stack(2).astype(np.float32),
    )
