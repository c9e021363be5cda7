"""Optimizers (AdamW, Adafactor, and Muon from switchmoe/muon.py) and learning-rate schedules
from the `optimizer` config block, freezing (`optimizer.freeze`), and the optimizer of a whole
config (`optimizer_for`).

`optimizer.freeze` keeps parameters at their starting values (ST-MoE §4 fine-tunes with the MoE
layers frozen): 'none', 'moe' (every MoE layer: router and experts), 'non_moe' (everything but
the MoE layers), 'router' (the routers only), 'experts' (the expert matrices only), or
're:<regex>' matched against '/'-joined parameter paths. Frozen parameters get a zero update and
no optimizer state (`optax.multi_transform` with `set_to_zero`).
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from switchmoe import muon as muon_lib
from switchmoe.moe import balancing
from switchmoe.moe.experts import EXPERT_MATRICES, in_moe_layer, is_expert_matrix

FREEZE_PATTERNS = ("none", "moe", "non_moe", "router", "experts")
FROZEN = "frozen"  # the optimizer partition of frozen parameters


def check_freeze(freeze: Any) -> None:
    """Raises ValueError unless `optimizer.freeze` is a known pattern or 're:<valid regex>'."""
    if isinstance(freeze, str) and freeze.startswith("re:"):
        try:
            re.compile(freeze[3:])
        except re.error as e:
            raise ValueError(f"optimizer.freeze={freeze!r} is not a valid regex ({e})") from None
        return
    if freeze not in FREEZE_PATTERNS:
        raise ValueError(
            f"optimizer.freeze={freeze!r}; allowed: {FREEZE_PATTERNS} or 're:<regex>' over "
            "'/'-joined parameter paths (e.g. 're:block_1/')"
        )


def is_frozen(path: tuple, freeze: str) -> bool:
    """Whether the parameter at `path` (a tuple of keys) is frozen by `optimizer.freeze`."""
    if freeze == "none":
        return False
    if freeze.startswith("re:"):
        return re.search(freeze[3:], "/".join(str(k) for k in path)) is not None
    moe = in_moe_layer(path)
    if freeze == "moe":
        return moe
    if freeze == "non_moe":
        return not moe
    if freeze == "experts":
        return is_expert_matrix(path)
    if freeze == "router":
        return moe and path[-1] not in EXPERT_MATRICES and path[-1] != "selection_bias"
    raise ValueError(f"optimizer.freeze={freeze!r}")


def frozen_paths(params: Any, freeze: str) -> list[str]:
    flat = traverse_util.flatten_dict(params)
    return ["/".join(p) for p in flat if is_frozen(p, freeze)]


def optimizer_for(
    config: ml_collections.ConfigDict, boxed_params: Any = None
) -> optax.GradientTransformation:
    """The optimizer a run of `config` trains with (and whose state its checkpoints hold).
    boxed_params: the model's partitioned abstract parameters, where the caller has them (Muon
    reads their axis names instead of tracing the model's init again)."""
    moe = config.model.moe
    rule_set = bool(moe.num_experts) and moe.get("bias_update_speed", 0.0) > 0
    # Muon reads which axes of each parameter form its matrices from the model's axis names.
    muon = config.optimizer.name == "muon"
    axes = muon_lib.parameter_axes(config, boxed_params) if muon else None
    return make_optimizer(
        config.optimizer,
        config.num_train_steps,
        rule_set=rule_set,
        freeze=config.optimizer.get("freeze", "none"),
        axes=axes,
    )


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then:

    rsqrt     lr · sqrt(warmup / step)  (T5 / Switch: 1/sqrt(max(step, warmup)) up to scale)
    cosine    cosine decay to 10% of the peak at num_train_steps
    constant  the peak
    """
    peak, warmup = opt.learning_rate, max(opt.warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = jnp.minimum((step + 1) / warmup, 1.0)
        if opt.schedule == "rsqrt":
            decay = jnp.sqrt(warmup / jnp.maximum(step + 1, warmup))
        elif opt.schedule == "cosine":
            progress = jnp.clip((step - warmup) / max(num_train_steps - warmup, 1), 0.0, 1.0)
            decay = 0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        else:
            decay = 1.0
        return peak * ramp * decay

    return schedule


def make_optimizer(
    opt: ml_collections.ConfigDict,
    num_train_steps: int,
    *,
    rule_set: bool = False,
    freeze: str = "none",
    axes: dict | None = None,
) -> optax.GradientTransformation:
    """AdamW, Adafactor or Muon with the schedule, after global-norm gradient clipping.

    rule_set: the parameters hold values set by a rule after each step rather than trained
    (the selection biases of auxiliary-loss-free balancing; see `parameter_labels`); the
    optimizer gives them a zero update, no weight decay and no state.
    freeze: `optimizer.freeze` (module docstring): those parameters get a zero update and no state
    either, and are left out of the clipped gradient norm.
    axes: Muon only: {parameter path: logical axis names} of the model (muon.parameter_axes).
    """
    tx = _optimizer(opt, num_train_steps, axes)
    if not rule_set and freeze == "none":
        return tx
    zero = optax.set_to_zero()
    return optax.multi_transform(
        {balancing.TRAINED: tx, balancing.RULE: zero, FROZEN: zero},
        lambda params: parameter_labels(params, freeze),
    )


def parameter_labels(params, freeze: str = "none"):
    """A tree like `params` naming each leaf's optimizer partition: RULE for a selection bias
    (set by balancing.update_biases), FROZEN for what `optimizer.freeze` keeps, TRAINED else."""

    def label(path):
        if balancing.is_bias(path):
            return balancing.RULE
        return FROZEN if is_frozen(path, freeze) else balancing.TRAINED

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: label(path) for path in flat})


def _adamw(opt: ml_collections.ConfigDict, schedule: optax.Schedule):
    return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)


def _optimizer(
    opt: ml_collections.ConfigDict, num_train_steps: int, axes: dict | None = None
) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt, num_train_steps)
    if opt.name == "adamw":
        core = _adamw(opt, schedule)
    elif opt.name == "muon":
        if axes is None:
            raise ValueError(
                "optimizer.name='muon' needs the model's parameter axes: build it with "
                "optim.optimizer_for(config) (or pass axes=muon.parameter_axes(config))."
            )
        # AdamW for what Muon leaves alone: exactly the 'adamw' optimizer of the same block.
        core = muon_lib.muon(opt, schedule, axes, _adamw(opt, schedule))
    elif opt.name == "adafactor":
        # Factored second moments (memory O(rows + cols) per matrix), as Switch and T5 trained;
        # the update is scaled by each parameter's RMS, so the learning rate is relative.
        core = optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None)
    else:
        raise ValueError(
            f"optimizer.name must be one of ('adafactor', 'adamw', 'muon'); got {opt.name!r}."
        )
    if opt.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core)
    return core
