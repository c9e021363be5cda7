"""Whether a workdir lets this config train: a resumed checkpoint must belong to the same model
and optimizer, and a run with int8 experts may only be evaluated. Both run before anything is
written or compiled (they are run checks of the trainer: switchmoe/training/features.py).
"""

from __future__ import annotations

import jax
import ml_collections

from switchmoe import optim
from switchmoe.models import abstract_params, build_model
from switchmoe.runs import checkpoints, config_files


def _setting_differences(previous, config) -> dict[str, tuple]:
    """{dotted key: (old, new)} of the model and optimizer settings that differ."""
    flat = lambda c: {
        k: v
        for k, v in config_files.flat_items(c.to_dict())
        if k.startswith(("model.", "optimizer.")) and not k.startswith("model.moe.hash_table")
    }
    old, new = flat(previous), flat(config)
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }


def _stored_shapes(config):
    model = build_model(config)
    params = abstract_params(model, config)
    optimizer = optim.optimizer_for(config)
    opt_state = jax.eval_shape(optimizer.init, params)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
    return shapes(params), jax.tree.structure(opt_state), shapes(opt_state)


def check_workdir_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a workdir whose checkpoint belongs to a different model or optimizer.

    Compares what the checkpoint stores (parameter shapes, the optimizer state's structure and
    shapes) under the two configs, so settings that do not change what is stored (capacity
    factors, loss weights, learning rate, steps) may change on resume. A refusal names first the
    settings that alone change what is stored, then the other differences apart.
    """
    previous = config_files.read_config(workdir)
    if previous is None or not checkpoints.has_checkpoint(workdir):
        return
    try:
        old = _stored_shapes(previous)
    except Exception as e:  # a config.json written by an incompatible switchmoe version
        raise ValueError(f"workdir {workdir} holds a config.json this version cannot read: {e}")
    if _stored_shapes(config) == old:
        return
    differences = _setting_differences(previous, config)
    breaking, harmless = [], []
    for key, (was, now) in differences.items():
        alone = ml_collections.ConfigDict(previous.to_dict())
        node = alone
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        try:
            with alone.unlocked():
                node[leaf] = now
            changes = _stored_shapes(alone) != old
        except Exception:  # noqa: BLE001  (a setting that cannot change alone counts as one)
            changes = True
        (breaking if changes else harmless).append(f"{key}: {was!r} -> {now!r}")
    message = (
        f"workdir {workdir} holds a checkpoint of another model; use a new workdir or the same "
        "model settings. What the checkpoint stores changes with: "
        + ("; ".join(breaking) or "the combination of the settings below")
        + "."
    )
    if harmless:
        message += " (Also differing, allowed on resume: " + "; ".join(harmless) + ".)"
    raise ValueError(message)


def check_trainable(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to train int8 experts (their values take no gradient); a finished int8 run may
    still be evaluated (rerunning it adds its final evaluation)."""
    moe = config.model.moe
    if not moe.num_experts or moe.get("expert_quantization", "none") == "none":
        return
    done = checkpoints.latest_saved_step(workdir) if checkpoints.has_checkpoint(workdir) else 0
    if (done or 0) < config.num_train_steps:
        raise ValueError(
            f"model.moe.expert_quantization={moe.expert_quantization!r} is "
            "for evaluation (int8 values take no gradient): train with 'none' and quantize "
            "the trained run (switchmoe.compress.quantization.quantize_run)."
        )
