"""Dispatch backends: move tokens to the experts' buffers, run the experts, combine the outputs.

Shape legend: G groups, S tokens per group, E experts, C capacity, K choices per token,
D model width; M = G·S·K (token, choice) pairs; blocked dropless: Bk rows per block, NB blocks,
R = NB·Bk padded rows.

Every backend reads the same `DispatchPlan` (expert, slot, gate; E and C static) and must produce the same output:
  y[g, s] = Σ_k gate[g, s, k] · expert_{expert[g,s,k]}(x[g, s])   over the kept choices (slot ≥ 0).
They differ in how they move data, which is a cost trade-off, not a modelling choice:

  einsum   (GShard, flaxformer) one-hot masks [G, S, E, C]; dispatch and combine are dense einsums.
           Simple and fast on TPUs (MXU-friendly, no gathers), but O(G·S·E·C) memory and FLOPs:
           dispatch+combine cost ≈ S/F of the expert FLOPs, cheap for S ≤ ~512, dominant beyond.
  gather   slot table [G, E, C] of token indices; dispatch gathers rows, combine gathers each
           token's K expert outputs. O(G·E·C·D + G·S·K·D); the backward pass is a scatter-add,
           which some backends (XLA:CPU) execute slowly.
  dropless (MegaBlocks) sort the kept pairs by expert; no [E, C] buffer, nothing dropped for lack
           of capacity. Two implementations of the same numbers:
           ragged_dot  a grouped matmul (`jax.lax.ragged_dot`), no padding at all; lowers to a
                       grouped GEMM on GPU/TPU, but on XLA:CPU costs about as much as running
                       every expert on every row.
           blocked     each expert's run padded to whole blocks of Bk rows (≤ M + E·(Bk−1) rows in
                       all, static), then one GEMM per block with that block's expert, padding
                       blocks skipped; the default on CPU.

The capacity backends are split into `dispatch` and `combine` around an expert buffer
[G, E, C, D] so that an expert-parallel layer can put an all-to-all on either side of the experts
without a second implementation of MoE (see switchmoe.sharding).
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from switchmoe.moe.experts import StackedExperts
from switchmoe.moe.routing import DispatchPlan

Array = jax.Array

# How the dropless backend computes: see `dropless_moe`.
DROPLESS_IMPLEMENTATIONS = ("ragged_dot", "blocked")


def _require_capacity(plan: DispatchPlan, backend: str) -> int:
    if plan.capacity is None:
        raise ValueError(
            f"backend {backend!r} needs a static capacity; this dispatch plan is dropless "
            "(capacity None): use backend 'dropless' or set a capacity factor."
        )
    return plan.capacity


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
    def masks(plan: DispatchPlan, dtype) -> tuple[Array, Array]:
        """dispatch[G, S, E, C] in {0, 1} and combine[G, S, E, C] = gate, both in `dtype`.

        A dropped choice (slot -1) has an all-zero one-hot row, so it neither takes a slot nor adds to
        the output. A token occupies at most one slot of an expert (its K choices are distinct
        experts), so summing over k never sums two ones into the same entry.
        """
        E = plan.num_experts
        C = _require_capacity(plan, EinsumDispatch.name)
        expert_1h = jax.nn.one_hot(plan.expert, E, dtype=dtype)  # [G, S, K, E]
        slot_1h = jax.nn.one_hot(plan.slot, C, dtype=dtype)  # [G, S, K, C], zeros for -1
        dispatch = jnp.einsum("gske,gskc->gsec", expert_1h, slot_1h)
        combine = jnp.einsum("gske,gskc,gsk->gsec", expert_1h, slot_1h, plan.gate.astype(dtype))
        return dispatch, combine

    @staticmethod
    def dispatch(x: Array, plan: DispatchPlan) -> Array:
        """x[G, S, D] -> expert buffer [G, E, C, D]; empty slots are zero."""
        dispatch, _ = EinsumDispatch.masks(plan, x.dtype)
        return jnp.einsum("gsec,gsd->gecd", dispatch, x)

    @staticmethod
    def combine(y: Array, plan: DispatchPlan) -> Array:
        """Expert outputs [G, E, C, D] -> y[G, S, D] weighted by the gates."""
        _, combine = EinsumDispatch.masks(plan, y.dtype)
        return jnp.einsum("gsec,gecd->gsd", combine, y)


# ----------------------------------------------------------------------------------------------
# Index gather.


class GatherDispatch:
    """Index-based dispatch (slot table) and combine (gather each token's K outputs)."""

    name = "gather"

    @staticmethod
    def slot_table(plan: DispatchPlan) -> Array:
        """int32[G, E, C]: the token index in each expert slot, -1 where the slot is empty.

        Dropped pairs are written into an extra column C that is then cut off, which keeps the
        scatter free of out-of-bounds indices (whose handling differs between backends).
        """
        G, S, K = plan.expert.shape
        E = plan.num_experts
        C = _require_capacity(plan, GatherDispatch.name)
        slot = jnp.where(plan.slot >= 0, plan.slot, C)
        token = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], (G, S, K))
        g = jnp.arange(G)[:, None, None]
        table = jnp.full((G, E, C + 1), -1, jnp.int32).at[g, plan.expert, slot].set(token)
        return table[..., :C]

    @staticmethod
    def dispatch(x: Array, plan: DispatchPlan) -> Array:
        """x[G, S, D] -> [G, E, C, D] by gathering rows; empty slots are zero."""
        x = jnp.asarray(x)  # NumPy input: indexing it with traced indices would fail
        table = GatherDispatch.slot_table(plan)
        g = jnp.arange(x.shape[0])[:, None, None]
        rows = x[g, jnp.maximum(table, 0)]  # [G, E, C, D]
        return jnp.where((table >= 0)[..., None], rows, jnp.zeros((), x.dtype))

    @staticmethod
    def combine(y: Array, plan: DispatchPlan) -> Array:
        """[G, E, C, D] -> y[G, S, D]: each token gathers its K outputs and sums them by gate."""
        y = jnp.asarray(y)
        g = jnp.arange(y.shape[0])[:, None, None]
        out = y[g, plan.expert, jnp.maximum(plan.slot, 0)]  # [G, S, K, D]
        gate = plan.gate.astype(y.dtype)  # 0 for dropped choices
        return jnp.einsum("gskd,gsk->gsd", out, gate)


