"""Analysis of trained runs for notebooks and reports: capacity sweeps at evaluation, what the
router learned, and sweep results.

    from switchmoe import analysis
    rows = analysis.evaluate_at_capacities("runs/demo")           # eval loss vs capacity factor
    capture = analysis.capture_routing("runs/demo", num_batches=4)  # who routes where
    table = analysis.expert_kind_table(capture)                   # ST-MoE Table 13, for Python
    trials = analysis.load_sweep("runs/sweeps/expert_count")      # one dict per trial

Everything here runs on a single plain device (a notebook kernel has one), whatever mesh wrote
the checkpoint. Plot helpers take plain lists and arrays and return matplotlib figures; nothing
needs pandas.

Shape legend: M MoE layers, N sequences (eval windows), L sequence length, E experts,
T kinds (len(KINDS)).

Modules: evaluation (load_run, evaluate_run, evaluate_at_capacities), source_kinds (token_kind),
routing_capture (capture_routing), expert_tables (expert_kind_table and plots), sweep_results
(load_sweep and plots). Everything is re-exported here.
"""

# ruff: noqa: F401  (this package re-exports its modules' public names)
from switchmoe.analysis.evaluation import (
    Run,
    in_repository,
    load_run,
    single_device_config,
    evaluate_at_capacities,
    evaluate_run,
    format_capacity_table,
    plot_capacity_sweep,
)
from switchmoe.analysis.source_kinds import (
    NUM_BYTES,
    KINDS,
    KIND,
    token_kind,
    token_kind_of_ids,
    kind_names,
)
from switchmoe.analysis.routing_capture import RoutingCapture, routing_fn, capture_routing
from switchmoe.analysis.expert_tables import (
    kind_counts,
    byte_counts,
    mutual_information,
    entropy_bits,
    expert_kind_table,
    format_kind_table,
    expert_load,
    plot_expert_load,
    plot_kind_expert,
    plot_confidence,
    plot_routed_text,
    routed_text_html,
)
from switchmoe.analysis.sweep_results import (
    config_value,
    metric_series,
    last_value,
    load_trial,
    load_sweep,
    trial_label,
    format_value,
    markdown_table,
    format_sweep_table,
    plot_eval_curves,
    plot_run_curves,
    plot_final_vs,
    explain_empty,
    plot_loss_vs_experts,
    plot_capacity_factor,
)
