"""Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE checkpoints in and out, checked against transformers:
tiny random models of each family (every tensor drawn at random, norms and biases included, so a
swapped or dropped tensor changes the logits), saved with save_pretrained, imported, and compared
on logits, on cached greedy generation, and after an export (transformers loads it back with the
same tensors)."""

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from switchmoe.generation import LMGenerator  # noqa: E402
from switchmoe.interop import hf_decoders  # noqa: E402
from switchmoe.interop.hf_switch import read_weights  # noqa: E402
from switchmoe.models import build_model, resolve  # noqa: E402

B, L = 3, 11
COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              num_experts_per_tok=2)  # fmt: skip
# Several configurations per family: GQA and not, windows, biases, shared experts, dense blocks,
# YaRN.
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, rope_theta=1e6)),
    "mixtral_window_mha": ("MixtralConfig", "MixtralForCausalLM",
                           dict(num_local_experts=3, num_key_value_heads=4, sliding_window=4)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, norm_topk_prob=False)),
    "olmoe_bias_normalized": ("OlmoeConfig", "OlmoeForCausalLM",
                              dict(num_experts=5, norm_topk_prob=True, attention_bias=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=6, moe_intermediate_size=16, head_dim=12, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[0],
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0,
                                        "original_max_position_embeddings": 16})),
    # DeepSeek-V3: latent attention with and without a query latent, 8 experts in 4 groups of
    # which a token uses 2, a shared expert, dense first blocks; routed scaling, sigmoid scores.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=1,
                         n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=12,
                         kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
                         num_key_value_heads=4,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                          "original_max_position_embeddings": 32, "mscale": 1.0,
                                          "mscale_all_dim": 0.5, "beta_fast": 32,
                                          "beta_slow": 1})),
    "deepseek_v3_no_q_latent": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                                dict(n_routed_experts=6, moe_intermediate_size=8,
                                     n_shared_experts=2, n_group=1, topk_group=1,
                                     first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=8,
                                     qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=7,
                                     num_key_value_heads=4, norm_topk_prob=False,
                                     routed_scaling_factor=1.5)),
}  # fmt: skip