CAPACITY_BACKENDS = {EinsumDispatch.name: EinsumDispatch, GatherDispatch.name: GatherDispatch}


def capacity_moe(backend, x: Array, plan: DispatchPlan, experts: Callable[[Array], Array]) -> Array:
    """Dispatch, run the experts on [E, G·C, D], combine: x[G, S, D] -> y[G, S, D]."""
    buffer = backend.dispatch(x, plan)
    y = experts(buffer_to_experts(buffer))
    return backend.combine(experts_to_buffer(y, x.shape[0]), plan)


# ----------------------------------------------------------------------------------------------
# Dropless grouped matmul.


def dropless_moe(
    x: Array,
    plan: DispatchPlan,
    experts: StackedExperts,
    implementation: Optional[str] = None,
    block_size: Optional[int] = None,  # None: auto_block_size
) -> Array:
    """The dropless backend: every kept (token, choice) pair runs on its expert, no capacity buffer.

    Works for any dispatch plan: with capacity None every requested pair is kept; with a capacity
    it computes exactly the pairs the capacity backends keep, so all backends agree on the same
    result.

    Args:
      x: [G, S, D]. plan: any DispatchPlan. experts: StackedExperts.
      implementation: "ragged_dot" (grouped matmul; fast where it lowers to a grouped GEMM, GPU and
        TPU), "blocked" (padded blocks, one GEMM per block; fast on XLA:CPU) or None for the
        platform's default (`default_dropless_implementation`).
      block_size: Bk, rows per block of the blocked implementation; None: `auto_block_size`.

    Returns:
      y[G, S, D].
    """
    implementation = implementation or default_dropless_implementation()
    if implementation == "ragged_dot":
        return _ragged_dot_moe(x, plan, experts)
    if implementation == "blocked":
        return blocked_moe(x, plan, experts, block_size)
    raise ValueError(
        f"dropless implementation must be one of {DROPLESS_IMPLEMENTATIONS}; got {implementation!r}."
    )


