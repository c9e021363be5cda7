"""Starting a run from another run's parameters: fine-tuning, freezing, sparse upcycling.

`init_from='<workdir>[:step]'` (default: its newest intact checkpoint) gives a new run the
other run's parameters in place of a fresh initialisation (`init_from='hf:<dir>'`: those of a
Hugging Face checkpoint of any supported model_type, switchmoe/interop/hf.py); the optimizer
state, the data and the step count start anew. It applies to the first start only: once the new run has a
checkpoint, it resumes from its own.

The two parameter trees must match leaf for leaf (the same path, the same shape); the first
difference is named. The one allowed difference is sparse upcycling (Komatsuzaki et al. 2022): a
dense FFN of the source (`.../ffn/{w_in,w_gate,w_out}`, [d, F] and [F, d]) where this config has
an MoE layer (`.../moe/...`, experts [E, d, F] and [E, F, d]) is copied into every expert; the
router (and any other MoE-only parameter) keeps this run's fresh initialisation. Two settings
make the copies differ:

  upcycle_noise             Gaussian noise of this std (relative to each matrix's std) added to
                            each expert's copy
  upcycle_reinit_fraction   Drop-Upcycling (Nakamura et al. 2025): in each expert, this fraction
                            of the hidden units (columns of w_in / w_gate, rows of w_out) is
                            re-drawn from a normal with the source matrix's mean and std

Freezing parameters for fine-tuning (`optimizer.freeze`) is the optimizer's (switchmoe/optim.py).
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from switchmoe import runs
from switchmoe.interop import hf
from switchmoe.models import abstract_params, build_model, resolve
from switchmoe.moe.experts import EXPERT_MATRICES
from switchmoe.runs import checkpoints, config_files

# init_from='hf:<dir>': a Hugging Face checkpoint of any supported model_type
# (switchmoe/interop/hf.py: Switch Transformers, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE).
HF_PREFIX = "hf:"


def parse_init_from(value: str) -> tuple[str, int | None]:
    """'<workdir>[:step]' -> (workdir, step or None)."""
    workdir, sep, step = value.rpartition(":")
    if sep and step.isdigit():
        return workdir, int(step)
    return value, None


def _hf_directory(value: str) -> str | None:
    """The directory of `init_from='hf:<dir>'` (a Hugging Face checkpoint), else None."""
    return value[len(HF_PREFIX) :] if value.startswith(HF_PREFIX) else None


def _source(config: ml_collections.ConfigDict):

    directory = _hf_directory(config.init_from)
    if directory is not None:
        try:
            return hf.load(directory)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"init_from={config.init_from!r}: {e}") from None
    workdir, step = parse_init_from(config.init_from)
    try:
        return runs.restore_run(workdir, step)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"init_from={config.init_from!r}: {e}") from None


def _plan(source: dict, target: dict, init_from: str) -> dict[tuple, tuple]:
    """{target path: ('copy', source path) | ('upcycle', source path) | ('fresh', None)};
    raises ValueError at the first parameter the two runs cannot share."""
    plan, used = {}, set()
    for path, leaf in target.items():
        if path in source:
            if tuple(source[path].shape) != tuple(leaf.shape):
                raise ValueError(
                    f"init_from={init_from!r}: parameter {'/'.join(path)} has shape "
                    f"{tuple(source[path].shape)} there and {tuple(leaf.shape)} in this config"
                )
            plan[path] = ("copy", path)
            used.add(path)
            continue
        if "moe" in path and path[-1] in EXPERT_MATRICES:
            i = path.index("moe")
            dense = path[:i] + ("ffn",) + path[i + 1 :]
            if dense in source and tuple(leaf.shape[1:]) == tuple(source[dense].shape):
                plan[path] = ("upcycle", dense)
                used.add(dense)
                continue
            if dense in source:
                raise ValueError(
                    f"init_from={init_from!r}: upcycling {'/'.join(dense)} {tuple(source[dense].shape)}"
                    f" into {'/'.join(path)} {tuple(leaf.shape)} needs experts of the dense "
                    "FFN's width (model.moe.expert_d_ff = the source's model.d_ff)"
                )
        if "moe" in path:
            prefix = path[: path.index("moe")] + ("ffn",)
            if any(q[: len(prefix)] == prefix for q in source):
                plan[path] = ("fresh", None)  # the router of an upcycled layer
                continue
        raise ValueError(
            f"init_from={init_from!r}: the source run has no parameter {'/'.join(path)} "
            f"(shape {tuple(leaf.shape)} in this config)"
        )
    unused = sorted("/".join(p) for p in source.keys() - used)
    if unused:
        raise ValueError(
            f"init_from={init_from!r}: parameters of the source run this config lacks: "
            f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}"
        )
    return plan


def _upcycled(dense: np.ndarray, experts: int, axis: int, units_seed, values_rng, noise, reinit):
    """[E, *dense.shape]: the dense matrix in every expert, plus `noise`, and with `reinit` of
    the hidden units (along `axis` of the dense matrix) re-drawn (Drop-Upcycling). The units of
    expert e come from `units_seed`, so w_in, w_gate and w_out of one layer re-draw the same
    ones: a hidden unit is dropped whole."""
    out = np.repeat(dense[None], experts, axis=0).astype(np.float32)
    mean, std = float(dense.mean()), float(dense.std())
    if noise:
        out += values_rng.normal(0.0, noise * std, out.shape).astype(np.float32)
    if reinit:
        hidden = dense.shape[axis]
        count = int(round(reinit * hidden))
        units_rng = np.random.default_rng(units_seed)
        for e in range(experts):
            units = units_rng.choice(hidden, size=count, replace=False)
            expert = np.moveaxis(out[e], axis, 0)  # a view: [F, d] whichever matrix
            expert[units] = values_rng.normal(mean, std, (count, expert.shape[1]))
    return out.astype(dense.dtype)


def check_before_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The run check of `init_from`: only a first start reads it (a run with a checkpoint
    resumes from its own)."""
    if not checkpoints.has_checkpoint(workdir):
        check_init_from(config)


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError when `init_from` names no run, or a run whose parameters this config
    cannot start from (the parameter named). Reads the source's config.json only: shapes come
    from jax.eval_shape, nothing is restored or compiled."""

    value = config.get("init_from")
    if not value:
        return
    if not isinstance(value, str):
        raise ValueError(
            f"init_from={value!r}; allowed: '<workdir>', '<workdir>:<step>' or 'hf:<directory>'"
        )
    directory = _hf_directory(value)
    if directory is not None:
        try:
            source_config = hf.config_from_directory(directory)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"init_from={value!r}: {e}") from None
    else:
        workdir, _ = parse_init_from(value)
        source_config = config_files.read_config(workdir)
        if source_config is None or not checkpoints.has_checkpoint(workdir):
            raise ValueError(
                f"init_from={value!r}: {workdir} holds no run (a config.json and a checkpoint)"
            )
    source_config = resolve(source_config)
    source = traverse_util.flatten_dict(abstract_params(build_model(source_config), source_config))
    target = traverse_util.flatten_dict(abstract_params(build_model(config), config))
    _plan(source, target, value)


def initial_params(config: ml_collections.ConfigDict, fresh: Any) -> Any:
    """The run's starting parameters: `fresh` (this config's initialisation, placed on the
    mesh) with every leaf the source run provides replaced by the source's (see the module
    docstring). Returns a tree placed like `fresh`."""
    _, source_params = _source(config)
    source = traverse_util.flatten_dict(source_params)
    target = traverse_util.flatten_dict(fresh)
    plan = _plan(source, target, config.init_from)
    values_rng = np.random.default_rng(config.seed)
    out = {}
    for path, (how, src) in plan.items():
        if how == "fresh":
            out[path] = target[path]
            continue
        value = np.asarray(source[src])
        if how == "upcycle":
            # w_in / w_gate are [d, F]: hidden units are columns (axis 1); w_out [F, d]: rows.
            axis = 0 if path[-1] == "w_out" else 1
            layer = "/".join(path[:-1]).encode()
            units_seed = [
                config.seed,
                int.from_bytes(hashlib.blake2b(layer, digest_size=4).digest(), "little"),
            ]
            value = _upcycled(
                value, target[path].shape[0], axis, units_seed, values_rng,
                config.get("upcycle_noise", 0.0), config.get("upcycle_reinit_fraction", 0.0),
            )  # fmt: skip
        out[path] = jax.device_put(value.astype(target[path].dtype), target[path].sharding)
    return traverse_util.unflatten_dict(out)
