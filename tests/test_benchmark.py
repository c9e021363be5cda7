"""The benchmark: its quick preset writes well-formed results (a smoke test: no timing is
asserted), and it refuses to time a program whose compiled FLOPs are not its hand count."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_preset_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench" / "quick.json"
    # One device, as a user's run has (the suite's 8 fake devices are set in-process by
    # conftest, not inherited); XLA_FLAGS keeps the suite's fast-compile level.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        # One capacity backend (a checked program) and one dropless: each branch below.
        [
            sys.executable,
            "-m",
            "experiments.benchmark",
            "--preset=quick",
            f"--out={out}",
            "--backends=gather,dropless_blocked",
            "--notrain",  # training steps: the device benchmark's smoke run below
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    machine = result["machine"]
    assert machine["platform"] == jax.default_backend() and machine["cpu_count"] >= 1
    for package in ("jax", "flax"):
        assert machine["versions"][package]
    settings = result["settings"]
    assert settings["preset"] == "quick"
    assert result["matmul"]["flops_per_s"] > 0 and result["dense"]["median_s"] > 0

    cases = result["cases"]
    expected = {(b, e) for b in settings["backends"] for e in settings["experts"]}
    assert {(c["backend"], c["num_experts"]) for c in cases} == expected
    for c in cases:
        assert "skipped" not in c and "refused" not in c, c
        for part in ("layer", "experts_only"):
            m = c[part]
            assert m["compile_s"] > 0 and m["median_s"] > 0
            if c["backend"] in ("einsum", "gather"):  # checked programs: no loops inside
                assert abs(m["compiled_flops"] / m["expected_flops"] - 1) < 0.05
            assert len(m["times_s"]) >= 3 and all(t > 0 for t in m["times_s"])
        assert c["ratio_to_dense"] > 0 and c["achieved_flops_per_s"] > 0
        # × dense pairs each layer call with the dense call timed right after it.
        layer, paired = c["layer"]["times_s"], c["layer"]["baseline_times_s"]
        assert len(paired) == len(layer)
        assert c["ratio_to_dense"] == pytest.approx(np.median(np.divide(layer, paired)))
        assert 0 <= c["routing_dispatch_share"] < 1 and 0 <= c["dropped_fraction"] <= 1
        if c["backend"] in ("einsum", "gather"):
            assert c["capacity"] >= 1 and c["capacity_factor"] in settings["capacity_factors"]
        else:
            assert c["capacity_factor"] is None
        memory = c["layer"]["memory"]
        if memory is not None:  # XLA:CPU reports it on this JAX; not every backend does
            assert memory["temp_bytes"] >= 0

    assert result["train"] == []

    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("# MoE benchmark: quick preset on cpu")
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + len(cases)  # the header row, no training table
    for c in cases:
        assert any(
            line.startswith(f"| {c['backend']} | {c['num_experts']} |") for line in table_rows
        )


@pytest.mark.slow
def test_the_device_benchmark_smoke_run_writes_every_part(tmp_path):
    out = tmp_path / "device.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.device_benchmark", "--tiny", f"--out={out}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["device_kind"] and result["peak_bf16_flops"] is None  # CPU
    assert result["not_lowered"] == {}  # everything lowers for the platform it runs on
    parts = result["parts"]
    assert sorted(parts) == ["top1_capacity", "top2_dropless"]
    assert parts["top2_dropless"]["settings"]["num_selected"] == 2
    for part in parts.values():
        assert part["settings"]["dtype"] == "bfloat16" and part["dense"]["mfu"] is None
        timed = [c for c in part["cases"] if "achieved_flops_per_s" in c]
        assert timed and all(c["mfu"] is None and c["ratio_to_dense"] > 0 for c in timed)
    assert [c["backend"] for c in parts["top2_dropless"]["cases"]] == ["dropless_blocked"]
    # Training steps, the models stepped in turn: step i of each against dense's.
    train = {r["model"]: r for r in result["train"]}
    assert sorted(train) == ["dense", "switch_base8"]
    assert train["dense"]["num_experts"] == 0 and train["dense"]["ratio_to_dense"] == 1.0
    for r in train.values():
        assert r["median_s"] > 0 and r["model_flops_per_step"] > 0 and r["mfu"] is None
        ratios = np.divide(r["times_s"], train["dense"]["times_s"])
        assert r["ratio_to_dense"] == pytest.approx(np.median(ratios))
    assert out.with_suffix(".md").read_text().startswith("# Device benchmark: cpu (cpu)")


def _ffn_program(value: bool, T=128, D=64, F=128):
    from experiments import benchmark

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k1, (T, D))
    w1, w2 = jax.random.normal(k2, (D, F)), jax.random.normal(k3, (F, D))
    c = jax.random.normal(k4, (T, D))
    loss = lambda x, w1, w2: jnp.sum((jax.nn.relu(x @ w1) @ w2) * c)
    transform = jax.value_and_grad if value else jax.grad
    return transform(loss, argnums=(0, 1, 2)), (x, w1, w2), benchmark.ffn_flops(T, D, F)


def test_a_program_that_drops_a_matmul_is_refused_and_value_and_grad_is_not():
    from experiments import benchmark

    timing = dict(warmup=0, repeats=1, max_seconds=1.0)
    # jax.grad of Σ y·c never reads y: XLA drops the second forward matmul (1/6 of the work).
    fn, args, hand = _ffn_program(value=False)
    with pytest.raises(benchmark.FlopMismatch, match=r"-16\.\d%"):
        benchmark.measure(fn, args, **timing, expected_flops=hand, what="grad only")
    fn, args, hand = _ffn_program(value=True)
    m = benchmark.measure(fn, args, **timing, expected_flops=hand, what="value and grad")
    assert abs(m["compiled_flops"] / hand - 1) < 0.02


@pytest.mark.parametrize("backend", ["einsum", "gather"])
def test_the_capacity_layer_hand_count_is_what_xla_compiles(backend):
    import flax.linen as nn

    from experiments import benchmark
    from switchmoe.moe.layer import MoeLayer

    x = jax.random.normal(jax.random.key(0), (2, 64, 32))
    layer = MoeLayer(num_experts=4, d_ff=64, num_selected=2, backend=backend)
    params = nn.meta.unbox(layer.init(jax.random.key(1), x)["params"])
    loss = lambda p, x: (lambda y, aux: jnp.sum(y) + aux["loss"])(
        *layer.apply({"params": p}, x, deterministic=False)
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    C = 40  # ceil(2 · 64 / 4 · 1.25)
    hand = benchmark.capacity_layer_flops(backend, 2, 64, 2, 4, C, 32, 64)
    assert abs(benchmark.compiled_flops(compiled) / hand - 1) < benchmark.FLOP_TOLERANCE


def test_peer_cases_compute_what_hugging_face_computes_on_shared_weights():
    pytest.importorskip("transformers")
    from experiments import benchmark, peer_cases

    s = dict(peer_batch=2, peer_length=16, d_model=16, d_ff=32, warmup=0, repeats=1,
             max_seconds=1.0)  # fmt: skip
    timing = dict(warmup=0, repeats=1, max_seconds=1.0)
    measure = lambda fn, args, **check: benchmark.measure(fn, args, **timing, **check)
    x = jax.random.normal(jax.random.key(0), (1, 32, 16))
    dense = benchmark.dense_case(x, 32, jnp.float32, measure)
    records = peer_cases.run_peer_cases(s, measure, dense, log=lambda line: None)
    assert [r["case"] for r in records] == ["dense", "switch_e8", "switch_e64", "mixtral"]
    for r in records[1:]:  # the forward outputs agreed before anything was timed
        assert all(d <= peer_cases.TOLERANCE for d in r["max_abs_difference"].values())
        assert r["ratio"] > 0 and r["peer_timing"]["median_s"] > 0
    assert set(records[1]["max_abs_difference"]) == {"einsum", "gather"}
    lines = peer_cases.peer_markdown(records)
    assert any("SwitchTransformersSparseMLP" in line for line in lines)
