"""Where arrays live: the device mesh, logical axis rules, and parameter/batch shardings.

Mesh axes (config.mesh):
  data    data parallelism: batch rows (and routing groups) are split over it.
  expert  expert parallelism: expert weights are split over it along E; for the non-MoE layers
          it acts as a second data axis (GShard), so every device holds a distinct slice of the
          batch and all devices route their own groups.
  model   tensor parallelism: the experts' and FFNs' hidden width F and the attention heads.

Parameters carry logical axis names (set in the modules with `nn.with_logical_partitioning`):
  vocab, embed, heads, kv, mlp, expert. `config.mesh.rules` maps them to mesh axes; the defaults
  shard experts over `expert`, hidden widths and heads over `model`, and replicate the rest.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "model")
# Mesh axes the batch (and the routing groups) is split over.
BATCH_AXES = ("data", "expert")
EXPERT_PARALLELISM = ("jit", "shard_map")

DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("expert", "expert"),
    ("mlp", "model"),
    ("heads", "model"),
    ("embed", None),
    ("vocab", None),
    ("kv", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """(data, expert, model) sizes with at most one -1 filled from the device count.

    Fixed sizes whose product is below the device count are allowed (the first devices are used,
    see `make_mesh`); above it, or not filling the devices with a -1, is an error.
    """
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one of mesh.data/expert/model may be -1; got {sizes}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1; got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible "
                f"by the fixed axes' product {known}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) > num_devices:
        raise ValueError(
            f"mesh data×expert×model = {'×'.join(map(str, sizes))} = {math.prod(sizes)} needs "
            f"more devices than the {num_devices} available."
        )
    return tuple(sizes)


def make_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, expert, model) mesh over `devices` (default: all devices of all processes).

    Axis types are Auto: the partitioner propagates shardings and Linen's logical constraints
    work (Explicit axes, jax.make_mesh's default, reject them).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    if math.prod(shape) < len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} of {len(devices)} devices; "
            "with several processes it must use them all (set one axis to -1)."
        )
    return Mesh(
        np.asarray(devices[: math.prod(shape)]).reshape(shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def logical_rules(mesh_config: ml_collections.ConfigDict) -> tuple:
    """The config's logical-axis rules as tuples (JSON round trips turn them into lists)."""
    rules = mesh_config.get("rules") or DEFAULT_RULES
    as_axes = lambda a: tuple(a) if isinstance(a, (list, tuple)) else a
    return tuple((str(name), as_axes(axes)) for name, axes in rules)


def param_shardings(boxed_abstract_params: Any, mesh: Mesh, rules: tuple) -> Any:
    """NamedShardings for a (boxed, abstract) parameter tree from its logical axis names."""
    specs = nn.get_partition_spec(boxed_abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over (data, expert), replicated over model."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["expert"]


def path_keys(path) -> tuple:
    """A jax key path as plain keys: dict keys, attribute names (optax states are named tuples),
    sequence indices; comparable with `traverse_util.flatten_dict`'s tuples."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def optimizer_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh):
    """Shardings of an abstract optimizer state: a leaf that mirrors a parameter (the same
    parameter path at its end, the same shape: Adam's moments, momentum) is placed like that
    parameter; one with an axis reduced away (Adafactor's factored statistics) keeps the other axes' placement;
    everything else (step counts) is replicated.

    Matching by path rather than through `optax.tree_utils.tree_map_params` keeps optimizers
    whose labels read the parameter tree (`optax.multi_transform` in balancing.py) working.
    """

    placed = {}
    for (path, leaf), spec in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings)
    ):
        placed[path_keys(path)] = (tuple(leaf.shape), spec)
    depths = sorted({len(p) for p in placed}, reverse=True)
    replicated_sharding = replicated(mesh)

    def place(path, leaf):
        keys, shape = path_keys(path), tuple(leaf.shape)
        for depth in depths:
            match = placed.get(keys[-depth:]) if depth <= len(keys) else None
            if match is None:
                continue
            param_shape, spec = match
            if param_shape == shape:
                return spec
            # A statistic with one axis reduced away (Adafactor's row and column factors of an
            # expert matrix [E, d, F] are [E, d] and [E, F]) keeps the other axes' placement.
            axes = tuple(spec.spec) + (None,) * (len(param_shape) - len(spec.spec))
            for i in range(len(param_shape)):
                if param_shape[:i] + param_shape[i + 1 :] == shape:
                    return NamedSharding(mesh, P(*(axes[:i] + axes[i + 1 :])))
        return replicated_sharding

    return jax.tree_util.tree_map_with_path(place, opt_state)
