"""The global-batch balance loss and auxiliary-loss-free bias balancing.

References: the papers' formulas transcribed in NumPy (Qiu et al. 2025's global-batch loss, the
bias rule of Wang et al. 2024 / DeepSeek-V3 as a per-expert loop), and the same step computed on
one device from the whole batch at once (for the 2×4 mesh with 4 accumulation microbatches, and
with rematerialisation).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config, train_straight_and_interrupted

from switchmoe.config import validate_config
from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.models import build_model, model_inputs, model_masks, resolve
from switchmoe.moe import balancing, losses
from switchmoe.moe.layer import MoeLayer
from switchmoe.moe.routers import top_k
from switchmoe.runs import restore_run
from switchmoe.sharding import make_mesh
from switchmoe.training.trainer import Trainer

quiet = lambda line: None


def qiu_global_loss(probs, chosen, real):
    """Qiu et al. 2025, eq. (1) with f over the global batch: N_E · Σ_i f_i · p_i, where
    f_i = #{(t, k): chosen[t, k] = i} / (K·T) and p_i = (1/T) Σ_t probs[t, i], over the T real
    tokens of the whole batch (all groups, devices and microbatches)."""
    probs, chosen = probs.reshape(-1, probs.shape[-1]), chosen.reshape(-1, chosen.shape[-1])
    keep = real.reshape(-1)
    probs, chosen = probs[keep], chosen[keep]
    T, N_E = probs.shape
    K = chosen.shape[-1]
    f = np.array([np.sum(chosen == i) / (K * T) for i in range(N_E)])
    p = probs.sum(0) / T
    return N_E * np.sum(f * p)


def random_routing(seed, G=4, S=8, E=6, K=2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(G, S, E)).astype(np.float32)
    logits[:2, :, 0] += 2.0  # the first groups lean on expert 0: imbalanced over the batch
    probs = jax.nn.softmax(jnp.asarray(logits), -1)
    chosen = np.argsort(-logits, axis=-1)[..., :K].astype(np.int32)
    real = rng.uniform(size=(G, S)) > 0.25
    real[-1, -3:] = False  # a padded tail
    return np.asarray(probs), chosen, real


def test_global_balance_loss_equals_the_papers_formula_and_splits_over_microbatches():
    probs, chosen, real = random_routing(0)
    expected = qiu_global_loss(probs, chosen, real)
    got = losses.global_balance_loss(jnp.asarray(probs), jnp.asarray(chosen), jnp.asarray(real))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Per group it is the Switch loss; over the batch it is not (the groups lean differently).
    switch = losses.load_balancing_loss(jnp.asarray(probs), jnp.asarray(chosen), jnp.asarray(real))
    assert abs(float(switch) - expected) > 1e-3
    # Two microbatches of two groups each, with the step's totals passed in: the mean of their
    # losses is the global loss exactly, although their real-token counts differ.
    counts = sum(
        losses.selection_counts(jnp.asarray(chosen[i : i + 2]), jnp.asarray(real[i : i + 2]), 6)
        for i in (0, 2)
    )
    tokens = real.sum() / 2
    per_micro = [
        losses.global_balance_loss(
            jnp.asarray(probs[i : i + 2]), jnp.asarray(chosen[i : i + 2]),
            jnp.asarray(real[i : i + 2]), global_counts=counts, global_tokens=tokens,
        )
        for i in (0, 2)
    ]  # fmt: skip
    assert real[:2].sum() != real[2:].sum()
    assert float(np.mean(per_micro)) == pytest.approx(expected, rel=1e-5)


def test_bias_rule_equals_a_per_expert_loop():
    rng = np.random.default_rng(1)
    bias = rng.normal(size=8).astype(np.float32) * 1e-2
    counts = np.array([3, 9, 0, 12, 6, 6, 1, 11], np.float32)  # mean 6: experts 4, 5 balanced
    expected = bias.copy()
    mean = counts.mean()
    for i in range(8):
        if counts[i] > mean:  # overloaded: chosen less
            expected[i] = bias[i] - np.float32(1e-3)
        elif counts[i] < mean:
            expected[i] = bias[i] + np.float32(1e-3)
    got = balancing.bias_update(jnp.asarray(bias), jnp.asarray(counts), 1e-3)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_the_bias_steers_selection_but_not_the_gates():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 16, 4)).astype(np.float32)
    bias = np.array([-10.0, 0.0, 0.0, 10.0], np.float32)  # expert 3 always, expert 0 never
    r = top_k.top_k_route(
        jnp.asarray(logits), num_selected=2, capacity=None, selection_bias=jnp.asarray(bias)
    )
    p = np.asarray(jax.nn.softmax(logits, -1))
    assert np.all(np.asarray(r.expert)[..., 0] == 3)
    assert not np.any(np.asarray(r.expert) == 0)
    chosen = np.argsort(-(logits + bias), axis=-1)[..., :2]
    np.testing.assert_array_equal(r.expert, chosen)
    np.testing.assert_allclose(r.gate, np.take_along_axis(p, chosen, -1), rtol=1e-6)
    # Sigmoid scores take the bias on the scores themselves (DeepSeek-V3).
    s = 1 / (1 + np.exp(-logits))
    small = np.array([0.0, 0.3, 0.0, -0.3], np.float32)
    r = top_k.top_k_route(
        jnp.asarray(logits), num_selected=2, capacity=None, score_function="sigmoid",
        gate_norm="normalized", selection_bias=jnp.asarray(small),
    )  # fmt: skip
    chosen = np.argsort(-(s + small), axis=-1, kind="stable")[..., :2]
    np.testing.assert_array_equal(r.expert, chosen)
    top = np.take_along_axis(s, chosen, -1)
    np.testing.assert_allclose(r.gate, top / top.sum(-1, keepdims=True), rtol=1e-5)


def test_the_bias_gets_no_gradient():
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    layer = MoeLayer(num_experts=4, d_ff=8, num_selected=2, bias_update_speed=1e-3,
                     z_loss_weight=1e-3, global_balance_weight=1.0)  # fmt: skip
    params = nn.meta.unbox(layer.init(jax.random.key(1), x)["params"])
    assert params[balancing.BIAS].shape == (4,)
    params = {**params, balancing.BIAS: jnp.array([0.3, -0.2, 0.1, 0.0])}

    def objective(params):
        y, aux = layer.apply({"params": params}, x)
        return jnp.sum(y**2) + aux["loss"]

    grads = jax.grad(objective)(params)
    np.testing.assert_array_equal(grads[balancing.BIAS], np.zeros(4))
    assert float(jnp.abs(grads["router_kernel"]).sum()) > 0
    with pytest.raises(ValueError, match="bias_update_speed .* applies to the routers .*top_k"):
        MoeLayer(num_experts=4, d_ff=8, router="expert_choice", bias_update_speed=1e-3).init(
            jax.random.key(1), x
        )


def trainer_step(config, steps=1):
    """Runs `steps` train steps of `config` from init; returns the Trainer, params before the
    last step, the batch of the last step, and (params, metrics) after it."""
    config = resolve(config)
    validate_config(config, num_devices=jax.device_count())
    trainer = Trainer(config, make_mesh(config.mesh))
    params, opt_state = trainer.init()
    pipeline = LMDataPipeline(config.data, config.batch_size)
    for step in range(steps):
        before = jax.device_get(params)
        rows = pipeline.batch(step)
        params, opt_state, out = trainer.run_train_step(
            params, opt_state, trainer.put_batch(rows), step
        )
    return config, before, rows, jax.device_get(params), jax.device_get(out)


BALANCED = {
    "batch_size": 32,
    "optimizer.grad_clip_norm": 0.0,
    "model.moe.num_experts": 4,
    "model.moe.num_selected": 2,
    "model.moe.jitter_eps": 0.0,
    "model.moe.load_balancing_weight": 0.0,
    "model.moe.global_balance_weight": 0.5,
    "model.moe.bias_update_speed": 1e-2,
}


def loads_by_loop(config, params, rows):
    """Each MoE layer's choices per expert over the whole batch, counted with a Python loop over
    the routing the model records (its "intermediates"), padded positions left out."""
    model = build_model(config)
    batch = jax.tree.map(jnp.asarray, rows)
    _, state = model.apply(
        {"params": params}, *model_inputs(config, batch), **model_masks(config, batch),
        deterministic=False, rngs={"dropout": jax.random.key(0)}, mutable=["intermediates"],
    )  # fmt: skip
    real = np.asarray(rows["weights"]).reshape(-1) > 0
    out = {}
    for name, block in state["intermediates"].items():
        (routing,) = block["moe"]["routing"]
        expert = np.asarray(routing.expert).reshape(-1, routing.expert.shape[-1])
        counts = np.zeros(config.model.moe.num_experts, np.float32)
        for t in range(expert.shape[0]):
            for k in range(expert.shape[1]):
                counts[expert[t, k]] += real[t]
        out[name] = counts
    return out


def test_the_bias_after_a_step_is_exactly_the_rule(data_dir):
    config, before, rows, after, out = trainer_step(tiny_config(data_dir, **BALANCED), steps=2)
    speed = config.model.moe.bias_update_speed
    loads = loads_by_loop(config, before, rows)
    assert loads and any(np.any(before[name]["moe"][balancing.BIAS] != 0) for name in loads)
    for name, counts in loads.items():
        old = before[name]["moe"][balancing.BIAS]
        mean = counts.mean()
        expected = old.copy()
        for i in range(len(counts)):
            expected[i] = old[i] + np.float32(speed) * np.float32(np.sign(mean - counts[i]))
        # Exactly the rule: no gradient, no Adam update, no weight decay on top.
        np.testing.assert_array_equal(after[name]["moe"][balancing.BIAS], expected)
    np.testing.assert_array_equal(
        out["train/selection_bias"],
        np.stack([after[n]["moe"][balancing.BIAS] for n in sorted(loads)]),
    )


@pytest.fixture(scope="module")
def whole_batch_step(data_dir):
    """The reference: one device, the whole batch at once, no rematerialisation."""
    _, _, _, params, out = trainer_step(tiny_config(data_dir, **BALANCED))
    return params, out


@pytest.mark.parametrize(
    "overrides",
    [
        {"mesh.data": 2, "mesh.expert": 4, "grad_accum_steps": 4},
        {"mesh.data": 2, "mesh.expert": 4, "grad_accum_steps": 4, "model.remat": "full"},
    ],
    ids=["2x4_mesh_4_microbatches", "with_remat"],
)
def test_global_loss_and_bias_equal_the_whole_batch_on_one_device(
    data_dir, whole_batch_step, overrides
):
    params, out = whole_batch_step
    _, _, _, params_m, out_m = trainer_step(tiny_config(data_dir, **BALANCED, **overrides))
    assert out["train/global_balance"] > 1.0  # imbalanced at init: the loss has work to do
    assert out_m["train/global_balance"] == pytest.approx(out["train/global_balance"], rel=1e-5)
    assert out_m["train/objective"] == pytest.approx(out["train/objective"], rel=1e-5)
    assert out_m["train/grad_norm"] == pytest.approx(out["train/grad_norm"], rel=1e-4)
    # Loads are integers: the bias (counted over every shard and microbatch, once) is exact.
    np.testing.assert_array_equal(out_m["train/selection_bias"], out["train/selection_bias"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_m, params
    )


def test_a_run_with_bias_balancing_resumes_bitwise(data_dir, tmp_path):
    short = {"num_train_steps": 12, "checkpoint_every": 6, "eval_every": 6, "log_every": 3}
    config = tiny_config(data_dir, **{**BALANCED, "batch_size": 8, "grad_accum_steps": 2, **short})
    # Metrics (the biases among them) identical with and without the interruption at step 6.
    straight, interrupted = train_straight_and_interrupted(config, tmp_path, stop_at=6)
    (_, a), (_, b) = restore_run(straight), restore_run(interrupted)
    biases = [v for p, v in jax.tree_util.tree_leaves_with_path(a) if balancing.BIAS in str(p)]
    assert biases and any(np.any(np.asarray(v) != 0) for v in biases)
    jax.tree.map(np.testing.assert_array_equal, a, b)
