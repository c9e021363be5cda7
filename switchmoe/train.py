"""Training and evaluation of an MoE language model from a config.

`train_and_evaluate(config, workdir)` is the whole job: it validates the config (before anything
is traced or written), builds the data pipeline and the model, restores the latest checkpoint of
`workdir` if there is one, then loops: a pure `train_step` jitted once, metrics to metrics.jsonl
and TensorBoard, periodic evaluation, async Orbax checkpoints.

Reproducibility: the batch of step t is a pure function of (data.seed, t) (data.pipeline='packed')
or is where the checkpoint's saved data iterator state resumes the stream ('stream'), and the
dropout/routing key of step t is fold_in(key(seed), t), so a run resumed from a checkpoint at step
t computes exactly what the uninterrupted run computed.

Shape legend: B batch (global), L sequence length, V vocabulary. The model and its batches
depend on `model.arch`: next-token prediction for the decoder-only LM, span corruption for the
encoder–decoder (see MODEL_INPUTS and switchmoe.data.span_corruption).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from switchmoe import distillation, finetune
from switchmoe.experts import is_expert_matrix
from switchmoe import balancing, bootstrap, checkpoints, integrity, optim, run_config, sharding
from switchmoe import metrics as metrics_lib
from switchmoe.config import resolve, validate_config
from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.data.span_corruption import make_pipeline
from switchmoe.models import (  # noqa: F401  (build_model & co. were defined here before)
    MODEL_INPUTS,
    abstract_params,
    build_model,
    count_params,
    dummy_inputs,
    init_rows,
    model_inputs,
    model_masks,
)
from switchmoe.workdir_lock import WorkdirLock

# MoE statistics that are vectors per layer ([num_moe_layers, E] or [num_moe_layers, K]); they
# are logged per layer. All other statistics are averaged over the MoE layers.
VECTOR_STATS = ("expert_load", "dropped_fraction_by_rank", "requested_fraction_by_rank")
# Utilisation statistics logged per MoE layer too ("<name>_by_layer"), beside their mean.
PER_LAYER_STATS = ("dead_expert_fraction", "max_expert_share")


def cross_entropy(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (nats) and the number of scored tokens."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["weights"]), jnp.sum(batch["weights"])


def expert_norms(tree: Any) -> jax.Array | None:
    """L2 norm of each expert's weights [num_moe_layers, E] (w_in, w_out and w_gate together).

    `tree` is shaped like the parameters (parameters, gradients or updates). MoE layers come in
    the order of their names, blocks numbered as numbers (block_2 before block_10); None for a
    dense model. Per-expert gradient and update norms show experts that starve (few tokens, small
    gradients) or that Adam moves as far as the busy ones on far less evidence.
    """
    layers: dict[tuple, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = tuple(getattr(k, "key", None) for k in path)
        if is_expert_matrix(keys):
            layer = tuple(keys[: keys.index("moe")])
            squares = jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=(1, 2))
            layers[layer] = layers.get(layer, 0.0) + squares
    if not layers:
        return None
    return jnp.sqrt(jnp.stack([layers[k] for k in sorted(layers, key=balancing.layer_order)]))


def moe_metrics(aux: dict[str, Any], prefix: str) -> dict:
    """Named MoE metrics of one step from the model's aux output (see model.sum_aux)."""
    if not aux["stats"]:
        return {}
    out = {
        # What the auxiliary losses add to the objective, summed over MoE layers (the layers
        # applied the weights).
        f"{prefix}/aux_loss": aux["weighted_losses"]["load_balancing"],
        f"{prefix}/z_loss": aux["weighted_losses"]["z_loss"],
    }
    num_layers = next(iter(aux["stats"].values())).shape[0]
    # Unweighted, averaged over layers: 1.0 is perfectly balanced.
    out[f"{prefix}/load_balancing"] = aux["losses"]["load_balancing"] / num_layers
    out[f"{prefix}/router_z"] = aux["losses"]["z_loss"] / num_layers
    for name in aux["losses"].keys() - {"load_balancing", "z_loss"}:  # e.g. importance, load
        out[f"{prefix}/{name}"] = aux["losses"][name] / num_layers
    for name, value in aux["stats"].items():
        out[f"{prefix}/{name}"] = value if name in VECTOR_STATS else jnp.mean(value)
        if name in PER_LAYER_STATS:
            out[f"{prefix}/{name}_by_layer"] = value
    return out