def default_dropless_implementation() -> str:
    """'blocked' on CPU, where ragged_dot costs as much as running every expert on every row;
    'ragged_dot' on GPU/TPU, where it lowers to a grouped GEMM with no padding at all.

    Read at trace time from the default backend: a function jitted for another platform than the
    default one should pass `implementation` explicitly.
    """
    return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


def _ragged_dot_moe(x: Array, plan: DispatchPlan, experts: StackedExperts) -> Array:
    """Sort kept pairs by expert, `ragged_dot`, unsort and combine.

    Shapes stay static: all M = G·S·K pairs are sorted, the non-kept ones last, where they fall
    outside every expert's group and come out of `ragged_dot` as zeros.
    """
    G, S, D = x.shape
    K = plan.expert.shape[-1]
    E = experts.num_experts
    kept = (plan.slot >= 0).reshape(-1)  # [M]
    expert = plan.expert.reshape(-1)
    token = jnp.repeat(jnp.arange(G * S), K)  # row of x for each pair
    order = jnp.argsort(jnp.where(kept, expert, E), stable=True)  # kept pairs by expert, then rest
    group_sizes = jnp.bincount(jnp.where(kept, expert, E), length=E + 1)[:E].astype(jnp.int32)
    rows = x.reshape(G * S, D)[token[order]]  # [M, D]
    out_sorted = experts.ragged(rows, group_sizes)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(G, S, K, D)
    return jnp.einsum("gskd,gsk->gsd", out, plan.gate.astype(out.dtype))


# Blocked dropless. Legend: T = G·S tokens, M = T·K pairs, Bk rows per block, NB blocks,
# R = NB·Bk padded rows.
#
# Each expert's run of sorted pairs is padded up to a multiple of Bk rows, so that every block of
# Bk rows belongs to a single expert; the blocks then run one GEMM each with their expert's
# weights (experts.block_matmul). Expert e takes ceil(n_e/Bk) blocks and
# Σ_e ceil(n_e/Bk)·Bk ≤ M + E·(Bk−1), so the static row count R = Bk·floor((M + min(E, M)·(Bk−1))
# / Bk) always suffices (`num_blocks`). The blocks past the used ones are all padding: they cost
# their memory but are skipped at run time. The used padding rows (about Bk/2 per expert) cost
# FLOPs; small Bk wastes fewer rows but makes smaller GEMMs (`auto_block_size`).


