"""Distillation: a student (usually dense) trained on hard labels and a trained teacher's soft
targets (Switch Transformer §5: distilling an MoE into a dense model keeps part of the MoE's gain
over a dense model trained alone).

Shape legend: B batch, L sequence length, V vocabulary.

Per scored token, with α = `distill.teacher_weight` and T = `distill.temperature`:

    loss = (1 − α) · CE(y, softmax(s)) + α · T² · H(softmax(t / T), softmax(s / T))

s and t are the student's and the teacher's logits, y the label, H(p, q) = −Σ_v p_v log q_v.
At T = 1 this is the cross-entropy against the mixed target (1 − α)·onehot(y) + α·softmax(t),
Switch's formulation (α = 0.25 worked best there). The T² keeps the soft term's gradient on the
same scale as T varies (Hinton et al. 2015). With α = 0 the soft term is not computed at all:
training equals plain training bit for bit (tested); the teacher's loss is still logged.

The teacher is a run restored from `distill.teacher` ('<workdir>' or '<workdir>:<step>', its
newest intact checkpoint by default), evaluated in each training step in evaluation mode (eval
capacity factor, no dropout, no gradient) on the student's batch, and in each evaluation
(`eval/teacher_loss`). It must read the same batches: the same `model.arch`, tokenizer and
vocabulary. `distill.student_init='non_expert'` starts the student from the teacher's
non-expert parameters (embeddings, attention, norms, dense blocks: every parameter outside the
MoE layers whose path and shape the student shares; Switch's recipe), the rest fresh.

    python -m experiments.train --config=configs/dense.py --workdir=runs/distilled \\
        --config.distill.teacher=runs/demo --config.distill.student_init=non_expert
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from switchmoe import models, runs, sharding
from switchmoe.config import with_defaults
from switchmoe.models import resolve
from switchmoe.runs import checkpoints, config_files
from switchmoe.training import init_from, seams

STUDENT_INITS = ("scratch", "non_expert")


def soft_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float):
    """float32[...]: T² · H(softmax(t/T), softmax(s/T)) per position (logits [..., V])."""
    t = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return -(temperature**2) * jnp.sum(t * log_s, axis=-1)


def distillation_sums(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    teacher_weight: float,
    temperature: float,
) -> dict[str, jax.Array]:
    """Weighted sums over the scored tokens: {"objective": Σ w·loss (module docstring),
    "hard": Σ w·CE(y, s), "soft": Σ w·T²·H(t/T, s/T), "teacher": Σ w·CE(y, t)}.

    logits [B, L, V]; targets int[B, L]; weights float[B, L] (0 at unscored positions). With
    teacher_weight 0 "objective" is "hard" itself and "soft" is not computed (absent)."""
    w = weights.astype(jnp.float32)
    hard = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(student_logits, targets) * w)
    teacher_ce = optax.softmax_cross_entropy_with_integer_labels(teacher_logits, targets)
    out = {"hard": hard, "teacher": jnp.sum(teacher_ce * w), "objective": hard}
    if teacher_weight:
        soft = jnp.sum(soft_cross_entropy(student_logits, teacher_logits, temperature) * w)
        out["soft"] = soft
        out["objective"] = (1.0 - teacher_weight) * hard + teacher_weight * soft
    return out


def settings(config: ml_collections.ConfigDict) -> Optional[ml_collections.ConfigDict]:
    """The `distill` block when a teacher is set, else None."""
    block = config.get("distill")
    return block if block is not None and block.get("teacher") else None


def check_distill(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `distill.*` setting that cannot work, before anything is
    compiled or written; reads the teacher's config.json (not its parameters)."""
    block = config.get("distill")
    if block is None:
        return
    init = block.get("student_init", "scratch")
    if init not in STUDENT_INITS:
        raise ValueError(f"distill.student_init must be one of {STUDENT_INITS}; got {init!r}.")
    if not block.get("teacher"):
        if init != "scratch":
            raise ValueError(
                f"distill.student_init={init!r} needs a teacher (distill.teacher='<workdir>')."
            )
        return
    alpha, temperature = block.teacher_weight, block.temperature
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"distill.teacher_weight must be in [0, 1]; got {alpha!r}.")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"distill.temperature must be > 0; got {temperature!r}.")
    if init == "non_expert" and config.get("init_from"):
        raise ValueError(
            "distill.student_init='non_expert' and init_from both set the student's start; "
            "set one of them."
        )
    teacher = teacher_config(config, need_checkpoint=True)
    for key in ("model.arch", "model.vocab_size", "data.tokenizer", "data.seq_len"):
        a, b = _get(teacher, key), _get(config, key)
        if a != b:
            raise ValueError(
                f"distill.teacher={block.teacher!r} has {key}={a!r} and this run {b!r}: the "
                "teacher must read the student's batches."
            )
    if teacher.model.moe.get("expert_quantization", "none") != "none" and (
        config.mesh.expert > 1
    ):  # fmt: skip
        raise ValueError("an int8 teacher runs on mesh.expert=1.")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def teacher_config(
    config: ml_collections.ConfigDict, need_checkpoint: bool
) -> ml_collections.ConfigDict:
    """The resolved config of `distill.teacher` (read from its workdir, defaults filled in);
    raises ValueError when there is none there, or, with `need_checkpoint`, no checkpoint."""
    teacher = config.distill.teacher
    workdir, _ = init_from.parse_init_from(teacher)
    found = config_files.read_config(workdir)
    if found is None or (need_checkpoint and not checkpoints.has_checkpoint(workdir)):
        what = "run (config and checkpoint)" if need_checkpoint else "config.json"
        raise ValueError(f"distill.teacher={teacher!r}: no {what} there.")
    return resolve(with_defaults(found))


