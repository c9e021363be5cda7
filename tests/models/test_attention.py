"""The attention settings of the open decoder-only families against their formulas, in NumPy:
grouped key/value heads, q/k RMSNorm per head or over the projection, projection biases, the
rotary base and a sliding window; and cached decoding equal to the full pass with all of them."""

import jax
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta

from switchmoe.models.decoder import SelfAttention

B, L, D, H, DH = 2, 9, 24, 4, 6


def rms(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def rotary(x, theta):
    """x[L, Dh] at positions 0..L-1: the two halves rotated by position · theta^(-i/half)."""
    half = x.shape[-1] // 2
    angle = np.arange(len(x))[:, None] * theta ** (-np.arange(half) / half)
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], -1)  # fmt: skip


def reference(x, p, kv_heads, qk_norm, bias, theta, window, eps):
    """One row x[L, D], every query head by a loop: head h reads key/value head h // (H/Hkv)."""
    get = lambda *k: np.asarray(p["/".join(k)], np.float64)
    project = lambda name: (
        np.einsum("ld,dhk->lhk", x, get(name, "kernel"))
        + (get(name, "bias") if bias != "none" else 0.0)
    )
    q, k, v = project("query"), project("key"), project("value")
    if qk_norm == "head":
        q, k = rms(q, get("query_norm", "scale"), eps), rms(k, get("key_norm", "scale"), eps)
    elif qk_norm == "projection":
        q = rms(q.reshape(L, -1), get("query_norm", "scale"), eps).reshape(q.shape)
        k = rms(k.reshape(L, -1), get("key_norm", "scale"), eps).reshape(k.shape)
    out = np.zeros((L, H, DH))
    for h in range(H):
        g = h // (H // kv_heads)
        qh, kh = rotary(q[:, h], theta), rotary(k[:, g], theta)
        for i in range(L):
            keys = [j for j in range(i + 1) if not window or i - j < window]
            s = np.array([qh[i] @ kh[j] for j in keys]) / np.sqrt(DH)
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ v[keys, g]
    y = np.einsum("lhk,hkd->ld", out, get("out", "kernel"))
    return y + (get("out", "bias") if bias == "all" else 0.0)


CASES = [
    dict(num_kv_heads=2, qk_norm="none", attention_bias="none", rope_theta=1e4, sliding_window=0),
    dict(num_kv_heads=1, qk_norm="head", attention_bias="qkv", rope_theta=1e6, sliding_window=4),
    dict(num_kv_heads=4, qk_norm="projection", attention_bias="all", rope_theta=500.0,
         sliding_window=3),
]  # fmt: skip


@pytest.mark.parametrize("settings", CASES)
def test_attention_equals_its_formula_and_decoding_equals_the_full_pass(settings):
    layer = SelfAttention(H, DH, norm_eps=1e-5, **settings)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    positions = np.broadcast_to(np.arange(L), (B, L))
    params = meta.unbox(layer.init(jax.random.key(0), x, positions, None, True)["params"])
    # Every parameter at random (norm scales and biases are initialised to 1 and 0).
    flat = traverse_util.flatten_dict(params)
    flat = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in flat.items()}
    params = traverse_util.unflatten_dict(flat)
    y = np.asarray(layer.apply({"params": params}, x, positions, None, True))
    p = {"/".join(k): v for k, v in flat.items()}
    args = (settings["num_kv_heads"], settings["qk_norm"], settings["attention_bias"],
            settings["rope_theta"], settings["sliding_window"], 1e-5)  # fmt: skip
    for b in range(B):
        np.testing.assert_allclose(y[b], reference(x[b].astype(np.float64), p, *args),
                                   rtol=2e-4, atol=2e-4)  # fmt: skip

    # Cached decoding, one position at a time, gives the full pass's outputs.
    cache = layer.apply({"params": params}, x, positions, None, True, decode=True,
                        mutable=["cache"])[1]  # fmt: skip
    steps = []
    for i in range(L):
        out, cache = layer.apply(
            {"params": params, **cache}, x[:, i : i + 1], positions[:, i : i + 1], None, True,
            decode=True, step_index=np.int32(i), mutable=["cache"],
        )  # fmt: skip
        steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, 1), y, rtol=1e-5, atol=1e-5)
