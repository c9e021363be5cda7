"""Stacked expert feed-forward networks: E FFNs evaluated as batched matmuls.

Shape legend: E experts, N tokens per expert (G·C for capacity backends), M sorted rows (dropless),
NB blocks of Bk rows (blocked dropless), D model width, F expert hidden width.

All experts' weights live in single arrays with a leading expert axis (w_in[E, D, F], w_out[E, F, D]),
so "run every expert on its own tokens" is one einsum over the expert axis, and sharding the experts
across devices is sharding that axis.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from switchmoe.moe import int8

# The parameter names of a routed expert stack ([E, d, F] and [E, F, d]), as the layers below
# name them. Quantization, merging, freezing, parameter counts and per-expert norms all ask
# `is_expert_matrix` rather than spelling the names again.
EXPERT_MATRICES = ("w_in", "w_gate", "w_out")


def in_moe_layer(path: tuple) -> bool:
    """Whether a parameter path lies in an MoE layer (`.../moe/...`), its shared expert aside."""
    return "moe" in path and "shared" not in path[path.index("moe") :]


def is_expert_matrix(path: tuple) -> bool:
    """Whether `path` is a routed expert matrix (w_in, w_gate, w_out of an MoE layer, not of its
    shared expert)."""
    return in_moe_layer(path) and path[-1] in EXPERT_MATRICES


Array = jax.Array

# name -> (activation, gated). Gated variants (Shazeer 2020, "GLU variants") multiply act(x·W_gate)
# with x·W_in; they need the extra w_gate weights.
ACTIVATIONS = {
    "relu": (jax.nn.relu, False),
    "gelu": (jax.nn.gelu, False),
    "swiglu": (jax.nn.silu, True),
    "geglu": (jax.nn.gelu, True),
}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {name!r}.")


@flax.struct.dataclass
class StackedExperts:
    """The weights and settings of E expert FFNs.

    Attributes:
      w_in: [E, D, F]; w_out: [E, F, D]; w_gate: [E, D, F] for gated activations, else None.
      w_in_scale, w_out_scale, w_gate_scale: per-output-channel scales of int8 weights
        ([E, 1, F], [E, 1, D], [E, 1, F]; switchmoe/compress/quantization.py), None for float weights. An
        int8 matrix is dequantised on the fly: the matmul runs on its values cast to `dtype`
        and the channel scales multiply the output, which equals multiplying by the
        dequantised matrix (each output channel has one scale) without writing it out.
      activation: a key of ACTIVATIONS.
      dtype: compute dtype; weights are cast to it (float32 master weights, bf16 matmuls).
      dropout_rate: dropout on the hidden activations (ST-MoE fine-tunes with a higher expert
        dropout than elsewhere); only applied when dropout_key is given.
      dropout_key: PRNG key, or None for deterministic evaluation.
    """

    w_in: Array
    w_out: Array
    w_gate: Optional[Array] = None
    activation: str = flax.struct.field(pytree_node=False, default="relu")
    dtype: jnp.dtype = flax.struct.field(pytree_node=False, default=jnp.float32)
    dropout_rate: float = flax.struct.field(pytree_node=False, default=0.0)
    dropout_key: Optional[Array] = None
    w_in_scale: Optional[Array] = None
    w_out_scale: Optional[Array] = None
    w_gate_scale: Optional[Array] = None

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def _weights(self):
        """(w_in, w_out, w_gate) cast to the compute dtype (int8 values as they are stored)."""
        cast = lambda w: None if w is None else w.astype(self.dtype)
        return cast(self.w_in), cast(self.w_out), cast(self.w_gate)

    def _scaled(self, y: Array, scale: Optional[Array], expert_of: Optional[Array] = None) -> Array:
        """A matmul output times its int8 matrix's channel scales (no-op for float weights).

        y: [E, N, out] (expert_of None), or [R, ..., out] rows whose expert is expert_of[R]."""
        if scale is None:
            return y
        scale = scale.astype(self.dtype)  # [E, 1, out]
        if expert_of is None:
            return y * scale
        s = jnp.take(scale[:, 0], expert_of, axis=0, mode="clip")  # [R, out]
        return y * s.reshape(s.shape[:1] + (1,) * (y.ndim - 2) + s.shape[1:])

    def _hidden(self, h_in: Array, h_gate: Optional[Array]) -> Array:
        act, gated = ACTIVATIONS[self.activation]
        h = act(h_gate) * h_in if gated else act(h_in)
        if self.dropout_key is not None and self.dropout_rate > 0:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout_rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout_rate), 0.0).astype(h.dtype)
        return h

    def __call__(self, x: Array) -> Array:
        """Runs expert e on x[e]: [E, N, D] -> [E, N, D]."""
        x = x.astype(self.dtype)
        w_in, w_out, w_gate = self._weights()
        h_in = self._scaled(jnp.einsum("end,edf->enf", x, w_in), self.w_in_scale)
        h_gate = None
        if w_gate is not None:
            h_gate = self._scaled(jnp.einsum("end,edf->enf", x, w_gate), self.w_gate_scale)
        y = jnp.einsum("enf,efd->end", self._hidden(h_in, h_gate), w_out)
        return self._scaled(y, self.w_out_scale)

    def ragged(self, x: Array, group_sizes: Array) -> Array:
        """Runs experts on rows sorted by expert: x[M, D], group_sizes int32[E] -> [M, D].

        Rows [Σ_{e'<e} n_e', Σ_{e'<=e} n_e') go to expert e; rows past Σ n_e belong to no expert and
        come out as zeros. `jax.lax.ragged_dot` lowers to a grouped GEMM on GPU/TPU; on XLA:CPU it
        costs about as much as running every expert on every row.
        """
        x = x.astype(self.dtype)
        w_in, w_out, w_gate = self._weights()
        row_expert = None
        if self.w_in_scale is not None:  # int8: each row's expert picks its channel scales
            ends = jnp.cumsum(group_sizes)
            row_expert = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
        mm = lambda a, w, scale: self._scaled(
            jax.lax.ragged_dot(a, w, group_sizes), scale, row_expert
        )
        h_in = mm(x, w_in, self.w_in_scale)
        h_gate = None if w_gate is None else mm(x, w_gate, self.w_gate_scale)
        return mm(self._hidden(h_in, h_gate), w_out, self.w_out_scale)

    def blocked(self, x: Array, block_expert: Array, used_blocks: Optional[Array] = None) -> Array:
        """Runs expert block_expert[n] on block n: x[NB, Bk, D], block_expert int32[NB] -> [NB, Bk, D].

        The static-shape dropless formulation for platforms without a grouped GEMM (XLA:CPU): rows
        are sorted by expert and each expert's run is padded to whole blocks, so each block belongs
        to one expert (see switchmoe.moe.dispatch.blocked_moe). Blocks n ≥ used_blocks (None: all
        used) are padding: they are skipped and come out as zeros. See `block_matmul` for how.
        """
        x = x.astype(self.dtype)
        w_in, w_out, w_gate = self._weights()
        if used_blocks is None:
            used_blocks = jnp.asarray(x.shape[0], jnp.int32)
        mm = lambda a, w, scale: self._scaled(
            block_matmul(a, w, block_expert, used_blocks), scale, block_expert
        )
        h_in = mm(x, w_in, self.w_in_scale)
        h_gate = None if w_gate is None else mm(x, w_gate, self.w_gate_scale)
        return mm(self._hidden(h_in, h_gate), w_out, self.w_out_scale)


# ----------------------------------------------------------------------------------------------
# Block matmul: y[n] = x[n] @ w[block_expert[n]].
#
# Measured on XLA:CPU (2 cores, float32). Forward, 23 blocks of 128 rows, D 256, F 1024, against
# 17.5 ms for one [2944, 256] x [256, 1024] matmul:
#   batched dot_general over blocks with gathered weights w[block_expert]   29.6 ms
#   the same with the weights gathered beforehand                            25.5 ms
#   lax.scan over blocks, slicing w[e] in place                              18.7 ms
# XLA:CPU runs a batched dot as a loop of small GEMMs slower than its own loop over blocks, and
# the gather costs NB·D·F memory. So every direction is a loop over blocks that slices w[e] (or
# dw[e]) in place, and it is a while loop that stops at `used_blocks`: the padding blocks past it
# (up to E·(Bk−1) rows) cost nothing, not even the branch a scan with a cond pays per block.
#
# The backward is two loops, one for dx and one for dw. One loop doing both per block, each
# block's work under a cond, took 91–102 ms against 70–85 ms for the two (35 used blocks of 128
# rows, D 512, F 2048, three runs in one process). At the layer the gain is within the machine's
# run-to-run spread (BENCHMARKS.md: blocked dropless at 1.45-1.48x dense before and after).
# The weight gradient Σ_{n: e_n = e} x[n]ᵀ·dy[n] adds each block's [A, B] product into its expert's slice in
# place; a batched dot [NB, A, B] followed by a segment sum took 122 ms against 80 ms for that.
# Summing 2–8 blocks of one expert per GEMM (fewer read-modify-writes of dw[e]) was within the
# run-to-run spread of one block per GEMM, so the loop stays simple.


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())))


def _blocks_times_weights(x: Array, w: Array, block_expert: Array, used_blocks: Array, contract):
    """out[n] = x[n] · w[block_expert[n]] (contracting x's axis 1 with w_e's axis contract) for
    n < used_blocks, zeros past it: [NB, Bk, out]."""
    NB, Bk, _ = x.shape
    out_width = w.shape[2] if contract == 0 else w.shape[1]

    def body(carry):
        n, out = carry
        w_e = jax.lax.dynamic_index_in_dim(w, block_expert[n], axis=0, keepdims=False)
        y_n = _dot(x[n], w_e, (1, contract)).astype(out.dtype)
        return n + 1, jax.lax.dynamic_update_index_in_dim(out, y_n, n, axis=0)

    out = jnp.zeros((NB, Bk, out_width), x.dtype)
    return jax.lax.while_loop(lambda c: c[0] < used_blocks, body, (jnp.int32(0), out))[1]


@jax.custom_vjp
def block_matmul(x: Array, w: Array, block_expert: Array, used_blocks: Array) -> Array:
    """x[NB, Bk, A] · w[E, A, B] per block: y[n] = x[n] @ w[block_expert[n]], [NB, Bk, B].

    block_expert: int32[NB] in [0, E). used_blocks: int32 scalar; blocks n ≥ used_blocks are
    skipped and give zeros (their rows must be zeros, as padding rows are).
    """
    return _blocks_times_weights(x, w, block_expert, used_blocks, contract=0)


def _block_matmul_fwd(x, w, block_expert, used_blocks):
    return block_matmul(x, w, block_expert, used_blocks), (x, w, block_expert, used_blocks)


def _block_matmul_bwd(residuals, dy):
    """dx[n] = dy[n] @ w[e_n]ᵀ, and dw[e] = Σ_{n: e_n = e} x[n]ᵀ @ dy[n] added in place."""
    x, w, block_expert, used_blocks = residuals
    dx = _blocks_times_weights(dy, w, block_expert, used_blocks, contract=1)

    def body(carry):
        n, dw = carry
        e = block_expert[n]
        dw_e = jax.lax.dynamic_index_in_dim(dw, e, axis=0, keepdims=False)
        dw_e = dw_e + _dot(x[n], dy[n], (0, 0)).astype(dw.dtype)  # [A, B]
        return n + 1, jax.lax.dynamic_update_index_in_dim(dw, dw_e, e, axis=0)

    dw = jax.lax.while_loop(lambda c: c[0] < used_blocks, body, (jnp.int32(0), jnp.zeros_like(w)))[
        1
    ]
    return dx, dw, None, None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


class DenseFFN(nn.Module):
    """A dense feed-forward block: the dense blocks' FFN, and the MoE layer's shared expert
    (DeepSeekMoE) applied to every token. The same maths as one stacked expert."""

    d_ff: int
    activation: str = "relu"
    dtype: Any = jnp.float32
    init_scale: float = 1.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x[B, L, D] -> [B, L, D]."""
        D = x.shape[-1]
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        param = lambda name, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
        )
        gated = ACTIVATIONS[self.activation][1]
        ffn = StackedExperts(
            w_in=param("w_in", (D, self.d_ff), ("embed", "mlp"))[None],
            w_out=param("w_out", (self.d_ff, D), ("mlp", "embed"))[None],
            w_gate=param("w_gate", (D, self.d_ff), ("embed", "mlp"))[None] if gated else None,
            activation=self.activation,
            dtype=self.dtype,
        )
        return ffn(x.reshape(1, -1, D)).reshape(x.shape)


def layer_order(path: tuple) -> list:
    """Sort key of a module path with numbers compared as numbers (block_2 before block_10):
    the order in which per-layer metrics are stacked."""
    return [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(part))] for part in path]


