"""An exported run generates in transformers as it does in switchmoe: the tokenizer written
beside the weights encodes and decodes as the run's own tokenizer (byte-level, a SentencePiece
model switchmoe trained, and one in T5's layout with NFKC normalisation and a dummy prefix), and
transformers' greedy `generate`, given only the prompt (the ids come from the exported
config.json and generation_config.json), equals switchmoe's cached generation token for token,
for a decoder-only byte-level run (Mixtral) and an encoder–decoder SentencePiece run (Switch)."""

import io
import json

import jax
import numpy as np
import pytest
from flax.linen import meta

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

from switchmoe.data import default_data_config, make_tokenizer, pipeline  # noqa: E402
from switchmoe.generation import LMGenerator, Seq2SeqGenerator  # noqa: E402
from switchmoe.interop import hf, hf_decoders, hf_switch, hf_tokenizer  # noqa: E402
from switchmoe.models import build_model, dummy_inputs, resolve  # noqa: E402

MAX_FILES = 12
# Text the corpus holds and text it does not: tabs, CRLF, runs of spaces, accents, CJK, emoji,
# a NUL, and a sentinel's spelling (text, not a special).
EXTRA = [
    "def f(x):\n\treturn 'é€😀' + x  # ok\r\n  \x00 <extra_id_0>",
    "naïve café — 数学 🙂   trailing   \n\n",
    "  leading spaces, digits 1234567890 and ﬁ ligatures ①\n",
]


def data_config(data_dir, kind, tmp_path):
    c = default_data_config()
    c.data_dir, c.max_files = str(data_dir), MAX_FILES
    if kind == "sentencepiece":  # switchmoe's own vocabulary (identity normalisation)
        c.tokenizer, c.spm_vocab_size, c.num_sentinels = "sentencepiece", 400, 4
    elif kind == "t5":  # sentencepiece's defaults: NFKC, dummy prefix, whitespace collapsed
        text = [t.decode() for t in pipeline.load_texts(c, c.train_split)]
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter("\n".join(text).splitlines()), model_writer=model,
            vocab_size=300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
        )  # fmt: skip
        path = tmp_path / "spiece.model"
        path.write_bytes(model.getvalue())
        c.tokenizer, c.spm_model_path, c.num_sentinels = "t5", str(path), 5
    else:
        c.tokenizer, c.num_sentinels = "byte", 3
    return c


def scaled_params(config, seed):
    """Parameters drawn at random at a scale where greedy choices are not near-ties."""
    model = build_model(config)
    params = meta.unbox(model.init(jax.random.key(seed), *dummy_inputs(config))["params"])
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [(0.3 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "t5"])
def test_exported_tokenizer_encodes_and_decodes_as_the_runs(data_dir, tmp_path, kind):
    c = data_config(data_dir, kind, tmp_path)
    ours = make_tokenizer(c)
    config = hf_switch.config_from_hf({"vocab_size": ours.vocab_size, "d_model": 8, "d_kv": 4,
                                       "d_ff": 8, "num_layers": 1, "num_heads": 2,
                                       "num_experts": 2, "expert_capacity": 4})  # fmt: skip
    config.data = c
    out = tmp_path / "out"
    out.mkdir()
    written, note = hf_tokenizer.tokenizer_files(config, str(out))
    assert note is None and hf_tokenizer.TOKENIZER_FILE in written
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert len(theirs) == ours.vocab_size
    assert (theirs.pad_token_id, theirs.eos_token_id) == (ours.pad_id, ours.eos_id)
    for i in range(ours.num_sentinels):
        assert theirs.convert_tokens_to_ids(f"<extra_id_{i}>") == ours.sentinel_id(i)
    texts = [t.decode() for t in pipeline.load_texts(c, "validation")[:6]] + EXTRA
    if kind == "byte":  # the specials' spellings are text (SentencePiece: module docstring)
        texts.append("<s> </s> <pad>")
    for text in texts:
        ids = ours.encode(text)
        # An encoder input ends with EOS, as the span-corruption inputs do.
        np.testing.assert_array_equal(theirs(text).input_ids, [*ids, ours.eos_id])
        np.testing.assert_array_equal(theirs(text, add_special_tokens=False).input_ids, ids)
        assert theirs.decode(ids) == ours.decode(ids)
    specials = [ours.pad_id, ours.eos_id, *map(ours.sentinel_id, range(ours.num_sentinels))]
    mixed = np.concatenate([ours.encode(EXTRA[0]), specials, ours.encode(EXTRA[1])])
    assert theirs.decode(mixed, skip_special_tokens=True) == ours.decode(mixed)


def test_a_byte_level_decoder_run_generates_in_transformers_as_in_switchmoe(data_dir, tmp_path):
    config = hf_decoders.config_from_hf({
        "model_type": "mixtral", "vocab_size": 262, "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2,
    })  # fmt: skip
    config.data = data_config(data_dir, "byte", tmp_path)
    config = resolve(config)
    params = scaled_params(config, 0)
    # EOS likelier than most bytes, so some rows end early and the pad id after EOS is checked.
    params["logits"]["kernel"][:, 258] += 0.8
    out = str(tmp_path / "exported")
    exported = hf.save(config, params, out)
    assert exported.model_type == "mixtral" and exported.note is None
    with open(f"{out}/config.json") as f:
        written = json.load(f)
    ids = {k: written[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    assert ids == {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    texts = ["def main(", "import os", "class Foo", "    retur", "x = [1, 2"]
    prompts = tokenizer(texts, return_tensors="pt", padding=True)  # one length: no padding
    T = 9 + 12
    with torch.no_grad():
        theirs = model.generate(**prompts, max_new_tokens=T - 10).numpy()
    generator = LMGenerator(config, max_length=T)
    ours = generator(params, list(prompts.input_ids.numpy()))
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert (theirs == 258).any(axis=1).sum() >= 2  # rows ended, and were padded after
    new = theirs[:, prompts.input_ids.shape[1] :]
    assert tokenizer.batch_decode(new, skip_special_tokens=True) == generator.complete(
        params, texts
    )


def test_a_sentencepiece_switch_run_generates_in_transformers_as_in_switchmoe(data_dir, tmp_path):
    c = data_config(data_dir, "sentencepiece", tmp_path)
    vocab = make_tokenizer(c).vocab_size
    config = hf_switch.config_from_hf({"vocab_size": vocab, "d_model": 32, "d_kv": 8,
                                       "d_ff": 48, "num_layers": 1, "num_decoder_layers": 1,
                                       "num_heads": 4, "num_experts": 4,
                                       "num_sparse_encoder_layers": 1,
                                       "num_sparse_decoder_layers": 1, "expert_capacity": 64,
                                       "tie_word_embeddings": False})  # fmt: skip
    config.data = c
    config = resolve(config)
    params = scaled_params(config, 1)
    out = str(tmp_path / "exported")
    exported = hf.save(config, params, out)
    assert hf_tokenizer.SPM_FILE in exported.files and exported.note is None
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
    assert model.generation_config.decoder_start_token_id == make_tokenizer(c).bos_id
    texts = ["def parse(self, value):", "import sys\nimport os", "for i in range(10):"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    T = 10
    with torch.no_grad():
        theirs = model.generate(**batch, max_new_tokens=T).numpy()
    generator = Seq2SeqGenerator(config, max_length=T)
    ours = generator(params, batch.input_ids.numpy(), batch.attention_mask.numpy())
    assert (theirs[:, 0] == generator.start_id).all()
    n = theirs.shape[1] - 1
    np.testing.assert_array_equal(ours[:, :n], theirs[:, 1:])
