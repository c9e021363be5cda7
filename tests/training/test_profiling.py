"""The profiler window and model FLOPs (switchmoe/training/profiling.py): FLOPs against a count
written out by hand for a tiny MoE model, MFU against FLOPs ÷ time ÷ peak, and a tiny run whose
chosen steps leave a trace."""

import glob
import os

import pytest
from tiny import tiny_config

from switchmoe.config import default_config
from switchmoe.models import resolve
from switchmoe.runs import read_metrics
from switchmoe.training import profiling
from switchmoe.training.trainer import train_and_evaluate


def test_model_flops_equal_a_hand_count_and_mfu_is_flops_over_time_over_peak(tmp_path):
    c = default_config()
    c.data.seq_len, c.batch_size = 8, 4
    c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.d_ff = 16, 2, 2, 24
    c.model.moe.num_experts, c.model.moe.num_selected, c.model.moe.moe_every = 4, 1, 2
    c.model.moe.expert_d_ff = 12
    config = resolve(c)
    V, D, F, E, Fe, L = config.model.vocab_size, 16, 24, 4, 12, 8
    attention = 4 * D * D + 2 * D  # query, key, value, out; two norm scales
    dense_block = attention + 2 * D * F
    moe_block = attention + D * E + (1 / E) * E * 2 * D * Fe  # router, one expert of four
    matmul_params = V * D + dense_block + moe_block + D  # tied embedding: the output projection
    scores = 6 * 2 * (8 + 8) * L * L * 2  # 6·H·(Dqk + Dv)·keys·queries, two layers
    want = 6 * matmul_params * L + scores
    assert profiling.model_flops_per_example(config) == pytest.approx(want, rel=1e-12)

    window = profiling.StepWindow(config, str(tmp_path), log=lambda line: None)
    window.peak = 2e9  # a made-up device of 2 GFLOP/s
    tokens_per_second = 1000.0  # 1000 / (4 × 8) = 31.25 steps/s
    m = window.metrics(tokens_per_second)
    assert m["train/model_flops_per_second"] == pytest.approx(want * 4 * 31.25)
    assert m["train/mfu"] == pytest.approx(want * 4 * 31.25 / 2e9)
    assert profiling.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert profiling.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert profiling.peak_flops("TPU v5 lite") == 197e12
    assert profiling.peak_flops("cpu") is None


def test_the_chosen_steps_are_traced_and_a_bad_window_is_refused(data_dir, tmp_path):
    lines = []
    config = tiny_config(
        data_dir,
        num_train_steps=4,
        log_every=2,
        eval_every=4,
        checkpoint_every=4,
        profile_steps="2:2",
        final_eval="sample",
    )
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, log=lines.append)
    assert f"profiling steps 2-3 into {workdir}/profile" in lines
    assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    rows = [r for r in read_metrics(workdir) if "train/model_flops_per_second" in r]
    assert rows and all(r["train/model_flops_per_second"] > 0 for r in rows)
    assert any("GFLOP/s" in line for line in lines if line.startswith("step 2/"))
    for bad in ("0:3", "5", "a:b", "3:0"):
        other = str(tmp_path / f"bad{bad.replace(':', '_')}")
        with pytest.raises(ValueError, match=r"profile_steps=.*expected 'START:COUNT'"):
            train_and_evaluate(tiny_config(data_dir, profile_steps=bad), other)
        assert not os.path.exists(other)