def auto_block_size(num_pairs: int, num_experts: int) -> int:
    """Bk when none is set: an expert's mean load M/E, as a power of two in [16, 128].

    Small blocks waste fewer rows (an expert pads about Bk/2 rows on average, at most Bk−1) but
    run as small GEMMs, each of which reads its expert's whole [D, F] weights: on XLA:CPU the
    weight traffic, not the padding, dominates once Bk is well below the mean load. Measured
    there (2 cores, float32, 4,096 tokens, D 512, F 2048, layer forward+backward / dense FFN):
    8 experts: Bk 64/128/256 gave 1.67/1.46/1.57×; 64 experts: Bk 16/32/64 gave 3.6/2.9/2.85×.
    """
    target = max(1, num_pairs // num_experts)
    return int(min(128, max(16, 1 << (target.bit_length() - 1))))


def num_blocks(num_pairs: int, num_experts: int, block_size: int) -> int:
    """NB: the static number of Bk-row blocks that holds M pairs padded per expert, whatever the
    loads. Only min(E, M) experts can hold a pair, and each pads by at most Bk−1 rows."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}.")
    padding = min(num_experts, num_pairs) * (block_size - 1)
    return max(1, (num_pairs + padding) // block_size)


@flax.struct.dataclass
class BlockLayout:
    """Where each kept pair sits in the padded, expert-sorted rows, and each block's expert.

    Attributes:
      pair_row: int32[M], row of R that pair m occupies; -1 for a pair that is not kept.
      row_pair: int32[R], the pair in row r; -1 for a padding row.
      block_expert: int32[NB], the expert of each block (padding blocks past the last used one
        get expert E−1; their rows are zeros and their outputs are never read).
      used_blocks: int32 scalar, blocks that hold at least one pair's run (statistics only).
    """

    pair_row: Array
    row_pair: Array
    block_expert: Array
    used_blocks: Array


def block_layout(
    plan: DispatchPlan, num_experts: int, block_size: Optional[int] = None
) -> BlockLayout:
    """The padded layout of the kept pairs of `plan` (integer work only, no gradient)."""
    G, S, K = plan.expert.shape
    M, E = G * S * K, num_experts
    Bk = block_size or auto_block_size(M, E)
    NB = num_blocks(M, E, Bk)
    kept = (plan.slot >= 0).reshape(M)
    key = jnp.where(kept, plan.expert.reshape(M), E).astype(jnp.int32)  # E = not kept: last
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # [M], pairs sorted by expert
    count = jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)  # n_e, kept pairs per expert
    padded = (count + Bk - 1) // Bk * Bk  # run of e rounded up to whole blocks
    sorted_start = jnp.cumsum(count) - count  # first sorted position of e
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded  # first row of e

    # Sorted position i holds a pair of expert e = key[order[i]]; it goes to row
    # padded_start[e] + (i − sorted_start[e]). Not-kept pairs (key E) get row −1.
    sorted_key = key[order]
    e = jnp.minimum(sorted_key, E - 1)
    row_sorted = padded_start[e] + jnp.arange(M, dtype=jnp.int32) - sorted_start[e]
    row_sorted = jnp.where(sorted_key < E, row_sorted, -1)
    pair_row = jnp.zeros(M, jnp.int32).at[order].set(row_sorted)  # inverse permutation

    # Row r lies in block r // Bk, whose expert is the e with padded_start[e] ≤ r < padded_end[e].
    R = NB * Bk
    block_start = jnp.arange(NB, dtype=jnp.int32) * Bk
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side="right"), E - 1)
    row = jnp.arange(R, dtype=jnp.int32)
    row_e = jnp.repeat(block_expert, Bk, total_repeat_length=R)
    offset = row - padded_start[row_e]  # position in e's run
    valid = (offset >= 0) & (offset < count[row_e])
    sorted_index = jnp.clip(sorted_start[row_e] + offset, 0, M - 1)
    row_pair = jnp.where(valid, order[sorted_index], -1)
    return BlockLayout(
        pair_row=pair_row,
        row_pair=row_pair,
        block_expert=block_expert.astype(jnp.int32),
        used_blocks=padded_end[-1] // Bk,
    )


def _take_rows_fwd_only(x: Array, index: Array) -> Array:
    """x[N, D] rows at index[...] (−1 gives a zero row): [..., D]."""
    rows = jnp.take(x, jnp.maximum(index, 0), axis=0)
    return jnp.where((index >= 0)[..., None], rows, jnp.zeros((), x.dtype))


@jax.custom_vjp
def _permute_rows(x: Array, index: Array, inverse: Array) -> Array:
    """y[r] = x[index[r]] (zero where index is −1) for a one-to-one map of rows, as a gather whose
    gradient is also a gather.

    The plain gather's gradient is a scatter-add, slow on XLA:CPU; here every output row comes
    from at most one input row and `inverse[n, j]` lists the output rows that x[n] goes to (−1
    for none), so dx[n] = Σ_j dy[inverse[n, j]].

    Args:
      x: [N, D]. index: int32[R] in [−1, N). inverse: int32[N, J] in [−1, R).

    Returns:
      y[R, D].
    """
    return _take_rows_fwd_only(x, index)


def _permute_rows_fwd(x, index, inverse):
    return _take_rows_fwd_only(x, index), inverse


def _permute_rows_bwd(inverse, dy):
    dx = jnp.sum(_take_rows_fwd_only(dy, inverse), axis=-2)  # [N, J, D] -> [N, D]
    return dx, None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def blocked_moe(
    x: Array,
    plan: DispatchPlan,
    experts: StackedExperts,
    block_size: Optional[int] = None,  # None: auto_block_size
) -> Array:
    """Dropless MoE with static shapes: sort kept pairs by expert, pad each expert's run to whole
    Bk-row blocks, run the blocks as a batched matmul, gather each pair's output back.

    Moving rows costs two gathers forward and two backward (see `_permute_rows`); the experts cost
    the FLOPs of R ≤ M + E·(Bk−1) rows (see `num_blocks`).

    Args:
      x: [G, S, D]. plan: any DispatchPlan. experts: StackedExperts.
      block_size: Bk; None: `auto_block_size`.

    Returns:
      y[G, S, D].
    """
    G, S, D = x.shape
    K = plan.expert.shape[-1]
    T = G * S
    layout = block_layout(plan, experts.num_experts, block_size)
    NB = layout.block_expert.shape[0]
    block_size = layout.row_pair.shape[0] // NB
    # A row's token is its pair // K; a token's rows are its K pairs' rows.
    row_token = jnp.where(layout.row_pair >= 0, layout.row_pair // K, -1)
    rows = _permute_rows(x.reshape(T, D), row_token, layout.pair_row.reshape(T, K))  # [R, D]
    out_rows = experts.blocked(
        rows.reshape(NB, block_size, D), layout.block_expert, layout.used_blocks
    )
    out_rows = out_rows.reshape(NB * block_size, D)
    out = _permute_rows(out_rows, layout.pair_row, layout.row_pair[:, None])  # [M, D]
    out = out.reshape(G, S, K, D)
    return jnp.einsum("gskd,gsk->gsd", out, plan.gate.astype(out.dtype))


BACKENDS = ("auto", "einsum", "gather", "dropless")


def resolve_backend(backend: str, platform: Optional[str] = None) -> str:
    """The backend `backend` names; "auto" (the default) picks the capacity backend for the
    platform (default: JAX's default backend). Both capacity backends compute the same numbers,
    so the choice is speed only; "dropless" (another routing rule) is never picked for you.

    The rule, and what it rests on (BENCHMARKS.md, one run each, forward+backward):
      cpu  gather, measured: faster than einsum at every shape timed. Groups of 4,096 tokens
           (E 1-128, capacity factor 1-2): 1.13× against 2.44× dense at E 8, cf 1.25; groups
           of 512 (the peer preset): 328 against 401 ms at E 8, 516 against 579 ms at E 64.
           Einsum's one-hot dispatch costs (5/6)·S/F of the expert work, and gathers are cheap
           on CPU, so no CPU shape measured favours einsum.
      tpu  einsum, assumed (not measured here): one-hot matmuls run on the MXU, gathers and
           scatters do not (GShard's formulation).
      gpu  gather, assumed (not measured here: no GPU lent yet); the GPU command in
           BENCHMARKS.md times both and settles it.
    """
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    return "einsum" if platform == "tpu" else "gather"


def moe_forward(
    backend: str,
    x: Array,
    plan: DispatchPlan,
    experts: StackedExperts,
    dropless_implementation: Optional[str] = None,
    block_size: Optional[int] = None,  # None: auto_block_size
) -> Array:
    """The routed part of an MoE layer with the named backend: x[G, S, D] -> y[G, S, D].

    `dropless_implementation` and `block_size` apply to the dropless backend only (see
    `dropless_moe`)."""
    backend = resolve_backend(backend)
    if backend == "dropless":
        return dropless_moe(x, plan, experts, dropless_implementation, block_size)
    if backend in CAPACITY_BACKENDS:
        return capacity_moe(CAPACITY_BACKENDS[backend], x, plan, experts)
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
