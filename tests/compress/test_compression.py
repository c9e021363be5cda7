"""Making a trained MoE small: distillation, expert merging, int8 experts.

References: the distillation formula and Switch's mixed-target cross-entropy transcribed in
NumPy on hand-made logits; plain training (teacher weight 0 must equal it bit for bit); the
teacher's own evaluation; hand-built groups of identical experts (merging them must not change
a logit); the float model run on the dequantised weights (int8 experts must give its logits);
the rounding bound |w − ŵ| ≤ scale/2 over random matrices.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tiny import tiny_config

from switchmoe import runs
from switchmoe.analysis.evaluation import evaluate_run
from switchmoe.compress import merging, quantization
from switchmoe.models import build_model, count_params, dummy_inputs, resolve
from switchmoe.runs.metrics import read_metrics
from switchmoe.training import distillation
from switchmoe.training.trainer import train_and_evaluate

quiet = lambda line: None


def flat(tree):
    return {"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items()}


# ------------------------------------------------------------------------------- distillation


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_distillation_loss_is_its_formula_on_a_hand_made_example():
    s = np.array([[[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]], np.float32)  # [B 1, L 2, V 3]
    t = np.array([[[1.0, 2.0, 0.0], [-2.0, 0.0, 2.5]]], np.float32)
    y = np.array([[0, 2]])
    w = np.array([[1.0, 0.0]])  # the second position is not scored
    for alpha, T in ((0.25, 1.0), (0.25, 2.0), (0.7, 0.5), (1.0, 3.0)):
        got = distillation.distillation_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                                             jnp.asarray(w), alpha, T)  # fmt: skip
        hard = -log_softmax(s[0, 0])[0]
        soft = -(T**2) * np.sum(np.exp(log_softmax(t[0, 0] / T)) * log_softmax(s[0, 0] / T))
        np.testing.assert_allclose(got["hard"], hard, rtol=1e-6)
        np.testing.assert_allclose(got["soft"], soft, rtol=1e-6)
        np.testing.assert_allclose(got["objective"], (1 - alpha) * hard + alpha * soft, rtol=1e-6)
        np.testing.assert_allclose(got["teacher"], -log_softmax(t[0, 0])[0], rtol=1e-6)
    # T = 1 is Switch's cross-entropy against the mixed target 0.75·onehot + 0.25·softmax(t).
    got = distillation.distillation_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                                         jnp.asarray(np.ones((1, 2))), 0.25, 1.0)  # fmt: skip
    target = 0.75 * np.eye(3)[y[0]] + 0.25 * np.exp(log_softmax(t[0]))
    np.testing.assert_allclose(got["objective"], -np.sum(target * log_softmax(s[0])), rtol=1e-6)


STEPS = {"num_train_steps": 4, "log_every": 2, "eval_every": 4, "checkpoint_every": 4}


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    """A tiny top-1 MoE trained 6 steps."""
    workdir = str(tmp_path_factory.mktemp("teacher") / "run")
    train_and_evaluate(tiny_config(data_dir, **{**STEPS, "num_train_steps": 6}), workdir, log=quiet)
    return workdir


def student_config(data_dir, **overrides):
    return tiny_config(data_dir, **{**STEPS, "model.moe.num_experts": 0, **overrides})


@pytest.fixture(scope="module")
def plain(data_dir, tmp_path_factory):
    """The student's config trained without a teacher."""
    workdir = str(tmp_path_factory.mktemp("plain") / "run")
    train_and_evaluate(student_config(data_dir), workdir, log=quiet)
    return workdir


def test_fit_counts_the_teachers_parameters_and_its_forward_pass(data_dir, teacher):
    from switchmoe.training import memory_fit  # noqa: PLC0415

    one = jax.devices()[:1]
    alone = memory_fit.fit_report(student_config(data_dir), one)
    taught = memory_fit.fit_report(student_config(data_dir, **{"distill.teacher": teacher}), one)
    # The teacher's bytes, read off its checkpoint: every float32 parameter on the one device.
    held = sum(np.asarray(a).nbytes for a in jax.tree.leaves(runs.restore_run(teacher)[1]))
    assert taught["teacher_param_bytes"] == held > 0 and alone["teacher_param_bytes"] == 0
    assert taught["param_bytes"] == alone["param_bytes"]
    assert memory_fit.total_bytes(taught) == (
        taught["param_bytes"] + taught["opt_state_bytes"] + held
        + taught["estimates"]["temp_bytes"]
    )  # fmt: skip
    # Its forward pass is in the step: more FLOPs than the student's step alone.
    assert taught["estimates"]["flops_per_step"] > alone["estimates"]["flops_per_step"]
    assert "teacher params" in memory_fit.describe(taught) and "teacher" not in memory_fit.describe(
        alone
    )


