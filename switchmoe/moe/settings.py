"""The one validation of the MoE settings, for an `MoeLayer` and a config's `model.moe` alike.

`MoeLayer.check_settings` runs it when the layer is traced; `config.validate_config` runs it on
`MoeLayer.from_config(model)` with the prefix "model.moe.", before anything is compiled or
written. Router-specific checks are the router's (`Router.check`).
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from switchmoe.moe import dispatch as dispatch_lib
from switchmoe.moe import experts as experts_lib
from switchmoe.moe import routers as routers_lib
from switchmoe.moe.routing import GATE_NORMS


def _positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be > 0; got {value!r}.")


def check_settings(s, prefix: str = "", tokens_per_group: Optional[int] = None) -> None:
    """Raises ValueError naming the setting (with `prefix`) and what is allowed.

    s: an MoeLayer (anything with its settings as attributes and `make_router()`);
    tokens_per_group: S where the caller knows it.
    """
    if s.num_experts < 1:
        raise ValueError(f"{prefix}num_experts must be >= 1; got {s.num_experts}.")
    if not 1 <= s.num_selected <= s.num_experts:
        raise ValueError(
            f"{prefix}num_selected (k) must be in [1, {prefix}num_experts={s.num_experts}]; "
            f"got {s.num_selected}."
        )
    _one_of(prefix + "router", s.router, routers_lib.NAMES)
    _one_of(prefix + "backend", s.backend, dispatch_lib.BACKENDS)
    if s.dropless_implementation not in (None, *dispatch_lib.DROPLESS_IMPLEMENTATIONS):
        raise ValueError(
            f"{prefix}dropless_implementation must be None or one of "
            f"{dispatch_lib.DROPLESS_IMPLEMENTATIONS}; got {s.dropless_implementation!r}."
        )
    if s.block_size is not None:
        _positive(prefix + "block_size", s.block_size)
    _positive(prefix + "train_capacity_factor", s.train_capacity_factor)
    _positive(prefix + "eval_capacity_factor", s.eval_capacity_factor)
    if s.min_capacity < 1:
        raise ValueError(f"{prefix}min_capacity must be >= 1; got {s.min_capacity}.")
    _one_of(prefix + "gate_norm", s.gate_norm, GATE_NORMS)
    _one_of(prefix + "router_dtype", s.router_dtype, ("float32", "bfloat16"))
    if s.group_size is not None:
        _positive(prefix + "group_size", s.group_size)
    if not 0.0 <= s.jitter_eps < 1.0:
        raise ValueError(
            f"{prefix}jitter_eps must be in [0, 1) (the input is scaled by U(1-ε, 1+ε)); "
            f"got {s.jitter_eps}."
        )
    nonnegative = ("load_balancing_weight", "z_loss_weight", "sequence_balance_weight",
                   "global_balance_weight", "bias_update_speed", "shared_d_ff",
                   "router_init_scale")  # fmt: skip
    for name in nonnegative:
        if not getattr(s, name) >= 0:
            raise ValueError(f"{prefix}{name} must be >= 0; got {getattr(s, name)!r}.")
    if getattr(s, "shared_gate", False) and not s.shared_d_ff:
        raise ValueError(
            f"{prefix}shared_gate gates the shared expert: it needs {prefix}shared_d_ff > 0; "
            f"got {prefix}shared_d_ff={s.shared_d_ff}."
        )
    _positive(prefix + "init_scale", s.init_scale)
    _positive(prefix + "random_routing_threshold", s.random_routing_threshold)
    if not 0.0 <= s.expert_dropout < 1.0:
        raise ValueError(f"{prefix}expert_dropout must be in [0, 1); got {s.expert_dropout}.")
    if s.random_routing and s.num_selected < 2:
        raise ValueError(
            f"{prefix}random_routing (GShard second-expert routing) needs {prefix}num_selected "
            f">= 2; got {prefix}num_selected={s.num_selected}."
        )
    experts_lib.check_activation(s.activation)
    _one_of(prefix + "expert_quantization", s.expert_quantization, EXPERT_QUANTIZATIONS)
    if s.expert_quantization != "none" and getattr(s, "expert_parallelism", None):
        raise ValueError(
            f"{prefix}expert_quantization={s.expert_quantization!r} evaluates on one device or "
            "data-parallel: set mesh.expert=1 (quantized experts are not split over devices)."
        )
    s.make_router().check(prefix, tokens_per_group)


# 'none': float expert matrices; 'int8': weight-only int8 with per-output-channel scales, for
# evaluation (switchmoe/compress/quantization.py).
EXPERT_QUANTIZATIONS = ("none", "int8")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}.")


def check_granularity(model: ml_collections.ConfigDict) -> int:
    """`model.moe.granularity` m, checked: a positive integer dividing the expert width, with a
    router that supports it. Raises ValueError naming the setting and what is allowed.

    Fine-grained experts (DeepSeekMoE): m splits each of the E experts of width F into m experts
    of width F/m and routes each token to m·k of them, so the layer has m·E experts, top-(m·k),
    of width F/m: the same expert parameters and FLOPs per token as m = 1, with far more
    combinations of experts per token (the router alone grows, from D·E to D·m·E weights)."""
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
