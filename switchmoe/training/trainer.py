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

from switchmoe import bootstrap, optim, sharding
from switchmoe.config import validate_config
from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.data.span_corruption import make_pipeline
from switchmoe.models import build_model, dummy_inputs, model_inputs, model_masks, resolve
from switchmoe.moe.experts import is_expert_matrix, layer_order
from switchmoe.runs import checkpoints, config_files, integrity, workdir_lock
from switchmoe.runs import metrics as metrics_lib
from switchmoe.training import features, init_from, preemption

# MoE statistics that are vectors per layer ([num_moe_layers, E] or [num_moe_layers, K]); they
# are logged per layer. All other statistics are averaged over the MoE layers.
VECTOR_STATS = ("expert_load", "dropped_fraction_by_rank", "requested_fraction_by_rank")
# Utilisation statistics logged per MoE layer too ("<name>_by_layer"), beside their mean.
PER_LAYER_STATS = ("dead_expert_fraction", "max_expert_share")


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
    return jnp.sqrt(jnp.stack([layers[k] for k in sorted(layers, key=layer_order)]))


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

    The step is composed from the parts of training/seams.py: `objective` (default: the
    config's, `features.objective_for`), the updates after the optimizer and the load counting
    (`features.after_optimizer`, `features.step_loads`).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, objective=None):
        self.config, self.mesh = config, mesh
        parallel = config.mesh.expert_parallelism if mesh.shape["expert"] > 1 else None
        self.model = build_model(config, parallel)
        self.schedule = optim.learning_rate_schedule(config.optimizer, config.num_train_steps)
        self.objective = features.objective_for(config) if objective is None else objective
        self.terms = features.objective_terms(config)
        self.after_optimizer = features.after_optimizer(config)
        self.loads = features.step_loads(config)
        boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0), *dummy_inputs(config)))[
            "params"
        ]
        self.optimizer = optim.optimizer_for(config, boxed)
        self.replicated = sharding.replicated(mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
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
        self.objective.place(mesh, parallel)
        extra_in = self.objective.input_shardings
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.param_sharding, self.opt_sharding, self.batch_sharding, None)
            + extra_in,
            out_shardings=(self.param_sharding, self.opt_sharding, self.replicated),
            donate_argnums=(0, 1),
        )
        self.eval_step = jax.jit(
            self._eval_step,
            in_shardings=(self.param_sharding, self.batch_sharding) + extra_in,
            out_shardings=self.replicated,
        )

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

    def run_train_step(self, params, opt_state, batch, step: int):
        with jax.set_mesh(self.mesh):
            return self.train_step(
                params, opt_state, batch, jnp.asarray(step, jnp.int32), *self.objective.inputs
            )

    def _apply(self, params, rows, key, totals=None):
        """The model on `rows` in training mode -> (logits, aux, the loads it sowed)."""
        variables = {"params": params, **self.loads.variables(totals)}
        (logits, aux), sown = self.model.apply(
            variables,
            *model_inputs(self.config, rows),
            **model_masks(self.config, rows),
            deterministic=False,
            rngs={"dropout": key},
            mutable=list(self.loads.collections),
        )
        return logits, aux, self.loads.read(sown)

    def _token_sums(self, logits, aux, rows, inputs) -> tuple[dict, dict]:
        """The objective's token sums with every objective term's part added, and `aux`
        without what the terms read (per-token predictions need not leave the step)."""
        sums = self.objective.token_sums(logits, rows, *inputs)
        for term in self.terms:
            sums = term.add(sums, aux, rows)
            aux = {k: v for k, v in aux.items() if k not in term.aux_keys}
        return sums, aux

    def _train_step(self, params, opt_state, batch, step, *inputs):
        key = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
        count = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        if self.config.get("grad_accum_steps", 1) > 1:
            total, sums, aux, grads, counts = self._accumulated_gradients(
                params, batch, key, inputs
            )
        else:

            def objective(params):
                logits, aux, counts = self._apply(params, batch, key)
                sums, aux = self._token_sums(logits, aux, batch, inputs)
                return sums["objective"] / count + aux["loss"], (sums, aux, counts)

            (total, (sums, aux, counts)), grads = jax.value_and_grad(objective, has_aux=True)(
                params
            )
        loss = sums["hard"] / count
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for update in self.after_optimizer:
            # Outside the optimizer, from the loads of the whole global batch.
            params = update.apply(params, counts)
        metrics = {
            "train/loss": loss,
            "train/objective": total,
            "train/grad_norm": optax.tree_utils.tree_norm(grads),
            "train/learning_rate": self.schedule(step),
            **moe_metrics(aux, "train"),
        }
        metrics.update(self.objective.train_metrics(sums, count))
        for term in self.terms:
            metrics.update(term.train_metrics(sums, count))
        grad_norms, update_norms = expert_norms(grads), expert_norms(updates)
        if grad_norms is not None:
            metrics["train/expert_grad_norm"] = grad_norms
            metrics["train/expert_update_norm"] = update_norms
        for update in self.after_optimizer:
            metrics.update(update.metrics(params))
        return params, opt_state, metrics

    def _accumulated_gradients(self, params, batch, key, inputs=()):
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
        objective's `token_sums` over the whole batch, aux, grads, loads).
        """
        n = self.config.grad_accum_steps
        count = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch
        )
        xs = (micro, jnp.arange(n))
        totals = None
        if self.loads.count_first:

            def count_loads(carry, xs):
                rows, i = xs
                _, _, counts = self._apply(params, rows, jax.random.fold_in(key, i))
                return carry, counts

            _, per_micro = jax.lax.scan(count_loads, None, xs)
            loads = jax.tree.map(lambda v: jnp.sum(v, axis=0), per_micro)
            totals = self.loads.totals(loads, n)

        def objective(params, rows, i):
            logits, aux, counts = self._apply(params, rows, jax.random.fold_in(key, i), totals)
            sums, aux = self._token_sums(logits, aux, rows, inputs)
            return sums["objective"] / count + aux["loss"] / n, (sums, aux, counts)

        def accumulate(carry, xs):
            grads, total_sums = carry
            (_, (sums, aux, counts)), g = jax.value_and_grad(objective, has_aux=True)(params, *xs)
            total_sums = jax.tree.map(jnp.add, total_sums, sums)
            return (jax.tree.map(jnp.add, grads, g), total_sums), (aux, counts)

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], micro)

        def first_sums():
            logits, aux, _ = self._apply(params, first, key, totals)
            return self._token_sums(logits, aux, first, inputs)[0]

        sum_shapes = jax.eval_shape(first_sums)
        no_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes)
        (grads, sums), (auxes, per_micro) = jax.lax.scan(accumulate, (zeros, no_sums), xs)
        aux = jax.tree.map(lambda v: jnp.mean(v, axis=0), auxes)
        loads = jax.tree.map(lambda v: jnp.sum(v, axis=0), per_micro)
        return sums["objective"] / count + aux["loss"], sums, aux, grads, loads

    def _eval_step(self, params, batch, *inputs):
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
        out["objective_sums"] = self.objective.eval_sums(batch, *inputs)
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
        stats, batches, extra, sums, count = 0.0, 0, {}, 0.0, 0.0
        for batch, units, unit_bytes in pipeline.eval_set_batches(
            which, num_batches, jax.process_index(), jax.process_count()
        ):
            with jax.set_mesh(self.mesh):
                out = jax.device_get(
                    self.eval_step(params, self.put_batch(batch), *self.objective.inputs)
                )
            for name, value in out.pop("objective_sums").items():
                extra[name] = extra.get(name, 0.0) + float(value)
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
        result.update(self.objective.eval_metrics(extra, count, prefix))
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
    features.check_before_run(config, workdir)
    lead = jax.process_index() == 0  # one process writes config, metrics and progress
    with workdir_lock.held(workdir, take=lead):
        return _train_and_evaluate(config, workdir, stop_at=stop_at, log=log, lead=lead)


def _train_and_evaluate(config, workdir, *, stop_at, log, lead) -> dict[str, Any]:
    if not lead:
        log = lambda line: None
    os.makedirs(workdir, exist_ok=True)
    if lead and not checkpoints.has_checkpoint(workdir):
        # Nothing trained yet: config.json (re)states what this start trains. Once a checkpoint
        # exists it stays as written; changes on resume go to config_history.jsonl.
        config_files.write_config(workdir, config)

    mesh = sharding.make_mesh(config.mesh)
    trainer = Trainer(config, mesh)
    pipeline = make_pipeline(config)
    if jax.process_count() > 1:
        # Process 0 prepares the TFDS data once; the others wait, then read what it wrote.
        if lead:
            pipeline.prepare()
        multihost_utils.sync_global_devices("switchmoe: data prepared")
    ckpt = checkpoints.Checkpointer(
        workdir,
        keep=config.keep_checkpoints,
        timeout_seconds=config.get(
            "checkpoint_timeout_seconds", checkpoints.DEFAULT_TIMEOUT_SECONDS
        ),
        owner=True,
    )
    # The newest intact checkpoint: a damaged newer one is reported and set aside.
    restored = ckpt.restore_latest(*trainer.abstract_state(), log=log)
    start = 0
    history = None  # the settings a resumed start changed, recorded once it has a checkpoint
    if restored:
        start, params, opt_state, meta = restored
        if meta["data_step"] != start:
            raise ValueError(f"checkpoint {start} records data position {meta['data_step']}.")
        log(f"Resumed from {ckpt.directory}/{start}.")
        if lead:
            history = config_files.History(workdir, config, start)
    else:
        params, opt_state = trainer.init()
        if config.get("init_from"):
            params, opt_state = trainer.start_from(init_from.initial_params(config, params))
            log(f"Initialised from {config.init_from} (new optimizer state, data from step 0).")
        elif started := trainer.objective.start(params):
            start_params, line = started
            params, opt_state = trainer.start_from(start_params)
            log(line)
    batches = pipeline.train_batches(
        start, meta.get("data_state") if restored else None,
        jax.process_index(), jax.process_count(),
    )  # fmt: skip
    writer = metrics_lib.MetricWriter(workdir, resume_step=start) if lead else None
    total = config.num_train_steps
    progress = metrics_lib.Progress(total, config.batch_size * config.data.seq_len, start)
    hooks = features.step_hooks(config, workdir, log, trainer.abstract_state()[0])
    # The steps' metrics since the last logged row (a checkpoint between log rows carries them).
    pending = preemption.pending_from_json(meta.get(preemption.PENDING_KEY)) if restored else []
    last: dict[str, Any] = {}
    # SIGTERM / SIGINT: finish the step, save it, stop (training/preemption.py).
    watch = preemption.PreemptionWatch(log, config.get("checkpoint_every_minutes", 0.0)).install()
    try:
        for step in range(start, total):
            rows = next(batches)
            for hook in hooks:
                hook.before(step + 1)
            params, opt_state, step_metrics = trainer.run_train_step(
                params, opt_state, trainer.put_batch(rows), step
            )
            pending.append(step_metrics)
            done = step + 1
            for hook in hooks:
                hook.after(done, params)
            record: dict[str, Any] = {}
            is_last = done == total or done == stop_at
            preempted, timed = watch.check(done)
            if done == start + 1 and not (done % config.log_every == 0 or is_last):
                # A first sign of life whatever log_every is (this step includes compilation).
                first = float(jax.device_get(step_metrics["train/loss"]))
                log(
                    f"step {done}/{total} | loss {first:.4f} | first step (with compilation) "
                    f"{metrics_lib.format_seconds(progress.elapsed())}; next line at step "
                    f"{min(total, (done // config.log_every + 1) * config.log_every)}"
                )
                jax.block_until_ready(params)
                progress.rebase(done)  # tokens/s without the compilation
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
                for hook in hooks:
                    record.update(hook.metrics(tokens_per_second))
                log(progress.line(done, record, tokens_per_second))
            if done % config.eval_every == 0 or is_last:
                with progress.paused(params):
                    record.update(trainer.evaluate(params, pipeline))
                log(
                    f"step {done}: eval loss {record['eval/loss']:.4f} "
                    f"({record['eval/bits_per_token']:.3f} bits/token)"
                )
            if done == total:
                # The headline number: every token of the eval split (or, for quick runs, the
                # sample), with its bootstrap interval over documents.
                with progress.paused(params):
                    record.update(final_evaluation(trainer, params, pipeline, workdir, log, lead))
            if done % config.checkpoint_every == 0 or is_last or preempted or timed:
                # Never save what a non-finite step produced. The loss is computed before the
                # update, so the parameters and optimizer state themselves are checked.
                bad = integrity.first_non_finite({"params": params, "opt_state": opt_state})
                if bad:
                    raise FloatingPointError(
                        f"non-finite values in {bad} after step {done}; not saved. Latest "
                        f"checkpoint: {ckpt.latest_step()}."
                    )
                ckpt_meta = {"step": done, "data_step": done,
                        preemption.PENDING_KEY: preemption.pending_to_json(pending)}  # fmt: skip
                with progress.paused(params):
                    ckpt.save(done, params, opt_state, ckpt_meta, data_state=batches.get_state())
                watch.saved()
                if history:
                    history.saved(done)
                    history.settle(checkpoints.latest_saved_step(workdir))
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
            if preempted and done < total:  # closing below waits for the save to complete
                raise preemption.Preempted(watch.signal_name, done, workdir)
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
        for hook in hooks:
            hook.close()
        watch.uninstall()
        if history:  # after close: every save of this start that completed is on disk
            history.settle(checkpoints.latest_saved_step(workdir))
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