def test_teacher_weight_zero_trains_bitwise_like_plain_training(data_dir, teacher, plain, tmp_path):
    zero = str(tmp_path / "zero")
    train_and_evaluate(
        student_config(data_dir, **{"distill.teacher": teacher, "distill.teacher_weight": 0.0}),
        zero, log=quiet,
    )  # fmt: skip
    a, b = flat(runs.restore_run(plain)[1]), flat(runs.restore_run(zero)[1])
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    (pa, pb) = read_metrics(plain)[-1], read_metrics(zero)[-1]
    assert pa["train/loss"] == pb["train/loss"] and pa["eval/loss"] == pb["eval/loss"]
    # The teacher was still run, in the step and in the evaluation: its eval loss there is the
    # one its own evaluation gives.
    assert "train/teacher_loss" in pb and "train/distill_loss" not in pb
    np.testing.assert_allclose(pb["eval/teacher_loss"], evaluate_run(teacher)["eval/loss"],
                               rtol=1e-6)  # fmt: skip


def test_a_distilled_student_learns_from_the_teacher_and_can_start_from_its_non_expert_weights(
    data_dir, teacher, plain, tmp_path
):
    config = student_config(data_dir, **{"distill.teacher": teacher, "distill.temperature": 2.0,
                                         "distill.student_init": "non_expert"})  # fmt: skip
    # The start: every parameter outside the MoE layers is the teacher's, the dense FFN in the
    # teacher's MoE block is fresh.
    model = build_model(resolve(config))
    fresh = nn.meta.unbox(model.init(jax.random.key(0), *dummy_inputs(resolve(config)))["params"])
    start, copied = distillation.non_expert_start(runs.restore_run(teacher)[1], fresh)
    t = flat(runs.restore_run(teacher)[1])
    for path, value in flat(start).items():
        if path in t:
            np.testing.assert_array_equal(value, t[path], err_msg=path)
            assert path in copied
        else:
            np.testing.assert_array_equal(value, flat(fresh)[path], err_msg=path)
    assert "block_1/ffn/w_in" not in copied and "embed/embedding" in copied
    workdir = str(tmp_path / "student")
    lines = []
    train_and_evaluate(config, workdir, log=lines.append)
    assert any("teacher's" in line and "non-expert" in line for line in lines)
    last = read_metrics(workdir)[-1]
    assert last["train/distill_loss"] > 0 and np.isfinite(last["train/teacher_loss"])
    assert read_metrics(plain)[-1]["train/loss"] != last["train/loss"]


def test_distillation_in_microbatches_makes_the_whole_batch_step(data_dir, teacher, tmp_path):
    # A dense student: accumulation equals the whole-batch step to float rounding (the MoE
    # teacher routes each microbatch as the whole batch would: groups are sequences).
    distill = {"distill.teacher": teacher, "distill.temperature": 2.0, "num_train_steps": 2,
               "checkpoint_every": 2, "eval_every": 2}  # fmt: skip
    whole, micro = str(tmp_path / "whole"), str(tmp_path / "micro")
    train_and_evaluate(student_config(data_dir, **distill), whole, log=quiet)
    train_and_evaluate(student_config(data_dir, **distill, grad_accum_steps=2), micro, log=quiet)
    a, b = read_metrics(whole)[-1], read_metrics(micro)[-1]
    for key in ("train/loss", "train/distill_loss", "train/teacher_loss", "train/objective"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    pa, pb = flat(runs.restore_run(whole)[1]), flat(runs.restore_run(micro)[1])
    for path in pa:
        np.testing.assert_allclose(pb[path], pa[path], rtol=1e-4, atol=1e-6, err_msg=path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distill.teacher_weight": 1.5}, r"distill.teacher_weight must be in \[0, 1\]"),
        ({"distill.temperature": 0.0}, r"distill.temperature must be > 0"),
        ({"distill.student_init": "teacher"}, r"distill.student_init must be one of"),
        ({"distill.teacher": "/nonexistent/run"}, r"no run \(config and checkpoint\) there"),
        ({"data.seq_len": 16}, r"has data.seq_len=32 and this run 16"),
    ],
)
def test_bad_distillation_settings_are_named_before_anything_is_written(
    data_dir, teacher, tmp_path, overrides, message
):
    config = student_config(data_dir, **{"distill.teacher": teacher, **overrides})
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, str(tmp_path / "run"), log=quiet)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- merging


