"""Every router the MoE layer offers, by name: the registry the layer and the config read.

Each router is one module here holding its maths (plain functions over logits, testable without
Flax) and a `Router` subclass saying what it is (switchmoe/moe/routers/base.py). Adding a router is
one new module and one line below.
"""

from __future__ import annotations

from typing import Any, Mapping

from switchmoe.moe.routers.base import Option, Router, stream_keys  # noqa: F401  (the layer's)
from switchmoe.moe.routers.dselect_k import DSelectK
from switchmoe.moe.routers.expert_choice import ExpertChoice
from switchmoe.moe.routers.hash import Hash
from switchmoe.moe.routers.noisy_top_k import NoisyTopK
from switchmoe.moe.routers.sbase import SBase
from switchmoe.moe.routers.top_k import TopK

REGISTRY: dict[str, type[Router]] = {
    cls.name: cls for cls in (TopK, ExpertChoice, NoisyTopK, Hash, SBase, DSelectK)
}
NAMES = tuple(REGISTRY)
DEFAULT = TopK.name  # Switch's


def all_options() -> dict[str, Option]:
    """Every router's own settings, by name (the config's `model.moe` holds them flat)."""
    out: dict[str, Option] = {}
    for cls in REGISTRY.values():
        for name, option in cls.options.items():
            if name in out:
                raise ValueError(f"router option {name!r} is declared by two routers")
            out[name] = option
    return out


def make_router(settings: Any, option_values: Mapping[str, Any] | None = None) -> Router:
    """The router `settings.router` names, over `settings` (an MoeLayer or a `model.moe` block).

    option_values: the router's own settings; by default read from `settings` itself (a config
    block holds them flat). The one place that reads the dispatch backend's name for routing:
    the router is told only whether its plan is dropless.
    """
    if settings.router not in REGISTRY:
        raise ValueError(f"router must be one of {NAMES}; got {settings.router!r}.")
    cls = REGISTRY[settings.router]
    if option_values is None:
        option_values = {name: getattr(settings, name, None) for name in cls.options}
    unknown = set(option_values) - set(cls.options)
    if unknown:
        raise ValueError(
            f"router={settings.router!r} has no option(s) {sorted(unknown)}; its options: "
            f"{sorted(cls.options) or 'none'}."
        )
    dropless = getattr(settings, "backend", None) == "dropless"
    return cls(settings, dict(option_values), dropless=dropless)
