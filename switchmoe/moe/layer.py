"""The Flax MoE layer: parameters and wiring around a router, a dispatch backend and experts.

Shape legend: B batch, L sequence length, G groups, S tokens per group (group_size), E experts,
C capacity, K choices per token, D model width, F expert hidden width.

The layer only wires: what a router is (parameters, capacity rule, randomness, losses and their
weights) is the router's (moe/routers/), routing, dispatch and experts are plain functions, and
the settings are checked in one place (moe/settings.py). It replaces a Transformer block's FFN:

  x[B, L, D] -> groups [G, S, D] -> router -> RoutingResult (plan + diagnostics)
             -> backend (einsum | gather | dropless) reads the DispatchPlan, with StackedExperts
             -> y[B, L, D]   (+ an optional shared dense FFN applied to every token, DeepSeekMoE)

and returns (y, aux), aux = {"loss", "losses", "weighted_losses", "stats"} (Router.aux_outputs).
Parameters carry logical axis names ("expert", "embed", "mlp"): a mesh's rules place them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from switchmoe.moe import balancing, decoding, expert_parallel
from switchmoe.moe import experts as experts_lib
from switchmoe.moe import routers as routers_lib
from switchmoe.moe import routing as routing_lib
from switchmoe.moe import settings as moe_settings
from switchmoe.moe.experts import DenseFFN

Array = jax.Array


class MoeLayer(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer.

    Attributes (the settings a config's `model.moe` block sets carry the same names there):
      num_experts: E.
      d_ff: F, hidden width of each expert.
      num_selected: K, experts per token (1 Switch, 2 GShard/ST-MoE); its meaning is the router's.
      router: a name in `moe.routers.NAMES` (default Switch's; each module there says what it is).
      router_options: the router's own settings (`Router.options`), flat in a config's `model.moe`.
      backend: "auto" (the platform's faster capacity backend: dispatch.resolve_backend),
        "einsum", "gather" or "dropless" (a token-choice router without capacity: no token is
        dropped, the capacity factors are ignored).
      dropless_implementation, block_size: how "dropless" computes, the same numbers either way:
        "ragged_dot" (GPU/TPU) or "blocked" (XLA:CPU) with rows per block; None: the platform's
        default, and a block size from the tokens per expert (dispatch.auto_block_size).
      train_capacity_factor, eval_capacity_factor: C = ceil(K·S/E·factor) (Switch: 1.0–1.25, 2.0).
      min_capacity: lower bound on C (small groups would otherwise get 1-slot experts).
      group_size: S, tokens per routing group (None: each sequence one group); must divide B·L.
      gate_norm: "raw" (Switch: the router probability) or "normalized" over K (GShard, Mixtral).
      batch_prioritized: V-MoE batch prioritized routing (not causal: encoders only).
      causal_routing: with K >= 2, each token's choices before the next token's (token-major,
        causal), not GShard's rank-major order (an early token's second choice displaced by later
        first choices); a decoder-only LM refuses False unless `model.moe.noncausal_ablation`.
      random_routing: GShard random routing of the second expert during training.
      random_routing_threshold: keep the second expert when U < g2/threshold (GShard: 0.5).
      jitter_eps: multiplicative jitter on the router input during training (Switch: 1e-2).
      load_balancing_weight: α of the Switch load-balancing loss (1e-2).
      z_loss_weight: β of the router z-loss (ST-MoE: 1e-3; 0 = off).
      sequence_balance_weight: DeepSeek-V3's sequence-wise balance loss (the Switch loss counted
        per sequence; DeepSeek-V3: 1e-4). Balancers compose: every non-zero weight adds its loss.
      global_balance_weight: the global-batch balance loss (Qiu et al. 2025): the Switch loss
        counted over the whole global batch, every device and microbatch (losses.py).
      bias_update_speed: γ of auxiliary-loss-free bias balancing (0 = off; DeepSeek-V3: 1e-3;
        moe/balancing.py): a bias for choosing experts only, moved after each optimizer step.
      expert_dropout: dropout rate on the experts' hidden activations during training.
      shared_d_ff: hidden width of a shared dense FFN applied to every token (0 = none).
      shared_gate: scale the shared FFN's output per token by sigmoid(x·w_gate), w_gate [D]
        (Qwen2-MoE's shared_expert_gate); False: the shared output is added as it is (DeepSeek).
      router_init_scale: router kernel variance scale·1/D (Switch: 0.1; 0: zeros, Shazeer et al.).
      router_bias: add a learned bias to the router logits.
      router_dtype: the router matmul's precision, "float32" (Switch) or "bfloat16" (its ablation).
      init_scale: variance scale of the expert weights' fan-in initialisation (Switch: 0.1).
      activation: "relu", "gelu", "swiglu" or "geglu" (the model's).
      expert_parallelism: None, "jit" (sharding constraints) or "shard_map" (explicit all-to-all):
        the experts split over the mesh axis "expert", under `jax.set_mesh` (expert_parallel.py).
      expert_quantization: "none" or "int8": int8 expert matrices with per-channel scales, for
        evaluation only (moe/int8.py; compress/quantization.py makes such a run).
      dtype: compute dtype of the experts (bfloat16 on accelerators); the router is always float32.
      param_dtype: storage dtype of the parameters (float32).
    """

    num_experts: int
    d_ff: int
    num_selected: int = 1
    router: str = routers_lib.DEFAULT
    router_options: Optional[Mapping[str, Any]] = None
    backend: str = "auto"
    dropless_implementation: Optional[str] = None
    block_size: Optional[int] = None
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    group_size: Optional[int] = None
    gate_norm: str = "raw"
    batch_prioritized: bool = False
    causal_routing: bool = True
    random_routing: bool = False
    random_routing_threshold: float = 0.5
    jitter_eps: float = 0.0
    load_balancing_weight: float = 1e-2
    z_loss_weight: float = 0.0
    sequence_balance_weight: float = 0.0
    global_balance_weight: float = 0.0
    bias_update_speed: float = 0.0
    expert_dropout: float = 0.0
    shared_d_ff: int = 0
    shared_gate: bool = False
    router_init_scale: float = 0.1
    router_bias: bool = False
    router_dtype: str = "float32"
    init_scale: float = 1.0
    activation: str = "relu"
    expert_quantization: str = "none"
    expert_parallelism: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, **fields) -> "MoeLayer":
        """The MoE layer of a config's `model` block (settings from `model.moe`, the expert width
        from `model.moe.expert_d_ff` or `model.d_ff`); `fields` override (name, dtype, ...).
        Fine-grained experts (`model.moe.granularity` m, settings.check_granularity): m·E
        experts of width F/m, top-(m·k): the same expert parameters and FLOPs per token.
        """
        moe = model.moe
        options = routers_lib.REGISTRY[moe.router].options
        values = {name: moe.get(name) for name in options}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        settings = {name: moe[name] for name in SETTINGS}
        m = moe_settings.check_granularity(model)
        settings["num_selected"] = moe.num_selected * m
        return cls(
            num_experts=moe.num_experts * m,
            d_ff=(moe.get("expert_d_ff") or model.d_ff) // m,
            activation=model.activation,
            router_options=flax.core.FrozenDict(values),
            **{**settings, **fields},
        )

    def make_router(self) -> routers_lib.Router:
        return routers_lib.make_router(self, dict(self.router_options or {}))

    def check_settings(self, prefix: str = "", tokens_per_group: Optional[int] = None) -> None:
        """Raises ValueError naming the setting and its allowed values, before anything compiles.

        The config's validation runs this same check on `MoeLayer.from_config` (prefix
        "model.moe."); the layer runs it when traced, with its group size.
        """
        moe_settings.check_settings(self, prefix, tokens_per_group)

    @nn.compact
    def __call__(
        self,
        x: Array,
        deterministic: bool = True,
        token_ids: Optional[Array] = None,
        mask: Optional[Array] = None,
        decode: bool = False,
        step_index: Optional[Array] = None,
    ) -> tuple[Array, dict[str, Any]]:
        """Applies the layer.

        Args:
          x: [B, L, D] tokens.
          token_ids: int[B, L] token ids, for routers that route on them (a fixed id table).
          mask: optional bool[B, L], False at padded positions: they take no expert slot and are
            left out of every balance loss, the z-loss, the load counts, the statistics and the
            bias updates (their output is the shared expert's, or 0).
          deterministic: evaluation mode: eval capacity factor, no jitter, no random routing, no
            expert dropout. When False and any of those is active, the "dropout" stream is used.
          decode: cached decoding (switchmoe/moe/decoding.py): the first call, on the full length T
            (step_index None), creates the cache; each later call routes x[B, 1, D], the new
            position step_index of every row, as a full pass over T positions would have.

        Returns:
          y[B, L, D] in `dtype`, and aux = {"loss", "losses", "weighted_losses", "stats"} (see
          the module docstring).
        """
        x = jnp.asarray(x)  # NumPy or JAX input, eager or traced
        B, L, D = x.shape
        E, F = self.num_experts, self.d_ff
        step = decode and step_index is not None
        # A decoding step routes each row's one new token as a group of its own; the cache
        # carries what the rest of its full-length group asked for.
        groups = x if step else routing_lib.group_tokens(x, self.group_size)
        G, S, _ = groups.shape
        self.check_settings(tokens_per_group=None if step else S)
        router = self.make_router()
        if token_ids is not None:
            token_ids = token_ids.reshape(G, S)
        group_mask = None if mask is None else mask.reshape(G, S).astype(bool)

        train = not deterministic
        # The layer's randomness, training only: one key from the "dropout" stream, split into
        # the named streams the router and the experts draw (routers/base.py: STREAMS).
        dropout = ("expert_dropout",) if train and self.expert_dropout > 0 else ()
        streams = router.streams(train) + dropout
        keys = routers_lib.stream_keys(self.make_rng("dropout"), streams) if streams else {}
        bias = balancing.selection_bias(self, E) if self.bias_update_speed else None
        routing = router.route(
            self, groups, token_ids, keys, train, mask=group_mask, selection_bias=bias
        )
        if decode:
            routing = decoding.decoding_step(self, router, routing, B, L, step_index)
        # The loads of this call, and the step's totals when the caller passes them.
        counts = router.selection_counts(routing, group_mask)
        totals = balancing.count_loads(self, counts, group_mask, G * S)
        routing = router.with_balance_losses(routing, sequence_length=L, mask=group_mask, **totals)
        self.sow("intermediates", "routing", routing)

        matrices = experts_lib.expert_weights(self, (E, D, F), train)
        experts = experts_lib.StackedExperts(
            activation=self.activation,
            dtype=self.dtype,
            dropout_rate=self.expert_dropout,
            dropout_key=keys.get("expert_dropout"),
            **matrices,
        )
        tokens = groups.astype(self.dtype)
        y = expert_parallel.moe_forward(
            self.expert_parallelism, self.backend, tokens, routing.plan, experts,
            dropless_implementation=self.dropless_implementation, block_size=self.block_size,
        ).reshape(B, L, D)  # fmt: skip

        if self.shared_d_ff:
            shared = DenseFFN(
                self.shared_d_ff,
                self.activation,
                self.dtype,
                init_scale=self.init_scale,
                param_dtype=self.param_dtype,
                name="shared",
            )(x)
            if self.shared_gate:
                w = self.param(
                    "shared_gate",
                    nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                    (D,),
                    self.param_dtype,
                )
                gate = jax.nn.sigmoid(jnp.einsum("bld,d->bl", x.astype(self.dtype), w))
                shared = shared * gate[..., None].astype(shared.dtype)
            y = y + shared

        return y.astype(self.dtype), router.aux_outputs(routing)


# The MoeLayer fields a config's `model.moe` block sets (by the same names); the rest come from
# the model (sizes, activation, dtypes) or the run (expert parallelism).
SETTINGS = tuple(
    f.name
    for f in dataclasses.fields(MoeLayer)
    if f.name
    not in ("parent", "name", "num_experts", "d_ff", "router_options", "activation",
            "expert_parallelism", "dtype", "param_dtype")
)  # fmt: skip
