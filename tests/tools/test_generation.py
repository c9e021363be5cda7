"""Cached generation (switchmoe/generation.py) against recomputing the whole prefix at every
step, sampling filters against a brute-force NumPy reference, and what generation refuses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from switchmoe import generation
from switchmoe.models import build_model, dummy_inputs, resolve

T = 24  # cache length
PROMPTS = [[5], [7, 8, 9, 10], list(range(40, 49))]  # rows of different prompt lengths


def lm_config(**overrides):
    # Low capacity so that tokens drop: 24 tokens over 4 experts with C = ceil(24/4 · 0.5) = 3.
    base = {"model.moe.eval_capacity_factor": 0.5, "model.moe.min_capacity": 1}
    return resolve(tiny_config("/unused", **{**base, **overrides}))


def init_params(config, seed=0):
    variables = build_model(config).init(jax.random.key(seed), *dummy_inputs(config))
    return nn.meta.unbox(variables["params"])


def recompute_lm(config, params, prompts, eos, pad):
    """Greedy decoding that reruns the model on the whole [B, T] buffer at every step (no
    cache): the definition cached decoding must equal. Returns (tokens, logits[B, T-1, V])."""
    model = jax.jit(build_model(config).apply)
    rows = np.full((len(prompts), T), pad, np.int32)
    for i, p in enumerate(prompts):
        rows[i, : len(p)] = p
    done = np.zeros(len(prompts), bool)
    all_logits = []
    for t in range(T - 1):
        logits, _ = model({"params": params}, jnp.asarray(rows))
        step = np.asarray(logits[:, t])
        all_logits.append(step)
        for b, p in enumerate(prompts):
            if t + 1 < len(p):
                continue
            token = pad if done[b] else int(np.argmax(step[b]))
            done[b] |= token == eos
            rows[b, t + 1] = token
    return rows, np.stack(all_logits, axis=1)


CASES = {
    "dense": {"model.moe.num_experts": 0},
    "top1_drops": {},
    "top2_groups_of_8_gather": {
        "model.moe.num_selected": 2, "model.moe.group_size": 8, "model.moe.backend": "gather",
    },
    # Groups of two sequences (as the demo's span 8): generation routes each row as a group.
    "groups_across_rows": {"model.moe.group_size": 2 * T},
    "dropless": {"model.moe.backend": "dropless"},
    # Every block MoE, a router per block (hash, then learned top-1), and a shared expert.
    "moe_every_block_hash_first_shared_expert": {
        "model.moe.moe_every": 1, "model.moe.block_routers": ("hash", "top_k"),
        "model.moe.shared_d_ff": 16,
    },
    # A full expert's choice moves to the token's next-ranked expert with room: the cache must
    # replay the moves of earlier positions.
    "top2_next_choice": {"model.moe.num_selected": 2, "model.moe.overflow": "next_choice"},
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_cached_generation_equals_recomputing_the_prefix(case):
    config = lm_config(**CASES[case])
    params = init_params(config)
    generator = generation.LMGenerator(config, max_length=T)
    tok = generator.tokenizer
    tokens, logits = generator(params, PROMPTS, return_logits=True)
    if case == "groups_across_rows":
        assert generator.config.model.moe.group_size is None
        config = generator.config
    ref_tokens, ref_logits = recompute_lm(config, params, PROMPTS, tok.eos_id, tok.pad_id)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for row, p in zip(tokens, PROMPTS):
        assert row[: len(p)].tolist() == p
    if case in ("top1_drops", "top2_groups_of_8_gather", "groups_across_rows",
                "moe_every_block_hash_first_shared_expert"):  # fmt: skip
        # The reference dropped tokens: the cache must have tracked the experts' slots.
        _, aux = build_model(config).apply({"params": params}, jnp.asarray(ref_tokens))
        assert float(jnp.max(aux["stats"]["dropped_fraction"])) > 0.05
    if case == "top2_next_choice":  # choices moved in the reference: the cache replayed them
        _, aux = build_model(config).apply({"params": params}, jnp.asarray(ref_tokens))
        assert float(jnp.max(aux["stats"]["moved_fraction"])) > 0.05


def test_one_compilation_serves_every_prompt_and_sampling_setting():
    config = lm_config()
    params = init_params(config)
    generator = generation.LMGenerator(config, max_length=T)
    greedy = generator(params, PROMPTS)
    generator(params, [[1, 2], [3], [4, 5, 6]], jax.random.key(1), temperature=0.7, top_k=5)
    # top-k 1 leaves one token: sampling at any temperature is then greedy.
    again = generator(params, PROMPTS, jax.random.key(2), temperature=1.3, top_k=1, top_p=0.5)
    np.testing.assert_array_equal(again, greedy)
    assert generator.traces == 1


def test_sampling_is_reproducible_and_moves_with_the_key():
    config = lm_config()
    params = init_params(config)
    generator = generation.LMGenerator(config, max_length=T)
    a = generator(params, PROMPTS, jax.random.key(3), temperature=1.0)
    b = generator(params, PROMPTS, jax.random.key(3), temperature=1.0)
    c = generator(params, PROMPTS, jax.random.key(4), temperature=1.0)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    texts = generator.complete(params, ["def f(x):", ""], jax.random.key(5), temperature=1.0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def filter_reference(logits, top_k, top_p):
    """Token by token: the top-k set (ties at the k-th kept), then the nucleus over it."""
    out = np.full_like(logits, -np.inf)
    for row in range(logits.shape[0]):
        x = logits[row]
        k = len(x) if top_k == 0 else min(top_k, len(x))
        kth = np.sort(x)[::-1][k - 1]
        allowed = [i for i in range(len(x)) if x[i] >= kth]
        probs = np.exp(x[allowed] - x[allowed].max())
        probs /= probs.sum()
        order = np.argsort(-x[allowed], kind="stable")
        kept, mass = [], 0.0
        for j in order:
            if mass >= top_p:
                break
            kept.append(allowed[j])
            mass += probs[j]
        cutoff = min(x[i] for i in kept)
        for i in allowed:
            if x[i] >= cutoff:
                out[row, i] = x[i]
    return out


@pytest.mark.parametrize(
    "top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.8), (1, 0.3), (0, 0.05)]
)
def test_filter_logits_matches_a_brute_force_reference(top_k, top_p):
    rng = np.random.default_rng(top_k * 10 + int(top_p * 100))
    logits = rng.normal(0, 2, (6, 11)).astype(np.float32)
    logits[0, 3] = logits[0, 5]  # a tie
    ours = np.asarray(generation.filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(ours, filter_reference(logits, top_k, top_p))


def test_samples_follow_the_filtered_tempered_distribution():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    keys = jax.random.split(jax.random.key(0), 40_000)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.5, 4, 1.0), (2.0, 0, 0.7)):
        draws = jax.vmap(lambda k: generation.sample(logits, k, temperature, top_k, top_p))(keys)
        freq = np.bincount(np.asarray(draws).ravel(), minlength=6) / len(keys)
        scaled = np.asarray(logits) / temperature
        filtered = filter_reference(scaled, top_k, top_p)[0]
        want = np.exp(filtered - filtered.max())
        want /= want.sum()
        np.testing.assert_allclose(freq, want, atol=0.01)
    greedy = generation.sample(logits, jax.random.key(1), 0.0, 3, 0.5)
    assert int(greedy[0]) == 0


def test_generation_refuses_what_cannot_decode_as_it_evaluates():
    with pytest.raises(ValueError, match="causal routing.*expert_choice"):
        generation.LMGenerator(
            lm_config(**{"model.moe.router": "expert_choice", "model.moe.noncausal_ablation": True})
        )
    with pytest.raises(ValueError, match="Seq2SeqGenerator"):
        generation.LMGenerator(lm_config(**{"model.arch": "encoder_decoder"}))
    generator = generation.LMGenerator(lm_config(), max_length=T)
    with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
        generator(None, [[1], []])
    with pytest.raises(ValueError, match="top_p must be in"):
        generator(None, [[1]], temperature=1.0, top_p=0.0)


def test_cached_encoder_decoder_equals_recomputing_the_decoder_prefix():
    config = lm_config(**{"model.arch": "encoder_decoder", "data.num_sentinels": 16})
    params = init_params(config, seed=1)
    model = build_model(config)
    generator = generation.Seq2SeqGenerator(config, max_length=12)
    tok = generator.tokenizer
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (3, config.data.seq_len)).astype(np.int32)
    mask = np.ones(inputs.shape, np.float32)
    mask[1, 20:] = 0
    out, logits = generator(params, inputs, mask, return_logits=True)
    # Reference: the full decoder on the growing [B, 12] buffer, one step at a time.
    dec = np.full((3, 12), tok.pad_id, np.int32)
    dec[:, 0] = tok.bos_id
    done = np.zeros(3, bool)
    apply = jax.jit(model.apply)
    for t in range(12):
        ref, _ = apply({"params": params}, inputs, dec, mask)
        np.testing.assert_allclose(logits[:, t], ref[:, t], atol=1e-5, rtol=1e-5)
        token = np.where(done, tok.pad_id, np.argmax(np.asarray(ref[:, t]), -1))
        np.testing.assert_array_equal(out[:, t], token)
        done |= token == tok.eos_id
        if t + 1 < 12:
            dec[:, t + 1] = token
    assert generator.traces == 1
