"""The Flax MoE layer: parameters and wiring around routing, dispatch and stacked experts.

Shape legend: B batch, L sequence length, G groups, S tokens per group (group_size), E experts,
C capacity, K choices per token, D model width, F expert hidden width.

The module only declares parameters and connects the plain functions of `routing`, `dispatch` and
`experts`; all the maths is testable without it. It replaces a Transformer block's FFN:

  x[B, L, D] -> groups [G, S, D] -> router logits (float32) -> RoutingResult
             -> backend (einsum | gather | dropless) with StackedExperts -> y[B, L, D]
             (+ an optional shared dense FFN applied to every token, DeepSeekMoE)

and returns (y, aux) where aux = {"loss": Σ weight·loss, "losses": {...}, "stats": {...}}: the
weighted auxiliary loss the model adds to its objective, the unweighted per-layer losses and the
routing statistics. Parameters carry logical axis names ("expert", "embed", "mlp") so that the
sharding rules of a mesh decide where they live.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchmoe import dispatch as dispatch_lib
from switchmoe import expert_parallel
from switchmoe import experts as experts_lib
from switchmoe import routing as routing_lib

Array = jax.Array


def _positive_or_none(name: str, value: Optional[float]) -> None:
    if value is not None and not value > 0:
        raise ValueError(
            f"{name} must be > 0; got {value}. (Use backend='dropless' for no capacity.)"
        )


class MoeLayer(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer.

    Attributes:
      num_experts: E.
      d_ff: F, hidden width of each expert.
      num_selected: K, experts per token for the top-k router (1 Switch, 2 GShard/ST-MoE).
      router: "top_k" (token choice) or "expert_choice" (non-causal).
      backend: "einsum", "gather" or "dropless". With the top-k router, "dropless" routes without
        capacity (no token is ever dropped) and ignores the capacity factors.
      train_capacity_factor, eval_capacity_factor: C = ceil(K·S/E·factor) during training
        (deterministic=False) and evaluation. Switch: 1.0–1.25 train, 2.0 eval.
      min_capacity: lower bound on C (small groups would otherwise get 1-slot experts).
      group_size: S, tokens per routing group; None routes each sequence as one group. Must divide
        the number of tokens B·L.
      gate_norm: "raw" (Switch) or "normalized" over the chosen K (GShard, Mixtral).
      batch_prioritized: V-MoE batch prioritized routing (not causal: encoders only).
      random_routing: GShard random routing of the second expert during training.
      random_routing_threshold: keep the second expert when U < g2/threshold (GShard: 0.5).
      jitter_eps: multiplicative jitter on the router input during training (Switch: 1e-2).
      load_balancing_weight: α of the Switch load-balancing loss (1e-2).
      z_loss_weight: β of the router z-loss (ST-MoE: 1e-3).
      activation: "relu", "gelu", "swiglu" or "geglu".
      expert_dropout: dropout rate on the experts' hidden activations during training.
      shared_d_ff: hidden width of a shared dense FFN applied to every token (0 = none).
      router_init_scale: router kernel ~ truncated normal with variance scale·1/D (Switch uses 0.1
        of the default; 0 gives zeros as in Shazeer et al. 2017, every expert equally likely).
      router_bias: add a learned bias to the router logits.
      init_scale: variance scale of the expert weights' fan-in initialisation (Switch: 0.1).
      expert_parallelism: None (single device or plain data parallelism), "jit" (sharding
      constraints; the partitioner inserts the all-to-alls) or "shard_map" (explicit all-to-all);
      both split the experts over the mesh axis "expert" and must run under `jax.set_mesh`.
    dtype: compute dtype of the experts (bfloat16 on accelerators); the router is always float32.
      param_dtype: storage dtype of the parameters (float32).
    """

    num_experts: int
    d_ff: int
    num_selected: int = 1
    router: str = "top_k"
    backend: str = "einsum"
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    group_size: Optional[int] = None
    gate_norm: str = "raw"
    batch_prioritized: bool = False
    random_routing: bool = False
    random_routing_threshold: float = 0.5
    jitter_eps: float = 0.0
    load_balancing_weight: float = 1e-2
    z_loss_weight: float = 0.0
    activation: str = "relu"
    expert_dropout: float = 0.0
    shared_d_ff: int = 0
    router_init_scale: float = 0.1
    router_bias: bool = False
    init_scale: float = 1.0
    expert_parallelism: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check_settings(self) -> None:
        """Raises ValueError naming the setting and its allowed values (at trace time, pre-compile)."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1; got {self.num_experts}.")
        if not 1 <= self.num_selected <= self.num_experts:
            raise ValueError(
                f"num_selected (k) must be in [1, num_experts={self.num_experts}]; "
                f"got {self.num_selected}."
            )
        if self.router not in routing_lib.ROUTERS:
            raise ValueError(f"router must be one of {routing_lib.ROUTERS}; got {self.router!r}.")
        if self.backend not in dispatch_lib.BACKENDS:
            raise ValueError(
                f"backend must be one of {dispatch_lib.BACKENDS}; got {self.backend!r}."
            )
        _positive_or_none("train_capacity_factor", self.train_capacity_factor)
        _positive_or_none("eval_capacity_factor", self.eval_capacity_factor)
        if self.min_capacity < 1:
            raise ValueError(f"min_capacity must be >= 1; got {self.min_capacity}.")
        if self.gate_norm not in routing_lib.GATE_NORMS:
            raise ValueError(
                f"gate_norm must be one of {routing_lib.GATE_NORMS}; got {self.gate_norm!r}."
            )
        experts_lib.check_activation(self.activation)
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1); got {self.expert_dropout}.")
        if self.random_routing and self.num_selected < 2:
            raise ValueError(
                "random_routing (GShard second-expert routing) needs num_selected >= 2; "
                f"got num_selected={self.num_selected}."
            )
        if self.batch_prioritized and self.router != "top_k":
            raise ValueError(
                f"batch_prioritized applies to router='top_k' only; got router={self.router!r}."
            )

    def capacity(self, tokens_per_group: int, deterministic: bool) -> Optional[int]:
        """Static C for this call; None for the dropless top-k layer."""
        factor = self.eval_capacity_factor if deterministic else self.train_capacity_factor
        if self.router == "expert_choice":
            return routing_lib.expert_capacity(
                tokens_per_group, self.num_experts, 1, factor, self.min_capacity
            )
        if self.backend == "dropless":
            return None
        return routing_lib.expert_capacity(
            tokens_per_group, self.num_experts, self.num_selected, factor, self.min_capacity
        )

    def _groups(self, x: Array) -> Array:
        """[B, L, D] -> [G, S, D]."""
        B, L, D = x.shape
        S = L if self.group_size is None else self.group_size
        if S < 1 or (B * L) % S:
            raise ValueError(
                f"group_size must divide the tokens per batch (batch {B} × length {L} = "
                f"{B * L}); got group_size={S}."
            )
        return x.reshape(B * L // S, S, D)

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> tuple[Array, dict[str, Any]]:
        """Applies the layer.

        Args:
          x: [B, L, D] tokens.
          deterministic: evaluation mode: eval capacity factor, no jitter, no random routing, no
            expert dropout. When False and any of those is active, the "dropout" PRNG stream is used.

        Returns:
          y[B, L, D] in `dtype`, and aux = {"loss", "losses", "stats"} (see module docstring).
        """
        self.check_settings()
        B, L, D = x.shape
        E, F = self.num_experts, self.d_ff
        groups = self._groups(x)
        G, S, _ = groups.shape

        fan_in = lambda scale: nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
        router_init = (
            nn.initializers.zeros if self.router_init_scale == 0 else fan_in(self.router_init_scale)
        )
        router_kernel = self.param(
            "router_kernel",
            nn.with_logical_partitioning(router_init, ("embed", None)),
            (D, E),
            self.param_dtype,
        )
        router_b = None
        if self.router_bias:
            router_b = self.param(
                "router_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                (E,),
                self.param_dtype,
            )
        # Batched over experts: fan-in is the axis D (or F) of each expert's matrix.
        expert_init = nn.initializers.variance_scaling(
            self.init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        w_in = self.param(
            "w_in",
            nn.with_logical_partitioning(expert_init, ("expert", "embed", "mlp")),
            (E, D, F),
            self.param_dtype,
        )
        w_out = self.param(
            "w_out",
            nn.with_logical_partitioning(expert_init, ("expert", "mlp", "embed")),
            (E, F, D),
            self.param_dtype,
        )
        w_gate = None
        if experts_lib.ACTIVATIONS[self.activation][1]:
            w_gate = self.param(
                "w_gate",
                nn.with_logical_partitioning(expert_init, ("expert", "embed", "mlp")),
                (E, D, F),
                self.param_dtype,
            )

        # Stochastic parts, training only: one key each from the "dropout" stream.
        train = not deterministic
        needs_rng = train and (
            self.jitter_eps > 0 or self.random_routing or self.expert_dropout > 0
        )
        keys = jax.random.split(self.make_rng("dropout"), 3) if needs_rng else [None] * 3
        jitter_key = keys[0] if train and self.jitter_eps > 0 else None
        routing_key = keys[1] if train and self.random_routing else None
        dropout_key = keys[2] if train and self.expert_dropout > 0 else None

        logits = routing_lib.router_logits(
            groups, router_kernel, router_b, jitter_key=jitter_key, jitter_eps=self.jitter_eps
        )
        self.sow("intermediates", "router_logits", logits)
        capacity = self.capacity(S, deterministic)
        if self.router == "expert_choice":
            routing = routing_lib.expert_choice_route(logits, capacity=capacity)
        else:
            routing = routing_lib.top_k_route(
                logits,
                num_selected=self.num_selected,
                capacity=capacity,
                gate_norm=self.gate_norm,
                batch_prioritized=self.batch_prioritized,
                random_routing_key=routing_key,
                random_routing_threshold=self.random_routing_threshold,
            )
        self.sow("intermediates", "routing", routing)

        experts = experts_lib.StackedExperts(
            w_in=w_in,
            w_out=w_out,
            w_gate=w_gate,
            activation=self.activation,
            dtype=self.dtype,
            dropout_rate=self.expert_dropout,
            dropout_key=dropout_key,
        )
        if self.expert_parallelism:
            y = expert_parallel.expert_parallel_moe(
                self.expert_parallelism, self.backend, groups.astype(self.dtype), routing, experts
            )
        else:
            y = dispatch_lib.moe_forward(self.backend, groups.astype(self.dtype), routing, experts)
        y = y.reshape(B, L, D)

        if self.shared_d_ff:
            y = y + SharedExpert(
                self.shared_d_ff,
                self.activation,
                self.init_scale,
                self.dtype,
                self.param_dtype,
                name="shared",
            )(x)

        loss = (
            self.load_balancing_weight * routing.losses["load_balancing"]
            + self.z_loss_weight * routing.losses["z_loss"]
        )
        return y.astype(self.dtype), {
            "loss": loss,
            "losses": routing.losses,
            "stats": routing.stats,
        }


class SharedExpert(nn.Module):
    """A dense FFN applied to every token beside the routed experts (DeepSeekMoE shared experts)."""

    d_ff: int
    activation: str = "relu"
    init_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x[B, L, D] -> [B, L, D]."""
        D = x.shape[-1]
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        gated = experts_lib.ACTIVATIONS[self.activation][1]
        param = lambda name, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
        )
        # The shared FFN reuses the stacked-expert maths with a single expert.
        experts = experts_lib.StackedExperts(
            w_in=param("w_in", (D, self.d_ff), ("embed", "mlp"))[None],
            w_out=param("w_out", (self.d_ff, D), ("mlp", "embed"))[None],
            w_gate=param("w_gate", (D, self.d_ff), ("embed", "mlp"))[None] if gated else None,
            activation=self.activation,
            dtype=self.dtype,
        )
        return experts(x.reshape(1, -1, D)).reshape(x.shape)