def random_hf(tmp_path, case, **overrides):
    """A tiny random model of `case`, every parameter drawn at random, saved to disk."""
    config_cls, model_cls, settings = CASES[case]
    config = getattr(transformers, config_cls)(**{**COMMON, **settings, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms drawn around 1, not left at 1
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            else:  # routers wide enough that the top-k is never a near-tie
                scale = 1.0 if name.endswith("gate.weight") else 0.2
                p.copy_(scale * torch.randn(p.shape, generator=generator))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's selection bias
                b.copy_(0.2 * torch.randn(b.shape, generator=generator))
    path = tmp_path / case
    model.save_pretrained(path, max_shard_size="20KB" if case == "qwen2_moe" else "5GB")
    return model, str(path)


def tokens(seed, length=L):
    return np.random.default_rng(seed).integers(0, COMMON["vocab_size"], (B, length))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def our_logits(config, params, ids):
    logits, _ = build_model(resolve(config)).apply({"params": params}, ids, deterministic=True)
    return np.asarray(logits)


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_equal_transformers(tmp_path, case):
    model, path = random_hf(tmp_path, case)
    config, params = hf_decoders.load(path)
    ids = tokens(0)
    np.testing.assert_allclose(
        our_logits(config, params, ids), hf_logits(model, ids), rtol=1e-4, atol=1e-4
    )


def test_a_bfloat16_checkpoint_imports_its_values_exactly(tmp_path):
    """A checkpoint saved in bfloat16: every tensor imports as the float32 of its bfloat16 value
    (exact), so the logits equal those transformers computes from the same checkpoint in float32,
    to the float32 tolerance 1e-4 (comparing with transformers' own bfloat16 arithmetic instead
    would measure bfloat16 rounding, ~1e-2, not the converter)."""
    model, path = random_hf(tmp_path, "olmoe")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config, params = hf_decoders.load(str(tmp_path / "bf16"))
    upcast = (
        getattr(transformers, CASES["olmoe"][1])
        .from_pretrained(tmp_path / "bf16", dtype=torch.float32)
        .eval()
    )
    ids = tokens(3)
    np.testing.assert_allclose(
        our_logits(config, params, ids), hf_logits(upcast, ids), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("case", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_cached_greedy_generation_equals_transformers_generate(tmp_path, case):
    model, path = random_hf(tmp_path, case)
    config, params = hf_decoders.load(path)
    T, prompt = 14, tokens(1, 4)
    generator = LMGenerator(config, max_length=T)
    ours = generator(params, list(prompt))
    eos, pad = generator.tokenizer.eos_id, generator.tokenizer.pad_id
    with torch.no_grad():
        theirs = model.generate(
            input_ids=torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=int),
            max_new_tokens=T - 4, do_sample=False, num_beams=1, eos_token_id=eos,
            pad_token_id=pad,
        ).numpy()  # fmt: skip
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)


@pytest.mark.parametrize("case", ["mixtral_window_mha", "olmoe_bias_normalized", "qwen2_moe",
                                  "qwen3_moe", "deepseek_v3", "deepseek_v3_no_q_latent"])  # fmt: skip
def test_export_then_import_is_the_identity_and_transformers_loads_it(tmp_path, case):
    model, path = random_hf(tmp_path, case)
    config, params = hf_decoders.load(path)
    out = str(tmp_path / "exported")
    hf_decoders.save(config, params, out, max_shard_bytes=30_000)
    again, params_again = hf_decoders.load(out)
    assert again.to_dict() == config.to_dict()
    flat = lambda p: {
        "/".join(k): v for k, v in __import__("flax").traverse_util.flatten_dict(p).items()
    }
    a, b = flat(params), flat(params_again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    # transformers reads the export: the same tensors as the original, the same logits.
    _, model_cls, _ = CASES[case]
    loaded = getattr(transformers, model_cls).from_pretrained(out).eval()
    original, exported = read_weights(path), read_weights(out)
    assert original.keys() == exported.keys()
    for k in original:
        np.testing.assert_array_equal(original[k], exported[k], err_msg=k)
    ids = tokens(2)
    np.testing.assert_allclose(hf_logits(loaded, ids), hf_logits(model, ids), rtol=0, atol=0)


REFUSED = [
    ("mixtral", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
     "RoPE scaling"),
    ("olmoe", dict(clip_qkv=2.0), "clip_qkv=2.0"),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4), "use_sliding_window=True"),
    ("qwen3_moe", dict(tie_word_embeddings=True), "tie_word_embeddings=True"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias=True"),
]  # fmt: skip


@pytest.mark.parametrize("case,overrides,named", REFUSED)
def test_a_setting_switchmoe_does_not_build_is_refused_by_name(tmp_path, case, overrides, named):
    _, path = random_hf(tmp_path, case, **overrides)
    with pytest.raises(ValueError, match=named):
        hf_decoders.load(path)


def test_deepseek_v2_and_unknown_families_are_refused_by_name():
    with pytest.raises(ValueError, match="deepseek_v2.*softmax group routing"):
        hf_decoders.config_from_hf({"model_type": "deepseek_v2"})
    with pytest.raises(ValueError, match="model_type='llama'; supported: "):
        hf_decoders.config_from_hf({"model_type": "llama"})


def test_what_a_family_cannot_express_is_refused_on_export(tmp_path):
    _, path = random_hf(tmp_path, "olmoe")
    config, params = hf_decoders.load(path)
    with pytest.raises(ValueError, match="mixtral cannot express: model.qk_norm='projection'"):
        hf_decoders.save(config, params, str(tmp_path / "out"), model_type="mixtral")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_import_hf_writes_a_run_and_init_from_reads_the_checkpoint(tmp_path):
    import json
    import os
    import re
    import subprocess
    import sys

    import flax
    import jax

    from switchmoe.runs import restore_run
    from switchmoe.training import init_from

    _, path = random_hf(tmp_path, "qwen2_moe", pad_token_id=7, bos_token_id=8, eos_token_id=9)
    config, params = hf_decoders.load(path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workdir = str(tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.import_hf", f"--hf_dir={path}", f"--workdir={workdir}"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # The entry points print their own output only: no library INFO lines (absl's "I1207 ..."
    # format; cli.run silences them for every entry point unless --debug).
    commands = [["experiments.export_hf", f"--workdir={workdir}", f"--out={tmp_path / 'exported'}"]]
    for command in commands:
        out = subprocess.run([sys.executable, "-m", *command], cwd=root, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        info = [line for line in (done.stdout + done.stderr + out.stdout + out.stderr).splitlines()
                if re.match(r"I\d{4} ", line)]  # fmt: skip
        assert not info, info[:3]
    exported, _ = hf_decoders.load(str(tmp_path / "exported"))
    assert exported.model.to_dict() == config.model.to_dict()
    # Imported without a tokenizer: the export keeps the checkpoint's own special ids (import_hf
    # recorded them), not the byte tokenizer's, and writes no tokenizer.
    source, back = (
        json.load(open(os.path.join(d, "config.json"))) for d in (path, tmp_path / "exported")
    )
    ids = [k for k in ("pad_token_id", "bos_token_id", "eos_token_id") if source.get(k) is not None]
    assert ids and all(back[k] == source[k] for k in ids)
    assert not os.path.exists(tmp_path / "exported" / "tokenizer.json")
    restored_config, restored = restore_run(workdir)
    as_json = lambda c: json.loads(json.dumps(c.model.to_dict()))  # tuples read back as lists
    assert as_json(restored_config) == as_json(resolve(config))
    flat = flax.traverse_util.flatten_dict
    expected = flat(params)
    assert flat(restored).keys() == expected.keys()
    for key, value in flat(restored).items():
        np.testing.assert_array_equal(np.asarray(value), expected[key], err_msg="/".join(key))

    # init_from='hf:<dir>' starts a run from the same parameters.
    config.init_from = f"hf:{path}"
    config = resolve(config)
    init_from.check_init_from(config)
    fresh = build_model(config).init(jax.random.key(0), tokens(0))
    start = init_from.initial_params(config, flax.linen.meta.unbox(fresh["params"]))
    for key, value in flat(start).items():
        np.testing.assert_array_equal(np.asarray(value), expected[key], err_msg="/".join(key))


def test_import_onto_a_mesh_places_each_tensor_as_it_is_read(tmp_path):
    """On 8 fake devices with the experts split over them: the placed parameters equal the
    host import's, each device holds 1/8 of every expert stack, and the host's peak allocation
    while reading and placing (NumPy staging, measured by tracemalloc around `place_on_mesh`;
    the device buffers and the memory-mapped files are not host copies) stays within a few of
    the checkpoint's largest tensors while the model is many times larger."""
    import tracemalloc

    import jax
    from flax import traverse_util

    from switchmoe.interop.lazy_weights import LazyWeights
    from switchmoe.sharding import make_mesh

    _, path = random_hf(tmp_path, "mixtral", num_local_experts=16, num_hidden_layers=6,
                        hidden_size=64, intermediate_size=96)  # fmt: skip
    config, host = hf_decoders.load(path)
    mesh = make_mesh(ml_collections.ConfigDict({"data": 1, "expert": 8, "model": 1}))
    _, placed = hf_decoders.load_onto_mesh(path, mesh)  # the whole path, once
    shardings = jax.tree.map(lambda a: a.sharding, placed)
    tracemalloc.start()
    placed = hf_decoders.place_on_mesh(path, config, shardings, "mixtral")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    weights = LazyWeights(path)
    largest = max(w.nbytes for w in weights.values())
    model_bytes = sum(w.nbytes for w in weights.values())
    # The peak: one leaf's conversion (an embedding, or one device's 2 of the 16 experts of a
    # stack) plus JAX's Python objects for the arrays placed so far (~300 bytes each).
    assert peak < 8 * largest, (peak, largest, model_bytes)
    assert model_bytes > 12 * peak, (peak, largest, model_bytes)
    flat_host, flat_placed = (traverse_util.flatten_dict(p) for p in (host, placed))
    assert flat_host.keys() == flat_placed.keys()
    for key, value in flat_placed.items():
        np.testing.assert_array_equal(np.asarray(value), flat_host[key], err_msg="/".join(key))
        if key[-1] in ("w_in", "w_gate", "w_out"):
            assert len(value.sharding.device_set) == 8
            for shard in value.addressable_shards:
                assert shard.data.nbytes == value.nbytes // 8
    assert len(jax.devices()) == 8
