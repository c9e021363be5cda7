"""A decoder-only LM routes causally by default: the logits at position t do not move when the
tokens after t change, for every router it accepts, with tokens being dropped; the non-causal
routers are refused unless the run says it is an ablation (and then they do leak, which shows
that this test can see a leak)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import apply_overrides

from switchmoe.config import (
    causal_routers,
    default_config,
    is_noncausal_ablation,
    validate_config,
)
from switchmoe.models import resolve
from switchmoe.models.decoder import DecoderLM
from switchmoe.moe.routers import make_router

L, ROWS, T = 16, 4, 6  # sequence length, rows, the position whose future is changed


def lm_config(**overrides):
    c = default_config()
    c.data.seq_len = L
    c.batch_size = ROWS
    c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.d_ff = 32, 2, 2, 32
    c.model.moe.num_experts = 4
    c.model.moe.moe_every = 1
    # Capacity 2 per expert and group: most tokens after the first few are dropped.
    c.model.moe.train_capacity_factor = c.model.moe.eval_capacity_factor = 0.5
    c.model.moe.min_capacity = 1
    c.model.moe.router_init_scale = 10.0  # confident, unbalanced routers: many drops
    return apply_overrides(c, overrides)


ACCEPTED = {
    "top1": {},
    "top2": {"model.moe.num_selected": 2, "model.moe.gate_norm": "normalized"},
    "top2_random_routing": {"model.moe.num_selected": 2, "model.moe.random_routing": True},
    # A router per block (moe/blocks.py): a fixed hash, then noisy top-2.
    "hash_then_noisy_top2": {
        "model.moe.block_routers": ("hash", "noisy_top_k"),
        "model.moe.num_selected": 2,
    },
    "dselect_k": {
        "model.moe.router": "dselect_k",
        "model.moe.num_selected": 2,
        "model.moe.train_capacity_factor": 0.25,  # C = S·0.25 of the E choices per token
    },
    "top2_dropless": {"model.moe.num_selected": 2, "model.moe.backend": "dropless"},
    "top1_gather_groups_of_two_rows": {
        "model.moe.backend": "gather",
        "model.moe.group_size": 2 * L,
    },
    "top2_einsum_groups_of_two_rows": {
        "model.moe.num_selected": 2,
        "model.moe.backend": "einsum",
        "model.moe.group_size": 2 * L,
    },
    # A full expert's choice moves to the token's next-ranked expert with room, token by token.
    "top1_next_choice": {"model.moe.overflow": "next_choice"},
    "top2_next_choice_gather_groups_of_two_rows": {
        "model.moe.num_selected": 2,
        "model.moe.overflow": "next_choice",
        "model.moe.backend": "gather",
        "model.moe.group_size": 2 * L,
    },
}


def logits_and_drops(config, tokens, deterministic):
    model = DecoderLM(config.model)
    params = model.init(jax.random.key(0), tokens)["params"]
    apply = jax.jit(
        lambda p, x: model.apply(
            {"params": p}, x, deterministic=deterministic, rngs={"dropout": jax.random.key(1)}
        )
    )
    logits, aux = apply(params, tokens)
    changed = tokens.at[1, T + 1 :].set((tokens[1, T + 1 :] + 17) % 64)
    logits2, _ = apply(params, changed)
    return (
        np.asarray(logits),
        np.asarray(logits2),
        float(jnp.mean(aux["stats"]["dropped_fraction"])),
    )


# Training mode differs from evaluation in what it draws (jitter, random routing, noise) and in
# its capacity factor; it is checked for the routers where that changes the routing itself.
TRAIN_CHECKED = ("top1", "top2", "top2_random_routing", "hash_then_noisy_top2", "dselect_k",
                 "top2_next_choice_gather_groups_of_two_rows")  # fmt: skip


@pytest.mark.parametrize(
    "name,deterministic",
    [(n, True) for n in ACCEPTED] + [(n, False) for n in TRAIN_CHECKED],
    ids=[f"{n}-eval" for n in ACCEPTED] + [f"{n}-train" for n in TRAIN_CHECKED],
)
def test_accepted_routers_do_not_see_later_tokens(name, deterministic):
    config = resolve(lm_config(**ACCEPTED[name]))
    validate_config(config)  # accepted by default, with no ablation flag
    tokens = jax.random.randint(jax.random.key(2), (ROWS, L), 0, 64)
    before, after, dropped = logits_and_drops(config, tokens, deterministic)
    # Where the router's capacity can drop tokens (not dropless; DSelect-k trains with S slots),
    # the check needs drops to have happened.
    group = config.model.moe.get("group_size") or L
    capacity = make_router(config.model.moe).capacity(group, train=not deterministic)
    if capacity is not None and capacity < group:
        assert dropped > 0.2, "the test needs tokens to be dropped"
    # Row 1 changed after position T: its positions <= T and row 0 (earlier in any group that
    # holds both) must not move. Later rows of a two-row group may: they route after row 1.
    np.testing.assert_array_equal(before[1, : T + 1], after[1, : T + 1])
    np.testing.assert_array_equal(before[0], after[0])
    assert not np.array_equal(before[1, T + 1 :], after[1, T + 1 :])  # the change is seen later


def test_every_router_accepted_by_default_is_checked_above():
    checked = set()
    for overrides in ACCEPTED.values():
        checked.update(overrides.get("model.moe.block_routers", ()))
        checked.add(overrides.get("model.moe.router", "top_k"))
    assert set(causal_routers()) <= checked, "add the new causal router to ACCEPTED"


NONCAUSAL = {
    "expert_choice": {"model.moe.router": "expert_choice"},
    "sbase": {"model.moe.router": "sbase"},
    "top2_rank_major": {"model.moe.num_selected": 2, "model.moe.causal_routing": False},
    # Megatron-Core's drop policy: an expert keeps its highest-scoring tokens, later ones too.
    "top1_probability_priority": {"model.moe.drop_priority": "probability"},
}


@pytest.mark.parametrize("name", list(NONCAUSAL))
def test_noncausal_routers_are_refused_unless_marked_as_an_ablation(name):
    with pytest.raises(ValueError, match="noncausal_ablation=True"):
        validate_config(resolve(lm_config(**NONCAUSAL[name])))
    validate_config(resolve(lm_config(**NONCAUSAL[name], **{"model.moe.noncausal_ablation": True})))


@pytest.mark.parametrize("name", ["expert_choice", "top1_probability_priority"])
def test_the_check_sees_a_leak_when_there_is_one(name):
    overrides = {**NONCAUSAL[name], "model.moe.noncausal_ablation": True}
    config = resolve(lm_config(**overrides))
    tokens = jax.random.randint(jax.random.key(2), (ROWS, L), 0, 64)
    before, after, _ = logits_and_drops(config, tokens, deterministic=True)
    assert not np.array_equal(before[1, : T + 1], after[1, : T + 1])


def test_only_runs_that_route_non_causally_are_reported_as_ablations():
    flag = {"model.moe.noncausal_ablation": True}
    assert not is_noncausal_ablation(lm_config(**flag))  # causal routing: the flag changes nothing
    assert not is_noncausal_ablation(lm_config(**NONCAUSAL["sbase"]))  # refused, not an ablation
    for overrides in NONCAUSAL.values():
        assert is_noncausal_ablation(lm_config(**overrides, **flag))