class Trainer:
    """The jitted pieces of a run on a mesh: init, train_step, eval_step, with their shardings.

    Parameters and optimizer state are placed by the logical axis rules (experts split over
    `expert`, hidden widths over `model`, the rest replicated); the batch is split over
    (data, expert). With mesh.expert > 1 the MoE layers exchange tokens with all-to-alls.

    `teacher`: (config, host params) of a distillation teacher (switchmoe/distillation.py),
    placed on the mesh by its own axis rules and run in evaluation mode in every train and eval
    step; the objective then mixes in its soft targets by `config.distill`.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, teacher=None):
        self.config, self.mesh = config, mesh
        parallel = config.mesh.expert_parallelism if mesh.shape["expert"] > 1 else None
        self.model = build_model(config, parallel)
        self.schedule = optim.learning_rate_schedule(config.optimizer, config.num_train_steps)
        moe = config.model.moe
        self.bias_speed = moe.get("bias_update_speed", 0.0) if moe.num_experts else 0.0
        # Under accumulation, the global-batch loss needs every microbatch's loads first.
        self.count_first = (
            bool(moe.num_experts) and moe.get("global_balance_weight", 0.0) > 0
            and config.get("grad_accum_steps", 1) > 1
        )  # fmt: skip
        self.optimizer = optim.optimizer_for(config)
        self.replicated = sharding.replicated(mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0), *dummy_inputs(config)))[
            "params"
        ]
        self.param_sharding = sharding.param_shardings(
            boxed, mesh, sharding.logical_rules(config.mesh)
        )
        abstract = checkpoints.abstract_like(nn.meta.unbox(boxed), None)
        # Optimizer state that mirrors the parameters (Adam's moments) is placed like them:
        # experts' moments split over `expert`. Asking the partitioner instead (the output
        # shardings of a jitted init) replicates every moment, since zeros_like does not
        # depend on its input's values: E x the expert moments on every device.
        self.opt_sharding = sharding.optimizer_state_shardings(
            jax.eval_shape(self.optimizer.init, abstract), abstract, self.param_sharding, mesh
        )
        self._abstract_params = abstract
        self.teacher_model = self.teacher_params = None
        teacher_in: tuple = ()
        if teacher is not None:
            self.teacher_model, self.teacher_params, teacher_sharding = self._place_teacher(
                *teacher, parallel
            )
            teacher_in = (teacher_sharding,)
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.param_sharding, self.opt_sharding, self.batch_sharding, None)
            + teacher_in,
            out_shardings=(self.param_sharding, self.opt_sharding, self.replicated),
            donate_argnums=(0, 1),
        )
        self.eval_step = jax.jit(
            self._eval_step,
            in_shardings=(self.param_sharding, self.batch_sharding) + teacher_in,
            out_shardings=self.replicated,
        )

    def _place_teacher(self, config, params, parallel):
        """(model, params on the mesh, their shardings) of a distillation teacher."""
        model = build_model(config, parallel)
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
        shardings = sharding.param_shardings(
            boxed["params"], self.mesh, sharding.logical_rules(self.config.mesh)
        )

        # From host values, each device taking its part: also right with several processes.
        # Shapes (jax.ShapeDtypeStruct, as `fit` passes) get the shardings and nothing more.
        def place(x, s):
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            return jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index])

        return model, jax.tree.map(place, params, shardings), shardings

    def init(self) -> tuple[Any, Any]:
        """Fresh (params, opt_state), placed on the mesh."""

        def init_fn(key):
            params = nn.meta.unbox(self.model.init(key, *dummy_inputs(self.config))["params"])
            return params, self.optimizer.init(params)

        # Outside the mesh context on purpose: a one-row dummy batch cannot be split over the
        # batch shards, and the parameters do not depend on how tokens are exchanged.
        init = jax.jit(init_fn, out_shardings=(self.param_sharding, self.opt_sharding))
        return init(jax.random.key(self.config.seed))

    def start_from(self, params) -> tuple[Any, Any]:
        """(params, a fresh optimizer state for them), placed on the mesh: a fine-tuning start."""
        init = jax.jit(self.optimizer.init, out_shardings=self.opt_sharding)
        return params, init(params)

    def abstract_state(self) -> tuple[Any, Any]:
        """Restore targets: shapes, dtypes and this mesh's shardings."""
        place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        params = jax.tree.map(place, self._abstract_params, self.param_sharding)
        opt_state = jax.eval_shape(self.optimizer.init, self._abstract_params)
        return params, jax.tree.map(place, opt_state, self.opt_sharding)

    def _teacher_args(self) -> tuple:
        return () if self.teacher_model is None else (self.teacher_params,)

    def run_train_step(self, params, opt_state, batch, step: int):
        with jax.set_mesh(self.mesh):
            return self.train_step(
                params, opt_state, batch, jnp.asarray(step, jnp.int32), *self._teacher_args()
            )

    def _teacher_logits(self, teacher, rows):
        """The teacher's logits on `rows`, in evaluation mode and without gradient."""
        logits, _ = self.teacher_model.apply(
            {"params": teacher},
            *model_inputs(self.config, rows),
            **model_masks(self.config, rows),
            deterministic=True,
        )
        return jax.lax.stop_gradient(logits)

    def _token_sums(self, logits, rows, teacher):
        """{"objective", "hard"(, "soft", "teacher")}: the token loss summed over `rows`'
        scored tokens, the hard-label cross-entropy sum, and with a teacher the distillation
        terms (distillation.distillation_sums)."""
        if teacher is None:
            ce_sum, _ = cross_entropy(logits, rows)
            return {"objective": ce_sum, "hard": ce_sum}
        d = self.config.distill
        return distillation.distillation_sums(
            logits, self._teacher_logits(teacher, rows), rows["targets"], rows["weights"],
            float(d.teacher_weight), float(d.temperature),
        )  # fmt: skip

    def _apply(self, params, rows, key, totals=None):
        """The model on `rows` in training mode -> (logits, aux, the loads it sowed)."""
        variables = {"params": params}
        if totals is not None:
            variables[balancing.TOTALS] = totals
        (logits, aux), sown = self.model.apply(
            variables,
            *model_inputs(self.config, rows),
            **model_masks(self.config, rows),
            deterministic=False,
            rngs={"dropout": key},
            mutable=[balancing.COUNTS],
        )
        return logits, aux, sown.get(balancing.COUNTS, {})

    def _train_step(self, params, opt_state, batch, step, teacher=None):
        key = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
        count = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        if self.config.get("grad_accum_steps", 1) > 1:
            total, sums, aux, grads, counts = self._accumulated_gradients(
                params, batch, key, teacher
            )
        else:

            def objective(params):
                logits, aux, counts = self._apply(params, batch, key)
                sums = self._token_sums(logits, batch, teacher)
                return sums["objective"] / count + aux["loss"], (sums, aux, counts)

            (total, (sums, aux, counts)), grads = jax.value_and_grad(objective, has_aux=True)(
                params
            )
        loss = sums["hard"] / count
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if self.bias_speed:
            # After the optimizer, from the loads of the whole global batch (balancing.py).
            params = balancing.update_biases(params, counts, self.bias_speed)
        metrics = {
            "train/loss": loss,
            "train/objective": total,
            "train/grad_norm": optax.tree_utils.tree_norm(grads),
            "train/learning_rate": self.schedule(step),
            **moe_metrics(aux, "train"),
        }
        if "teacher" in sums:  # distillation: the teacher's loss and the soft term, per token
            metrics["train/teacher_loss"] = sums["teacher"] / count
            if "soft" in sums:
                metrics["train/distill_loss"] = sums["soft"] / count
        grad_norms, update_norms = expert_norms(grads), expert_norms(updates)
        if grad_norms is not None:
            metrics["train/expert_grad_norm"] = grad_norms
            metrics["train/expert_update_norm"] = update_norms
        biases = balancing.stacked_biases(params)
        if biases is not None:
            metrics["train/selection_bias"] = biases
        return params, opt_state, metrics

    def _accumulated_gradients(self, params, batch, key, teacher=None):
        """The objective's value and gradient on `batch`, in grad_accum_steps microbatches.

        Microbatch i holds rows i, i + N, i + 2N, ... (N microbatches): reshaping [B, ...] to
        [B/N, N, ...] keeps the batch axis's split over devices on the B/N axis, so every
        microbatch is spread over all batch shards and nothing moves between devices. The token
        loss is summed over microbatches and divided by the whole batch's token count, and the
        auxiliary losses (means over routing groups) are averaged over microbatches, so the
        objective and its gradient are the whole batch's. Dropout and routing keys are folded
        per microbatch.

        The global-batch balance loss counts the loads of all N microbatches before any of them
        is differentiated: a forward pass over the microbatches first (the price of exactness:
        one more forward per step, only with global_balance_weight > 0 and N > 1), whose totals
        every microbatch's loss then reads (losses.global_balance_loss). The loads the bias rule
        reads are the microbatches' counts summed. Returns (objective, the token sums of
        `_token_sums` over the whole batch, aux, grads, loads).
        """
        n = self.config.grad_accum_steps
        count = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch
        )
        xs = (micro, jnp.arange(n))
        totals = None
        if self.count_first:

            def count_loads(carry, xs):
                rows, i = xs
                _, _, counts = self._apply(params, rows, jax.random.fold_in(key, i))
                return carry, counts

            _, per_micro = jax.lax.scan(count_loads, None, xs)
            loads = jax.tree.map(lambda v: jnp.sum(v, axis=0), per_micro)
            totals = balancing.totals_for_microbatches(loads, n)

        def objective(params, rows, i):
            logits, aux, counts = self._apply(params, rows, jax.random.fold_in(key, i), totals)
            sums = self._token_sums(logits, rows, teacher)
            return sums["objective"] / count + aux["loss"] / n, (sums, aux, counts)

        def accumulate(carry, xs):
            grads, total_sums = carry
            (_, (sums, aux, counts)), g = jax.value_and_grad(objective, has_aux=True)(params, *xs)
            total_sums = jax.tree.map(jnp.add, total_sums, sums)
            return (jax.tree.map(jnp.add, grads, g), total_sums), (aux, counts)

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], micro)
        sum_shapes = jax.eval_shape(
            lambda: self._token_sums(self._apply(params, first, key, totals)[0], first, teacher)
        )
        no_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes)
        (grads, sums), (auxes, per_micro) = jax.lax.scan(accumulate, (zeros, no_sums), xs)
        aux = jax.tree.map(lambda v: jnp.mean(v, axis=0), auxes)
        loads = jax.tree.map(lambda v: jnp.sum(v, axis=0), per_micro)
        return sums["objective"] / count + aux["loss"], sums, aux, grads, loads

    def _eval_step(self, params, batch, teacher=None):
        logits, aux = self.model.apply(
            {"params": params},
            *model_inputs(self.config, batch),
            **model_masks(self.config, batch),
            deterministic=True,
        )
        # Per-token losses (0 where unscored) for the per-document sums of the bootstrap, and
        # their sum; the step's outputs are replicated, so every process sees every row's.
        ce_tokens = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        ce_tokens = ce_tokens * batch["weights"]
        out = {
            "ce_sum": jnp.sum(ce_tokens),
            "count": jnp.sum(batch["weights"]),
            "ce_tokens": ce_tokens.astype(jnp.float32),
            "weights": batch["weights"],
            **moe_metrics(aux, "eval"),
        }
        if teacher is not None:
            out["teacher_ce_sum"] = cross_entropy(self._teacher_logits(teacher, batch), batch)[0]
        return out

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch -> global arrays split over (data, expert)."""
        return jax.tree.map(
            lambda rows: jax.make_array_from_process_local_data(self.batch_sharding, rows), batch
        )

    def evaluate(
        self,
        params,
        pipeline: LMDataPipeline,
        which: str = "sample",
        num_batches: int | None = None,
        prefix: str = "eval",
        keep_documents: bool = False,
    ) -> dict[str, Any]:
        """`{prefix}/loss` over eval set `which` (switchmoe/data/eval_set.py), with what was
        scored and averaged MoE statistics.

        which: 'sample' (periodic evaluations: whole documents drawn at random) or 'split'
          (every token of the eval split).
        num_batches: the first batches only; default the config's `num_eval_batches` for the
          sample and all of them for the split; 0 = all.
        Beside the loss: `scored_tokens`, `scored_bytes`, `documents` (those with a scored
        token), and for the whole split a 95% bootstrap interval over documents
        (`loss_low`/`loss_high`, `bits_per_byte_low`/`_high`; switchmoe/bootstrap.py).
        keep_documents: also return the per-document sums (the eval set's document indices,
          summed loss in nats, tokens and bytes, each [D]) under `DOCUMENTS_KEY`, for
          `write_final_documents`.
        """
        if num_batches is None:
            num_batches = self.config.num_eval_batches if which == "sample" else 0
        num_batches = num_batches or None  # 0: every batch of the set
        eval_set = pipeline.eval_set(which)
        docs = eval_set.num_documents
        doc_loss, doc_tokens, doc_bytes = np.zeros(docs), np.zeros(docs), np.zeros(docs)
        stats, batches, teacher_sums, sums, count = 0.0, 0, 0.0, 0.0, 0.0
        for batch, units, unit_bytes in pipeline.eval_set_batches(
            which, num_batches, jax.process_index(), jax.process_count()
        ):
            with jax.set_mesh(self.mesh):
                out = jax.device_get(
                    self.eval_step(params, self.put_batch(batch), *self._teacher_args())
                )
            teacher_sums += float(out.pop("teacher_ce_sum", 0.0))
            sums += float(out.pop("ce_sum"))
            count += float(out.pop("count"))
            ce_tokens, weights = np.asarray(out.pop("ce_tokens")), np.asarray(out.pop("weights"))
            scored = (units >= 0) & (weights > 0)
            np.add.at(doc_loss, units[scored], ce_tokens[scored])
            np.add.at(doc_tokens, units[scored], weights[scored])
            if unit_bytes is not None:
                np.add.at(doc_bytes, units[scored], unit_bytes[scored])
            stats = jax.tree.map(lambda a, b: a + b, stats, out) if batches else out
            batches += 1
        loss = sums / max(count, 1.0)
        num_bytes = float(doc_bytes.sum())
        result = {
            f"{prefix}/loss": loss,
            f"{prefix}/bits_per_token": loss / math.log(2),
            f"{prefix}/scored_tokens": count,
            f"{prefix}/scored_bytes": num_bytes,
            f"{prefix}/documents": float(np.count_nonzero(doc_tokens)),
        }
        if num_batches is None:  # every token of the set
            whole = "whole_split" if eval_set.name == "split" else "whole_sample"
            result[f"{prefix}/{whole}"] = 1.0
        if self.teacher_model is not None:
            result[f"{prefix}/teacher_loss"] = teacher_sums / max(count, 1.0)
        per_byte = self.config.model.get("arch", "decoder") == "decoder" and num_bytes > 0
        if per_byte:
            # Span-corruption targets are sentinels and masked spans, not a text stream: a
            # per-byte loss means something for the decoder-only LM only.
            result[f"{prefix}/bits_per_byte"] = metrics_lib.bits_per_byte(loss, count, num_bytes)
        units_seen = doc_tokens > 0
        if eval_set.name == "split" and num_batches is None and units_seen.sum() >= 2:
            low, high = bootstrap.ratio_interval(doc_loss[units_seen], doc_tokens[units_seen])
            result[f"{prefix}/loss_low"], result[f"{prefix}/loss_high"] = low, high
            if per_byte:
                scale = 1.0 / math.log(2)
                low, high = bootstrap.ratio_interval(
                    doc_loss[units_seen] * scale, doc_bytes[units_seen]
                )
                result[f"{prefix}/bits_per_byte_low"] = low
                result[f"{prefix}/bits_per_byte_high"] = high
        averaged = jax.tree.map(lambda v: np.asarray(v) / batches, stats)
        # The eval step names its MoE statistics eval/...; a final evaluation's are final/...
        result.update({prefix + key.removeprefix("eval"): v for key, v in averaged.items()})
        if keep_documents:
            result[DOCUMENTS_KEY] = {
                "documents": eval_set.documents,
                "loss": doc_loss,
                "tokens": doc_tokens,
                "bytes": doc_bytes,
            }
        return result


# Where `Trainer.evaluate(keep_documents=True)` puts its per-document sums.
DOCUMENTS_KEY = "per_document"
FINAL_DOCUMENTS_FILE = metrics_lib.FINAL_DOCUMENTS_FILE


def write_final_documents(workdir: str, per_document: dict) -> None:
    """Writes the final evaluation's per-document sums to `workdir/FINAL_DOCUMENTS_FILE`."""
    path = os.path.join(workdir, FINAL_DOCUMENTS_FILE)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **per_document)
    os.replace(tmp, path)


