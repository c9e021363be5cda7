"""DSelect-k (Hazimeh et al. 2021, "DSelect-k: Differentiable Selection in the Mixture of
Experts"): k selectors, each a smooth relaxation of picking one expert by its binary code.

Shape legend: G groups, S tokens per group, D model width, E experts, k selectors
(`num_selected`), m = ceil(log2 E) bits per expert code.

For a token x, selector i has m scores z_i = x·Z_i and the k selectors have weights
w = softmax(x·W). With the cubic smooth-step

  S(t) = 0                               t <= -γ/2
         -2/γ³ · t³ + 3/(2γ) · t + 1/2    -γ/2 <= t <= γ/2
         1                               t >= γ/2

selector i puts on expert e, whose code has bits b_j(e) = (e >> j) & 1,

  r_i(e) = Π_j  S(z_ij)^b_j(e) · (1 − S(z_ij))^(1 − b_j(e)),

a distribution over the 2^m codes (each factor is a two-way split); when E is not a power of two,
r_i is restricted to the E codes in use and renormalised (a selector that saturates on an unused
code then contributes nothing to that token: prefer E a power of two). The gate of expert e is
q(e) = Σ_i w_i · r_i(e). S is exactly 0 or 1 outside [-γ/2, γ/2], so once every |z_ij| >= γ/2
each r_i is one-hot and the layer uses at most k experts per token: the selectors learn to become
hard, helped by the entropy regulariser λ · mean over tokens of Σ_i H(r_i) (loss
"selector_entropy").

Training routes every expert with q(e) > 0 (choice e of a token is expert e, as in expert-choice's
representation, with capacity for K = E choices, i.e. up to S slots per expert: nothing drops
while the selectors are still soft, and the cost is that of the experts the gates use). At
evaluation each selector picks its most likely expert, with gate w_i: k choices per token, the
eval capacity factor. Both place tokens in sequence order, so routing is causal. DSelect-k has no
softmax logits: `logits` is zero and there is no z-loss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from switchmoe.moe import losses as losses_lib
from switchmoe.moe import routing as routing_lib
from switchmoe.moe.routers.base import Option, Router, router_weights
from switchmoe.moe.routing import RoutingResult, assign_slots, build_result

Array = jax.Array


def smooth_step(t: Array, gamma: float) -> Array:
    """The cubic smooth-step S(t): 0 below -γ/2, 1 above γ/2, C¹ in between."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def code_bits(num_experts: int) -> np.ndarray:
    """bool[E, m]: bit j of expert e's binary code, m = ceil(log2 E)."""
    m = max(1, math.ceil(math.log2(num_experts)))
    return (np.arange(num_experts)[:, None] >> np.arange(m)[None, :]) & 1 == 1


def selector_outputs(z: Array, num_experts: int, gamma: float) -> Array:
    """z[..., k, m] -> r[..., k, E]: each selector's distribution over the experts."""
    bits = jnp.asarray(code_bits(num_experts))  # [E, m]
    s = smooth_step(z.astype(jnp.float32), gamma)[..., None, :]  # [..., k, 1, m]
    r = jnp.prod(jnp.where(bits, s, 1.0 - s), axis=-1)  # [..., k, E]
    if num_experts != 2 ** bits.shape[1]:  # codes beyond E are unused: renormalise over E
        r = r / jnp.maximum(jnp.sum(r, axis=-1, keepdims=True), 1e-30)
    return r


def selector_entropy(r: Array, mask=None) -> Array:
    """Mean over (real) tokens of Σ_i H(r_i), with 0·log 0 = 0."""
    plogp = jnp.where(r > 0, r * jnp.log(jnp.where(r > 0, r, 1.0)), 0.0)
    entropy = -jnp.sum(plogp, axis=(-2, -1))
    if mask is None:
        return jnp.mean(entropy)
    w = mask.astype(jnp.float32)
    return jnp.sum(entropy * w) / jnp.maximum(jnp.sum(w), 1.0)


