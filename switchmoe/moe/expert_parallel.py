"""Expert parallelism: the capacity backends with experts split over the mesh's `expert` axis.

Shape legend: G groups, S tokens per group, E experts, C capacity, D model width, F hidden width;
n_b = data × expert (batch shards), n_e = expert-axis size, n_m = model-axis size;
G_l = G / n_b groups per device, E_l = E / n_e experts per device, F_l = F / n_m.

Nothing here re-implements MoE: routing, dispatch and combine are the single-device functions,
run where the tokens live. Only the expert buffer moves.

Layout (both paths compute the same thing):
  tokens   x[G, S, D]          G split over (data, expert): each device routes its own G_l groups.
  dispatch buf[G, E, C, D]     still split over G; every device holds slots for all E experts.
  exchange buf[E, G, C, D]     E split over expert, G over data: all-to-all over `expert`; each
                               device now holds the slots of all groups of its data row for its
                               E_l experts.
  experts  [E_l, G·C/n_d, D]   local expert weights w_in[E_l, D, F_l], w_out[E_l, F_l, D]; with a
                               model axis, a psum over `model` completes the F contraction.
  exchange back, then combine with the local routing result.

(a) `jit_moe`: sharding constraints on the buffer before and after the experts; the GSPMD
    partitioner inserts the two all-to-alls (GShard's formulation).
(b) `shard_map_moe`: an explicit `jax.shard_map` with `jax.lax.all_to_all(..., tiled=True)`, for
    when the collectives must be exactly these (the compiled HLO shows two all-to-alls per MoE
    layer forward, two more in the backward pass).
Both need a static capacity (einsum or gather backend): the dropless backend would need a ragged
all-to-all, which XLA:CPU does not run.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from switchmoe.moe import dispatch as dispatch_lib
from switchmoe.moe.experts import StackedExperts
from switchmoe.moe.routing import DispatchPlan
from switchmoe.sharding import BATCH_AXES

Array = jax.Array


def _constrain(x: Array, spec: P) -> Array:
    # Without a mesh in context (e.g. `init` outside `jax.set_mesh`) there is nothing to place.
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def jit_moe(backend_name: str, x: Array, plan: DispatchPlan, experts: StackedExperts) -> Array:
    """Path (a): capacity MoE with sharding constraints; call under `jax.set_mesh(mesh)`."""
    backend = dispatch_lib.CAPACITY_BACKENDS[backend_name]
    G, _, D = x.shape
    E = experts.num_experts
    buffer = _constrain(backend.dispatch(x, plan), P(BATCH_AXES, None, None, None))
    by_expert = _constrain(jnp.swapaxes(buffer, 0, 1), P("expert", "data", None, None))
    C = by_expert.shape[2]
    y = experts(by_expert.reshape(E, G * C, D)).reshape(E, G, C, D)
    y = _constrain(y, P("expert", "data", None, None))
    y = _constrain(jnp.swapaxes(y, 0, 1), P(BATCH_AXES, None, None, None))
    return backend.combine(y, plan)


def shard_map_moe(
    backend_name: str, x: Array, plan: DispatchPlan, experts: StackedExperts
) -> Array:
    """Path (b): explicit all-to-all in `jax.shard_map`; call under `jax.set_mesh(mesh)`."""
    backend = dispatch_lib.CAPACITY_BACKENDS[backend_name]
    if jax.sharding.get_abstract_mesh().empty:  # no mesh (e.g. init): the same maths, one device
        return dispatch_lib.capacity_moe(backend, x, plan, experts)
    gated = experts.w_gate is not None
    weights = (experts.w_in, experts.w_out) + ((experts.w_gate,) if gated else ())
    weight_specs = (P("expert", None, "model"), P("expert", "model", None)) + (
        (P("expert", None, "model"),) if gated else ()
    )
    tokens = P(BATCH_AXES)
    key = experts.dropout_key

    def local(x, plan, key, *weights):
        # Per device: x[G_l, S, D]; the plan of the same G_l groups; weights of E_l experts.
        buffer = backend.dispatch(x, plan)  # [G_l, E, C, D]
        # Send each expert shard its E_l experts' slots; receive all groups of the data row.
        buffer = jax.lax.all_to_all(buffer, "expert", split_axis=1, concat_axis=0, tiled=True)
        G_all, E_l, C, D = buffer.shape
        if key is not None:  # different dropout masks on different shards
            shard = jax.lax.axis_index("expert") * jax.lax.axis_size("model")
            key = jax.random.fold_in(key, shard + jax.lax.axis_index("model"))
        local_experts = experts.replace(
            w_in=weights[0], w_out=weights[1], w_gate=weights[2] if gated else None, dropout_key=key
        )
        y = dispatch_lib.buffer_to_experts(buffer)  # [E_l, G_all·C, D]
        y = jax.lax.psum(local_experts(y), "model")  # complete the sum over F
        y = dispatch_lib.experts_to_buffer(y, G_all)  # [G_all, E_l, C, D]
        y = jax.lax.all_to_all(y, "expert", split_axis=0, concat_axis=1, tiled=True)
        return backend.combine(y, plan)

    # The plan travels as one pytree (its E and C are static), split over groups like x.
    fn = jax.shard_map(
        local,
        in_specs=(tokens, tokens, P()) + weight_specs,
        out_specs=tokens,
        check_vma=False,
    )
    return fn(x, plan, key, *weights)


def expert_parallel_moe(
    parallelism: str, backend_name: str, x: Array, plan: DispatchPlan, experts: StackedExperts
) -> Array:
    """x[G, S, D] -> y[G, S, D] with experts split over `expert` ("jit" or "shard_map")."""
    backend_name = dispatch_lib.resolve_backend(backend_name)
    if backend_name not in dispatch_lib.CAPACITY_BACKENDS:
        raise ValueError(
            f"expert parallelism needs a capacity backend {tuple(dispatch_lib.CAPACITY_BACKENDS)}; "
            f"got backend={backend_name!r} (a dropless exchange needs a ragged all-to-all, which "
            "XLA:CPU does not run)."
        )
    if parallelism == "jit":
        return jit_moe(backend_name, x, plan, experts)
    if parallelism == "shard_map":
        return shard_map_moe(backend_name, x, plan, experts)
    raise ValueError(
        f"expert parallelism must be one of ('jit', 'shard_map'); got {parallelism!r}."
    )


def moe_forward(
    parallelism: Optional[str],
    backend: str,
    x: Array,
    plan: DispatchPlan,
    experts: StackedExperts,
    dropless_implementation: Optional[str] = None,
    block_size: Optional[int] = None,
) -> Array:
    """x[G, S, D] -> y[G, S, D]: the experts split over the mesh axis `expert` ("jit" or
    "shard_map"), or on every device whole (None: dispatch.moe_forward)."""
    if parallelism:
        return expert_parallel_moe(parallelism, backend, x, plan, experts)
    return dispatch_lib.moe_forward(
        backend, x, plan, experts,
        dropless_implementation=dropless_implementation, block_size=block_size,
    )  # fmt: skip
