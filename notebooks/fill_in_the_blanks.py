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
# # Fill in the blanks: greedy decoding with a restored encoder–decoder
#
# Reloads an encoder–decoder run (`configs/switch_t5.py`, trained with T5 span corruption),
# corrupts validation windows exactly as its evaluation does, and lets the model fill in the
# sentinels greedily. Prints each window as the encoder saw it, the spans the model wrote, and
# how many of the hidden tokens it got right; then which experts the decoder's tokens used.
#
# **The one setting to change:** `WORKDIR`, a directory written by
# `python -m experiments.train --config=configs/switch_t5.py` (default `runs/switch_t5`; or set
# `SWITCHMOE_T5_WORKDIR`). It is kept as a jupytext
# `py:percent` file: `jupytext --to ipynb notebooks/fill_in_the_blanks.py` makes a notebook of it.

# %%
import os

from absl import flags

flags.FLAGS.mark_as_parsed()  # grain and tokamax read absl flags on import: mark them parsed

from switchmoe.analysis import in_repository  # noqa: E402

# A relative path is found from the repository root too (a kernel may start in notebooks/).
WORKDIR = in_repository(os.environ.get("SWITCHMOE_T5_WORKDIR", "runs/switch_t5"))

# %%
import numpy as np

from switchmoe.generation import GreedyDecoder
from switchmoe.data.span_corruption import make_pipeline
from switchmoe.runs import restore_run

config, params = restore_run(WORKDIR)
m, moe = config.model, config.model.moe
print(
    f"{WORKDIR}: {m.arch}, {m.num_layers} + {m.get('num_decoder_layers') or m.num_layers} blocks "
    f"of width {m.d_model}, {moe.num_experts} experts (top-{moe.num_selected})"
)
batch = next(make_pipeline(config).eval_batches(1))
decoder = GreedyDecoder(config)
rows = 4
outputs = decoder(params, batch["inputs"][:rows], batch["input_mask"][:rows])

# %% [markdown]
# `<k>` marks sentinel k in the input; after it, what the model wrote there (⟦model⟧) and what
# the text had (⟦truth⟧). Token accuracy compares the decoded targets with the true ones
# position by position (teacher-forcing-free: each step reads the model's own earlier tokens).

# %%
tok = decoder.tokenizer
sentinel_index = {s: i for i, s in enumerate(decoder.sentinels)}


def spans(targets):
    """{sentinel k: its text} from a target sequence."""
    out, current = {}, None
    for t in targets:
        t = int(t)
        if t == tok.eos_id:
            break
        if t in sentinel_index:
            current = out.setdefault(sentinel_index[t], [])
        elif current is not None:
            current.append(t)
    return {k: tok.decode(np.asarray(v, np.int64)) for k, v in out.items()}


for row in range(rows):
    model_spans, true_spans = spans(outputs[row]), spans(batch["targets"][row])
    pieces = []
    real = int(batch["input_mask"][row].sum()) - 1  # the last real input is the final EOS
    for t in batch["inputs"][row][:real]:
        t = int(t)
        if t in sentinel_index:
            k = sentinel_index[t]
            pieces.append(f"<{k}>⟦{model_spans.get(k, '')!r}|{true_spans.get(k, '')!r}⟧")
        else:
            pieces.append(tok.decode(np.asarray([t], np.int64)))
    correct = np.mean(outputs[row] == batch["targets"][row])
    print(f"--- window {row}: token accuracy {correct:.1%}")
    print("".join(pieces)[:600])

# %%
accuracy = np.mean(outputs == batch["targets"][:rows])
print(f"greedy token accuracy over {rows} windows: {accuracy:.1%}")

# %% [markdown]
# Which experts the decoder's MoE layers chose for the decoded tokens (the model sows each
# layer's routing result).

# %%
import flax.traverse_util
import jax.numpy as jnp

model = decoder.model
decoder_inputs = np.concatenate([np.full((rows, 1), tok.bos_id), outputs[:, :-1]], axis=1).astype(
    np.int32
)
_, state = model.apply(
    {"params": params},
    jnp.asarray(batch["inputs"][:rows]),
    jnp.asarray(decoder_inputs),
    jnp.asarray(batch["input_mask"][:rows]),
    mutable=["intermediates"],
)
for path, value in flax.traverse_util.flatten_dict(state["intermediates"]).items():
    if path[-1] == "routing":
        result = value[-1]
        load = np.bincount(np.asarray(result.expert[..., 0]).ravel(), minlength=moe.num_experts)
        print(f"{path[0]}: first-choice tokens per expert {load.tolist()}")
