"""Dispatch backends: move tokens to the experts' buffers, run the experts, combine the outputs.

Shape legend: G groups, S tokens per group, E experts, C capacity, K choices per token,
D model width; M = G·S·K (token, choice) pairs.

Every backend reads the same `RoutingResult` (expert, slot, gate) and must produce the same output:
  y[g, s] = Σ_k gate[g, s, k] · expert_{expert[g,s,k]}(x[g, s])   over the kept choices (slot ≥ 0).
They differ in how they move data, which is a cost trade-off, not a modelling choice:

  einsum   (GShard, flaxformer) one-hot masks [G, S, E, C]; dispatch and combine are dense einsums.
           Simple and fast on TPUs (MXU-friendly, no gathers), but O(G·S·E·C) memory and FLOPs:
           dispatch+combine cost ≈ S/F of the expert FLOPs, cheap for S ≤ ~512, dominant beyond.
  gather   slot table [G, E, C] of token indices; dispatch gathers rows, combine gathers each
           token's K expert outputs. O(G·E·C·D + G·S·K·D); the backward pass is a scatter-add,
           which some backends (XLA:CPU) execute slowly.
  dropless (MegaBlocks) sort the kept pairs by expert and multiply with a grouped matmul
           (`jax.lax.ragged_dot`); no [E, C] buffer at all, so no padding FLOPs when capacity is
           unbounded. Needs a grouped-GEMM lowering (GPU/TPU) to be fast.

The capacity backends are split into `dispatch` and `combine` around an expert buffer
[G, E, C, D] so that an expert-parallel layer can put an all-to-all on either side of the experts
without a second implementation of MoE (see switchmoe.sharding).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from switchmoe.experts import StackedExperts
from switchmoe.routing import RoutingResult

Array = jax.Array


def _require_capacity(routing: RoutingResult, backend: str) -> int:
    if routing.capacity is None:
        raise ValueError(
            f"backend {backend!r} needs a static capacity; this routing result is dropless "
            "(capacity None): use backend 'dropless' or set a capacity factor."
        )
    return routing.capacity


def buffer_to_experts(x: Array) -> Array:
    """[G, E, C, D] -> [E, G·C, D]: each expert sees all its slots of all groups as one batch."""
    G, E, C, D = x.shape
    return jnp.swapaxes(x, 0, 1).reshape(E, G * C, D)


def experts_to_buffer(y: Array, num_groups: int) -> Array:
    """[E, G·C, D] -> [G, E, C, D]; inverse of buffer_to_experts."""
    E, N, D = y.shape
    return jnp.swapaxes(y.reshape(E, num_groups, N // num_groups, D), 0, 1)


# ----------------------------------------------------------------------------------------------
# One-hot einsum.


class EinsumDispatch:
    """One-hot dispatch/combine masks (GShard). See the module docstring for the trade-off."""

    name = "einsum"

    @staticmethod
    def masks(routing: RoutingResult, dtype) -> tuple[Array, Array]:
        """dispatch[G, S, E, C] in {0, 1} and combine[G, S, E, C] = gate, both in `dtype`.

        A dropped choice (slot -1) has an all-zero one-hot row, so it neither takes a slot nor adds to
        the output. A token occupies at most one slot of an expert (its K choices are distinct
        experts), so summing over k never sums two ones into the same entry.
        """
        E = routing.probs.shape[-1]
        C = _require_capacity(routing, EinsumDispatch.name)
        expert_1h = jax.nn.one_hot(routing.expert, E, dtype=dtype)  # [G, S, K, E]
        slot_1h = jax.nn.one_hot(routing.slot, C, dtype=dtype)  # [G, S, K, C], zeros for -1
        dispatch = jnp.einsum("gske,gskc->gsec", expert_1h, slot_1h)
        combine = jnp.einsum("gske,gskc,gsk->gsec", expert_1h, slot_1h, routing.gate.astype(dtype))
        return dispatch, combine

    @staticmethod
    def dispatch(x: Array, routing: RoutingResult) -> Array:
        """x[G, S, D] -> expert buffer [G, E, C, D]; empty slots are zero."""
        dispatch, _ = EinsumDispatch.masks(routing, x.dtype)
        return jnp.einsum("gsec,gsd->gecd", dispatch, x)

    @staticmethod
    def combine(y: Array, routing: RoutingResult) -> Array:
        """Expert outputs [G, E, C, D] -> y[G, S, D] weighted by the gates."""
        _, combine = EinsumDispatch.masks(routing, y.dtype)
        return jnp.einsum("gsec,gecd->gsd", combine, y)


# ----------------------------------------------------------------------------------------------
# Index gather.


class GatherDispatch:
    """Index-based dispatch (slot table) and combine (gather each token's K outputs)."""

    name = "gather"

    @staticmethod
    def slot_table(routing: RoutingResult) -> Array:
        """int32[G, E, C]: the token index in each expert slot, -1 where the slot is empty.

        Dropped pairs are written into an extra column C that is then cut off, which keeps the
        scatter free of out-of-bounds indices (whose handling differs between backends).
        """
        G, S, K = routing.expert.shape
        E = routing.probs.shape[-1]
        C = _require_capacity(routing, GatherDispatch.name)
        slot = jnp.where(routing.slot >= 0, routing.slot, C)
        token = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], (G, S, K))
        g = jnp.arange(G)[:, None, None]
        table = jnp.full((G, E, C + 1), -1, jnp.int32).at[g, routing.expert, slot].set(token)
        return table[..., :C]

    @staticmethod
    def dispatch(x: Array, routing: RoutingResult) -> Array:
        """x[G, S, D] -> [G, E, C, D] by gathering rows; empty slots are zero."""
        table = GatherDispatch.slot_table(routing)
        g = jnp.arange(x.shape[0])[:, None, None]
        rows = x[g, jnp.maximum(table, 0)]  # [G, E, C, D]
        return jnp.where((table >= 0)[..., None], rows, jnp.zeros((), x.dtype))

    @staticmethod
    def combine(y: Array, routing: RoutingResult) -> Array:
        """[G, E, C, D] -> y[G, S, D]: each token gathers its K outputs and sums them by gate."""
        g = jnp.arange(y.shape[0])[:, None, None]
        out = y[g, routing.expert, jnp.maximum(routing.slot, 0)]  # [G, S, K, D]
        gate = routing.gate.astype(y.dtype)  # 0 for dropped choices
        return jnp.einsum("gskd,gsk->gsd", out, gate)


