"""Fine-tuning from another run (init_from), freezing, and sparse upcycling.

References: the source run's restored parameters; frozen sets written out here by path; the
dense model's logits for a freshly upcycled MoE (top-2 gates normalised to sum to 1, dropless:
every expert computes the dense FFN, so the layer is the FFN).
"""

import math

import jax
import numpy as np
import pytest
from flax import traverse_util
from tiny import tiny_config

from switchmoe import optim, sharding
from switchmoe.data.pipeline import LMDataPipeline
from switchmoe.models import abstract_params, build_model, model_inputs, resolve
from switchmoe.runs import restore_run
from switchmoe.training import init_from
from switchmoe.training.trainer import Trainer, train_and_evaluate

quiet = lambda line: None


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):
    """A tiny MoE run of 4 steps and its dense counterpart (for upcycling)."""
    runs = {}
    for name, experts in (("moe", 4), ("dense", 0)):
        workdir = str(tmp_path_factory.mktemp(name) / "run")
        config = tiny_config(data_dir, num_train_steps=4, log_every=2, eval_every=4,
                             checkpoint_every=4, **{"model.moe.num_experts": experts})  # fmt: skip
        train_and_evaluate(config, workdir, log=quiet)
        runs[name] = workdir
    return runs


def flat(tree):
    return {"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items()}


# What each pattern freezes, written out by parameter path for the tiny MoE config.
FROZEN_BY_HAND = {
    "moe": lambda p: "/moe/" in p,
    "non_moe": lambda p: "/moe/" not in p,
    "router": lambda p: p.endswith("moe/router_kernel"),
    "re:^block_0/": lambda p: p.startswith("block_0/"),
}


def test_each_pattern_freezes_the_parameters_written_out_by_hand(data_dir):
    # What a pattern selects, for every pattern (no training: the partition labels). That a
    # FROZEN label keeps a parameter and its optimizer state away is one mechanism for all
    # patterns, trained below on a named pattern and a regex.
    config = resolve(tiny_config(data_dir))
    params = abstract_params(build_model(config), config)
    for freeze, by_hand in FROZEN_BY_HAND.items():
        labels = flat(optim.parameter_labels(params, freeze))
        frozen = {p for p, label in labels.items() if label == optim.FROZEN}
        assert frozen == {p for p in labels if by_hand(p)}, freeze
        assert frozen and frozen != set(labels), freeze


@pytest.mark.parametrize("freeze", ["moe", "re:^block_0/"])
def test_frozen_parameters_keep_their_values_and_hold_no_optimizer_state(data_dir, freeze):
    config = resolve(tiny_config(data_dir, **{"optimizer.freeze": freeze}))
    trainer = Trainer(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
    params, opt_state = trainer.init()
    before = flat(params)
    pipe = LMDataPipeline(config.data, config.batch_size)
    for step in range(3):
        params, opt_state, _ = trainer.run_train_step(
            params, opt_state, trainer.put_batch(pipe.batch(step)), step
        )
    after = flat(params)
    frozen = {p for p in before if FROZEN_BY_HAND[freeze](p)}
    assert frozen and frozen != set(before)
    for path in before:
        if path in frozen:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        else:
            assert not np.array_equal(after[path], before[path]), path
    # AdamW keeps two float32 moments per trained parameter and nothing for a frozen one.
    trained = sum(v.size for p, v in before.items() if p not in frozen)
    moments = sum(
        math.prod(x.shape) * x.dtype.itemsize
        for x in jax.tree.leaves(opt_state)
        if x.ndim  # step counts are scalars
    )
    assert moments == 2 * 4 * trained


def test_a_fine_tuning_run_starts_from_the_source_and_keeps_its_frozen_layers(
    data_dir, source, tmp_path
):
    _, start = restore_run(source["moe"])
    config = tiny_config(data_dir, **{"init_from": source["moe"], "optimizer.freeze": "moe",
                                      "num_train_steps": 4, "data.seed": 1})  # fmt: skip
    fresh = Trainer(resolve(config), sharding.make_mesh(config.mesh)).init()[0]
    initial = flat(init_from.initial_params(resolve(config), fresh))
    for path, value in flat(start).items():
        np.testing.assert_array_equal(initial[path], value, err_msg=path)
    workdir = str(tmp_path / "tuned")
    lines = []
    train_and_evaluate(config, workdir, log=lines.append)
    assert any(f"Initialised from {source['moe']}" in line for line in lines)
    _, tuned = restore_run(workdir)
    tuned, start = flat(tuned), flat(start)
    for path in start:
        same = np.array_equal(tuned[path], start[path])
        assert same == ("/moe/" in path), path


def test_a_source_the_config_cannot_start_from_is_named_before_anything_is_written(
    data_dir, source, tmp_path
):
    workdir = tmp_path / "run"
    wider = tiny_config(data_dir, **{"init_from": source["moe"], "model.d_model": 48})
    with pytest.raises(
        ValueError,
        match=r"parameter block_0/attention/key/kernel has shape "
        r"\(32, 2, 16\) there and \(48, 2, 24\) in this config",
    ):
        train_and_evaluate(wider, str(workdir), log=quiet)  # fmt: skip
    missing = tiny_config(data_dir, **{"init_from": str(tmp_path / "nothing")})
    with pytest.raises(ValueError, match=r"holds no run"):
        train_and_evaluate(missing, str(workdir), log=quiet)
    narrow = tiny_config(data_dir, **{"init_from": source["dense"], "model.moe.num_experts": 4,
                                      "model.moe.expert_d_ff": 32})  # fmt: skip
    with pytest.raises(ValueError, match=r"needs experts of the dense FFN's width"):
        train_and_evaluate(narrow, str(workdir), log=quiet)
    assert not workdir.exists()


def upcycled_config(data_dir, dense_workdir, **overrides):
    return resolve(
        tiny_config(
            data_dir,
            **{
                "init_from": dense_workdir,
                "model.moe.num_experts": 4,
                "model.moe.num_selected": 2,
                "model.moe.gate_norm": "normalized",
                "model.moe.backend": "dropless",
                "model.moe.jitter_eps": 0.0,
                "model.moe.expert_d_ff": 64,
                **overrides,
            },
        )
    )


def test_a_freshly_upcycled_moe_computes_the_dense_model(data_dir, source):
    dense_config, dense_params = restore_run(source["dense"])
    config = upcycled_config(data_dir, source["dense"])
    fresh = Trainer(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1])).init()[0]
    params = init_from.initial_params(config, fresh)
    batch = LMDataPipeline(config.data, config.batch_size).batch(0)
    dense_logits, _ = build_model(resolve(dense_config)).apply(
        {"params": dense_params}, *model_inputs(config, batch), deterministic=True
    )
    moe_logits, _ = build_model(config).apply(
        {"params": params}, *model_inputs(config, batch), deterministic=True
    )
    np.testing.assert_allclose(np.asarray(moe_logits), np.asarray(dense_logits), atol=1e-5)
    # The router is this run's fresh one; every expert is the dense FFN.
    p, f, d = flat(params), flat(fresh), flat(dense_params)
    np.testing.assert_array_equal(p["block_1/moe/router_kernel"], f["block_1/moe/router_kernel"])
    for e in range(4):
        np.testing.assert_array_equal(p["block_1/moe/w_in"][e], d["block_1/ffn/w_in"])


def test_drop_upcycling_redraws_the_same_hidden_units_in_every_matrix(data_dir, source):
    # A quarter of F = 64: 16 units, so that [d, 16] and [16, d] blocks cannot be confused.
    config = upcycled_config(data_dir, source["dense"], upcycle_reinit_fraction=0.25)
    fresh = Trainer(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1])).init()[0]
    p = flat(init_from.initial_params(config, fresh))
    _, dense = restore_run(source["dense"])
    d = flat(dense)
    units = []
    for e in range(4):
        kept_in = np.all(p["block_1/moe/w_in"][e] == d["block_1/ffn/w_in"], axis=0)  # [F]
        kept_out = np.all(p["block_1/moe/w_out"][e] == d["block_1/ffn/w_out"], axis=1)  # [F]
        np.testing.assert_array_equal(kept_in, kept_out)
        assert kept_in.sum() == 48  # 16 of F = 64 re-drawn
        units.append(tuple(np.flatnonzero(~kept_in)))
    assert len(set(units)) == 4  # each expert re-draws its own units