def tiny_moe(data_dir, **overrides):
    return resolve(tiny_config(data_dir, **{"model.moe.eval_capacity_factor": 8.0, **overrides}))


def logits_fn(config):
    """Jitted (params, inputs) -> (logits, aux) in evaluation mode."""
    model = build_model(config)
    return jax.jit(lambda params, x: model.apply({"params": params}, x, deterministic=True))


def routing_probs(config, params, inputs):
    """{layer: float32[N, E]} router probabilities of `inputs`, read from the sown routing."""
    model = build_model(config)
    apply = lambda p, x: model.apply(
        {"params": p}, x, deterministic=True, mutable=["intermediates"]
    )
    _, state = jax.jit(apply)(params, inputs)
    out = {}
    for path, value in traverse_util.flatten_dict(state["intermediates"]).items():
        if path[-1] == "routing":
            probs = np.asarray(value[-1].probs)
            out[path[0]] = probs.reshape(-1, probs.shape[-1])
    return merging.RoutingStatistics(out)


def with_identical_groups(params, groups):
    """Every member of a group made a copy of the group's first expert (weights and router)."""
    tree = flat(params)
    for path in list(tree):
        if "/moe/" in path and path.split("/")[-1] in ("w_in", "w_out", "w_gate", "router_kernel"):
            value = tree[path].copy()
            axis = 1 if path.endswith("router_kernel") else 0
            for members in groups:
                src = np.take(value, members[0], axis=axis)
                for m in members[1:]:
                    if axis:
                        value[:, m] = src
                    else:
                        value[m] = src
            tree[path] = value
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in tree.items()})


@pytest.mark.parametrize(
    "overrides, groups, target",
    [
        ({}, [[0, 2], [1, 3]], 2),  # Switch top-1, raw gates: scales 1/2
        ({"model.moe.gate_norm": "normalized"}, [[0, 3], [1, 2]], 2),  # gate 1: scales 1
        ({"model.activation": "swiglu", "model.moe.router_bias": True}, [[0, 1, 2, 3]], 1),
    ],
)
def test_merging_groups_of_identical_experts_leaves_the_logits_unchanged(
    data_dir, overrides, groups, target
):
    config = tiny_moe(data_dir, **overrides)
    model = build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(3), *dummy_inputs(config))["params"])
    params = with_identical_groups(params, groups)
    inputs = jax.random.randint(jax.random.key(4), (8, config.data.seq_len), 0, 256)
    before, aux = logits_fn(config)(params, inputs)
    assert float(aux["stats"]["dropped_fraction"].max()) == 0.0
    stats = routing_probs(config, params, inputs)
    merged_config, merged, report = merging.merge_experts(config, params, target, stats)
    assert sorted(map(sorted, report["layers"]["block_1"]["groups"])) == sorted(map(sorted, groups))
    assert merged_config.model.moe.num_experts == target
    after, _ = logits_fn(merged_config)(merged, inputs)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-6, rtol=0)
    expected = 1.0 if overrides.get("model.moe.gate_norm") == "normalized" else 1 / len(groups[0])
    if target > 1:  # with one expert the scale is the mean gate, which is 1/E here (equal logits)
        np.testing.assert_allclose(report["layers"]["block_1"]["scales"], expected, rtol=1e-6)


def test_grouping_finds_the_blocks_of_a_block_similarity_and_alignment_undoes_a_permutation():
    rng = np.random.default_rng(0)
    order = rng.permutation(8)
    blocks = np.repeat(np.arange(4), 2)[order]  # expert i belongs to block blocks[i]
    sim = np.where(blocks[:, None] == blocks[None, :], 0.9, 0.1) + 0.01 * rng.random((8, 8))
    groups = merging.group_experts(sim, rng.random(8), 4)
    assert sorted(sum(groups, [])) == list(range(8))
    assert all(len(g) == 2 and blocks[g[0]] == blocks[g[1]] for g in groups)
    ref = {"w_in": rng.normal(size=(6, 16)), "w_gate": rng.normal(size=(6, 16)),
           "w_out": rng.normal(size=(16, 6))}  # fmt: skip
    perm = rng.permutation(16)
    member = {"w_in": ref["w_in"][:, perm], "w_gate": ref["w_gate"][:, perm],
              "w_out": ref["w_out"][perm]}  # fmt: skip
    aligned = merging._align(ref, member)
    for name in ref:
        np.testing.assert_array_equal(aligned[name], ref[name])


