"""Reloading a run on one device and evaluating it at any capacity factor (or dropless)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import jax
import ml_collections

from switchmoe import sharding
from switchmoe.config import with_defaults
from switchmoe.data.span_corruption import make_pipeline
from switchmoe.models import resolve
from switchmoe.moe.blocks import router_names
from switchmoe.runs import restore_run
from switchmoe.training.trainer import Trainer

# A run is a workdir (restored with its latest checkpoint) or an already restored (config, params).
Run = Union[str, os.PathLike, tuple]


REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_repository(path: str) -> str:
    """`path` as given when it exists or is absolute; otherwise (a relative default such as
    "runs/demo") resolved against the repository switchmoe runs from, so that a notebook whose
    kernel starts in notebooks/ finds what `make demo` wrote in the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPOSITORY, path)


def load_run(run: Run, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of a workdir (at `step`, default latest) or of a (config, params) pair;
    the config resolved, with fields it lacks defaulted (`with_defaults`)."""
    if isinstance(run, (str, os.PathLike)):
        config, params = restore_run(os.fspath(run), step)
    else:
        config, params = run
    return resolve(with_defaults(config)), params


def single_device_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A resolved copy of `config` (missing fields defaulted) on a 1×1×1 mesh."""
    config = resolve(with_defaults(config))
    config.mesh.data = config.mesh.expert = config.mesh.model = 1
    return config


def _single_device_trainer(config: ml_collections.ConfigDict) -> Trainer:
    mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices()[:1])
    return Trainer(config, mesh)


def evaluate_run(
    run: Run, num_batches: Optional[int] = None, step: Optional[int] = None
) -> dict[str, Any]:
    """The eval metrics of a run (dense or MoE, float or int8 experts) as its training would
    report them: its own fixed validation batches (`num_batches`, default the config's
    `num_eval_batches`; 0 = all) at its eval capacity factor, on one device."""
    config, params = load_run(run, step)
    config = single_device_config(config)
    if num_batches is not None:
        config.num_eval_batches = int(num_batches)
    return _single_device_trainer(config).evaluate(params, make_pipeline(config))


def evaluate_at_capacities(
    run: Run,
    factors: Sequence[float] = (0.5, 1.0, 1.25, 2.0),
    dropless: bool = True,
    num_batches: Optional[int] = None,
    step: Optional[int] = None,
) -> list[dict[str, Any]]:
    """Evaluates the SAME parameters at several eval capacity factors (and dropless).

    Capacity only decides which tokens the experts see, not the parameters, so a model trained at
    one factor can be evaluated at any other: Switch §2.2 evaluates at 2.0, and the gap between a
    factor and dropless routing is what dropping costs. Each factor is one `Trainer` on a
    single-device mesh (capacity is static, so each compiles once) over the run's fixed
    validation batches, exactly as training evaluates.

    Args:
      run: a workdir or a (config, params) pair (see `load_run`).
      factors: values of `model.moe.eval_capacity_factor` to evaluate.
      dropless: also evaluate with `model.moe.backend='dropless'` (top-k router: no capacity,
        nothing dropped; token-choice routers). Skipped for the expert-choice router, whose
        capacity is what defines it.
      num_batches: validation batches (default: the config's `num_eval_batches`; 0 = all).
      step: checkpoint step when `run` is a workdir (default: latest).

    Returns:
      One dict per setting, in order: {"capacity_factor": float or "dropless", "eval_loss"
      (nats/token), "bits_per_token", "bits_per_byte" (None for an encoder–decoder),
      "dropped_fraction" (mean over MoE layers and batches)}.

    Raises:
      ValueError: a dense model (num_experts == 0) has no capacity to vary.
    """
    config, params = load_run(run, step)
    if not config.model.moe.num_experts:
        raise ValueError("model.moe.num_experts is 0: a dense model has no capacity factor.")
    config = single_device_config(config)
    if num_batches is not None:
        config.num_eval_batches = int(num_batches)
    pipeline = make_pipeline(config)  # packed once, shared
    settings: list[tuple[Any, ml_collections.ConfigDict]] = []
    for factor in factors:
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.moe.eval_capacity_factor = float(factor)
        if c.model.moe.backend == "dropless":  # a dropless run (an HF import) gets capacity
            c.model.moe.backend = "auto"
        settings.append((float(factor), c))
    if dropless and "expert_choice" not in router_names(config.model.moe):
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.moe.backend = "dropless"
        settings.append(("dropless", c))
    rows = []
    for label, c in settings:
        result = _single_device_trainer(c).evaluate(params, pipeline)
        rows.append(
            {
                "capacity_factor": label,
                "eval_loss": float(result["eval/loss"]),
                "bits_per_token": float(result["eval/bits_per_token"]),
                "bits_per_byte": result.get("eval/bits_per_byte"),  # decoder-only LMs
                "dropped_fraction": float(result.get("eval/dropped_fraction", 0.0)),
            }
        )
    return rows


def format_capacity_table(rows: Sequence[dict[str, Any]]) -> str:
    """`evaluate_at_capacities` rows as an aligned text table."""
    lines = [
        f"{'capacity factor':>16} {'eval loss':>10} {'bits/token':>11} {'bits/byte':>10} "
        f"{'dropped':>9}"
    ]
    for r in rows:
        f = r["capacity_factor"]
        label = f if isinstance(f, str) else f"{f:g}"
        per_byte = "-" if r.get("bits_per_byte") is None else f"{r['bits_per_byte']:.4f}"
        lines.append(
            f"{label:>16} {r['eval_loss']:>10.4f} {r['bits_per_token']:>11.4f} {per_byte:>10} "
            f"{100 * r['dropped_fraction']:>8.2f}%"
        )
    return "\n".join(lines)


def plot_capacity_sweep(rows: Sequence[dict[str, Any]]):
    """Eval loss and dropped fraction vs eval capacity factor; dropless as a dashed line."""
    import matplotlib.pyplot as plt

    fixed = [r for r in rows if not isinstance(r["capacity_factor"], str)]
    free = [r for r in rows if isinstance(r["capacity_factor"], str)]
    fig, (ax_loss, ax_drop) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["capacity_factor"] for r in fixed]
    ax_loss.plot(x, [r["bits_per_token"] for r in fixed], "o-", label="capacity factor")
    ax_drop.plot(x, [100 * r["dropped_fraction"] for r in fixed], "o-")
    for r in free:
        ax_loss.axhline(r["bits_per_token"], ls="--", color="gray", label=r["capacity_factor"])
    ax_loss.set(xlabel="eval capacity factor", ylabel="eval loss (bits/token)")
    ax_drop.set(xlabel="eval capacity factor", ylabel="tokens dropped (%)")
    ax_loss.legend()
    for ax in (ax_loss, ax_drop):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
