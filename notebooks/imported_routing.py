# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Where does an open MoE model send tokens?
#
# Imports a Hugging Face checkpoint of Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE or DeepSeek-V3
# (`switchmoe.interop.hf`: its logits equal transformers'), routes the embedded corpus (Python
# standard-library source) through it and shows, for every MoE layer, the expert load, what
# kinds of source each expert receives (ST-MoE's Table 13 for this corpus), and what evaluating
# the model with a capacity factor costs against the dropless routing it was trained with.
#
# **The one setting to change:** `HF_DIR`, a local model directory (config.json + safetensors;
# or set `SWITCHMOE_HF_DIR`). Unset, the notebook writes a tiny *random* OLMoE-style model and
# imports that, so it runs anywhere; its routing means nothing. The tokens are the corpus's bytes
# (the source-kind tables are per byte): a real model sees them as out-of-vocabulary ids, so read
# its tables as how the router splits *these* ids, and use the model's own tokenizer
# (`data.tokenizer='sentencepiece'` with Mixtral's tokenizer.model) for anything more.

# %%
import os
import tempfile

from absl import flags

flags.FLAGS.mark_as_parsed()  # grain and tokamax read absl flags on import: mark them parsed

HF_DIR = os.environ.get("SWITCHMOE_HF_DIR", "")

# %%
import jax
from flax.linen import meta

from switchmoe import analysis
from switchmoe.interop import hf, hf_decoders
from switchmoe.models import build_model, dummy_inputs, resolve

if not HF_DIR:  # a tiny random OLMoE-style checkpoint, written as transformers would
    tiny = hf_decoders.config_from_hf({
        "model_type": "olmoe", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
    })  # fmt: skip
    model = build_model(resolve(tiny))
    params = meta.unbox(model.init(jax.random.key(0), *dummy_inputs(resolve(tiny)))["params"])
    HF_DIR = os.path.join(tempfile.mkdtemp(), "tiny_olmoe")
    hf.save(tiny, params, HF_DIR)

config, params = hf.load(HF_DIR)
config.data.seq_len = 64
config.num_eval_batches = 2
moe = config.model.moe
print(
    f"{HF_DIR}: {config.model.num_layers} blocks, {moe.num_experts} experts, top-"
    f"{moe.num_selected} ({moe.gate_norm} gates, {moe.get('score_function', 'softmax')} scores), "
    f"backend {moe.backend!r}"
)

# %%
capture = analysis.capture_routing((config, params), num_batches=2)
print(f"{int(capture.valid.sum())} tokens through MoE layers {', '.join(capture.layers)}")

# %% [markdown]
# ## Expert load per layer

# %%
fig = analysis.plot_expert_load(analysis.expert_load(capture), capture.layers)

# %% [markdown]
# ## Each expert's kinds of source
# `×r (f%)`: the kind makes up f% of the expert's tokens, r times its share of all tokens.

# %%
print(analysis.format_kind_table(analysis.expert_kind_table(capture, top=3), capture))

# %% [markdown]
# ## Capacity instead of dropless
# The same parameters evaluated with expert capacity (tokens over an expert's slots are dropped,
# Switch §2.2) and without (the routing the model was trained with).

# %%
rows = analysis.evaluate_at_capacities((config, params), factors=(1.0,))
print(analysis.format_capacity_table(rows))