def dselect_k_route(
    z: Array,
    selector_logits: Array,
    *,
    num_experts: int,
    capacity,
    gamma: float,
    train: bool,
    mask=None,
) -> RoutingResult:
    """DSelect-k routing of one layer.

    Args:
      z: float32[G, S, k, m] selector scores. selector_logits: float32[G, S, k] (softmax: w).
      capacity: C per group (None: dropless). train: soft gates over every used expert (True)
        or each selector's most likely expert (False). mask: optional bool[G, S]; padded
        positions ask for no slot and are left out of the losses and statistics.
    """
    G, S, k, _ = z.shape
    E = num_experts
    r = selector_outputs(z, E, gamma)  # [G, S, k, E]
    w = jax.nn.softmax(selector_logits.astype(jnp.float32), axis=-1)  # [G, S, k]
    order = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (G, S))
    if train:
        q = jnp.einsum("gsk,gske->gse", w, r)  # [G, S, E], sums to 1
        expert = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
        requested = q > 0
        gate_of_choice = q
    else:
        expert = jnp.argmax(r, axis=-1).astype(jnp.int32)  # [G, S, k]
        q = jnp.einsum("gsk,gske->gse", w, jax.nn.one_hot(expert, E, dtype=jnp.float32))
        requested = jnp.ones(expert.shape, bool)
        gate_of_choice = w
    if mask is not None:
        requested = requested & mask[..., None]
    slot, overflow = assign_slots(expert, requested, E, capacity, order, rank_major=False)
    gate = jnp.where(slot >= 0, gate_of_choice, 0.0)
    top1 = jnp.argmax(q, axis=-1)[..., None].astype(jnp.int32)
    losses = {
        "load_balancing": losses_lib.load_balancing_loss(q, top1, mask),
        "z_loss": jnp.zeros((), jnp.float32),
        "selector_entropy": selector_entropy(r, mask),
    }
    return build_result(
        expert, slot, gate, q, jnp.zeros_like(q),
        capacity=capacity, causal=True, losses=losses,
        requested=requested, overflow=overflow, per_rank=not train, mask=mask,
    )  # fmt: skip


class DSelectK(Router):
    """k differentiable selectors over binary expert codes; hard (k experts) once trained."""

    name = "dselect_k"
    options = {
        "dselect_gamma": Option(1.0, "width γ of the smooth-step's transition (paper: 1)"),
        "dselect_entropy_weight": Option(
            1e-3, "weight λ of the selectors' entropy regulariser (the paper tunes it)"
        ),
    }

    @property
    def choices_per_token(self):
        return self.num_experts  # while training; k at evaluation

    @property
    def experts_per_token(self):
        return self.settings.num_selected  # once the selectors are hard

    def preferences(self, result):
        return jnp.argmax(result.probs, axis=-1)[..., None].astype(jnp.int32)  # top-1 of q

    def capacity(self, tokens_per_group, train):
        if self.dropless:
            return None
        k = self.num_experts if train else self.settings.num_selected
        return self._factor_capacity(tokens_per_group, train, k)

    def loss_weights(self):
        return {**super().loss_weights(), "selector_entropy": self.option("dselect_entropy_weight")}

    def check(self, prefix="", tokens_per_group=None):
        super().check(prefix, tokens_per_group)
        if self.num_experts < 2:
            raise ValueError(f"{prefix}router='dselect_k' needs {prefix}num_experts >= 2.")
        if self.settings.random_routing:
            raise ValueError(f"{prefix}random_routing applies to router 'top_k', not 'dselect_k'.")
        if not self.option("dselect_entropy_weight") >= 0:
            raise ValueError(
                f"{prefix}dselect_entropy_weight must be >= 0; "
                f"got {self.option('dselect_entropy_weight')!r}."
            )
        if not self.option("dselect_gamma") > 0:
            raise ValueError(
                f"{prefix}dselect_gamma must be > 0; got {self.option('dselect_gamma')}."
            )

    def route(self, layer, groups, token_ids, keys, train, mask=None, selection_bias=None):
        s = self.settings
        G, S, D = groups.shape
        k, m = s.num_selected, code_bits(self.num_experts).shape[1]
        init = (
            jax.nn.initializers.zeros
            if s.router_init_scale == 0
            else jax.nn.initializers.variance_scaling(
                s.router_init_scale, "fan_in", "truncated_normal"
            )
        )
        z_kernel = router_weights(layer, "selector_kernel", init, D, k * m)
        w_kernel = router_weights(layer, "selector_weight_kernel", init, D, k)
        scores = lambda kernel: routing_lib.router_logits(
            groups, kernel, jitter_key=keys.get("jitter"), jitter_eps=s.jitter_eps,
            dtype=jnp.dtype(s.router_dtype),
        )  # fmt: skip
        return dselect_k_route(
            scores(z_kernel).reshape(G, S, k, m),
            scores(w_kernel),
            num_experts=self.num_experts,
            capacity=self.capacity(S, train),
            gamma=self.option("dselect_gamma"),
            train=train,
            mask=mask,
        )
