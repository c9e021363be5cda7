"""Which blocks of a stack are MoE blocks, and the router each MoE block routes with.

The settings (`model.moe`):
  moe_every, moe_layers  which blocks are MoE blocks (`is_moe_block`);
  block_routers          None: every MoE block routes with `router`. Or one router name per MoE
                         block of a decoder-only model, in block order: DeepSeek-V4 routes its
                         first MoE blocks by a fixed token -> expert hash and the rest by learned
                         scores, e.g. ('hash', 'hash', 'top_k', 'top_k').

What differs between blocks is the router and nothing else. Each router reads its own options
from the same flat `model.moe` (no two routers share an option name: routers.all_options), and
every layer setting (k, capacity factors, group size, balance-loss weights, backend) is the one
the config sets, with one exception: the selection bias of auxiliary-loss-free balancing
(`bias_update_speed`) is kept by the blocks whose router picks experts by a top-k of scores and
left out of the others (a hash block has no scores to bias), so one setting serves a model that
mixes the two. A model in which no block could take the bias is refused.

`block_view(model, router)` is the `model` block as an MoE block with that router sees it:
`model.moe.router` is the block's router. The layer, its validation and every check that asks a
router something read a view, so nothing below the model knows that blocks differ; with
`block_routers` None the view is `model` itself (the same object: a model with one router is
built exactly as before this setting existed).
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from switchmoe.moe import routers as routers_lib


def is_moe_block(
    index: int, num_experts: int, moe_every: int, moe_layers: tuple[int, ...] | None = None
) -> bool:
    """Block `index` (0-based) is an MoE block: the last of every `moe_every` blocks, or, when
    `moe_layers` lists the MoE blocks explicitly, one of them.

    With moe_every=2 blocks 1, 3, 5… are MoE (Switch, GShard); with 4, blocks 3, 7, 11… (ST-MoE).
    An explicit list says what a rule cannot: DeepSeek's first k dense blocks, Qwen's
    `mlp_only_layers`.
    """
    if num_experts <= 0:
        return False
    if moe_layers is not None:
        return index in moe_layers
    return (index + 1) % moe_every == 0


def moe_block_indices(model: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The indices of a decoder-only model's MoE blocks, in order."""
    moe = model.moe
    return tuple(
        i
        for i in range(model.num_layers)
        if is_moe_block(i, moe.num_experts, moe.moe_every, moe.get("moe_layers"))
    )


def block_routers(model: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The router of each MoE block of a decoder-only model, in block order."""
    names = model.moe.get("block_routers")
    if names is None:
        return (model.moe.router,) * len(moe_block_indices(model))
    return tuple(names)


def router_names(moe: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The distinct routers of the MoE blocks, in order of first use."""
    return tuple(dict.fromkeys(moe.get("block_routers") or (moe.router,)))


def router_of_block(model: ml_collections.ConfigDict, index: int) -> str:
    """The router of block `index` (an MoE block) of the model's stack."""
    if model.moe.get("block_routers") is None:
        return model.moe.router
    return dict(zip(moe_block_indices(model), model.moe.block_routers))[index]


def block_view(
    model: ml_collections.ConfigDict, router: Optional[str] = None
) -> ml_collections.ConfigDict:
    """`model` as an MoE block routed by `router` sees it (module docstring); `model` itself
    when the config names no router per block."""
    if model.moe.get("block_routers") is None:
        return model
    view = ml_collections.ConfigDict(model.to_dict())
    with view.unlocked():
        view.moe = moe_view(model.moe, router)
    return view


def moe_view(moe: ml_collections.ConfigDict, router: str) -> ml_collections.ConfigDict:
    """The `model.moe` block of `block_view`: what the router of such a block reads."""
    if moe.get("block_routers") is None:
        return moe
    view = ml_collections.ConfigDict(moe.to_dict())
    with view.unlocked():
        view.router = router
        view.block_routers = None
        if not routers_lib.REGISTRY[router].supports_selection_bias:
            view.bias_update_speed = 0.0
    return view


def moe_views(moe: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """`moe_view` for each distinct router of the blocks, in order of first use."""
    if moe.get("block_routers") is None:
        return [moe]
    return [moe_view(moe, name) for name in router_names(moe)]


def router_views(model: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One view per distinct router of the model's MoE blocks, in order of first use: what a check
    that asks the router something (causality, options, settings) runs over."""
    if model.moe.get("block_routers") is None:
        return [model]
    return [block_view(model, name) for name in router_names(model.moe)]


def check_block_routers(model: ml_collections.ConfigDict) -> None:
    """`model.moe.block_routers`: one registered router per MoE block of a decoder-only model."""
    names = model.moe.get("block_routers")
    if names is None or not model.moe.num_experts:
        return
    if model.get("arch", "decoder") != "decoder":
        raise ValueError(
            "model.moe.block_routers names the routers of a decoder-only model's MoE blocks; got "
            f"model.arch={model.arch!r}. Use None (every MoE block routes with model.moe.router)."
        )
    count = len(moe_block_indices(model))
    if not isinstance(names, (list, tuple)) or len(names) != count:
        raise ValueError(
            f"model.moe.block_routers must name one router per MoE block: {count} for the blocks "
            f"{moe_block_indices(model)} of this model; got {names!r} (or None: every MoE block "
            "routes with model.moe.router)."
        )
    for i, name in enumerate(names):
        if name not in routers_lib.REGISTRY:
            raise ValueError(
                f"model.moe.block_routers[{i}]={name!r} is not a router; allowed: "
                f"{routers_lib.NAMES}."
            )
    biased = [n for n in names if routers_lib.REGISTRY[n].supports_selection_bias]
    if model.moe.get("bias_update_speed", 0.0) and not biased:
        allowed = tuple(n for n, r in routers_lib.REGISTRY.items() if r.supports_selection_bias)
        raise ValueError(
            f"model.moe.bias_update_speed applies to the MoE blocks whose router picks experts "
            f"by a top-k of scores {allowed}; none of model.moe.block_routers={tuple(names)} "
            "does. Allowed: such a router in at least one block, or bias_update_speed=0."
        )
