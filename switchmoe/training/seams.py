"""The parts a train step is composed from, so that a training feature is its own module plus
one line in `training/features.py`, never an edit of the trainer.

- **Objective**: what a step minimises per scored token, the arrays it reads beside the batch
  (placed on the mesh once, passed to every jitted step), what it logs, and optionally where
  the parameters start. `LanguageModel` (cross-entropy on the labels) is the default;
  distillation (training/distillation.py) mixes in a teacher's soft targets.
- **ObjectiveTerm**: a term added to the objective, whichever it is, from the model's auxiliary
  outputs (`add(sums, aux, rows)`: the sums with its part in "objective" and its own entries;
  `aux_keys`: the aux entries it reads, dropped afterwards; `train_metrics(sums, count)`):
  multi-token prediction (training/mtp.py).
- **AfterOptimizer**: an update of the parameters after the optimizer's, outside it, from the
  step's loads, and what it logs (auxiliary-loss-free bias balancing: moe/balancing.py).
- **StepHook**: host-side work around the steps: `before(step)` / `after(step, pending)` around
  each step's dispatch, `metrics(tokens_per_second)` for each logged row, `close()` when the
  loop ends however it ends (the profiler window and model FLOPs: training/profiling.py).
- **RunCheck**: `check(config, workdir)` before a run writes or compiles anything; raises
  ValueError naming the setting (int8 experts cannot train, init_from's source must fit, a
  resumed workdir must hold this model, a teacher must read the student's batches).

Shape legend: B batch, L sequence length, V vocabulary.

Objectives and updates are plain classes, not Flax modules: their methods run inside the
trainer's jitted step (`token_sums`, `train_metrics`, `eval_sums`, `apply`, `metrics`) or on the
host (`start`, `eval_metrics`). A lower wing may supply one without importing this module (the
interfaces are duck-typed); `Protocol`s below name what the trainer calls.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import optax


def cross_entropy(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(Σ w·CE, Σ w) over the scored tokens: logits [B, L, V], targets and weights [B, L]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["weights"]), jnp.sum(batch["weights"])


class Objective:
    """The language-model objective: the labels' cross-entropy, nothing read beside the batch.

    Subclasses override what they change. `token_sums` returns sums over the scored tokens with
    at least {"objective": what the step minimises, "hard": the labels' cross-entropy}; the
    trainer divides by the scored-token count and adds the MoE auxiliary loss.
    """

    name = "language_model"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def place(self, mesh, parallel: Optional[str]) -> None:
        """Puts what the objective reads (`inputs`) on the trainer's mesh."""

    @property
    def inputs(self) -> tuple:
        """Arrays passed to every jitted train and eval step after the batch."""
        return ()

    @property
    def input_shardings(self) -> tuple:
        return ()

    def token_sums(self, logits, rows, *inputs) -> dict[str, jax.Array]:
        ce_sum, _ = cross_entropy(logits, rows)
        return {"objective": ce_sum, "hard": ce_sum}

    def train_metrics(self, sums: dict, count) -> dict:
        """Logged beside train/loss (per token: divide by `count`)."""
        return {}

    def eval_sums(self, rows, *inputs) -> dict[str, jax.Array]:
        """Sums an eval step adds beside the model's loss; summed over the eval batches."""
        return {}

    def eval_metrics(self, sums: dict, count: float, prefix: str) -> dict:
        return {}

    def start(self, fresh: Any) -> Optional[tuple[Any, str]]:
        """(the parameters a new run starts from, a log line), or None: the fresh ones."""
        return None


class ObjectiveTerm(Protocol):
    """A term added to the objective inside the jitted step, from the model's aux outputs."""

    aux_keys: tuple[str, ...]

    def add(self, sums: dict, aux: dict, rows: dict) -> dict: ...

    def train_metrics(self, sums: dict, count) -> dict: ...


class AfterOptimizer(Protocol):
    """An update after the optimizer's: `apply(params, loads) -> params` inside the jitted step
    (loads: the step's `balancing.COUNTS` tree), `metrics(params) -> dict` for the step's log."""

    def apply(self, params: Any, loads: Any) -> Any: ...

    def metrics(self, params: Any) -> dict: ...


class StepHook(Protocol):
    """Host-side work around the train steps (steps numbered from 1, as logged)."""

    def before(self, step: int) -> None: ...

    def after(self, step: int, pending: Any) -> None: ...

    def metrics(self, tokens_per_second: float) -> dict: ...

    def close(self) -> None: ...


RunCheck = Callable[[ml_collections.ConfigDict, str], None]