def final_evaluation(trainer, params, pipeline, workdir: str, log, lead: bool) -> dict:
    """A run's headline evaluation (`config.final_eval`: every token of the eval split, or for
    quick runs the sample) as final/* metrics with its bootstrap interval; the lead process
    writes its per-document sums to the workdir, and the line is logged."""
    which = trainer.config.get("final_eval", "split")
    final = trainer.evaluate(params, pipeline, which, 0, "final", keep_documents=True)
    per_document = final.pop(DOCUMENTS_KEY)
    if lead:
        write_final_documents(workdir, per_document)
    log(metrics_lib.final_line(final))
    return final


def _setting_differences(previous, config) -> dict[str, tuple]:
    """{dotted key: (old, new)} of the model and optimizer settings that differ."""
    flat = lambda c: {
        k: v
        for k, v in run_config.flat_items(c.to_dict())
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
    previous = run_config.read_config(workdir)
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


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    Args:
      config: a switchmoe config (configs/*.py).
      workdir: output directory (config.json, metrics.jsonl, TensorBoard events, checkpoints/).
      stop_at: stop after this many steps as if interrupted (after that step's checkpoint, if
        any); the schedule still follows num_train_steps. For tests and preemption drills.
      log: where progress lines go.

    Returns:
      The last logged train metrics and eval metrics, merged.

    Raises:
      ValueError: a bad setting or an incompatible workdir, before anything is written.
      FloatingPointError: a non-finite metric; the checkpoints already written are intact.
      WorkdirLocked: another live trainer holds the workdir (nothing is written).
    """
    config = resolve(config)
    validate_config(config, num_devices=jax.device_count())
    distillation.check_distill(config)
    if config.model.moe.num_experts and config.model.moe.expert_quantization != "none":
        done = checkpoints.latest_saved_step(workdir) if checkpoints.has_checkpoint(workdir) else 0
        if (done or 0) < config.num_train_steps:
            raise ValueError(
                f"model.moe.expert_quantization={config.model.moe.expert_quantization!r} is "
                "for evaluation (int8 values take no gradient): train with 'none' and quantize "
                "the trained run (switchmoe.quantization.quantize_run)."
            )
    check_workdir_compatible(config, workdir)
    if not checkpoints.has_checkpoint(workdir):
        finetune.check_init_from(config)  # a resumed run continues from its own checkpoint
    lead = jax.process_index() == 0  # one process writes config, metrics and progress
    lock = WorkdirLock(workdir)
    if lead:
        lock.acquire()
    try:
        return _train_and_evaluate(config, workdir, stop_at=stop_at, log=log, lead=lead)
    finally:
        lock.release()


def _train_and_evaluate(config, workdir, *, stop_at, log, lead) -> dict[str, Any]:
    if not lead:
        log = lambda line: None
    os.makedirs(workdir, exist_ok=True)
    if lead and not checkpoints.has_checkpoint(workdir):
        # Nothing trained yet: config.json (re)states what this start trains. Once a checkpoint
        # exists it stays as written; changes on resume go to config_history.jsonl.
        run_config.write_config(workdir, config)

    mesh = sharding.make_mesh(config.mesh)
    teacher = distillation.load_teacher(config) if distillation.settings(config) else None
    trainer = Trainer(config, mesh, teacher=teacher)
    pipeline = make_pipeline(config)
    if jax.process_count() > 1:
        # Process 0 prepares the TFDS data once; the others wait, then read what it wrote.
        if lead:
            pipeline.prepare()
        multihost_utils.sync_global_devices("switchmoe: data prepared")
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    # The newest intact checkpoint: a damaged newer one is reported and set aside.
    restored = ckpt.restore_latest(*trainer.abstract_state(), log=log)
    start = 0
    if restored:
        start, params, opt_state, meta = restored
        if meta["data_step"] != start:
            raise ValueError(f"checkpoint {start} records data position {meta['data_step']}.")
        log(f"Resumed from {ckpt.directory}/{start}.")
        if lead:
            run_config.record_config(workdir, config, start)
    else:
        params, opt_state = trainer.init()
        if config.get("init_from"):
            params, opt_state = trainer.start_from(finetune.initial_params(config, params))
            log(f"Initialised from {config.init_from} (new optimizer state, data from step 0).")
        elif teacher is not None and config.distill.student_init == "non_expert":
            start_params, copied = distillation.non_expert_start(teacher[1], params)
            params, opt_state = trainer.start_from(start_params)
            log(f"Student starts from the teacher's {len(copied)} non-expert parameters.")
    batches = pipeline.train_batches(
        start, meta.get("data_state") if restored else None,
        jax.process_index(), jax.process_count(),
    )  # fmt: skip
    writer = metrics_lib.MetricWriter(workdir, resume_step=start) if lead else None
    total = config.num_train_steps
    progress = metrics_lib.Progress(total, config.batch_size * config.data.seq_len, start)
    pending: list[dict] = []
    last: dict[str, Any] = {}
    try:
        for step in range(start, total):
            rows = next(batches)
            params, opt_state, step_metrics = trainer.run_train_step(
                params, opt_state, trainer.put_batch(rows), step
            )
            pending.append(step_metrics)
            done = step + 1
            record: dict[str, Any] = {}
            is_last = done == total or done == stop_at
            if done == start + 1 and not (done % config.log_every == 0 or is_last):
                # A first sign of life whatever log_every is (this step includes compilation).
                first = float(jax.device_get(step_metrics["train/loss"]))
                log(
                    f"step {done}/{total} | loss {first:.4f} | first step (with compilation) "
                    f"{metrics_lib.format_seconds(progress.elapsed())}; next line at step "
                    f"{min(total, (done // config.log_every + 1) * config.log_every)}"
                )
            if done % config.log_every == 0 or is_last:
                # Mean over the steps since the last log; one device->host transfer per log.
                host = jax.device_get(pending)
                record.update(jax.tree.map(lambda *v: np.mean(np.stack(v), axis=0), *host))
                pending = []
                bad = metrics_lib.first_non_finite(record)
                if bad:
                    raise FloatingPointError(
                        f"non-finite {bad} at step {done} (averaged over the last "
                        f"{len(host)} steps); stopping without saving. Latest checkpoint: "
                        f"{ckpt.latest_step()}."
                    )
                tokens_per_second = progress.tokens_per_second(done)
                record["train/tokens_per_second"] = tokens_per_second
                log(progress.line(done, record, tokens_per_second))
            if done % config.eval_every == 0 or is_last:
                record.update(trainer.evaluate(params, pipeline))
                log(
                    f"step {done}: eval loss {record['eval/loss']:.4f} "
                    f"({record['eval/bits_per_token']:.3f} bits/token)"
                )
            if done == total:
                # The headline number: every token of the eval split (or, for quick runs, the
                # sample), with its bootstrap interval over documents.
                record.update(final_evaluation(trainer, params, pipeline, workdir, log, lead))
            if done % config.checkpoint_every == 0 or is_last:
                # Never save what a non-finite step produced. The loss is computed before the
                # update, so the parameters and optimizer state themselves are checked.
                bad = integrity.first_non_finite({"params": params, "opt_state": opt_state})
                if bad:
                    raise FloatingPointError(
                        f"non-finite values in {bad} after step {done}; not saved. Latest "
                        f"checkpoint: {ckpt.latest_step()}."
                    )
                ckpt.save(
                    done, params, opt_state, {"step": done, "data_step": done},
                    data_state=batches.get_state(),
                )  # fmt: skip
            if record and writer:
                try:
                    writer.write(done, record)
                except OSError as e:
                    raise checkpoints.CheckpointWriteError(
                        f"cannot write the metrics of step {done} to {workdir} ({e}); the latest "
                        f"intact checkpoint: {checkpoints.latest_saved_step(workdir)}. Training "
                        "stopped."
                    ) from e
                last.update(record)
            if stop_at is not None and done >= stop_at:
                break
    except BaseException:
        batches.close()
        try:
            ckpt.close()  # waits for async saves: what was saved stays intact
        except checkpoints.CheckpointWriteError:
            pass  # the error already raised says more
        raise
    else:
        batches.close()
        ckpt.close()
    finally:
        if writer:
            try:
                writer.close()
            except OSError:
                pass  # a workdir that vanished: reported above
    if not last:  # nothing left to train: report what the finished run logged
        # Every process reads it (a workdir is shared storage, as its checkpoints are), so that
        # all of them agree on whether the final evaluation below runs.
        for record in metrics_lib.read_metrics(workdir):
            last.update(record)
        has_documents = os.path.exists(os.path.join(workdir, FINAL_DOCUMENTS_FILE))
        if start >= total and ("final/loss" not in last or not has_documents):
            # A run finished before the whole-split final evaluation (or its per-document
            # file) existed: add it now, from the final checkpoint, at the final step.
            final = final_evaluation(trainer, params, pipeline, workdir, log, lead)
            if lead and "final/loss" not in last:
                late = metrics_lib.MetricWriter(workdir, resume_step=total)
                try:
                    late.write(total, final)
                finally:
                    late.close()
            last.update(final)
    return last
