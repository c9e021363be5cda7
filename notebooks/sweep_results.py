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
# # Sweep results: scaling with experts, capacity factor
#
# Loads every trial of a sweep directory (one run workdir per trial, as `python -m
# experiments.sweep` writes it) and draws eval loss vs step per trial, final eval loss vs the
# number of experts (0 = dense; Switch Figure 4), and final loss and dropped fraction vs the
# training capacity factor (Switch Table 1). Unfinished trials are listed but left out of the
# final-value plots.
#
# **The one setting to change:** `SWEEP_DIR` (default `runs/sweeps/expert_count`; or set
# `SWITCHMOE_SWEEP_DIR`), e.g. `runs/sweeps/capacity` after
# `python -m experiments.sweep --config=configs/studies.py:capacity --workdir=runs/sweeps/capacity`.

# %%
import os

from absl import flags

flags.FLAGS.mark_as_parsed()  # grain and tokamax read absl flags on import: mark them parsed

from switchmoe.analysis import in_repository  # noqa: E402

# A relative path is found from the repository root too (a kernel may start in notebooks/).
SWEEP_DIR = in_repository(os.environ.get("SWITCHMOE_SWEEP_DIR", "runs/sweeps/expert_count"))

# %%
from switchmoe import analysis

trials = analysis.load_sweep(SWEEP_DIR)
keys = ("model.moe.num_experts", "model.moe.train_capacity_factor")
print(analysis.format_sweep_table(trials, keys))

# %%
fig = analysis.plot_eval_curves(trials)

# %%
fig = analysis.plot_loss_vs_experts(trials)

# %%
fig = analysis.plot_capacity_factor(trials)