def test_a_merged_run_is_a_workdir_that_restores_and_evaluates(data_dir, teacher, tmp_path):
    target = str(tmp_path / "merged")
    report = merging.merge_run(teacher, target, 2, num_batches=1)
    config, params = runs.restore_run(target)
    assert config.model.moe.num_experts == 2
    assert flat(params)["block_1/moe/w_in"].shape[0] == 2
    assert report["layers"]["block_1"]["groups"]
    derived = json.load(open(os.path.join(target, runs.DERIVED_FILE)))
    assert derived["source"] == teacher and derived["method"] == "expert merging"
    assert np.isfinite(evaluate_run(target)["eval/loss"])
    with pytest.raises(ValueError, match="already holds a run"):
        merging.merge_run(teacher, target, 2, num_batches=1)
    config, _ = runs.restore_run(teacher)
    with pytest.raises(ValueError, match=r"allowed: \[1, 2\]"):
        merging.merge_experts(config, None, 3, merging.RoutingStatistics({}))


# ------------------------------------------------------------------------------------- int8


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 7)),
        elements=st.floats(-1e3, 1e3, width=32),
    )  # fmt: skip
)
def test_int8_rounding_error_is_at_most_half_a_step_per_channel(w):
    q, scale = quantization.quantize_int8(w)
    assert q.dtype == np.int8 and scale.shape == w.shape[:-2] + (1, w.shape[-1])
    assert np.all(np.abs(q.astype(np.int32)) <= 127)
    err = np.abs(w - quantization.dequantize(q, scale))
    assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-30)
    # The largest entry of each channel is exact (to float rounding): it sets the scale.
    zero = np.max(np.abs(w), axis=-2, keepdims=True) == 0
    assert np.all(np.where(zero, (scale == 1) & (np.max(np.abs(q), -2, keepdims=True) == 0), True))


@pytest.mark.parametrize(
    "overrides",
    [
        # Both capacity backends run StackedExperts.__call__: gather stands for einsum too.
        {"model.moe.backend": "gather", "model.activation": "swiglu"},
        {"model.moe.backend": "dropless", "model.moe.dropless_implementation": "blocked"},
        {"model.moe.backend": "dropless", "model.moe.dropless_implementation": "ragged_dot",
         "model.moe.num_selected": 2},
    ],
)  # fmt: skip
def test_int8_experts_compute_what_the_float_model_computes_on_the_dequantised_weights(
    data_dir, overrides
):
    config = tiny_moe(data_dir, **{"model.moe.eval_capacity_factor": 1.0, **overrides})
    model = build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(5), *dummy_inputs(config))["params"])
    q_config, q_params = quantization.quantize_experts(config, params)
    reference = flat(params)
    for path, value in flat(q_params).items():
        if path.endswith("_scale"):
            matrix = path.removesuffix("_scale")
            reference[matrix] = quantization.dequantize(flat(q_params)[matrix], value)
    reference = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in reference.items()})
    inputs = jax.random.randint(jax.random.key(6), (8, config.data.seq_len), 0, 256)
    want, _ = logits_fn(config)(reference, inputs)
    got, _ = logits_fn(q_config)(q_params, inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    # Memory, read from the arrays: int8 values are a quarter of float32's; the per-channel
    # scales add 4 bytes per output channel.
    f32, i8 = quantization.expert_bytes(params), quantization.expert_bytes(q_params)
    assert f32["bytes"] == 4 * f32["parameters"] and i8["parameters"] == f32["parameters"]
    channels = sum(v.size for k, v in flat(q_params).items() if k.endswith("_scale"))
    assert i8["bytes"] == f32["parameters"] + 4 * channels
    q_counts, f_counts = count_params(q_config), count_params(config)
    assert q_counts["total"] == f_counts["total"] + channels
    assert q_counts["experts"] == f_counts["experts"] + channels  # scales count as experts'


def test_an_int8_run_evaluates_near_its_float_run_and_refuses_training(data_dir, teacher, tmp_path):
    target = str(tmp_path / "int8")
    quantization.quantize_run(teacher, target)
    config, params = runs.restore_run(target)
    assert flat(params)["block_1/moe/w_in"].dtype == np.int8
    float_loss = evaluate_run(teacher)["eval/loss"]
    int8_loss = evaluate_run(target)["eval/loss"]
    assert abs(int8_loss - float_loss) < 1e-2
    more = config.copy_and_resolve_references()
    more.num_train_steps += 2
    with pytest.raises(ValueError, match=r"model.moe.expert_quantization='int8' is for evaluation"):
        train_and_evaluate(more, target, log=quiet)
