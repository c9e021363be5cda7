"""Optimizers and learning-rate schedules from the `optimizer` config block."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util


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
) -> optax.GradientTransformation:
    """AdamW or Adafactor with the schedule, after global-norm gradient clipping.

    rule_set: the parameters hold values set by a rule after each step rather than trained
    (the selection biases of auxiliary-loss-free balancing; see `parameter_labels`); the
    optimizer gives them a zero update, no weight decay and no state.
    freeze: `optimizer.freeze` (finetune.py): those parameters get a zero update and no state
    either, and are left out of the clipped gradient norm.
    """
    tx = _optimizer(opt, num_train_steps)
    if not rule_set and freeze == "none":
        return tx
    from switchmoe import balancing, finetune  # noqa: PLC0415

    zero = optax.set_to_zero()
    return optax.multi_transform(
        {balancing.TRAINED: tx, balancing.RULE: zero, finetune.FROZEN: zero},
        lambda params: parameter_labels(params, freeze),
    )


def parameter_labels(params, freeze: str = "none"):
    """A tree like `params` naming each leaf's optimizer partition: RULE for a selection bias
    (set by balancing.update_biases), FROZEN for what `optimizer.freeze` keeps, TRAINED else."""
    from switchmoe import balancing, finetune  # noqa: PLC0415

    def label(path):
        if balancing.is_bias(path):
            return balancing.RULE
        return finetune.FROZEN if finetune.is_frozen(path, freeze) else balancing.TRAINED

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: label(path) for path in flat})


def _optimizer(
    opt: ml_collections.ConfigDict, num_train_steps: int
) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt, num_train_steps)
    if opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    elif opt.name == "adafactor":
        # Factored second moments (memory O(rows + cols) per matrix), as Switch and T5 trained;
        # the update is scaled by each parameter's RMS, so the learning rate is relative.
        core = optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None)
    else:
        raise ValueError(f"optimizer.name must be one of ('adafactor', 'adamw'); got {opt.name!r}.")
    if opt.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core)
    return core
