"""Will it fit? The train step of a config, lowered and compiled for a mesh from abstract inputs.

`fit_report(config)` builds the Trainer on the current devices (fake CPU devices stand in for an
accelerator slice: `experiments/fit.py --devices=N` sets them), lowers `train_step` with
`jax.ShapeDtypeStruct` parameters, optimizer state and batch (nothing is allocated), compiles it,
and reports per device:

  exact, from the shardings      bytes of parameters and of optimizer state on each device
  exact, from autodiff           bytes the backward pass keeps from the forward (the
                                 residuals of jax.vjp, parameters included; what model.remat
                                 trades for recomputation), for the global batch
  compiler estimates (CPU XLA)   temporaries of the compiled step, FLOPs of the step, bytes
                                 each collective delivers (summed over the partitioned HLO's
                                 all-to-all, all-gather, reduce-scatter, all-reduce results),
                                 all-to-all also per MoE layer

The estimates come from the CPU compiler: its fusion and buffer assignment differ from TPU's and
GPU's, so temporaries on the accelerator can be larger or smaller (rematerialisation and
activation sizes carry over; fusion-dependent buffers do not). FLOPs are XLA's count of the
partitioned program (per device); all-to-all bytes follow from the shardings and so carry over.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from switchmoe import sharding
from switchmoe.config import validate_config
from switchmoe.data.span_corruption import example_lengths
from switchmoe.models import resolve
from switchmoe.training import features
from switchmoe.training.seams import cross_entropy
from switchmoe.training.trainer import Trainer

# HLO element types -> bytes.
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
              "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


def batch_spec(config: ml_collections.ConfigDict, batch_sharding, rows=None) -> dict[str, Any]:
    """Abstract global batch of a config (or `rows` of it): the pipeline's batches, as shapes."""
    B, L = rows or config.batch_size, config.data.seq_len
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    if config.model.get("arch", "decoder") == "encoder_decoder":
        T = example_lengths(config.data).targets
        return {
            "inputs": spec((B, L), jnp.int32),
            "input_mask": spec((B, L), jnp.float32),
            "decoder_inputs": spec((B, T), jnp.int32),
            "targets": spec((B, T), jnp.int32),
            "weights": spec((B, T), jnp.float32),
        }
    return {
        "inputs": spec((B, L), jnp.int32),
        "targets": spec((B, L), jnp.int32),
        "weights": spec((B, L), jnp.float32),
    }


def bytes_per_device(tree) -> int:
    """Bytes one device holds of an abstract tree (the largest shard, for uneven splits)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * itemsize(leaf.dtype)
    return total


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {'ops': count, 'bytes': bytes of its results}} of each collective in a compiled
    (partitioned) HLO module's text: what one device receives per step."""
    out = {op: {"ops": 0, "bytes": 0} for op in COLLECTIVES}
    for match in _COLLECTIVE.finditer(hlo_text):
        entry = out[match.group("op")]
        entry["ops"] += 1
        for array in _ARRAY.finditer(match.group("shape")):
            dims = [int(d) for d in array.group("dims").split(",") if d]
            entry["bytes"] += math.prod(dims) * _HLO_BYTES.get(array.group("dtype"), 4)
    return out


def num_moe_layers(params) -> int:
    """MoE layers of a parameter tree: the distinct subtrees named 'moe'."""
    layers = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", None) for k in path]
        if "moe" in keys:
            layers.add(tuple(keys[: keys.index("moe") + 1]))
    return len(layers)


def saved_for_backward(trainer, config, params, batch) -> int:
    """Bytes of the residuals jax.vjp keeps for the backward pass of the training loss (global
    batch; traced with abstract values, nothing computed)."""

    def residuals(params, batch):
        def loss(params):
            logits, aux, _ = trainer._apply(params, batch, jax.random.key(0))
            ce_sum, count = cross_entropy(logits, batch)
            return ce_sum / count + aux["loss"]

        return jax.vjp(loss, params)[1]  # a Partial whose leaves are the residuals

    unplaced = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    with jax.set_mesh(trainer.mesh):
        kept = jax.eval_shape(residuals, unplaced(params), unplaced(batch))
    return sum(math.prod(x.shape) * itemsize(x.dtype) for x in jax.tree.leaves(kept))


