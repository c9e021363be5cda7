"""Dispatch backends: agreement with each other and with a per-token loop, outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from switchmoe.moe import dispatch, routing
from switchmoe.moe.experts import StackedExperts
from switchmoe.moe.layer import MoeLayer
from switchmoe.moe.routers import expert_choice, top_k

G, S, E, D, F = 3, 16, 4, 6, 8


def make_inputs(seed, activation="relu"):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (G, S, D))
    router = jax.random.normal(keys[1], (D, E)) + jnp.linspace(0.0, 1.0, E)  # skew: overflow
    w = {
        "w_in": jax.random.normal(keys[2], (E, D, F)) / np.sqrt(D),
        "w_out": jax.random.normal(keys[3], (E, F, D)) / np.sqrt(F),
    }
    if activation in ("swiglu", "geglu"):
        w["w_gate"] = jax.random.normal(keys[4], (E, D, F)) / np.sqrt(D)
    return x, router, w


def routed(x, router, k, C, policy="top_k"):
    logits = routing.router_logits(x, router)
    if policy == "expert_choice":
        return expert_choice.expert_choice_route(logits, capacity=C)
    rules = {"top_k_next_choice": {"overflow": "next_choice"},
             "top_k_probability": {"drop_priority": "probability"}}.get(policy, {})  # fmt: skip
    return top_k.top_k_route(logits, num_selected=k, capacity=C, rank_major=not rules, **rules)


@pytest.mark.parametrize(
    "policy,k,factor",
    [
        ("top_k", 1, 0.5),
        ("top_k", 1, 1.25),
        ("top_k", 2, 0.5),
        ("expert_choice", 1, 1.0),
        # The capacity rules (overflow, drop priority) change the plan only: every backend reads it.
        ("top_k_next_choice", 2, 0.5),
        ("top_k_probability", 2, 0.5),
    ],
)
def test_backends_agree_on_output_and_gradients(policy, k, factor):
    x, router, w = make_inputs(seed=k)
    C = routing.expert_capacity(S, E, 1 if policy == "expert_choice" else k, factor)

    def run(backend, x, router, w):
        experts = StackedExperts(**w, activation="relu")
        return dispatch.moe_forward(backend, x, routed(x, router, k, C, policy), experts)

    r = routed(x, router, k, C, policy)
    if policy in ("top_k", "top_k_probability") and factor < 1:
        assert (np.asarray(r.slot) < 0).any(), "overflow case must drop tokens"
    if policy == "top_k_next_choice":  # choices moved off their asked expert
        assert (np.asarray(r.expert) != np.asarray(r.ranking)[..., :k]).any()
    cotangent = jax.random.normal(jax.random.key(9), (G, S, D))
    loss = lambda backend, *args: jnp.sum(run(backend, *args) * cotangent)
    outs, grads = {}, {}
    for backend in dispatch.BACKENDS:
        outs[backend] = run(backend, x, router, w)
        grads[backend] = jax.grad(loss, argnums=(1, 2, 3))(backend, x, router, w)
    # All backends equal a loop over tokens computing Σ gate·expert(x) over the kept choices.
    expected = ref.moe_output(
        np.asarray(x, np.float64),
        np.asarray(r.expert),
        np.asarray(r.slot),
        np.asarray(r.gate, np.float64),
        np.asarray(w["w_in"], np.float64),
        np.asarray(w["w_out"], np.float64),
    )
    for backend in dispatch.BACKENDS:
        np.testing.assert_allclose(outs[backend], expected, atol=1e-5, rtol=1e-5, err_msg=backend)
        for a, b in zip(jax.tree.leaves(grads[backend]), jax.tree.leaves(grads["einsum"])):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=backend)
    # The router gets gradient through the gates.
    assert np.abs(np.asarray(grads["einsum"][1])).max() > 1e-4


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "geglu"])
def test_no_drops_equals_loop_over_tokens(activation):
    x, router, w = make_inputs(seed=3, activation=activation)
    C = routing.expert_capacity(S, E, 2, 100.0)  # = S: nothing can drop
    r = routed(x, router, 2, C)
    assert (np.asarray(r.slot) >= 0).all()
    f64 = lambda a: np.asarray(a, np.float64)
    expected = ref.moe_output(
        f64(x),
        np.asarray(r.expert),
        np.asarray(r.slot),
        f64(r.gate),
        f64(w["w_in"]),
        f64(w["w_out"]),
        None if "w_gate" not in w else f64(w["w_gate"]),
        activation,
    )
    for backend in dispatch.BACKENDS:
        y = dispatch.moe_forward(backend, x, r, StackedExperts(**w, activation=activation))
        np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5, err_msg=backend)


def test_dropped_tokens_give_zero_output():
    x, router, w = make_inputs(seed=4)
    r = routed(x, router, 1, 1)  # one slot per expert: most tokens drop
    dropped = np.asarray(r.slot[..., 0]) < 0
    assert dropped.sum() > G * S // 2
    for backend in dispatch.BACKENDS:
        y = np.asarray(dispatch.moe_forward(backend, x, r, StackedExperts(**w)))
        assert np.all(y[dropped] == 0), backend
        assert np.all(np.abs(y[~dropped]).sum(-1) > 0), backend


def test_slot_table_and_masks_match_the_routing_result():
    x, router, w = make_inputs(seed=5)
    r = routed(x, router, 2, 3)
    table = np.asarray(dispatch.GatherDispatch.slot_table(r))
    mask, combine = (np.asarray(m) for m in dispatch.EinsumDispatch.masks(r, jnp.float32))
    expert, slot, gate = (np.asarray(a) for a in (r.expert, r.slot, r.gate))
    expected_table = np.full((G, E, 3), -1)
    expected_mask = np.zeros((G, S, E, 3))
    expected_combine = np.zeros((G, S, E, 3))
    for g in range(G):
        for s in range(S):
            for k in range(2):
                if slot[g, s, k] >= 0:
                    expected_table[g, expert[g, s, k], slot[g, s, k]] = s
                    expected_mask[g, s, expert[g, s, k], slot[g, s, k]] = 1
                    expected_combine[g, s, expert[g, s, k], slot[g, s, k]] = gate[g, s, k]
    np.testing.assert_array_equal(table, expected_table)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(combine, expected_combine, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_layer_equals_capacity_layers_when_nothing_drops(k):
    x = jax.random.normal(jax.random.key(0), (2, 16, D))
    settings = dict(num_experts=E, d_ff=F, num_selected=k, eval_capacity_factor=E / k)
    layers = {b: MoeLayer(backend=b, **settings) for b in dispatch.BACKENDS}
    params = layers["einsum"].init(jax.random.key(1), x)
    outs = {}
    for backend, layer in layers.items():
        outs[backend], aux = layer.apply(params, x)
        assert float(aux["stats"]["dropped_count"]) == 0
    for backend in ("gather", "dropless"):
        np.testing.assert_allclose(outs[backend], outs["einsum"], atol=1e-5, rtol=1e-5)


def test_dropless_layer_keeps_what_capacity_drops():
    x = jax.random.normal(jax.random.key(0), (2, 16, D))
    settings = dict(num_experts=E, d_ff=F, eval_capacity_factor=0.25, min_capacity=1)
    capped = MoeLayer(backend="einsum", **settings)
    dropless = MoeLayer(backend="dropless", **settings)
    params = capped.init(jax.random.key(1), x)
    _, aux_c = capped.apply(params, x)
    y_d, aux_d = dropless.apply(params, x)
    assert float(aux_c["stats"]["dropped_fraction"]) > 0.5
    assert float(aux_d["stats"]["dropped_fraction"]) == 0.0
    assert np.all(np.abs(np.asarray(y_d)).sum(-1) > 0)


def test_shared_expert_adds_a_dense_ffn_on_every_token():
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    layer = MoeLayer(
        num_experts=E, d_ff=F, shared_d_ff=5, eval_capacity_factor=0.25, min_capacity=1
    )
    variables = layer.init(jax.random.key(1), x)
    y, _ = layer.apply(variables, x)
    without = MoeLayer(num_experts=E, d_ff=F, eval_capacity_factor=0.25, min_capacity=1)
    p = nn.meta.unbox(variables["params"])
    routed_only, _ = without.apply({"params": {k: v for k, v in p.items() if k != "shared"}}, x)
    shared = p["shared"]
    dense = np.stack(
        [
            ref.ffn(
                np.asarray(t, np.float64), np.asarray(shared["w_in"]), np.asarray(shared["w_out"])
            )
            for t in np.asarray(x).reshape(-1, D)
        ]
    )
    np.testing.assert_allclose(np.asarray(y - routed_only).reshape(-1, D), dense, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Dropless implementations (ragged_dot, blocked) against the per-token reference.


def uneven_routing(seed, k, capacity, empty_expert=E - 1):
    """Skewed loads, one expert that receives no token at all, optional drops."""
    x, router, w = make_inputs(seed)
    router = router.at[:, empty_expert].set(0.0)
    logits = routing.router_logits(x, router).at[..., empty_expert].add(-1e4).at[..., 0].add(2.0)
    r = top_k.top_k_route(logits, num_selected=k, capacity=capacity)
    assert not (np.asarray(r.expert) == empty_expert).any()
    return x, r, w


@pytest.mark.parametrize(
    "implementation,block_size",
    # block_size applies to "blocked" only: 1 (no padding), 4 (padding), 128 (> any run), auto.
    [("ragged_dot", None), ("blocked", 1), ("blocked", 4), ("blocked", 128), ("blocked", None)],
)
@pytest.mark.parametrize("k,capacity", [(1, None), (2, None), (1, 3), (2, 5)])
def test_dropless_implementations_equal_the_per_token_reference(
    implementation, block_size, k, capacity
):
    x, r, w = uneven_routing(seed=10 + k, k=k, capacity=capacity)
    kept = np.asarray(r.slot) >= 0
    requested = np.bincount(np.asarray(r.expert).reshape(-1), minlength=E)
    assert requested[-1] == 0 and requested.max() >= 1.5 * requested[:-1].min(), requested
    if capacity is not None:
        assert not kept.all(), "the capped cases must drop pairs (slot < 0)"
    cotangent = np.asarray(jax.random.normal(jax.random.key(7), (G, S, D)))

    def loss(x, gate, w_in, w_out):
        experts = StackedExperts(w_in=w_in, w_out=w_out)
        y = dispatch.dropless_moe(x, r.plan.replace(gate=gate), experts, implementation, block_size)
        return jnp.sum(y * cotangent), y

    grads, y = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, r.gate, w["w_in"], w["w_out"])
    f64 = lambda a: np.asarray(a, np.float64)
    args = (f64(x), np.asarray(r.expert), np.asarray(r.slot), f64(r.gate))
    expected_y = ref.moe_output(*args, f64(w["w_in"]), f64(w["w_out"]))
    expected_grads = ref.moe_output_grads(*args, f64(w["w_in"]), f64(w["w_out"]), cotangent)
    np.testing.assert_allclose(y, expected_y, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("x", "gate", "w_in", "w_out"), grads, expected_grads):
        if name == "gate":  # a dropped pair's gate is 0 and it has no output: compare kept ones
            got, want = np.asarray(got)[kept], want[kept]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)
    # The empty expert gets exactly zero weight gradient.
    assert np.all(np.asarray(grads[2])[-1] == 0) and np.all(np.asarray(grads[3])[-1] == 0)


@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
@pytest.mark.parametrize("k,capacity", [(1, None), (2, 5)])
def test_block_layout_places_each_kept_pair_once_in_a_block_of_its_expert(block_size, k, capacity):
    _, r, _ = uneven_routing(seed=20, k=k, capacity=capacity)
    layout = dispatch.block_layout(r, E, block_size)
    pair_row, row_pair = np.asarray(layout.pair_row), np.asarray(layout.row_pair)
    block_expert, used = np.asarray(layout.block_expert), int(layout.used_blocks)
    expert = np.asarray(r.expert).reshape(-1)
    kept = np.asarray(r.slot).reshape(-1) >= 0
    M = expert.size
    # The static bound: M + min(E, M)·(Bk − 1) rows, in whole blocks.
    assert block_expert.size == (M + min(E, M) * (block_size - 1)) // block_size
    assert row_pair.size == block_expert.size * block_size
    assert np.all(np.diff(block_expert) >= 0)  # blocks sorted by expert
    # Expected: expert e uses ceil(n_e / Bk) blocks.
    n = np.bincount(expert[kept], minlength=E)
    assert used == sum(-(-c // block_size) for c in n)
    for m in range(M):
        if not kept[m]:
            assert pair_row[m] == -1
            continue
        row = pair_row[m]
        assert row_pair[row] == m
        assert row // block_size < used and block_expert[row // block_size] == expert[m]
    assert sorted(row_pair[row_pair >= 0].tolist()) == np.flatnonzero(kept).tolist()


def test_layer_dropless_implementations_agree_and_bad_names_raise():
    x = jax.random.normal(jax.random.key(0), (2, 16, D))
    settings = dict(num_experts=E, d_ff=F, num_selected=2, backend="dropless")
    layer = MoeLayer(dropless_implementation="blocked", block_size=4, **settings)
    params = layer.init(jax.random.key(1), x)
    y_blocked, _ = layer.apply(params, x)
    y_ragged, _ = MoeLayer(dropless_implementation="ragged_dot", **settings).apply(params, x)
    y_default, _ = MoeLayer(**settings).apply(params, x)
    np.testing.assert_allclose(y_blocked, y_ragged, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y_default, y_ragged, atol=1e-5, rtol=1e-5)
    # Blocked GEMMs where ragged_dot is slow (XLA:CPU); the grouped GEMM elsewhere.
    expected = "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    assert dispatch.default_dropless_implementation() == expected
    with pytest.raises(ValueError, match=r"dropless_implementation must be None or one of"):
        MoeLayer(dropless_implementation="megablocks", **settings).init(jax.random.key(1), x)


@pytest.mark.parametrize(
    "M,E_,expected", [(4096, 8, 128), (4096, 64, 64), (4096, 128, 32), (64, 64, 16), (100, 1, 64)]
)
def test_auto_block_size_is_the_mean_load_as_a_power_of_two_within_16_128(M, E_, expected):
    assert dispatch.auto_block_size(M, E_) == expected


@pytest.mark.parametrize("backend", ["einsum", "gather", "dropless"])
def test_every_backend_takes_numpy_inputs_eagerly_and_traced(backend):
    x = np.random.default_rng(0).normal(size=(2, 8, 6)).astype(np.float32)
    layer = MoeLayer(num_experts=4, d_ff=8, backend=backend, num_selected=2)
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), x))  # NumPy input, traced
    params = layer.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, params)
    eager, _ = layer.apply(params, x)
    traced, _ = jax.jit(lambda p: layer.apply(p, x))(params)  # NumPy array captured in jit
    reference, _ = layer.apply(params, jnp.asarray(x))
    np.testing.assert_allclose(eager, reference, rtol=1e-6)
    np.testing.assert_allclose(traced, reference, rtol=1e-5, atol=1e-6)


def test_auto_is_the_platform_rule_and_computes_what_the_backend_it_picks_computes():
    assert [dispatch.resolve_backend("auto", p) for p in ("cpu", "gpu", "tpu")] == [
        "gather", "gather", "einsum",
    ]  # fmt: skip
    assert all(dispatch.resolve_backend(b, "tpu") == b for b in ("einsum", "gather", "dropless"))
    assert MoeLayer(num_experts=E, d_ff=F).backend == "auto"  # the default
    x = jax.random.normal(jax.random.key(0), (2, S, D))
    outputs = {}
    for backend in ("auto", dispatch.resolve_backend("auto")):
        layer = MoeLayer(num_experts=E, d_ff=F, backend=backend, train_capacity_factor=0.5)
        params = layer.init(jax.random.key(1), x)["params"]
        outputs[backend] = np.asarray(layer.apply({"params": params}, x)[0])
    np.testing.assert_array_equal(*outputs.values())
