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
# # What did the experts learn?
#
# Routes some of a run's validation batches (Python standard-library source, one byte per token)
# through its restored model and records, for every MoE layer, each byte's first-choice expert,
# whether it was kept and the router's probabilities. Then:
#
# - the table of ST-MoE (Table 13) for this corpus: for each expert, the kinds of source it
#   receives (indentation, names, keywords, strings, brackets, ...) and those over-represented
#   relative to their overall frequency, with the bytes it over-represents most;
# - P(expert | kind) per layer, the expert-load heat map (layers × experts), the histogram of the
#   router's confidence (top-1 probability), and a sample of source coloured by expert.
#
# **The one setting to change:** `WORKDIR`, a run directory (default `runs/demo`, from
# `make demo`; or set `SWITCHMOE_WORKDIR`). The run must use the byte tokenizer.

# %%
import os

from absl import flags

flags.FLAGS.mark_as_parsed()  # grain and tokamax read absl flags on import: mark them parsed

from switchmoe.analysis import in_repository  # noqa: E402

# A relative path is found from the repository root too (a kernel may start in notebooks/).
WORKDIR = in_repository(os.environ.get("SWITCHMOE_WORKDIR", "runs/demo"))

# %%
from IPython.display import HTML

from switchmoe import analysis
from switchmoe.runs import restore_run

config, params = restore_run(WORKDIR)
capture = analysis.capture_routing((config, params), num_batches=8)
tokens = int(capture.valid.sum())
print(
    f"{tokens} byte tokens routed through {len(capture.layers)} MoE layers "
    f"({', '.join(capture.layers)}) of {capture.num_experts} experts; "
    f"first choice kept for {100 * capture.kept[:, capture.valid].mean():.2f}% "
    f"at eval capacity factor {config.model.moe.eval_capacity_factor}"
)

# %% [markdown]
# ## Each expert's kinds of source
# `×r (f%)`: the kind makes up f% of the expert's tokens, r times its share of all tokens. The
# header of each layer says how much the expert tells about a byte's kind (mutual information).

# %%
table = analysis.expert_kind_table(capture, top=3)
print(analysis.format_kind_table(table, capture))

# %%
for layer in range(len(capture.layers)):
    analysis.plot_kind_expert(capture, layer)

# %% [markdown]
# ## Load and confidence

# %%
fig = analysis.plot_expert_load(analysis.expert_load(capture), capture.layers)

# %%
fig = analysis.plot_confidence(capture)

# %% [markdown]
# ## Source coloured by expert
# Background: the first MoE layer's choice for each byte (blanks included, so indentation shows).

# %%
fig = analysis.plot_routed_text(capture, layer=0, row=0, num_rows=4)

# %% [markdown]
# The same text, deepest MoE layer, as HTML (hover a character for its expert):

# %%
HTML(analysis.routed_text_html(capture, layer=len(capture.layers) - 1, row=0, num_rows=2))
