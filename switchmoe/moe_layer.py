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
from switchmoe import expert_parallel, hash_routing, noisy_top_k, sbase
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
      router: "top_k" (token choice), "expert_choice" (non-causal), "noisy_top_k" (Shazeer et al.
      2017), "hash" (fixed token-id table, no router parameters) or "sbase" (balanced assignment
      by Sinkhorn while training, greedy top-1 at evaluation; non-causal).
      backend: "einsum", "gather" or "dropless". With the top-k router, "dropless" routes without
        capacity (no token is ever dropped) and ignores the capacity factors.
      dropless_implementation: how backend="dropless" computes, same numbers either way:
        "ragged_dot" (grouped GEMM on GPU/TPU), "blocked" (padded blocks, fast on XLA:CPU), or
        None for the platform's default (blocked on CPU, ragged_dot elsewhere).
      block_size: rows per block of the blocked implementation; None picks it from the tokens
        per expert (see switchmoe.dispatch.auto_block_size).
      train_capacity_factor, eval_capacity_factor: C = ceil(K·S/E·factor) during training
        (deterministic=False) and evaluation. Switch: 1.0–1.25 train, 2.0 eval.
      min_capacity: lower bound on C (small groups would otherwise get 1-slot experts).
      group_size: S, tokens per routing group; None routes each sequence as one group. Must divide
        the number of tokens B·L.
      gate_norm: "raw" (Switch) or "normalized" over the chosen K (GShard, Mixtral).
      batch_prioritized: V-MoE batch prioritized routing (not causal: encoders only).
      causal_routing: with K >= 2, place each token's choices before the next token's
        (token-major) instead of all first choices first (GShard's rank-major order, in which an
        early token's second choice can be displaced by later tokens' first choices). Decoders
        that must decode one token at a time as they trained need it; top_k and noisy_top_k only.
      random_routing: GShard random routing of the second expert during training.
      random_routing_threshold: keep the second expert when U < g2/threshold (GShard: 0.5).
      jitter_eps: multiplicative jitter on the router input during training (Switch: 1e-2).
      load_balancing_weight: α of the Switch load-balancing loss (1e-2).
      z_loss_weight: β of the router z-loss (ST-MoE: 1e-3).
    importance_weight, load_weight: weights of noisy top-k's importance and load losses
      (Shazeer et al.: 0.1 each; only the noisy_top_k router reports these losses).
    hash_table: token id -> expert, for router="hash" (see switchmoe/hash_routing.py).
    sbase_iters, sbase_temperature: Sinkhorn iterations and temperature of router="sbase".
      activation: "relu", "gelu", "swiglu" or "geglu".
      expert_dropout: dropout rate on the experts' hidden activations during training.
      shared_d_ff: hidden width of a shared dense FFN applied to every token (0 = none).
      router_init_scale: router kernel ~ truncated normal with variance scale·1/D (Switch uses 0.1
        of the default; 0 gives zeros as in Shazeer et al. 2017, every expert equally likely).
      router_bias: add a learned bias to the router logits.
    router_dtype: precision of the router matmul, "float32" (default, Switch §2.4) or "bfloat16"
      (for the ablation); the logits are float32 either way.
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
    dropless_implementation: Optional[str] = None
    block_size: Optional[int] = None
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    group_size: Optional[int] = None
    gate_norm: str = "raw"
    batch_prioritized: bool = False
    causal_routing: bool = False
    random_routing: bool = False
    random_routing_threshold: float = 0.5
    jitter_eps: float = 0.0
    load_balancing_weight: float = 1e-2
    z_loss_weight: float = 0.0
    importance_weight: float = 0.0
    load_weight: float = 0.0
    hash_table: Optional[tuple] = None
    sbase_iters: int = 200
    sbase_temperature: float = 0.02
    activation: str = "relu"
    expert_dropout: float = 0.0
    shared_d_ff: int = 0
    router_init_scale: float = 0.1
    router_bias: bool = False
    router_dtype: str = "float32"
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
        if self.dropless_implementation not in (None, *dispatch_lib.DROPLESS_IMPLEMENTATIONS):
            raise ValueError(
                "dropless_implementation must be None or one of "
                f"{dispatch_lib.DROPLESS_IMPLEMENTATIONS}; got {self.dropless_implementation!r}."
            )
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be None or >= 1; got {self.block_size}.")
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
        if self.batch_prioritized and self.router not in ("top_k", "noisy_top_k"):
            raise ValueError(
                "batch_prioritized applies to router 'top_k' or 'noisy_top_k'; "
                f"got router={self.router!r}."
            )
        if self.router == "noisy_top_k" and self.num_selected >= self.num_experts:
            raise ValueError(
                f"router='noisy_top_k' needs num_selected < num_experts={self.num_experts}; "
                f"got {self.num_selected}."
            )

    def capacity(self, tokens_per_group: int, deterministic: bool) -> Optional[int]:
        """Static C for this call; None for the dropless top-k layer."""
        factor = self.eval_capacity_factor if deterministic else self.train_capacity_factor
        if self.router == "expert_choice":
            return routing_lib.expert_capacity(
                tokens_per_group, self.num_experts, 1, factor, self.min_capacity
            )
        if self.router == "sbase" and not deterministic:
            return tokens_per_group // self.num_experts  # exactly balanced
        if self.backend == "dropless":
            return None
        k = 1 if self.router in ("hash", "sbase") else self.num_selected
        return routing_lib.expert_capacity(
            tokens_per_group, self.num_experts, k, factor, self.min_capacity
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

    def _route(self, groups, token_ids, deterministic, keys) -> routing_lib.RoutingResult:
        """Creates the router's parameters (if it has any) and routes groups[G, S, D]."""
        G, S, D = groups.shape
        E = self.num_experts
        train = not deterministic
        capacity = self.capacity(S, deterministic)
        if self.router == "hash":
            if token_ids is None:
                raise ValueError(
                    "router='hash' needs the token ids: call the layer with token_ids."
                )
            if self.hash_table is None:
                raise ValueError("router='hash' needs hash_table (token id -> expert).")
            table = jnp.asarray(self.hash_table, jnp.int32)
            return hash_routing.hash_route(token_ids, table, E, capacity=capacity)

        def router_weights(name, init):
            return self.param(
                name, nn.with_logical_partitioning(init, ("embed", None)), (D, E), self.param_dtype
            )

        fan_in = lambda scale: nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
        # Noisy top-k starts from zero weights (Shazeer et al.): every expert equally likely.
        zero = self.router_init_scale == 0 or self.router == "noisy_top_k"
        router_kernel = router_weights(
            "router_kernel", nn.initializers.zeros if zero else fan_in(self.router_init_scale)
        )
        router_b = None
        if self.router_bias:
            router_b = self.param(
                "router_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                (E,),
                self.param_dtype,
            )
        jitter_key = keys[0] if train and self.jitter_eps > 0 else None
        logits_of = lambda kernel, bias, jitter: routing_lib.router_logits(
            groups,
            kernel,
            bias,
            jitter_key=jitter,
            jitter_eps=self.jitter_eps,
            dtype=jnp.dtype(self.router_dtype),
        )
        logits = logits_of(router_kernel, router_b, jitter_key)
        self.sow("intermediates", "router_logits", logits)

        if self.router == "expert_choice":
            return routing_lib.expert_choice_route(logits, capacity=capacity)
        if self.router == "noisy_top_k":
            noise_kernel = router_weights("noise_kernel", nn.initializers.zeros)
            return noisy_top_k.noisy_top_k_route(
                logits,
                logits_of(noise_kernel, None, jitter_key),
                num_selected=self.num_selected,
                capacity=capacity,
                noise_key=keys[3] if train else None,
                batch_prioritized=self.batch_prioritized,
                rank_major=not self.causal_routing,
            )
        if self.router == "sbase" and train:
            return sbase.sbase_route(
                logits, num_iters=self.sbase_iters, temperature=self.sbase_temperature
            )
        # top_k, and S-BASE at evaluation (greedy top-1).
        return routing_lib.top_k_route(
            logits,
            num_selected=1 if self.router == "sbase" else self.num_selected,
            capacity=capacity,
            gate_norm=self.gate_norm,
            batch_prioritized=self.batch_prioritized,
            random_routing_key=keys[1] if train and self.random_routing else None,
            random_routing_threshold=self.random_routing_threshold,
            rank_major=not self.causal_routing,
        )

    @nn.compact
    def __call__(
        self, x: Array, deterministic: bool = True, token_ids: Optional[Array] = None
    ) -> tuple[Array, dict[str, Any]]:
        """Applies the layer.

        Args:
          x: [B, L, D] tokens.
          token_ids: int[B, L] token ids, needed by the hash router only.
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
        if token_ids is not None:
            token_ids = token_ids.reshape(G, S)

        train = not deterministic
        # Stochastic parts, training only: one key each from the "dropout" stream (split so
        # jitter, random routing, router noise and expert dropout draw independently).
        needs_rng = train and (
            self.jitter_eps > 0
            or self.random_routing
            or self.expert_dropout > 0
            or self.router == "noisy_top_k"
        )
        keys = jax.random.split(self.make_rng("dropout"), 4) if needs_rng else [None] * 4
        dropout_key = keys[2] if train and self.expert_dropout > 0 else None
        routing = self._route(groups, token_ids, deterministic, keys)
        self.sow("intermediates", "routing", routing)

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
            y = dispatch_lib.moe_forward(
                self.backend,
                groups.astype(self.dtype),
                routing,
                experts,
                dropless_implementation=self.dropless_implementation,
                block_size=self.block_size,
            )
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

        weights = {
            "load_balancing": self.load_balancing_weight,
            "z_loss": self.z_loss_weight,
            "importance": self.importance_weight,
            "load": self.load_weight,
        }
        loss = sum(weights[name] * value for name, value in routing.losses.items())
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
