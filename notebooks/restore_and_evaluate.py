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
# # Restore a run and evaluate it at several capacity factors
#
# Reloads a run's latest Orbax checkpoint onto this machine's device (whatever mesh trained it),
# then evaluates the **same parameters** at eval capacity factors 0.5, 1.0, 1.25 and 2.0 and with
# no capacity at all (dropless routing): how much loss do dropped tokens cost (Switch §2.2)?
#
# **The one setting to change:** `WORKDIR`, a directory written by `python -m experiments.train`
# (default `runs/demo`, what `make demo` writes; or set `SWITCHMOE_WORKDIR`).  It is kept as a jupytext `py:percent` file:
# `jupytext --to ipynb notebooks/restore_and_evaluate.py` makes a notebook of it.

# %%
import os

from absl import flags

flags.FLAGS.mark_as_parsed()  # grain and tokamax read absl flags on import: mark them parsed

from switchmoe.analysis import in_repository  # noqa: E402

# A relative path is found from the repository root too (a kernel may start in notebooks/).
WORKDIR = in_repository(os.environ.get("SWITCHMOE_WORKDIR", "runs/demo"))

# %%
from switchmoe import analysis
from switchmoe.runs import read_metrics, restore_run

config, params = restore_run(WORKDIR)
moe = config.model.moe
print(
    f"{WORKDIR}: {config.model.num_layers} blocks of width {config.model.d_model}, "
    f"{moe.num_experts} experts (top-{moe.num_selected}, {moe.router}, backend {moe.backend}), "
    f"trained {config.num_train_steps} steps at capacity factor {moe.train_capacity_factor}"
)

# %% [markdown]
# Training curves, from the run's `metrics.jsonl`:

# %%
records = read_metrics(WORKDIR)
fig = analysis.plot_run_curves(records)

# %% [markdown]
# The same parameters evaluated on the run's fixed validation batches at each capacity factor.
# At the run's own eval factor the loss is the one training logged (printed below for comparison).

# %%
rows = analysis.evaluate_at_capacities((config, params), factors=(0.5, 1.0, 1.25, 2.0))
print(analysis.format_capacity_table(rows))
logged = analysis.last_value(records, "eval/loss")
print(f"\nlogged final eval/loss at eval capacity factor {moe.eval_capacity_factor}: {logged:.4f}")

# %%
fig = analysis.plot_capacity_sweep(rows)

# %% [markdown]
# ## Sample from the model
#
# Cached generation (`switchmoe/generation.py`): every attention layer keeps its keys and values
# and every MoE layer what earlier positions asked of each expert, so a step routes a token
# exactly as the full-length evaluation would. `temperature=0` is greedy; `top_k` and `top_p`
# filter the draw. One compilation serves every prompt and setting of the same batch size.

# %%
import jax

from switchmoe.generation import LMGenerator

generator = LMGenerator(config)  # the cache holds data.seq_len tokens, prompt included
prompts = ["def ", "import ", "class "]
for prompt, text in zip(
    prompts, generator.complete(params, prompts, jax.random.key(0), temperature=0.8, top_p=0.95)
):
    print(repr(prompt + text))
