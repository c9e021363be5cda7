"""Hugging Face Switch Transformers checkpoints in and out, checked against transformers itself:
a tiny random SwitchTransformersForConditionalGeneration, saved with save_pretrained, imported,
and its logits compared with transformers' on the same tokens (eval mode: no dropout, no
jitter)."""

import json

import flax.traverse_util
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from switchmoe.interop import hf_switch  # noqa: E402
from switchmoe.models import (
    build_model,  # noqa: E402
    resolve,  # noqa: E402
)
from switchmoe.moe.routing import expert_capacity  # noqa: E402

B, LE, LD = 3, 12, 7


def tiny_hf(tmp_path, name="hf", share_stack_embeddings=True, **overrides):
    """A random HF Switch model (4 + 3 blocks, sparse every other, 4 experts, router biases)
    saved to disk. The norm weights, router biases and relative-position tables are drawn at
    random too (transformers initialises norms to 1 and biases to 0, which would let a converter
    that swaps two norms or drops the router bias pass)."""
    settings = dict(
        vocab_size=61, d_model=32, d_kv=16, d_ff=48, num_layers=4, num_decoder_layers=3,
        num_heads=2, num_experts=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
        expert_capacity=LE, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        dropout_rate=0.0, router_jitter_noise=0.01, router_bias=True,
    )  # fmt: skip
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(
        transformers.SwitchTransformersConfig(**settings)
    ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif name.endswith("bias") or "relative_attention_bias" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    if not settings.get("tie_word_embeddings", True) and share_stack_embeddings:
        # transformers >= 5 unties the stacks' embeddings from `shared` along with the output
        # head; T5 v1.1 and the released checkpoints untie only the head.
        model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
    path = tmp_path / name
    model.save_pretrained(path)
    return model, str(path)


def tokens(seed, vocab=61):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, vocab, (B, LE))
    decoder = rng.integers(3, vocab, (B, LD))
    decoder[:, 0] = 0  # decoder_start_token_id
    mask = np.ones((B, LE), np.int64)
    return inputs, decoder, mask


def hf_logits(model, inputs, decoder, mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(inputs),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(decoder),
        )
    return out.logits.numpy()


def our_logits(config, params, inputs, decoder, mask):
    config = resolve(config)
    logits, aux = build_model(config).apply(
        {"params": params}, inputs, decoder, mask.astype(np.float32), deterministic=True
    )
    return np.asarray(logits), aux


@pytest.mark.parametrize("tied", [True, False])
def test_imported_logits_equal_transformers(tmp_path, tied):
    model, path = tiny_hf(tmp_path, tie_word_embeddings=tied, router_bias=not tied)
    config, params = hf_switch.load(path)
    # The layout the import found: sparse blocks 1 and 3 of the encoder, 1 of the decoder.
    assert config.model.moe.moe_every == 2 and config.model.tie_embeddings == tied
    inputs, decoder, mask = tokens(0)
    mask[1, 8:] = 0  # a padded encoder row (no drops here: padding cannot change what HF keeps)
    ours, _ = our_logits(config, params, inputs, decoder, mask)
    theirs = hf_logits(model, inputs, decoder, mask)
    assert ours.shape == theirs.shape == (B, LD, 61)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_imported_logits_equal_transformers_when_tokens_drop(tmp_path):
    # Two slots per expert per sequence for 12 (encoder) and 7 (decoder) tokens over 4 experts:
    # tokens overflow, and both sides keep the first two of each expert and output 0 for the rest.
    model, path = tiny_hf(tmp_path, expert_capacity=2)
    config, params = hf_switch.load(path)
    inputs, decoder, mask = tokens(1)
    ours, aux = our_logits(config, params, inputs, decoder, mask)
    dropped = np.asarray(aux["stats"]["dropped_fraction"])
    assert dropped.min() > 0.1  # every MoE layer dropped tokens
    np.testing.assert_allclose(ours, hf_logits(model, inputs, decoder, mask), atol=1e-4, rtol=1e-4)


