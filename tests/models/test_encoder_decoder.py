"""The T5-style encoder–decoder: span corruption, relative positions, causality, training,
restore and greedy decoding, parameter counts of the paper-sized configs."""

import itertools
import math
from collections import Counter

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from configs import switch_t5
from switchmoe import generation, sharding
from switchmoe.config import validate_config
from switchmoe.data import span_corruption as sc
from switchmoe.models import abstract_params, build_model, count_params, resolve
from switchmoe.models.decoder import Block
from switchmoe.models.encoder_decoder import relative_position_bucket
from switchmoe.runs import metrics, restore_run
from switchmoe.training.trainer import Trainer, train_and_evaluate

quiet = lambda line: None
SENTINELS = [1000 - i for i in range(100)]
EOS = 2


def ed_config(data_dir, **overrides):
    return tiny_config(
        data_dir,
        **{"model.arch": "encoder_decoder", "data.num_sentinels": 16, **overrides},
    )


# -- Span corruption ------------------------------------------------------------------------


def corrupt_reference(tokens, mask, sentinels, eos):
    """A token-by-token loop over the T5 recipe."""
    inputs, targets, span = [], [], -1
    for i, (t, noisy) in enumerate(zip(tokens, mask)):
        starts = noisy and (i == 0 or not mask[i - 1])
        if starts:
            span += 1
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
        if noisy:
            targets.append(t)
        else:
            inputs.append(t)
    return inputs + [eos], targets + [eos]


@pytest.mark.parametrize("raw", [10, 57, 141, 300])
def test_span_corruption_matches_the_recipe_and_interleaves_back(raw):
    lengths = sc.span_lengths(raw, 0.15, 3.0)
    for key in range(20):
        tokens = (np.arange(raw) * 7 + key) % 200
        mask = sc.noise_mask(lengths, f"k{key}")
        # Noise and span counts are exactly T5's rounding; spans alternate, ending with noise.
        assert mask.sum() == lengths.num_noise == min(max(round(raw * 0.15), 1), raw - 1)
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert starts.sum() == lengths.num_spans == max(round(lengths.num_noise / 3.0), 1)
        assert not mask[0] and mask[-1]
        inputs, targets = sc.corrupt(tokens, mask, SENTINELS, EOS)
        ref_inputs, ref_targets = corrupt_reference(tokens, mask, SENTINELS, EOS)
        assert inputs.tolist() == ref_inputs and targets.tolist() == ref_targets
        assert (len(inputs), len(targets)) == (lengths.inputs, lengths.targets)
        # Interleaving inputs and targets by sentinel gives the original text back.
        assert sc.fill_in_sentinels(inputs, targets, SENTINELS, EOS) == tokens.tolist()


def test_span_layout_is_a_uniform_composition():
    # 5 items in 3 non-empty spans: C(4, 2) = 6 compositions, each drawn about 1/6 of the time.
    counts = Counter(tuple(sc.random_composition(5, 3, f"u{k}")) for k in range(1200))
    assert set(counts) == {c for c in itertools.product(range(1, 4), repeat=3) if sum(c) == 5}
    assert max(counts.values()) < 1.3 * 200 and min(counts.values()) > 0.7 * 200


def test_raw_length_is_the_longest_window_that_fits():
    for seq_len in (16, 32, 128, 512):
        lengths = sc.raw_length(seq_len, 0.15, 3.0)
        assert lengths.inputs <= seq_len < sc.span_lengths(lengths.raw + 1, 0.15, 3.0).inputs
    assert sc.raw_length(512, 0.15, 3.0).targets == 114  # T5's 512 -> 114 targets


def test_pipeline_batches_are_deterministic_and_reconstruct_the_corpus(data_dir):
    config = resolve(ed_config(data_dir))
    pipe, again = sc.make_pipeline(config), sc.make_pipeline(config)
    assert isinstance(pipe, sc.SpanCorruptionPipeline)
    b0 = pipe.batch(3)
    for name, value in again.batch(3).items():
        np.testing.assert_array_equal(value, b0[name])
    assert not np.array_equal(pipe.batch(4)["inputs"], b0["inputs"])
    # Process slices are rows of the global batch.
    halves = [pipe.batch(3, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["targets"] for h in halves]), b0["targets"])
    # Teacher forcing: decoder inputs are BOS then the targets shifted right.
    bos = pipe.tokenizer.bos_id
    np.testing.assert_array_equal(b0["decoder_inputs"][:, 0], bos)
    np.testing.assert_array_equal(b0["decoder_inputs"][:, 1:], b0["targets"][:, :-1])
    # Filling the sentinels back in gives each row's packed window.
    windows = pipe.packed(config.data.train_split).windows[pipe.train_indices(3)]
    for row in range(len(windows)):
        filled = sc.fill_in_sentinels(b0["inputs"][row], b0["targets"][row], pipe.sentinels, 258)
        assert filled == windows[row].tolist()
        assert b0["input_mask"][row].sum() == pipe.lengths.inputs