def expert_weights(layer: nn.Module, shape: tuple[int, int, int], train: bool) -> dict[str, Array]:
    """The expert matrices of an MoE layer as its parameters, the keyword arguments of
    `StackedExperts`: w_in [E, D, F], w_out [E, F, D], and w_gate [E, D, F] for a gated
    activation, with `shape` = (E, D, F).

    Float matrices (`layer.param_dtype`) take a fan-in initialisation batched over experts
    (fan-in: the axis D, or F, of each expert's matrix) with `layer.init_scale`; with
    `layer.expert_quantization == 'int8'` each is int8 values with float32 channel scales
    (int8.int8_weight), for evaluation only."""
    E, D, F = shape
    quantized = layer.expert_quantization == "int8"
    if quantized and train:
        int8.refuse_training()
    init = nn.initializers.variance_scaling(
        layer.init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )
    out = {}

    def weight(name, axes, shape):
        if quantized:
            out[name], out[f"{name}_scale"] = int8.int8_weight(layer, name, axes, shape)
        else:
            out[name] = layer.param(
                name, nn.with_logical_partitioning(init, axes), shape, layer.param_dtype
            )

    weight("w_in", ("expert", "embed", "mlp"), (E, D, F))
    weight("w_out", ("expert", "mlp", "embed"), (E, F, D))
    if ACTIVATIONS[layer.activation][1]:  # gated
        weight("w_gate", ("expert", "embed", "mlp"), (E, D, F))
    return out