def abstract_teacher(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
    """(teacher config, teacher parameter shapes) of `distill.teacher`, from its config.json
    alone: what `fit` sizes (the teacher's parameters live on every step's devices)."""
    teacher = teacher_config(config, need_checkpoint=False)
    return teacher, models.abstract_params(models.build_model(teacher), teacher)


def load_teacher(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
    """(teacher config, teacher params on the host) of `distill.teacher`."""
    workdir, step = init_from.parse_init_from(config.distill.teacher)
    found, params = runs.restore_run(workdir, step)
    return resolve(with_defaults(found)), jax.device_get(params)


def non_expert_start(teacher_params: Any, fresh: Any) -> tuple[Any, list[str]]:
    """The student's start: `fresh` with every parameter outside the MoE layers that the teacher
    has at the same path and shape replaced by the teacher's (placed like `fresh`'s leaf); also
    the copied paths.

    Raises ValueError when nothing is shared (a student of another width or depth)."""
    source = traverse_util.flatten_dict(teacher_params)
    target = traverse_util.flatten_dict(fresh)
    copied = []
    out = {}
    for path, leaf in target.items():
        theirs = source.get(path)
        if "moe" not in path and theirs is not None and tuple(theirs.shape) == tuple(leaf.shape):
            value = np.asarray(theirs, leaf.dtype)
            out[path] = jax.device_put(value, leaf.sharding) if hasattr(leaf, "sharding") else value
            copied.append("/".join(path))
        else:
            out[path] = leaf
    if not copied:
        raise ValueError(
            "distill.student_init='non_expert': the student shares no parameter outside the MoE "
            "layers with the teacher (the same model.d_model, num_layers and num_heads are needed)."
        )
    return traverse_util.unflatten_dict(out), copied


class Distillation(seams.Objective):
    """The train step's objective with a teacher: the teacher's parameters are placed on the
    student's mesh (by the student's axis rules) and passed to every step; the teacher runs in
    evaluation mode without gradient on the student's batch.

    `abstract=True` reads the teacher's parameter shapes from its config.json alone (what
    `memory_fit` sizes) instead of restoring them.
    """

    name = "distillation"

    def __init__(self, config: ml_collections.ConfigDict, abstract: bool = False):
        super().__init__(config)
        self.teacher_config, self.host_params = (
            abstract_teacher(config) if abstract else load_teacher(config)
        )
        self.model = self.params = None
        self.shardings: Any = None

    @classmethod
    def for_config(cls, config, abstract: bool = False) -> Optional["Distillation"]:
        return cls(config, abstract) if settings(config) else None

    def place(self, mesh, parallel):
        self.model = models.build_model(self.teacher_config, parallel)
        boxed = jax.eval_shape(
            lambda: self.model.init(jax.random.key(0), *models.dummy_inputs(self.teacher_config))
        )
        self.shardings = sharding.param_shardings(
            boxed["params"], mesh, sharding.logical_rules(self.config.mesh)
        )

        # From host values, each device taking its part: also right with several processes.
        # Shapes (jax.ShapeDtypeStruct, as `memory_fit` passes) get the shardings and no more.
        def put(x, s):
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            return jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index])

        self.params = jax.tree.map(put, self.host_params, self.shardings)

    @property
    def inputs(self) -> tuple:
        return (self.params,)

    @property
    def input_shardings(self) -> tuple:
        return (self.shardings,)

    def teacher_logits(self, teacher, rows):
        """The teacher's logits on `rows`, in evaluation mode and without gradient."""
        logits, _ = self.model.apply(
            {"params": teacher},
            *models.model_inputs(self.config, rows),
            **models.model_masks(self.config, rows),
            deterministic=True,
        )
        return jax.lax.stop_gradient(logits)

    def token_sums(self, logits, rows, teacher):
        d = self.config.distill
        return distillation_sums(
            logits, self.teacher_logits(teacher, rows), rows["targets"], rows["weights"],
            float(d.teacher_weight), float(d.temperature),
        )  # fmt: skip

    def train_metrics(self, sums, count):
        # The teacher's loss and the soft term, per token.
        out = {"train/teacher_loss": sums["teacher"] / count}
        if "soft" in sums:
            out["train/distill_loss"] = sums["soft"] / count
        return out

    def eval_sums(self, rows, teacher):
        return {"teacher": seams.cross_entropy(self.teacher_logits(teacher, rows), rows)[0]}

    def eval_metrics(self, sums, count, prefix):
        return {f"{prefix}/teacher_loss": sums.get("teacher", 0.0) / max(count, 1.0)}

    def start(self, fresh):
        if self.config.distill.get("student_init", "scratch") != "non_expert":
            return None
        params, copied = non_expert_start(self.host_params, fresh)
        return params, f"Student starts from the teacher's {len(copied)} non-expert parameters."


def check_before_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The run check of distillation (`check_distill`)."""
    check_distill(config)