def test_too_few_sentinels_is_refused_before_anything_runs(data_dir):
    config = resolve(ed_config(data_dir, **{"data.num_sentinels": 1}))
    with pytest.raises(ValueError, match=r"data.num_sentinels=1 .* allowed: >= 2"):
        validate_config(config)


# -- Relative positions ---------------------------------------------------------------------


def bucket_reference(rel, bidirectional, num_buckets, max_distance):
    """T5's bucketing written per scalar."""
    n, base = -rel, 0
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            base = num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    exact = num_buckets // 2
    if n < exact:
        return base + n
    far = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
    return base + min(far, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_equal_the_formula(bidirectional):
    rel = np.arange(-300, 301)
    got = relative_position_bucket(
        jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    expected = [bucket_reference(int(r), bidirectional, 32, 128) for r in rel]
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert np.asarray(got).max() < 32


# -- Causality and batch-prioritized routing ------------------------------------------------


def small_model(data_dir, **overrides):
    config = resolve(
        ed_config(
            data_dir,
            **{
                "model.moe.moe_every": 1,
                "model.moe.num_selected": 2,
                "model.moe.eval_capacity_factor": 0.5,  # tight: tokens drop in both stacks
                "model.moe.min_capacity": 1,
                **overrides,
            },
        )
    )
    model = build_model(config)
    inputs = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    decoder_inputs = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    params = model.init(jax.random.key(2), inputs, decoder_inputs)["params"]
    return model, params, inputs, decoder_inputs


@pytest.mark.parametrize("encoder_bpr", [False, True])
def test_decoder_is_causal_and_encoder_sees_the_whole_input(data_dir, encoder_bpr):
    model, params, inputs, dec = small_model(
        data_dir, **{"model.moe.encoder_batch_prioritized": encoder_bpr}
    )

    def apply(i, d):
        (logits, aux), state = model.apply({"params": params}, i, d, mutable=["intermediates"])
        flat = flax.traverse_util.flatten_dict(state["intermediates"])
        # The decoder's routing results: expert and slot [G=B, S=Ld, K] per MoE layer.
        routes = [v[-1] for k, v in flat.items() if k[-1] == "routing" and "decoder" in k[0]]
        return logits, aux, [(np.asarray(r.expert), np.asarray(r.slot)) for r in routes]

    base, aux, base_routes = apply(inputs, dec)
    assert len(base_routes) == 2 and aux["stats"]["dropped_fraction"].max() > 0
    for j in (1, 5, 11):  # change decoder input j: outputs before j are unchanged
        changed, _, routes = apply(inputs, dec.at[:, j].set((dec[:, j] + 1) % 256))
        np.testing.assert_allclose(changed[:, :j], base[:, :j], atol=1e-5)
        assert not np.allclose(changed[:, j:], base[:, j:], atol=1e-3)
        for (expert, slot), (expert0, slot0) in zip(routes, base_routes):
            np.testing.assert_array_equal(expert[:, :j], expert0[:, :j])
            np.testing.assert_array_equal(slot[:, :j], slot0[:, :j])
    # Changing the last encoder token changes the encoder output at the first position (every
    # decoder position reads it through cross-attention), also through the MoE layers.
    encoded = lambda i: model.apply({"params": params}, i, method=model.encode)[0]
    last = inputs.at[:, -1].set((inputs[:, -1] + 1) % 256)
    assert not np.allclose(encoded(last)[:, 0], encoded(inputs)[:, 0])


def test_batch_prioritized_routing_is_refused_in_the_decoder(data_dir):
    with pytest.raises(ValueError, match="encoder_batch_prioritized=True"):
        validate_config(resolve(ed_config(data_dir, **{"model.moe.batch_prioritized": True})))
    with pytest.raises(ValueError, match="needs model.arch='encoder_decoder'"):
        validate_config(
            resolve(tiny_config(data_dir, **{"model.moe.encoder_batch_prioritized": True}))
        )
    config = resolve(ed_config(data_dir))
    block = Block(config.model, moe=True, causal=True, batch_prioritized=True)
    x = jnp.zeros((1, 8, config.model.d_model))
    with pytest.raises(ValueError, match="not allowed in a decoder"):
        block.init(jax.random.key(0), x, jnp.zeros((1, 8), jnp.int32), None, True)


def test_non_causal_routers_are_refused(data_dir):
    for router in ("expert_choice", "sbase"):
        with pytest.raises(ValueError, match=f"model.moe.router='{router}' is not causal"):
            validate_config(resolve(ed_config(data_dir, **{"model.moe.router": router})))
    with pytest.raises(ValueError, match="model.moe.drop_priority='probability' is not causal"):
        validate_config(resolve(ed_config(data_dir, **{"model.moe.drop_priority": "probability"})))


def test_tied_and_untied_embeddings(data_dir):
    for tied in (True, False):
        config = resolve(ed_config(data_dir, **{"model.tie_embeddings": tied}))
        params = abstract_params(build_model(config), config)
        assert ("logits" in params) == (not tied)
        if not tied:
            assert params["logits"]["kernel"].shape == (32, config.model.vocab_size)


# -- Training, restore, decoding, mesh ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ed") / "run")
    config = ed_config(data_dir, num_train_steps=40, log_every=10, eval_every=20)
    result = train_and_evaluate(config, workdir, log=quiet)
    return workdir, result


def test_cpu_sized_encoder_decoder_loss_falls_and_restores(trained):
    workdir, result = trained
    records = metrics.read_metrics(workdir)
    train = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(train) == 4 and train[-1] < train[0] - 0.5
    # MoE statistics cover both stacks' MoE layers: one in the encoder, one in the decoder.
    assert np.asarray(records[-1]["train/expert_load"]).shape == (2, 4)
    config, params = restore_run(workdir)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    again = Trainer(config, mesh).evaluate(params, sc.make_pipeline(config))
    np.testing.assert_allclose(again["eval/loss"], result["eval/loss"], rtol=1e-6)


def test_greedy_decoding_from_a_restored_checkpoint_equals_a_step_by_step_loop(trained):
    workdir, _ = trained
    config, params = restore_run(workdir)
    batch = next(sc.make_pipeline(config).eval_batches(1))
    decoder = generation.GreedyDecoder(config)
    out = decoder(params, batch["inputs"][:3], batch["input_mask"][:3])
    model, T = build_model(config), decoder.max_length
    tok = decoder.tokenizer
    # The whole model on a padded prefix: one shape, so one compilation for every call below.
    full_pass = jax.jit(
        lambda inputs, dec, mask: model.apply({"params": params}, inputs, dec, mask)
    )
    for row in range(3):  # reference: rerun the whole model on the growing prefix
        prefix = [tok.bos_id]
        for t in range(T):
            dec = np.full((1, T), tok.pad_id, np.int32)
            dec[0, : len(prefix)] = prefix
            logits, _ = full_pass(
                batch["inputs"][row : row + 1], dec, batch["input_mask"][row : row + 1]
            )
            nxt = int(np.argmax(logits[0, t]))
            assert out[row, t] == nxt, (row, t)
            if nxt == tok.eos_id:
                assert (out[row, t + 1 :] == tok.pad_id).all()
                break
            prefix.append(nxt)
    text = decoder.fill_in(batch["inputs"][0], out[0])
    assert isinstance(text, str) and text


def test_encoder_decoder_on_a_mesh_equals_one_device(data_dir):
    config = resolve(ed_config(data_dir, **{"mesh.data": 2, "mesh.expert": 4}))
    pipe = sc.make_pipeline(config)
    losses = {}
    for name, devices in (("mesh", jax.devices()[:8]), ("one", jax.devices()[:1])):
        c = resolve(config) if name == "mesh" else resolve(ed_config(data_dir))
        trainer = Trainer(c, sharding.make_mesh(c.mesh, devices=devices))
        params, opt = trainer.init()
        losses[name] = []
        for step in range(3):
            params, opt, m = trainer.run_train_step(
                params, opt, trainer.put_batch(pipe.batch(step)), step
            )
            losses[name].append(float(m["train/loss"]))
    np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-5)


# -- Paper-sized configs --------------------------------------------------------------------


def test_switch_base_parameter_count_equals_a_hand_count():
    V, D, F, H, Dh, E, N = 32128, 768, 3072, 12, 64, 8, 32
    attention = 4 * D * H * Dh  # query, key, value, out
    ffn = 2 * D * F  # ReLU: w_in, w_out
    moe = E * ffn + D * E  # experts + router
    encoder_block = lambda f: attention + f + 2 * D  # + 2 RMSNorm scales
    decoder_block = lambda f: 2 * attention + f + 3 * D  # self + cross attention, 3 norms
    encoder = 6 * encoder_block(ffn) + 6 * encoder_block(moe) + D + N * H  # norm, position bias
    decoder = 6 * decoder_block(ffn) + 6 * decoder_block(moe) + D + N * H
    hand = V * D + encoder + decoder  # tied embeddings: no output kernel
    assert hand == 619_339_008
    # Each count traces a whole 24-block model (5 s): three variants, each traced once.
    low, high = min(switch_t5.SWITCH_BASE_EXPERTS), max(switch_t5.SWITCH_BASE_EXPERTS)
    total = {
        v: count_params(switch_t5.get_config(v))["total"]
        for v in (f"base{low}", f"base{high}", "base_dense")
    }
    assert low == E and total[f"base{low}"] == hand
    # Every expert count adds (E - 1) FFNs and E - 1 router columns per MoE layer (12): the
    # count is linear in E, so the smallest and largest variants pin it.
    assert total[f"base{high}"] == hand + 12 * (high - E) * (ffn + D)
    # T5-Base: 223M in the T5 paper; Switch-Base (128 experts): 7.4B in the Switch paper.
    assert round(total["base_dense"] / 1e6) == 223
    assert round(total[f"base{high}"] / 1e8) == 74


def test_every_switch_t5_variant_validates():
    for variant in (None, *switch_t5.VARIANTS):
        config = switch_t5.get_config(variant)
        if config.data.tokenizer == "sentencepiece":
            continue  # needs a .model file; its counts are checked above
        validate_config(resolve(config))
    with pytest.raises(ValueError, match="unknown variant"):
        switch_t5.get_config("base7")
