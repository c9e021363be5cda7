"""Padding-aware routing: what padded positions hold changes no loss, statistic, load or bias.

The reference is the same computation with different contents at the padded positions (random
vectors, other token ids): every router's losses, statistics and sown loads, and the layer's
output at the real positions, must not move; and padded positions take no expert slot. Then a
whole train step of the decoder-only LM with every balancer on, whose padded tail is rewritten.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from switchmoe.config import validate_config
from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.models import resolve
from switchmoe.moe import balancing, losses
from switchmoe.moe.layer import MoeLayer
from switchmoe.sharding import make_mesh
from switchmoe.training.trainer import Trainer

B, L, D, E = 2, 16, 8, 4
ROUTERS = {
    "top_k": dict(num_selected=2, jitter_eps=0.1, bias_update_speed=1e-3),
    "top_k_dropless": dict(num_selected=2, backend="dropless"),
    "expert_choice": dict(router="expert_choice"),
    "noisy_top_k": dict(router="noisy_top_k", num_selected=2,
                        router_options=dict(importance_weight=0.1, load_weight=0.1)),
    "hash": dict(router="hash", router_options=dict(hash_kind="random", hash_table=tuple(
        int(e) for e in np.random.default_rng(0).integers(0, E, 50)))),
    "sbase": dict(router="sbase"),
    "dselect_k": dict(router="dselect_k", num_selected=2),
}  # fmt: skip


def padded_inputs(seed):
    """x[B, L, D], token ids and a mask with a padded tail (row 0) and padded middle (row 1)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, L), bool)
    mask[0, 11:] = False
    mask[1, 3:6] = False
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    ids = rng.integers(0, 50, size=(B, L)).astype(np.int32)
    return x, ids, mask


def run_layer(layer, params, x, ids, mask, train):
    out, state = layer.apply(
        params, jnp.asarray(x), deterministic=not train, token_ids=jnp.asarray(ids),
        mask=jnp.asarray(mask), rngs={"dropout": jax.random.key(5)},
        mutable=["intermediates", balancing.COUNTS],
    )  # fmt: skip
    return out, state


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_padded_contents_change_nothing(name, train):
    settings = dict(num_experts=E, d_ff=16, z_loss_weight=1e-3, sequence_balance_weight=1e-2,
                    global_balance_weight=1e-2, train_capacity_factor=1.0)  # fmt: skip
    settings.update(ROUTERS[name])
    layer = MoeLayer(**settings)
    x, ids, mask = padded_inputs(0)
    params = {"params": layer.init(jax.random.key(1), x, token_ids=ids)["params"]}
    (y, aux), state = run_layer(layer, params, x, ids, mask, train)
    other_x, other_ids, _ = padded_inputs(1)
    x2 = np.where(mask[..., None], x, 10.0 * other_x)
    ids2 = np.where(mask, ids, other_ids)
    (y2, aux2), state2 = run_layer(layer, params, x2, ids2, mask, train)

    for key in ("losses", "stats"):
        for stat, value in aux[key].items():
            np.testing.assert_allclose(aux2[key][stat], value, rtol=1e-5, atol=1e-6, err_msg=stat)
    jax.tree.map(np.testing.assert_array_equal, state[balancing.COUNTS], state2[balancing.COUNTS])
    np.testing.assert_allclose(np.asarray(y2)[mask], np.asarray(y)[mask], rtol=1e-5, atol=1e-6)
    # Pads hold no slot and are not counted: the loads add up to the real tokens' choices.
    (routing,) = state["intermediates"]["routing"]
    slot = np.asarray(routing.slot).reshape(B, L, -1)
    assert np.all(slot[~mask] < 0)
    assert np.all(np.asarray(y)[~mask] == 0)  # no shared expert: a pad's output is 0
    counts = state[balancing.COUNTS]["counts"]
    per_token = layer.make_router().preferences(routing).shape[-1]
    assert float(jnp.sum(counts)) == mask.sum() * per_token
    assert float(state[balancing.COUNTS]["tokens"]) == mask.sum()


def test_masked_losses_equal_their_formulas_over_the_real_tokens():
    rng = np.random.default_rng(3)
    G, S, K = 3, 8, 2
    logits = rng.normal(size=(G, S, E)).astype(np.float32)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    chosen = np.argsort(-logits, -1)[..., :K].astype(np.int32)
    mask = rng.uniform(size=(G, S)) > 0.3
    mask[2] = False  # a group with no real token is left out of the mean over groups
    switch, z = [], []
    for g in range(G):
        real = mask[g]
        if not real.any():
            continue
        f = np.array([np.sum(chosen[g][real] == i) for i in range(E)]) / (K * real.sum())
        switch.append(E * np.sum(f * probs[g][real].mean(0)))
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    z = np.sum(lse**2 * mask) / mask.sum()
    m = jnp.asarray(mask)
    got = losses.load_balancing_loss(jnp.asarray(probs), jnp.asarray(chosen), m)
    assert float(got) == pytest.approx(np.mean(switch), rel=1e-5)
    assert float(losses.z_loss(jnp.asarray(logits), m)) == pytest.approx(z, rel=1e-5)


def test_a_train_step_ignores_what_padded_positions_hold(data_dir):
    config = resolve(tiny_config(data_dir, **{
        "model.moe.num_selected": 2, "model.moe.z_loss_weight": 1e-3,
        "model.moe.sequence_balance_weight": 1e-2, "model.moe.global_balance_weight": 1e-2,
        "model.moe.bias_update_speed": 1e-2, "model.moe.group_size": 64,
    }))  # fmt: skip
    validate_config(config)
    trainer = Trainer(config, make_mesh(config.mesh))
    rows = LMDataPipeline(config.data, config.batch_size).batch(0)
    # Rows 0 and 5 end early (a padded tail, as the last window of a document split has).
    for row, length in ((0, 20), (5, 9)):
        rows["weights"][row, length:] = 0.0
    other = {k: v.copy() for k, v in rows.items()}
    rng = np.random.default_rng(0)
    pad = other["weights"] == 0
    other["inputs"][pad] = rng.integers(0, 256, size=pad.sum())
    other["targets"][pad] = rng.integers(0, 256, size=pad.sum())

    def step(rows):
        params, opt_state = trainer.init()
        params, _, out = trainer.run_train_step(params, opt_state, trainer.put_batch(rows), 0)
        return jax.device_get(params), jax.device_get(out)

    params, out = step(rows)
    params2, out2 = step(other)
    assert set(out) == set(out2)
    for name, value in out.items():
        np.testing.assert_allclose(out2[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, params2
    )
