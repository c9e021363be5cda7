"""The benchmark's quick preset writes well-formed results (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_preset_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench" / "quick.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as a user's run has
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--preset=quick", f"--out={out}"],
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
        assert "skipped" not in c, c
        for part in ("layer", "experts_only"):
            m = c[part]
            assert m["compile_s"] > 0 and m["median_s"] > 0
            assert len(m["times_s"]) >= 3 and all(t > 0 for t in m["times_s"])
        assert c["ratio_to_dense"] > 0 and c["achieved_flops_per_s"] > 0
        assert 0 <= c["routing_dispatch_share"] < 1 and 0 <= c["dropped_fraction"] <= 1
        if c["backend"] in ("einsum", "gather"):
            assert c["capacity"] >= 1 and c["capacity_factor"] in settings["capacity_factors"]
        else:
            assert c["capacity_factor"] is None
        memory = c["layer"]["memory"]
        if memory is not None:  # XLA:CPU reports it on this JAX; not every backend does
            assert memory["temp_bytes"] >= 0

    assert [r["model"] for r in result["train"]] == settings["train_models"]
    for r in result["train"]:
        assert r["median_s"] > 0 and r["tokens_per_s"] > 0 and r["params_total"] > 0
    dense = next(r for r in result["train"] if r["model"] == "dense")
    assert dense["num_experts"] == 0

    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("# MoE benchmark: quick preset on cpu")
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 2 + len(cases) + len(result["train"])  # two header rows
    for c in cases:
        assert any(
            line.startswith(f"| {c['backend']} | {c['num_experts']} |") for line in table_rows
        )
