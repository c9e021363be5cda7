"""switchmoe: sparse Mixture-of-Experts Transformers in JAX/Flax.

Routing decides, dispatch moves, experts compute:
  - `switchmoe.routing`  routers: logits -> one `RoutingResult` (expert, slot, gate per choice).
  - `switchmoe.losses`   auxiliary losses and routing statistics.
  - `switchmoe.dispatch` backends that move tokens to stacked experts and back.
  - `switchmoe.experts`  the stacked expert FFNs.
  - `switchmoe.moe_layer` the Flax module that ties them together.
"""

__version__ = "0.1.0"
