"""Stacked expert feed-forward networks: E FFNs evaluated as batched matmuls.

Shape legend: E experts, N tokens per expert (G·C for capacity backends), M sorted rows (dropless),
D model width, F expert hidden width.

All experts' weights live in single arrays with a leading expert axis (w_in[E, D, F], w_out[E, F, D]),
so "run every expert on its own tokens" is one einsum over the expert axis, and sharding the experts
across devices is sharding that axis.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

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

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

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
        cast = lambda w: None if w is None else w.astype(self.dtype)
        w_in, w_out, w_gate = cast(self.w_in), cast(self.w_out), cast(self.w_gate)
        h_in = jnp.einsum("end,edf->enf", x, w_in)
        h_gate = None if w_gate is None else jnp.einsum("end,edf->enf", x, w_gate)
        return jnp.einsum("enf,efd->end", self._hidden(h_in, h_gate), w_out)

    def ragged(self, x: Array, group_sizes: Array) -> Array:
        """Runs experts on rows sorted by expert: x[M, D], group_sizes int32[E] -> [M, D].

        Rows [Σ_{e'<e} n_e', Σ_{e'<=e} n_e') go to expert e; rows past Σ n_e belong to no expert and
        come out as zeros. `jax.lax.ragged_dot` lowers to a grouped GEMM on GPU/TPU; on XLA:CPU it
        costs about as much as running every expert on every row.
        """
        x = x.astype(self.dtype)
        cast = lambda w: None if w is None else w.astype(self.dtype)
        w_in, w_out, w_gate = cast(self.w_in), cast(self.w_out), cast(self.w_gate)
        h_in = jax.lax.ragged_dot(x, w_in, group_sizes)
        h_gate = None if w_gate is None else jax.lax.ragged_dot(x, w_gate, group_sizes)
        return jax.lax.ragged_dot(self._hidden(h_in, h_gate), w_out, group_sizes)

    def single(self, e: int, x: Array) -> Array:
        """Expert e alone on x[..., D] (reference path for tests and analysis)."""
        one = jax.tree.map(lambda w: w[e : e + 1], (self.w_in, self.w_out, self.w_gate))
        flat = x.reshape(1, -1, x.shape[-1])
        return self.replace(w_in=one[0], w_out=one[1], w_gate=one[2])(flat).reshape(x.shape)
