"""Gradient accumulation: N microbatches of B/N rows make the step that B rows make.

The reference is the same Trainer without accumulation on the whole batch: the objective, its
gradient (through the updated parameters and the gradient norm) and the MoE statistics must agree
to float rounding, for a dense model and for an MoE whose routing groups are single sequences
(they lie inside any microbatch), on one device and on the 2×4 mesh; and a run with
accumulation resumes exactly.
"""

import jax
import numpy as np
import pytest
from tiny import tiny_config, train_straight_and_interrupted

from switchmoe.config import validate_config
from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.models import resolve
from switchmoe.sharding import make_mesh
from switchmoe.training.trainer import Trainer

quiet = lambda line: None


def one_step(config):
    config = resolve(config)
    validate_config(config, num_devices=jax.device_count())
    trainer = Trainer(config, make_mesh(config.mesh))
    params, opt_state = trainer.init()
    batch = trainer.put_batch(LMDataPipeline(config.data, config.batch_size).batch(3))
    params, _, out = trainer.run_train_step(params, opt_state, batch, 3)
    return jax.device_get(params), jax.device_get(out)


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.moe.num_experts": 0},
        {"model.moe.num_selected": 2, "model.moe.jitter_eps": 0.0},
        {"model.moe.num_experts": 4, "mesh.data": 2, "mesh.expert": 4},
        {"model.moe.num_experts": 0, "mesh.data": 2, "mesh.model": 2},
    ],
    ids=["dense", "moe_top2", "moe_on_2x4_mesh", "dense_on_2x2_mesh"],
)
def test_microbatches_make_the_whole_batch_step(data_dir, overrides):
    settings = {"batch_size": 16, "optimizer.grad_clip_norm": 0.0, **overrides}
    whole = one_step(tiny_config(data_dir, **settings))
    micro = one_step(
        tiny_config(data_dir, **settings, grad_accum_steps=4 if "mesh.data" not in overrides else 2)
    )
    params, out = whole
    params_m, out_m = micro
    for name in ("train/loss", "train/objective", "train/grad_norm"):
        assert out_m[name] == pytest.approx(out[name], rel=2e-5), name
    # Statistics are means over microbatches; these have equal denominators in every microbatch,
    # so the mean is the whole batch's value. (expert_load, kept pairs per expert over all kept
    # pairs, is a mean of per-microbatch shares: close, not equal, when drops differ.)
    for name in ("train/aux_loss", "train/dropped_fraction"):
        if name in out:
            np.testing.assert_allclose(out_m[name], out[name], rtol=2e-5, atol=1e-7)
    if "train/expert_load" in out:
        np.testing.assert_allclose(out_m["train/expert_load"], out["train/expert_load"], atol=2e-3)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_m, params
    )


def test_microbatch_size_must_hold_whole_routing_groups(data_dir):
    config = tiny_config(
        data_dir, batch_size=8, grad_accum_steps=4, **{"model.moe.group_size": 128}
    )
    with pytest.raises(ValueError, match=r"group_size=128 must divide .* 4 microbatches"):
        validate_config(resolve(config))
    with pytest.raises(ValueError, match="grad_accum_steps × batch shards = 3 × 1"):
        validate_config(resolve(tiny_config(data_dir, grad_accum_steps=3)))
    with pytest.raises(ValueError, match="grad_accum_steps must be an integer >= 1"):
        validate_config(resolve(tiny_config(data_dir, grad_accum_steps=0)))


def test_a_run_with_accumulation_resumes_exactly(data_dir, tmp_path):
    config = tiny_config(data_dir, grad_accum_steps=2, **{"model.moe.num_selected": 2})
    train_straight_and_interrupted(config, tmp_path)
