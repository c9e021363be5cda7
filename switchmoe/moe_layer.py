"""The Flax MoE layer: parameters and wiring around a router, a dispatch backend and experts.

Shape legend: B batch, L sequence length, G groups, S tokens per group (group_size), E experts,
C capacity, K choices per token, D model width, F expert hidden width.

The layer only wires: what a router is (its parameters, capacity rule, randomness, losses and
their weights) is the router's (switchmoe/routers), the maths of routing, dispatch and experts are
plain functions testable without Flax, and the settings are validated in one place
(switchmoe/moe_settings.py). It replaces a Transformer block's FFN:

  x[B, L, D] -> groups [G, S, D] -> router -> RoutingResult (plan + diagnostics)
             -> backend (einsum | gather | dropless) reads the DispatchPlan, with StackedExperts
             -> y[B, L, D]   (+ an optional shared dense FFN applied to every token, DeepSeekMoE)

and returns (y, aux) where aux = {"loss", "losses", "weighted_losses", "stats"}: the weighted
auxiliary loss the model adds to its objective, the unweighted per-layer losses, what each of them
adds, and the routing statistics. Parameters carry logical axis names ("expert", "embed", "mlp")
so that the sharding rules of a mesh decide where they live.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from switchmoe import balancing
from switchmoe import dispatch as dispatch_lib
from switchmoe import expert_parallel
from switchmoe import experts as experts_lib
from switchmoe import routers as routers_lib
from switchmoe import moe_settings
from switchmoe.experts import DenseFFN

Array = jax.Array


class MoeLayer(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer.

    Attributes (the settings a config's `model.moe` block sets carry the same names there):
      num_experts: E.
      d_ff: F, hidden width of each expert.
      num_selected: K, experts per token (1 Switch, 2 GShard/ST-MoE); what it means is the
        router's (switchmoe/routers).
      router: a name in `switchmoe.routers.NAMES` (default: Switch's token choice); each
        router's module in switchmoe/routers/ says what it is and what options it takes.
      router_options: the router's own settings (its `Router.options`); a config holds them flat
        in `model.moe`.
      backend: "auto" (the default: the faster capacity backend for the platform, gather on
        CPU and GPU, einsum on TPU; see switchmoe.dispatch.resolve_backend for the measurements),
        "einsum", "gather" or "dropless". With a token-choice router, "dropless" routes
        without capacity (no token is ever dropped) and ignores the capacity factors.
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
      gate_norm: "raw" (Switch: the gate is the router probability) or "normalized" over the
        chosen K (GShard, Mixtral).
      batch_prioritized: V-MoE batch prioritized routing (not causal: encoders only).
      causal_routing: with K >= 2, place each token's choices before the next token's
        (token-major, causal) instead of all first choices first (GShard's rank-major order, in
        which an early token's second choice can be displaced by later tokens' first choices).
        A decoder-only LM refuses False unless `model.moe.noncausal_ablation` is set.
      random_routing: GShard random routing of the second expert during training.
      random_routing_threshold: keep the second expert when U < g2/threshold (GShard: 0.5).
      jitter_eps: multiplicative jitter on the router input during training (Switch: 1e-2).
      load_balancing_weight: α of the Switch load-balancing loss (1e-2).
      z_loss_weight: β of the router z-loss (ST-MoE: 1e-3; 0 = off).
      sequence_balance_weight: weight of DeepSeek-V3's sequence-wise balance loss (the Switch
        loss counted over each sequence rather than each routing group; DeepSeek-V3: 1e-4).
        Balancers compose: every loss with a non-zero weight adds to the objective.
      global_balance_weight: weight of the global-batch balance loss (Qiu et al. 2025): the
        Switch loss with its counts taken over the whole global batch (every device, process
        and accumulation microbatch, exactly; losses.global_balance_loss). With
        load_balancing_weight it is the Switch loss "per batch" beside "per routing group".
      bias_update_speed: γ of DeepSeek-V3's auxiliary-loss-free balancing (0 = off; DeepSeek-V3:
        1e-3): a per-expert bias `selection_bias`, added to the scores for choosing experts
        only, moved by γ·sign(mean load − load) after every optimizer step from the global
        batch's loads, outside the optimizer (switchmoe/balancing.py).
      expert_dropout: dropout rate on the experts' hidden activations during training.
      shared_d_ff: hidden width of a shared dense FFN applied to every token (0 = none).
      router_init_scale: router kernel ~ truncated normal with variance scale·1/D (Switch uses 0.1
        of the default; 0 gives zeros as in Shazeer et al. 2017, every expert equally likely).
      router_bias: add a learned bias to the router logits.
      router_dtype: precision of the router matmul, "float32" (Switch's selective precision) or
        "bfloat16" (the ablation it argues against); logits and losses are float32 either way.
      init_scale: variance scale of the expert weights' fan-in initialisation (Switch: 0.1).
      activation: "relu", "gelu", "swiglu" or "geglu" (the model's).
      expert_parallelism: None (single device or plain data parallelism), "jit" (sharding
        constraints; the partitioner inserts the all-to-alls) or "shard_map" (explicit all-to-all);
        both split the experts over the mesh axis "expert" and must run under `jax.set_mesh`.
      expert_quantization: "none" (float expert matrices) or "int8": each expert matrix is
        stored as int8 values `w_*` with per-output-channel float32 scales `w_*_scale`
        ([E, 1, F] or [E, 1, D]) and dequantised on the fly by every backend (StackedExperts).
        For evaluation only (int8 values take no gradient): `switchmoe.quantization` makes
        such a run from a trained one.
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

        Fine-grained experts (DeepSeekMoE): `model.moe.granularity` m splits each of the E
        experts of width F into m experts of width F/m and routes each token to m·k of them, so
        the layer has m·E experts, top-(m·k), of width F/m: the same expert parameters and FLOPs
        per token as m = 1, with far more combinations of experts per token (the router alone
        grows, from D·E to D·m·E weights).
        """
        moe = model.moe
        options = routers_lib.REGISTRY[moe.router].options
        values = {name: moe.get(name) for name in options}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        settings = {name: moe[name] for name in SETTINGS}
        m = check_granularity(model)
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
            expert dropout. When False and any of those is active, the "dropout" PRNG stream is used.
          decode: cached decoding (see `_decoding_step`): the first call, on the full length T
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
        groups = x if step else self._groups(x)
        G, S, _ = groups.shape
        self.check_settings(tokens_per_group=None if step else S)
        router = self.make_router()
        if token_ids is not None:
            token_ids = token_ids.reshape(G, S)
        group_mask = None if mask is None else mask.reshape(G, S).astype(bool)

        train = not deterministic
        # The layer's randomness, training only: one key from the "dropout" stream, split into
        # the named streams the router and the experts draw (routers/base.py: STREAMS).
        streams = router.streams(train)
        if train and self.expert_dropout > 0:
            streams += ("expert_dropout",)
        keys = routers_lib.stream_keys(self.make_rng("dropout"), streams) if streams else {}
        bias = balancing.selection_bias(self, E) if self.bias_update_speed else None
        routing = router.route(
            self, groups, token_ids, keys, train, mask=group_mask, selection_bias=bias
        )
        if decode:
            routing = self._decoding_step(router, routing, B, L, step_index)
        # The loads of this call, and the step's totals when the caller passes them.
        counts = router.selection_counts(routing, group_mask)
        totals = balancing.count_loads(self, counts, group_mask, G * S)
        routing = router.with_balance_losses(routing, sequence_length=L, mask=group_mask, **totals)
        self.sow("intermediates", "routing", routing)

        # Batched over experts: fan-in is the axis D (or F) of each expert's matrix.
        expert_init = nn.initializers.variance_scaling(
            self.init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        quantized = self.expert_quantization == "int8"
        if quantized and train:
            raise ValueError(
                "model.moe.expert_quantization='int8' is for evaluation (int8 values take no "
                "gradient): train in float and quantize the trained run (switchmoe.quantization)."
            )
        scales = {}

        def param(name, axes, shape):
            if not quantized:
                init = nn.with_logical_partitioning(expert_init, axes)
                return self.param(name, init, shape, self.param_dtype)
            # Initialised only for their shapes: a quantized layer's values come from
            # switchmoe.quantization.quantize_experts.
            values = self.param(
                name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.int8
            )
            scales[f"{name}_scale"] = self.param(
                f"{name}_scale",
                nn.with_logical_partitioning(nn.initializers.ones, (axes[0], None, axes[2])),
                (shape[0], 1, shape[2]),
                jnp.float32,
            )
            return values

        w_in = param("w_in", ("expert", "embed", "mlp"), (E, D, F))
        w_out = param("w_out", ("expert", "mlp", "embed"), (E, F, D))
        gated = experts_lib.ACTIVATIONS[self.activation][1]
        w_gate = param("w_gate", ("expert", "embed", "mlp"), (E, D, F)) if gated else None

        experts = experts_lib.StackedExperts(
            w_in=w_in,
            w_out=w_out,
            w_gate=w_gate,
            activation=self.activation,
            dtype=self.dtype,
            dropout_rate=self.expert_dropout,
            dropout_key=keys.get("expert_dropout"),
            **scales,
        )
        tokens = groups.astype(self.dtype)
        if self.expert_parallelism:
            y = expert_parallel.expert_parallel_moe(
                self.expert_parallelism, self.backend, tokens, routing.plan, experts
            )
        else:
            y = dispatch_lib.moe_forward(
                self.backend,
                tokens,
                routing.plan,
                experts,
                dropless_implementation=self.dropless_implementation,
                block_size=self.block_size,
            )
        y = y.reshape(B, L, D)

        if self.shared_d_ff:
            y = y + DenseFFN(
                self.shared_d_ff,
                self.activation,
                self.dtype,
                init_scale=self.init_scale,
                param_dtype=self.param_dtype,
                name="shared",
            )(x)

        # The one place loss weights are applied: the objective adds `loss`, the metrics report
        # `weighted_losses` (what each loss adds) and `losses` (unweighted).
        weights = router.loss_weights()
        weighted = {name: weights[name] * value for name, value in routing.losses.items()}
        return y.astype(self.dtype), {
            "loss": sum(weighted.values()),
            "losses": routing.losses,
            "weighted_losses": weighted,
            "stats": routing.stats,
        }

    def _decoding_step(self, router, routing, B: int, L: int, step_index: Optional[Array]):
        """The routing of one decoding step, made what a full pass would have decided.

        Cache ("cache" collection): `requests` int32[B, T, K], the experts each position asked
        for (-1: none), whose shape fixes T; the position comes from the model (`step_index`,
        model.DecodePosition). In a full pass over T
        positions a causal router places a (token, choice) in its expert's buffer iff fewer than
        C choices of earlier tokens in its group asked for that expert (in-order priority,
        token-major: routing.assign_slots), with C = the router's capacity for the group. A step
        routes its token alone (every choice fits a 1-slot buffer) and then keeps a choice only
        if the cached requests of its group leave it a slot. Groups are rows (group_size None)
        or runs of group_size positions within a row. Dropless routing needs no counting.
        """
        K = routing.expert.shape[-1]
        requests = self.variable("cache", "requests", jnp.zeros, (B, L, K), jnp.int32)
        if step_index is None:  # the call that creates the cache routes the full length as usual
            return routing
        T = requests.value.shape[1]
        S = T if self.group_size is None else self.group_size
        if T % S:
            raise ValueError(
                f"cached decoding needs group_size={self.group_size} to divide the cache length "
                f"{T} (each group a run of positions within one row)."
            )
        i = step_index
        expert = routing.expert[:, 0]  # [B, K]
        asked = routing.slot[:, 0] >= 0  # [B, K]
        requests.value = jax.lax.dynamic_update_slice_in_dim(
            requests.value, jnp.where(asked, expert, -1)[:, None], i, axis=1
        )
        capacity = router.capacity(S, train=False)
        if capacity is None:
            return routing
        position = jnp.arange(T)
        earlier = (position < i) & (position // S == i // S)  # [T]: this group, before i
        hits = (requests.value[:, :, :, None] == jnp.arange(self.num_experts)) & earlier[
            None, :, None, None
        ]  # [B, T, K, E]
        counts = jnp.sum(hits, axis=(1, 2), dtype=jnp.int32)  # [B, E]
        kept = asked & (jnp.take_along_axis(counts, expert, axis=1) < capacity)
        plan = routing.plan.replace(
            slot=jnp.where(kept, 0, -1)[:, None].astype(jnp.int32),
            gate=jnp.where(kept[:, None], routing.gate, 0.0),
        )
        return routing.replace(plan=plan)


def check_granularity(model: ml_collections.ConfigDict) -> int:
    """`model.moe.granularity` m, checked: a positive integer dividing the expert width, with a
    token-choice router. Raises ValueError naming the setting and what is allowed."""
    moe = model.moe
    m = moe.get("granularity", 1)
    if not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
        raise ValueError(f"model.moe.granularity must be an integer >= 1; got {m!r}.")
    if m == 1:
        return m
    width = moe.get("expert_d_ff") or model.d_ff
    if width % m:
        divisors = [d for d in range(1, width + 1) if width % d == 0 and d <= 64]
        raise ValueError(
            f"model.moe.granularity={m} must divide the expert width "
            f"{'model.moe.expert_d_ff' if moe.get('expert_d_ff') else 'model.d_ff'}={width} "
            f"(each expert is split into m experts of width F/m); allowed: {divisors}."
        )
    granular = tuple(n for n, r in routers_lib.REGISTRY.items() if r.supports_granularity)
    if not routers_lib.REGISTRY.get(moe.router, routers_lib.Router).supports_granularity:
        raise ValueError(
            f"model.moe.granularity={m} applies to token-choice routers {granular} (a token "
            f"picks m·k experts); got model.moe.router={moe.router!r}."
        )
    return m


# The MoeLayer fields a config's `model.moe` block sets (by the same names); the rest come from
# the model (sizes, activation, dtypes) or the run (expert parallelism).
SETTINGS = tuple(
    f.name
    for f in dataclasses.fields(MoeLayer)
    if f.name
    not in ("parent", "name", "num_experts", "d_ff", "router_options", "activation",
            "expert_parallelism", "dtype", "param_dtype")
)  # fmt: skip