CAPACITY_BACKENDS = {EinsumDispatch.name: EinsumDispatch, GatherDispatch.name: GatherDispatch}


def capacity_moe(
    backend, x: Array, routing: RoutingResult, experts: Callable[[Array], Array]
) -> Array:
    """Dispatch, run the experts on [E, G·C, D], combine: x[G, S, D] -> y[G, S, D]."""
    buffer = backend.dispatch(x, routing)
    y = experts(buffer_to_experts(buffer))
    return backend.combine(experts_to_buffer(y, x.shape[0]), routing)


# ----------------------------------------------------------------------------------------------
# Dropless grouped matmul.


def dropless_moe(x: Array, routing: RoutingResult, experts: StackedExperts) -> Array:
    """Sort kept (token, choice) pairs by expert, run a grouped matmul, unsort and combine.

    Works for any routing result: with capacity None every requested pair is kept; with a capacity
    it computes exactly the pairs the capacity backends keep, so the three backends agree on the
    same result. Shapes stay static: all M = G·S·K pairs are sorted, the non-kept ones last, where
    they fall outside every expert's group and come out of `ragged_dot` as zeros.

    Args:
      x: [G, S, D]. routing: any RoutingResult. experts: StackedExperts.

    Returns:
      y[G, S, D].
    """
    G, S, D = x.shape
    K = routing.expert.shape[-1]
    E = experts.num_experts
    kept = (routing.slot >= 0).reshape(-1)  # [M]
    expert = routing.expert.reshape(-1)
    token = jnp.repeat(jnp.arange(G * S), K)  # row of x for each pair
    order = jnp.argsort(jnp.where(kept, expert, E), stable=True)  # kept pairs by expert, then rest
    group_sizes = jnp.bincount(jnp.where(kept, expert, E), length=E + 1)[:E].astype(jnp.int32)
    rows = x.reshape(G * S, D)[token[order]]  # [M, D]
    out_sorted = experts.ragged(rows, group_sizes)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(G, S, K, D)
    return jnp.einsum("gskd,gsk->gsd", out, routing.gate.astype(out.dtype))


BACKENDS = ("einsum", "gather", "dropless")


def moe_forward(backend: str, x: Array, routing: RoutingResult, experts: StackedExperts) -> Array:
    """The routed part of an MoE layer with the named backend: x[G, S, D] -> y[G, S, D]."""
    if backend == "dropless":
        return dropless_moe(x, routing, experts)
    if backend in CAPACITY_BACKENDS:
        return capacity_moe(CAPACITY_BACKENDS[backend], x, routing, experts)
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