def itemsize(dtype) -> int:
    """Bytes per element; a PRNG key (an extended dtype NumPy does not know) is 2 x uint32."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8
    return np.dtype(dtype).itemsize


def fit_report(
    config: ml_collections.ConfigDict, devices=None, *, compile: bool = True
) -> dict[str, Any]:
    """Compiles the train step for `config.mesh` on `devices` (default: all); see module doc.
    With compile=False only the exact numbers are computed (no compiler estimates)."""
    devices = jax.devices() if devices is None else devices
    config = resolve(config)
    checked = ml_collections.ConfigDict(config.to_dict())
    if checked.data.tokenizer == "sentencepiece" and not checked.data.spm_model_path:
        # Reading data needs the vocabulary file; sizing the model needs model.vocab_size only.
        checked.data.tokenizer, checked.data.spm_vocab_size = "byte", None
    validate_config(checked, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    # What the objective reads beside the batch (a distillation teacher's parameters) sits on
    # the devices beside the student's, and the teacher's forward pass runs in every step.
    trainer = Trainer(config, mesh, objective=features.objective_for(config, abstract=True))
    params, opt_state = trainer.abstract_state()
    batch = batch_spec(config, trainer.batch_sharding)
    n = mesh.devices.size
    accum = config.get("grad_accum_steps", 1)
    report = {
        "devices": n,
        "platform": devices[0].platform,
        "mesh": dict(mesh.shape),
        "batch_shards": mesh.shape["data"] * mesh.shape["expert"],
        "batch_size": config.batch_size,
        "seq_len": config.data.seq_len,
        "dtype": config.model.dtype,
        "remat": config.model.get("remat", "none"),
        "param_bytes": bytes_per_device(params),
        "opt_state_bytes": bytes_per_device(opt_state),
        "teacher_param_bytes": bytes_per_device(trainer.objective.inputs),
        "grad_accum_steps": accum,
        # One microbatch's: under accumulation the microbatches run one after another.
        "saved_for_backward_bytes": saved_for_backward(
            trainer, config, params, batch_spec(config, None, config.batch_size // accum)
        ),
    }
    if not compile:
        return report
    step = jax.ShapeDtypeStruct((), jnp.int32)
    with jax.set_mesh(mesh):
        compiled = trainer.train_step.lower(
            params, opt_state, batch, step, *trainer.objective.inputs
        ).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    collectives = collective_bytes(compiled.as_text())
    # XLA counts a loop body once: under accumulation the microbatch scan runs `accum` times,
    # and with it every MoE layer's all-to-alls and nearly all the FLOPs (the optimizer update
    # outside it is element-wise).
    count, exchanged = collectives["all-to-all"]["ops"], collectives["all-to-all"]["bytes"] * accum
    layers = num_moe_layers(params)
    return {
        **report,
        "estimates": {
            "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "alias_bytes": int(memory.alias_size_in_bytes),
            "flops_per_device": float(cost.get("flops", float("nan"))) * accum,
            "flops_per_step": float(cost.get("flops", float("nan"))) * accum * n,
            "all_to_all_ops": count,
            "all_to_all_bytes": exchanged,
            "moe_layers": layers,
            "all_to_all_bytes_per_moe_layer": exchanged / layers if layers else 0.0,
            "collectives": collectives,
        },
    }


def total_bytes(report: dict) -> int:
    """Parameters + optimizer state (+ a distillation teacher's parameters) + compiled
    temporaries on one device (donated buffers are reused for the outputs, so they count once)."""
    held = report["param_bytes"] + report["opt_state_bytes"] + report.get("teacher_param_bytes", 0)
    return held + report["estimates"]["temp_bytes"]


def describe(report: dict, device_memory_gib: float | None = None) -> str:
    """The report as the lines `experiments/fit.py` prints."""
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    lines = [
        f"{report['devices']} devices, mesh {report['mesh']}, batch {report['batch_size']} x "
        f"{report['seq_len']} in {report['grad_accum_steps']} microbatch(es), {report['dtype']}, "
        f"remat {report['remat']}",
        "per device, exact (from the shardings):",
        f"  parameters       {gib(report['param_bytes'])}",
        f"  optimizer state  {gib(report['opt_state_bytes'])}",
        *(
            [f"  teacher params   {gib(report['teacher_param_bytes'])} (distill.teacher)"]
            if report.get("teacher_param_bytes")
            else []
        ),
        "kept for the backward pass, exact (jax.vjp residuals of one microbatch, parameters "
        "included):",
        f"  {gib(report['saved_for_backward_bytes'])}; about "
        f"{gib(report['saved_for_backward_bytes'] / max(1, report['batch_shards']))} per device "
        f"over {report['batch_shards']} batch shards",
    ]
    if "estimates" not in report:
        return "\n".join(lines)
    e = report["estimates"]
    lines += [
        "per device, estimates of the CPU compiler (fusion differs on TPU/GPU):",
        f"  temporaries      {gib(e['temp_bytes'])}",
        f"  total            {gib(total_bytes(report))}",
        f"  FLOPs per step   {e['flops_per_step']:.3e} ({e['flops_per_device']:.3e} per device)",
        f"  all-to-all       {e['all_to_all_ops']} ops, {e['all_to_all_bytes'] / 2**20:.1f} MiB "
        f"per step, {e['all_to_all_bytes_per_moe_layer'] / 2**20:.1f} MiB per MoE layer "
        f"({e['moe_layers']} layers; forward and backward)",
        "  other collectives per step: "
        + ", ".join(
            f"{op} {c['bytes'] / 2**20:.1f} MiB ({c['ops']})"
            for op, c in e["collectives"].items()
            if op != "all-to-all" and c["ops"]
        ),
    ]
    if device_memory_gib and "estimates" in report:
        fits = total_bytes(report) <= device_memory_gib * 2**30
        lines.append(
            f"fits in {device_memory_gib:g} GiB per device: {'yes' if fits else 'NO'} "
            "(by the CPU estimate)"
        )
    return "\n".join(lines)