def test_export_then_import_is_the_identity_and_transformers_loads_it(tmp_path):
    model, path = tiny_hf(tmp_path, tie_word_embeddings=False)
    config, params = hf_switch.load(path)
    out = str(tmp_path / "exported")
    hf_switch.save(config, params, out)
    again_config, again = hf_switch.load(out)
    assert again_config.to_dict() == config.to_dict()
    flat = flax.traverse_util.flatten_dict
    assert flat(again).keys() == flat(params).keys()
    for key, value in flat(params).items():  # d_kv = 16: the sqrt(d_kv) = 4 scaling is exact
        np.testing.assert_array_equal(flat(again)[key], value, err_msg="/".join(key))
    # The exported directory is an HF checkpoint: transformers loads it, with the same weights.
    reloaded = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
    theirs = dict(model.state_dict())
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), theirs[name].numpy(), err_msg=name)
    inputs, decoder, mask = tokens(2)
    np.testing.assert_allclose(
        hf_logits(reloaded, inputs, decoder, mask), hf_logits(model, inputs, decoder, mask)
    )


def test_a_trained_switchmoe_model_exports_with_its_logits(tmp_path):
    # Not from HF: a switchmoe init (head_dim 12, not a power of 4), exported and run by HF.
    _, path = tiny_hf(tmp_path, d_kv=12, expert_capacity=4)
    config, _ = hf_switch.load(path)
    config = resolve(config)
    inputs, decoder, mask = tokens(3)
    variables = build_model(config).init(jax.random.key(1), inputs, decoder, mask.astype(float))
    params = jax.tree.map(np.asarray, flax.linen.meta.unbox(variables["params"]))
    out = str(tmp_path / "from_switchmoe")
    hf_switch.save(config, params, out)
    reloaded = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
    ours, _ = our_logits(config, params, inputs, decoder, mask)
    np.testing.assert_allclose(
        ours, hf_logits(reloaded, inputs, decoder, mask), atol=1e-4, rtol=1e-4
    )


def test_bfloat16_tensors_are_read_from_the_file_header(tmp_path):
    import ml_dtypes
    import safetensors.torch

    values = torch.randn(3, 5).to(torch.bfloat16)
    path = str(tmp_path / "bf16.safetensors")
    safetensors.torch.save_file({"w": values, "f": torch.ones(2)}, path)
    read = hf_switch.read_safetensors(path)
    assert read["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(read["w"].astype(np.float32), values.float().numpy())
    np.testing.assert_array_equal(read["f"], np.ones(2, np.float32))


def test_what_hf_cannot_express_is_refused_by_name(tmp_path):
    hf = json.loads(open(tiny_hf(tmp_path)[1] + "/config.json").read())
    # HF's step 4 puts sparse layers at 1, 5; switchmoe's moe_every=4 at 3, 7.
    with pytest.raises(ValueError, match="moe_every"):
        hf_switch.config_from_hf({**hf, "num_layers": 8, "num_sparse_encoder_layers": 2})
    with pytest.raises(ValueError, match="dense_act_fn"):
        hf_switch.config_from_hf({**hf, "dense_act_fn": "silu"})
    _, separate = tiny_hf(tmp_path, "separate", False, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="embeddings .* are not all equal"):
        hf_switch.load(separate)
    with pytest.raises(ValueError, match="dense_act_fn"):
        hf_switch.config_from_hf({**hf, "dense_act_fn": "silu"})
    config = hf_switch.config_from_hf(hf)
    config.model.activation = "swiglu"
    config.model.moe.num_selected = 2
    with pytest.raises(ValueError, match="model.activation='swiglu'.*num_selected=2"):
        hf_switch.hf_config(config)
    assert not (tmp_path / "refused").exists()


def test_capacity_matches_hf_up_to_the_reference_length():
    hf = {"num_experts": 8, "expert_capacity": 64, "num_layers": 2, "num_sparse_encoder_layers": 1,
          "num_sparse_decoder_layers": 1, "vocab_size": 10, "d_model": 8, "num_heads": 1,
          "d_kv": 8, "d_ff": 8}  # fmt: skip
    moe = hf_switch.config_from_hf(hf).model.moe
    for S in (16, 100, 512):
        C = expert_capacity(S, 8, 1, moe.eval_capacity_factor, moe.min_capacity)
        assert C == min(64, S)  # HF: 64 slots per expert per sequence, whatever its length


def test_fine_tuning_starts_from_a_hugging_face_checkpoint(tmp_path):
    from switchmoe.training import init_from

    # The vocabulary of switchmoe's byte tokenizer with 16 sentinels, so the embedded corpus fits.
    _, path = tiny_hf(tmp_path, vocab_size=259 + 16)
    config, hf_params = hf_switch.load(path)
    config.data.num_sentinels = 16
    config.init_from = f"hf:{path}"
    config = resolve(config)
    init_from.check_init_from(config)
    model = build_model(config)
    fresh = model.init(jax.random.key(0), *tokens(0, vocab=275))
    start = init_from.initial_params(config, flax.linen.meta.unbox(fresh["params"]))
    flat, hf_flat = (flax.traverse_util.flatten_dict(p) for p in (start, hf_params))
    assert flat.keys() == hf_flat.keys()
    for key, value in hf_flat.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg="/".join(key))
    # A config whose shapes differ is refused before anything is written, naming the parameter.
    config.model.d_ff = 40
    with pytest.raises(ValueError, match=r"hf:.*ffn/w_in has shape \(32, 48\) there"):
        init_from.check_init_from(resolve(config))


