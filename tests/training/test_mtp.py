"""Multi-token prediction (models/mtp.py, training/mtp.py): the loss is DeepSeek-V3's formula in
NumPy on hand-made logits; depth k at position i never reads past token i + k; a run resumes
exactly, in microbatches; weight 0 leaves the main model's training bitwise as without MTP;
generation is the main model's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from tiny import tiny_config, train_straight_and_interrupted

from switchmoe import generation
from switchmoe.config import validate_config
from switchmoe.models import build_model, dummy_inputs, resolve
from switchmoe.runs import metrics, restore_run
from switchmoe.training import features
from switchmoe.training.mtp import MultiTokenPrediction
from switchmoe.training.trainer import train_and_evaluate

quiet = lambda line: None


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_the_loss_is_deepseek_v3s_formula_on_hand_made_logits():
    rng = np.random.default_rng(0)
    K, B, L, V, lam = 2, 3, 6, 7, 0.3
    logits = rng.normal(size=(K, B, L, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, L))
    weights = (rng.random((B, L)) > 0.25).astype(np.float32)  # padding anywhere
    T = weights.sum()
    # Depth k (1-based) at position i predicts targets[i + k], scored by weights[i + k].
    ce = np.zeros(K)
    counts = np.zeros(K)
    for k in range(1, K + 1):
        for b in range(B):
            for i in range(L - k):
                w = weights[b, i + k]
                ce[k - 1] += -w * log_softmax(logits[k - 1, b, i])[targets[b, i + k]]
                counts[k - 1] += w
    term = MultiTokenPrediction(depth=K, weight=lam)
    rows = {"targets": jnp.asarray(targets), "weights": jnp.asarray(weights)}
    sums = term.add({"objective": jnp.float32(2.5), "hard": 2.5}, {"mtp_logits": logits}, rows)
    np.testing.assert_allclose(sums["mtp"], ce, rtol=1e-5)
    np.testing.assert_allclose(sums["mtp_count"], counts)
    # L_MTP = λ/K Σ_k (1/T) Σ_i w·CE: the trainer divides the objective's sum by T.
    np.testing.assert_allclose(sums["objective"] / T, 2.5 / T + lam / K * ce.sum() / T, rtol=1e-5)
    logged = term.train_metrics(sums, T)
    np.testing.assert_allclose(logged["train/mtp_loss_2"], ce[1] / counts[1], rtol=1e-5)
    np.testing.assert_allclose(logged["train/mtp_loss"], np.mean(ce / counts), rtol=1e-5)


def test_each_depth_reads_no_token_past_its_own():
    config = resolve(tiny_config("/unused", **{"model.mtp_depth": 2}))
    validate_config(config)
    model = build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), *dummy_inputs(config))["params"])
    assert {"mtp_1", "mtp_2"} <= set(params)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    x = jax.random.randint(jax.random.key(1), (2, config.data.seq_len), 0, 256)
    j = 12  # change the token at position j of row 1
    changed = x.at[1, j].set((x[1, j] + 1) % 256)
    (logits, aux), (logits2, aux2) = apply(params, x), apply(params, changed)
    np.testing.assert_array_equal(logits[1, :j], logits2[1, :j])
    for k in (1, 2):  # depth k at position i reads tokens up to i + k
        before, after = aux["mtp_logits"][k - 1, 1], aux2["mtp_logits"][k - 1, 1]
        np.testing.assert_array_equal(before[: j - k], after[: j - k])
        assert not np.array_equal(before[j - k], after[j - k])  # and does read i + k


def test_a_run_with_mtp_resumes_exactly_in_microbatches(data_dir, tmp_path):
    steps = {"num_train_steps": 8, "eval_every": 4, "checkpoint_every": 4, "log_every": 4}
    config = tiny_config(data_dir, grad_accum_steps=2, **steps, **{"model.mtp_depth": 2})
    straight, _ = train_straight_and_interrupted(config, tmp_path, stop_at=4)
    last = metrics.read_metrics(straight)[-1]
    for k in (1, 2):
        assert 0 < last[f"train/mtp_loss_{k}"] < 5.6  # a uniform guess over 259 ids: 5.56
    # Generation runs the main model: the MTP modules' parameters change nothing.
    run_config, params = restore_run(straight)
    main = {k: v for k, v in params.items() if not k.startswith("mtp_")}
    without = resolve(tiny_config(data_dir))
    prompts = [[5, 6, 7], [40]]
    tokens = generation.LMGenerator(run_config, max_length=12)(params, prompts)
    np.testing.assert_array_equal(
        tokens, generation.LMGenerator(without, max_length=12)(main, prompts)
    )


def test_depth_zero_is_todays_model_and_weight_zero_trains_the_main_model_alike(data_dir, tmp_path):
    # mtp_depth=0 builds no module, adds no term and no aux entry: the step is today's program.
    plain = tiny_config(data_dir, **{"model.moe.moe_layers": (0,), "num_train_steps": 6})
    assert features.objective_terms(plain) == []
    model = build_model(resolve(plain))
    variables = model.init(jax.random.key(0), *dummy_inputs(resolve(plain)))
    assert not [k for k in variables["params"] if k.startswith("mtp_")]
    assert "mtp_logits" not in model.apply(variables, *dummy_inputs(resolve(plain)))[1]
    # With weight 0 (and a dense MTP block: the last block is dense here) nothing of the MTP
    # module reaches the main model's gradient: the main parameters train as without it, up to
    # the order of float sums (XLA fuses the larger program differently).
    zero = tiny_config(
        data_dir,
        **{"model.moe.moe_layers": (0,), "num_train_steps": 6},
        **{"model.mtp_depth": 1, "model.mtp_loss_weight": 0.0},
    )
    train_and_evaluate(plain, str(tmp_path / "plain"), log=quiet)
    train_and_evaluate(zero, str(tmp_path / "zero"), log=quiet)
    _, p_plain = restore_run(str(tmp_path / "plain"))
    _, p_zero = restore_run(str(tmp_path / "zero"))
    flat_zero = traverse_util.flatten_dict(p_zero)
    assert any(path[0] == "mtp_1" for path in flat_zero)
    for path, value in traverse_util.flatten_dict(p_plain).items():
        np.testing.assert_allclose(flat_zero[path], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model.mtp_depth": -1}, r"model.mtp_depth must be an integer >= 0; got -1"),
        ({"model.mtp_depth": 32}, r"model.mtp_depth=32 must be below data.seq_len=32"),
        (
            {"model.mtp_depth": 1, "model.mtp_loss_weight": float("inf")},
            r"model.mtp_loss_weight must be a number >= 0; got inf",
        ),
    ],
)
def test_bad_mtp_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(resolve(tiny_config("/unused", **overrides)))
