"""Muon (switchmoe/muon.py) against a NumPy transcription of the algorithm: Newton–Schulz on each
expert's matrix separately, AdamW exactly on what Muon leaves alone; and a Muon run resumes
bitwise."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from switchmoe import muon, optim
from switchmoe.config import default_config, validate_config
from switchmoe.models import abstract_params, build_model, resolve
from switchmoe.runs import checkpoints
from switchmoe.sharding import make_mesh
from switchmoe.training.trainer import Trainer
from tests.tiny import apply_overrides, tiny_config, train_straight_and_interrupted

NS = (3.4445, -4.7750, 2.0315)


def _config(**overrides):
    c = default_config()
    c.data.seq_len = 16
    c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.d_ff = 16, 2, 2, 24
    c.model.moe.num_experts, c.model.moe.expert_d_ff = 4, 12
    c.optimizer.name = "muon"
    c.optimizer.warmup_steps = 2
    c.optimizer.grad_clip_norm = 0.0  # the reference below has no clipping
    return resolve(apply_overrides(c, overrides))


def _newton_schulz(x, steps):
    """Orthogonalise one matrix: the quintic iteration of Jordan et al., in float64."""
    transposed = x.shape[0] > x.shape[1]
    x = x.T if transposed else x
    x = x / (np.linalg.norm(x) + 1e-8)
    a, b, c = NS
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transposed else x


def _muon_direction(m, kind):
    """The orthogonalised update of a parameter's momentum, by hand per kind of parameter."""
    if kind == "expert":  # [E, D, F]: one matrix per expert
        out = np.stack([_newton_schulz(m[e], 5) for e in range(m.shape[0])])
        fans = m.shape[1:]
    elif kind == "qkv":  # [D, H, Dh] -> [D, H·Dh]
        out = _newton_schulz(m.reshape(m.shape[0], -1), 5).reshape(m.shape)
        fans = (m.shape[0], m.shape[1] * m.shape[2])
    elif kind == "out":  # [H, Dh, D] -> [H·Dh, D]
        out = _newton_schulz(m.reshape(-1, m.shape[-1]), 5).reshape(m.shape)
        fans = (m.shape[0] * m.shape[1], m.shape[2])
    else:  # a plain [in, out] matrix
        out, fans = _newton_schulz(m, 5), m.shape
    return out * 0.2 * np.sqrt(max(fans))


def _kind(path):
    if path[-1] in ("w_in", "w_out") and "moe" in path:
        return "expert"
    if path[-2:] == ("out", "kernel"):
        return "out"
    if path[-1] == "kernel" and path[-2] in ("query", "key", "value"):
        return "qkv"
    if path[-1] in ("w_in", "w_out"):
        return "matrix"
    return "adamw"


def test_muon_orthogonalises_each_expert_and_leaves_the_rest_to_adamw():
    config = _config()
    opt = config.optimizer
    tx = optim.optimizer_for(config)
    rng = np.random.default_rng(0)
    shapes = abstract_params(build_model(config), config)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    flat = {p: v.astype(np.float64) for p, v in traverse_util.flatten_dict(params).items()}
    kinds = {p: _kind(p) for p in flat}
    assert {"expert", "qkv", "out", "matrix", "adamw"} == set(kinds.values())
    assert sorted(muon.muon_parameters(muon.parameter_axes(config))) == sorted(
        "/".join(p) for p, k in kinds.items() if k != "adamw"
    )
    # The router, the embedding and the norm scales are AdamW's.
    assert kinds[("block_1", "moe", "router_kernel")] == "adamw"
    assert kinds[("embed", "embedding")] == "adamw"

    schedule = optim.learning_rate_schedule(opt, config.num_train_steps)
    state = tx.init(params)
    mom = {p: np.zeros_like(v) for p, v in flat.items()}
    nu = {p: np.zeros_like(v) for p, v in flat.items()}
    beta, b1, b2, wd = opt.muon_beta, opt.b1, opt.b2, opt.weight_decay
    for t in (1, 2, 3):
        grads = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
        updates, state = tx.update(grads, state, params)
        got = traverse_util.flatten_dict(updates)
        lr = float(schedule(t - 1))
        for path, p in flat.items():
            g = traverse_util.flatten_dict(grads)[path].astype(np.float64)
            if kinds[path] == "adamw":  # optax.adamw, by hand
                mom[path] = b1 * mom[path] + (1 - b1) * g
                nu[path] = b2 * nu[path] + (1 - b2) * g**2
                m_hat, v_hat = mom[path] / (1 - b1**t), nu[path] / (1 - b2**t)
                want = -lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + wd * p)
            else:  # Muon: Nesterov momentum (bias-corrected), Newton–Schulz, RMS match, decay
                mom[path] = beta * mom[path] + (1 - beta) * g
                nesterov = beta * mom[path] / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
                want = -lr * (_muon_direction(nesterov, kinds[path]) + wd * p)
            np.testing.assert_allclose(got[path], want, rtol=2e-4, atol=2e-6, err_msg=str(path))
        params = jax.tree.map(lambda a, u: a + np.asarray(u), params, updates)
        flat = {p: v.astype(np.float64) for p, v in traverse_util.flatten_dict(params).items()}


def test_muon_settings_are_checked_before_anything_is_built():
    for key, value, match in (
        ("optimizer.muon_beta", 1.0, r"optimizer.muon_beta must be in \[0, 1\)"),
        ("optimizer.muon_ns_steps", 0, "optimizer.muon_ns_steps must be an int >= 1"),
        ("optimizer.muon_rms", 0.0, "optimizer.muon_rms"),
    ):
        with pytest.raises(ValueError, match=match):
            validate_config(_config(**{key: value}))
    with pytest.raises(ValueError, match="needs the model's parameter axes"):
        optim.make_optimizer(_config().optimizer, 10)


def test_a_muon_run_on_the_mesh_resumes_exactly_with_momentum_placed_like_the_experts(
    data_dir, tmp_path
):
    """On the 2×4 mesh (experts split over `expert`): each expert stack's momentum lives where
    its expert does, and a run stopped and resumed from its checkpoint ends bitwise where the
    uninterrupted run does (metrics, parameters and optimizer state)."""
    config = tiny_config(
        data_dir,
        **{
            "optimizer.name": "muon",
            "num_train_steps": 6,
            "checkpoint_every": 3,
            "eval_every": 3,  # the stopped run evaluates where it stops
            "log_every": 1,
            "final_eval": "sample",  # the whole split's evaluation is tested elsewhere
            "model.moe.num_experts": 8,
            "mesh.data": 2,
            "mesh.expert": 4,
        },
    )
    trainer = Trainer(resolve(config), make_mesh(config.mesh))
    placed = {
        tuple(getattr(k, "key", getattr(k, "name", None)) for k in path): s.spec
        for path, s in jax.tree_util.tree_leaves_with_path(trainer.opt_sharding)
    }
    momentum = [spec for path, spec in placed.items() if path[-3:] == ("block_1", "moe", "w_in")]
    assert momentum and all(spec[0] == "expert" for spec in momentum), placed
    straight, interrupted = train_straight_and_interrupted(config, tmp_path, stop_at=3)
    targets = trainer.abstract_state()
    a = checkpoints.Checkpointer(straight).restore(6, *targets)
    b = checkpoints.Checkpointer(interrupted).restore(6, *targets)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