def test_cached_greedy_decoding_of_an_import_equals_transformers_generate(tmp_path):
    from switchmoe.generation import Seq2SeqGenerator

    # Capacity for every token (HF's cached generate routes one token at a time, so it never
    # drops; the comparison holds where nothing drops).
    model, path = tiny_hf(tmp_path)
    config, params = hf_switch.load(path)
    inputs, _, mask = tokens(4)
    T = 6
    generator = Seq2SeqGenerator(config, max_length=T, start_id=0, pad_id=0, eos_id=1)
    ours = generator(params, inputs, mask.astype(np.float32))
    with torch.no_grad():
        theirs = model.generate(
            input_ids=torch.tensor(inputs), attention_mask=torch.tensor(mask),
            max_new_tokens=T, do_sample=False, num_beams=1, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1,
        ).numpy()  # fmt: skip
    assert (theirs[:, 0] == 0).all()  # decoder_start_token_id
    n = theirs.shape[1] - 1
    np.testing.assert_array_equal(ours[:, :n], theirs[:, 1:])
    assert (ours[:, n:] == 0).all()  # HF stopped: every row had ended (padding after EOS)


def test_t5_tokenizer_mode_numbers_tokens_as_t5_and_starts_the_decoder_from_pad(tmp_path, data_dir):
    """A SentencePiece model built here in T5's id layout (pad 0, eos 1, unk 2, no BOS):
    data.tokenizer='t5' gives transformers' T5 tokenizer's ids (pieces, eos, <extra_id_i>), and
    span-corruption batches start the decoder from pad 0 with those sentinels."""
    import io

    import sentencepiece

    from switchmoe.config import default_config
    from switchmoe.data import span_corruption
    from switchmoe.data.pipeline import load_texts
    from switchmoe.data.tokenizers import make_tokenizer

    config = default_config()
    config.data.data_dir = data_dir
    config.data.max_files = 40
    text = "\n".join(t.decode() if isinstance(t, bytes) else t
                     for t in load_texts(config.data, config.data.train_split))  # fmt: skip
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=300,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
    )  # fmt: skip
    path = tmp_path / "spiece.model"
    path.write_bytes(model.getvalue())
    config.data.tokenizer, config.data.spm_model_path, config.data.num_sentinels = (
        "t5",
        str(path),
        100,
    )
    ours = make_tokenizer(config.data)
    theirs = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=100)
    assert ours.vocab_size == len(theirs) == 400
    assert (ours.pad_id, ours.eos_id, ours.bos_id) == (theirs.pad_token_id, theirs.eos_token_id, 0)
    for i in (0, 1, 57, 99):
        assert ours.sentinel_id(i) == theirs.convert_tokens_to_ids(f"<extra_id_{i}>") == 399 - i
    sample = "def parse(self, value):\n    return value.strip()  # bytes\n"
    np.testing.assert_array_equal(
        ours.encode(sample), theirs(sample, add_special_tokens=False).input_ids
    )

    config.model.arch = "encoder_decoder"
    config.data.seq_len = 64
    pipeline = span_corruption.SpanCorruptionPipeline(config.data, 4, tokenizer=ours)
    batch = next(iter(pipeline.train_batches(0)))
    assert (batch["decoder_inputs"][:, 0] == 0).all()  # HF's decoder_start_token_id
    first_sentinel = batch["targets"][:, 0]
    assert (first_sentinel == 399).all()  # <extra_id_0>
    assert (batch["targets"] == 1).any(axis=1).all()  # each target ends with eos 1
