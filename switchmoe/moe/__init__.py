"""The MoE core, in the order a token meets it: `routing` (the routing result, slot
assignment, capacity) and `routers/` (what each router is), `losses` (auxiliary losses and
routing statistics), `balancing` (loss-free bias balancing and load counts), `dispatch` (the
backends that move tokens to stacked experts and back), `experts` (the stacked expert FFNs),
`expert_parallel` (experts across a mesh), `settings` (the layer's settings, checked in one
place) and `layer` (the Flax module that wires them).
"""
