"""The Router interface: what every router owns, so that the MoE layer and the config only ask.

Shape legend: G groups, S tokens per group, D model width, E experts, K choices per token.

A router is a small frozen object over the MoE settings: an `MoeLayer`, or a config's
`model.moe` block (anything that has the layer's settings as attributes), plus the options only
that router reads (`Router.options`, e.g. S-BASE's Sinkhorn iterations). Outside any trace it
answers what the layer, the config validation, the reports and the FLOP counts ask:

  name                  the registry key (`model.moe.router`)
  noncausal_reason()    None when a token's routing depends only on earlier tokens of its group;
                        else why not (a decoder-only LM refuses it unless it is an ablation)
  choices_per_token     K of the RoutingResult it returns
  experts_per_token     experts that process a token on average (active FLOPs and parameters)
  capacity(S, train)    static slots per expert per group, None when nothing can drop
  streams(train)        the PRNG streams it draws (`STREAMS`), by name
  loss_weights()        the weight of every loss it reports (the layer applies them, once)
  check(prefix, S)      ValueError naming a setting it cannot serve, before anything compiles
  prepare(config)       derived settings filled when a run starts (the hash router's table)

and inside the layer's compact call, `route(layer, groups, token_ids, keys, train, mask,
selection_bias)` creates its parameters on the layer (so their names sit directly under the MoE
layer, as they always have) and returns a `RoutingResult`. `mask` (bool[G, S], False at padded
positions) must keep pads from taking slots and out of the losses and statistics; a router that
can take `selection_bias` [E] (auxiliary-loss-free balancing) says so in
`supports_selection_bias`.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchmoe.moe import losses as losses_lib
from switchmoe.moe import routing as routing_lib

Array = jax.Array


class Option(NamedTuple):
    """A setting only one router reads: its default and what it means (the config's comment)."""

    default: Any
    doc: str
    type: type = float


# PRNG streams a layer may draw while training, all from one key of Flax's "dropout" stream.
# The first four are the streams the layer has always drawn, in the order of a 4-way split, so
# a run written before streams had names resumes bitwise; any other name is folded in by a
# stable hash of the name.
STREAMS = ("jitter", "random_routing", "expert_dropout", "noise")


def stream_keys(key: Array, names) -> dict[str, Array]:
    """{name: PRNG key} for the named streams, derived from one key."""
    split = jax.random.split(key, len(STREAMS))
    return {
        name: split[STREAMS.index(name)]
        if name in STREAMS
        else jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        for name in names
    }


@dataclasses.dataclass(frozen=True)
class Router:
    """Base class: a token-choice router over learned logits; subclasses override what differs.

    settings: the MoE settings (attribute access); options: this router's own settings (defaults
    from `options`, values from the layer's `router_options` or the config's `model.moe`).
    """

    settings: Any
    option_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Whether the dispatch plan this router fills has no capacity (every choice gets a slot).
    # What the layer's dispatch is called is the layer's business; `routers.make_router` tells
    # the router only this fact, which its capacity rule needs.
    dropless: bool = False

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    # Settings that only some routers read; a router that does not lists them here so that
    # setting them with it is an error rather than silently ignored.
    supports_batch_prioritized: ClassVar[bool] = False
    # Routers that pick experts by a top-k of scores, to which a balancing bias can be added.
    supports_selection_bias: ClassVar[bool] = False
    # Token-choice routers whose m·k choices can mean m·k experts of width F/m
    # (`model.moe.granularity`, DeepSeekMoE's fine-grained experts).
    supports_granularity: ClassVar[bool] = False

    def option(self, name: str) -> Any:
        value = self.option_values.get(name)
        return self.options[name].default if value is None else value

    @property
    def num_experts(self) -> int:
        return self.settings.num_experts

    # -- what it is ---------------------------------------------------------------------------

    @property
    def choices_per_token(self) -> int:
        return self.settings.num_selected

    @property
    def experts_per_token(self) -> float:
        return self.choices_per_token

    def noncausal_reason(self) -> Optional[str]:
        return None

    def capacity(self, tokens_per_group: int, train: bool) -> Optional[int]:
        """Static C per group (C = ceil(K·S/E·factor), see routing.expert_capacity); None when
        the plan is dropless."""
        if self.dropless:
            return None
        return self._factor_capacity(tokens_per_group, train, self.choices_per_token)

    def _factor_capacity(self, tokens_per_group: int, train: bool, k: int) -> int:
        s = self.settings
        factor = s.train_capacity_factor if train else s.eval_capacity_factor
        return routing_lib.expert_capacity(
            tokens_per_group, self.num_experts, k, factor, s.min_capacity
        )

    def streams(self, train: bool) -> tuple[str, ...]:
        return ("jitter",) if train and self.settings.jitter_eps > 0 else ()

    def loss_weights(self) -> dict[str, float]:
        s = self.settings
        return {
            "load_balancing": s.load_balancing_weight,
            "z_loss": s.z_loss_weight,
            "sequence_balance": s.sequence_balance_weight,
            "global_balance": s.global_balance_weight,
        }

    def aux_outputs(self, result: routing_lib.RoutingResult) -> dict[str, Any]:
        """The layer's aux output: {"loss": the weighted sum the objective adds, "losses"
        (unweighted), "weighted_losses" (what each adds), "stats"}. The one place loss weights
        are applied."""
        weights = self.loss_weights()
        weighted = {name: weights[name] * value for name, value in result.losses.items()}
        return {
            "loss": sum(weighted.values()),
            "losses": result.losses,
            "weighted_losses": weighted,
            "stats": result.stats,
        }

    def preferences(self, result: routing_lib.RoutingResult) -> Array:
        """int32[G, S, K']: the experts each token asked for, before capacity (what balance
        losses count); token-choice routers' own choices."""
        return result.expert

    def with_balance_losses(
        self,
        result: routing_lib.RoutingResult,
        sequence_length: int,
        mask: Optional[Array] = None,
        global_counts: Optional[Array] = None,
        global_tokens: Optional[Array] = None,
    ) -> routing_lib.RoutingResult:
        """`result` with the balance losses every router reports beside its own: the
        sequence-wise loss (losses.sequence_balance_loss) over sequences of `sequence_length`,
        and the global-batch loss (losses.global_balance_loss; `global_counts` and
        `global_tokens` when the step counted them over several microbatches)."""
        preferences = self.preferences(result)
        balance = {
            "sequence_balance": losses_lib.sequence_balance_loss(
                result.probs, preferences, sequence_length, mask
            ),
            "global_balance": losses_lib.global_balance_loss(
                result.probs, preferences, mask,
                global_counts=global_counts, global_tokens=global_tokens,
            ),
        }  # fmt: skip
        return result.replace(losses={**result.losses, **balance})

    def selection_counts(self, result: routing_lib.RoutingResult, mask=None) -> Array:
        """float32[E]: (real token, choice) pairs that chose each expert, before capacity: the
        loads the global-batch loss and the bias balancing read."""
        return losses_lib.selection_counts(self.preferences(result), mask, self.num_experts)

    def check(self, prefix: str = "", tokens_per_group: Optional[int] = None) -> None:
        """Raises ValueError for settings this router cannot serve (names carry `prefix`);
        `tokens_per_group` is S where the caller knows it."""
        s = self.settings
        if s.batch_prioritized and not self.supports_batch_prioritized:
            raise ValueError(
                f"{prefix}batch_prioritized applies to the routers that claim slots in a "
                f"priority order ({', '.join(_with_batch_priority())}); got "
                f"{prefix}router={self.name!r}."
            )
        if s.bias_update_speed and not self.supports_selection_bias:
            raise ValueError(
                f"{prefix}bias_update_speed (auxiliary-loss-free balancing) applies to the "
                f"routers that pick experts by a top-k of scores "
                f"({', '.join(_with_selection_bias())}); got {prefix}router={self.name!r}."
            )

    def prepare(self, config) -> None:
        """Fills settings derived when a run starts into `config` (unlocked); most have none."""

    # -- what it does -------------------------------------------------------------------------

    def route(
        self, layer, groups, token_ids, keys, train, mask=None, selection_bias=None
    ) -> routing_lib.RoutingResult:
        raise NotImplementedError

    def learned_logits(
        self, layer: nn.Module, groups: Array, keys: Mapping[str, Array], zero_init: bool = False
    ) -> tuple[Array, Any]:
        """The router's linear scores h = x·W_r (+ b) on groups[G, S, D], float32 [G, S, E].

        Creates `router_kernel` [D, E] (and `router_bias` [E]) on `layer` and records the logits
        as the intermediate "router_logits". Returns the logits and `scores(kernel, bias)`,
        which computes further linear scores of the same (jittered) input.
        """
        s = self.settings
        D, E = groups.shape[-1], self.num_experts
        scale = s.router_init_scale
        kernel = router_weights(
            layer, "router_kernel", nn.initializers.zeros if zero_init or scale == 0 else
            nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal"), D, E,
        )  # fmt: skip
        bias = None
        if s.router_bias:
            bias = layer.param(
                "router_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                (E,),
                layer.param_dtype,
            )
        jitter_key = keys.get("jitter")

        def scores(kernel, bias):
            return routing_lib.router_logits(
                groups,
                kernel,
                bias,
                jitter_key=jitter_key,
                jitter_eps=s.jitter_eps,
                dtype=jnp.dtype(s.router_dtype),
            )

        logits = scores(kernel, bias)
        layer.sow("intermediates", "router_logits", logits)
        return logits, scores


def router_weights(layer: nn.Module, name: str, init, d_model: int, num_experts: int) -> Array:
    """A [D, E] router weight on `layer`, replicated over the mesh (logical axes embed, None)."""
    return layer.param(
        name,
        nn.with_logical_partitioning(init, ("embed", None)),
        (d_model, num_experts),
        layer.param_dtype,
    )


def _with_selection_bias() -> tuple[str, ...]:
    from switchmoe.moe.routers import REGISTRY  # noqa: PLC0415  (the registry imports this module)

    return tuple(n for n, r in REGISTRY.items() if r.supports_selection_bias)


def _with_batch_priority() -> tuple[str, ...]:
    from switchmoe.moe.routers import REGISTRY  # noqa: PLC0415  (the registry imports this module)

    return tuple(n for n, r in REGISTRY.items() if r.supports_batch_prioritized)
