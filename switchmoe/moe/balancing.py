"""Load counting over a whole step, and DeepSeek-V3's auxiliary-loss-free bias balancing.

Shape legend: E experts.

Two balancers need the loads of the whole global batch rather than of one routing group:

- the global-batch balance loss (losses.global_balance_loss, Qiu et al. 2025), whose f_i counts
  every token of every device, process and accumulation microbatch;
- auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3): a bias b_i per
  expert is added to the scores for choosing the top K only (never to the gates), and after each
  optimizer step moves by  b_i ← b_i + γ · sign(mean_j c_j − c_i),  c_i being the number of
  choices of expert i over the step's global batch: an overloaded expert's bias falls, an
  underloaded one's rises, and no gradient is involved.

Every MoE layer sows its loads into the collection `COUNTS` ("counts" [E]: choices per expert,
and "tokens": the real tokens routed), which is empty unless the caller makes it mutable. Under
jit the arrays are global, so one call counts every device and process; a step in microbatches
sums the microbatches' counts (`add_counts`). A layer reads the step's totals from the collection
`TOTALS` when the caller provides them (the global-batch loss under accumulation).

The bias lives in the parameters as `selection_bias` (so it is placed, checkpointed and restored
with them), receives no gradient (the layer stops it), and the optimizer leaves it alone
(`optim.parameter_labels` gives it to optax.set_to_zero: no update, no weight decay, no state);
the train step then applies `update_biases`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from switchmoe.moe.experts import layer_order

Array = jax.Array

BIAS = "selection_bias"  # the parameter of an MoE layer with bias balancing
COUNTS = "balance"  # the collection of loads the layers sow
TOTALS = "balance_totals"  # the collection of a step's totals a layer may read

TRAINED, RULE = "trained", "rule"  # optimizer partitions (optax.multi_transform labels)


def is_bias(path: tuple) -> bool:
    return bool(path) and path[-1] == BIAS


def add_counts(a: Any, b: Any) -> Any:
    """Sums two `COUNTS` trees (two microbatches' loads)."""
    return jax.tree.map(jnp.add, a, b)


def totals_for_microbatches(counts: Any, num_microbatches: int) -> Any:
    """The `TOTALS` a layer reads, from the `COUNTS` summed over a step's microbatches:
    the counts as they are, and the real tokens per microbatch on average (the denominator that
    makes the mean of the microbatches' losses the global-batch loss)."""
    flat = traverse_util.flatten_dict(counts)
    return traverse_util.unflatten_dict(
        {
            path: value / num_microbatches if path[-1] == "tokens" else value
            for path, value in flat.items()
        }
    )


def bias_update(bias: Array, counts: Array, speed: float) -> Array:
    """b + γ·sign(mean(c) − c): the auxiliary-loss-free rule for one layer (float32[E])."""
    return bias + speed * jnp.sign(jnp.mean(counts) - counts)


def update_biases(params: Any, counts: Any, speed: float) -> Any:
    """`params` with every MoE layer's selection bias moved by the rule, from that layer's loads
    in `counts` (a `COUNTS` tree of the step: same module paths as the parameters)."""
    flat = traverse_util.flatten_dict(params)
    loads = traverse_util.flatten_dict(counts)
    out = {}
    for path, value in flat.items():
        if is_bias(path):
            value = bias_update(value, loads[path[:-1] + ("counts",)], speed)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def stacked_biases(params: Any) -> Array | None:
    """The selection biases [num_moe_layers, E] in the order of the layers' names (block_2
    before block_10), for the metrics; None when no layer has one."""
    flat = {p: v for p, v in traverse_util.flatten_dict(params).items() if is_bias(p)}
    if not flat:
        return None
    return jnp.stack([flat[p] for p in sorted(flat, key=layer_order)])


# -- What an MoE layer does for balancing (called from its __call__) ---------------------------


def selection_bias(layer: nn.Module, num_experts: int) -> Array:
    """The layer's selection bias [E] (a parameter, zeros at init), without gradient: it is moved
    by `update_biases` after each step, never by the optimizer."""
    init = nn.with_logical_partitioning(nn.initializers.zeros, (None,))
    bias = layer.param(BIAS, init, (num_experts,), jnp.float32)
    return jax.lax.stop_gradient(bias)


def count_loads(
    layer: nn.Module, counts: Array, mask: Array | None, num_tokens: int
) -> dict[str, Array]:
    """Sows this call's loads into COUNTS: `counts` (the router's selection counts) and the
    tokens routed (`num_tokens` = G·S, or the unmasked ones with `mask`, bool [G, S]). They serve
    the bias update and a multi-microbatch step's global-batch loss, and sowing is a no-op unless
    the caller makes the collection mutable. Returns the step's totals when the caller passed
    them in TOTALS ({'global_counts', 'global_tokens'}), else {}."""
    tokens = jnp.float32(num_tokens) if mask is None else jnp.sum(mask, dtype=jnp.float32)
    for name, value in (("counts", counts), ("tokens", tokens)):
        layer.sow(COUNTS, name, value, init_fn=lambda: 0.0, reduce_fn=jnp.add)
    if not layer.has_variable(TOTALS, "counts"):
        return {}
    return {
        "global_counts": layer.get_variable(TOTALS, "counts"),
        "global_tokens": layer.get_variable(TOTALS, "tokens"),
    }


# -- What a train step does with the loads (the trainer's seams; switchmoe/training/seams.py) --


class StepLoads:
    """How a train step collects its layers' loads: the collection it makes mutable, the totals
    it passes back in, and whether a step in microbatches must count every microbatch before
    differentiating any (the global-batch loss needs the whole step's loads: one more forward
    pass per step, only with global_balance_weight > 0 and grad_accum_steps > 1)."""

    collections = (COUNTS,)

    def __init__(self, config):
        moe = config.model.moe
        self.count_first = (
            bool(moe.num_experts) and moe.get("global_balance_weight", 0.0) > 0
            and config.get("grad_accum_steps", 1) > 1
        )  # fmt: skip

    @staticmethod
    def variables(totals: Any) -> dict:
        """The variables a forward pass reads beside the parameters: the step's totals, if any."""
        return {} if totals is None else {TOTALS: totals}

    @staticmethod
    def read(sown: dict) -> Any:
        """This pass's loads from what it sowed."""
        return sown.get(COUNTS, {})

    totals = staticmethod(totals_for_microbatches)


class BiasRule:
    """The selection-bias update applied after the optimizer (an `AfterOptimizer` of the train
    step): from the loads of the whole global batch, outside the optimizer."""

    def __init__(self, speed: float):
        self.speed = speed

    @classmethod
    def for_config(cls, config) -> "BiasRule | None":
        moe = config.model.moe
        speed = moe.get("bias_update_speed", 0.0) if moe.num_experts else 0.0
        return cls(speed) if speed else None

    def apply(self, params: Any, loads: Any) -> Any:
        return update_biases(params, loads, self.speed)

    def metrics(self, params: Any) -> dict:
        biases = stacked_biases(params)
        return {} if biases is None else {"train/selection_bias": biases}
