"""What the train step is composed from (the seams are in training/seams.py): a training
feature is its own module plus one line here.

    OBJECTIVES       the first that applies to a config gives the step's objective; else the
                     language-model loss (seams.Objective)
    OBJECTIVE_TERMS  every one that applies adds to the objective, whichever it is, from the
                     model's auxiliary outputs (multi-token prediction)
    AFTER_OPTIMIZER  every one that applies updates the parameters after the optimizer, in order
    STEP_HOOKS       host-side work around the steps, in order (the profiler window, model FLOPs)
    RUN_CHECKS       run in order before a run writes or compiles anything

Each entry of the first three is a `for_config(config)` that returns the part, or None when the
config does not use it; a step hook's is `for_config(config, workdir, log, params)`.
"""

from __future__ import annotations

import ml_collections

from switchmoe.moe import balancing
from switchmoe.runs import compatibility
from switchmoe.training import distillation, init_from, mtp, profiling, seams

OBJECTIVES = (distillation.Distillation.for_config,)
OBJECTIVE_TERMS = (mtp.MultiTokenPrediction.for_config,)
AFTER_OPTIMIZER = (balancing.BiasRule.for_config,)
STEP_HOOKS = (profiling.StepWindow.for_config,)
RUN_CHECKS: tuple[seams.RunCheck, ...] = (
    distillation.check_before_run,  # a teacher that reads the student's batches
    compatibility.check_trainable,  # int8 experts: evaluation only
    compatibility.check_workdir_compatible,  # a resumed checkpoint of the same model
    init_from.check_before_run,  # a first start's source fits this model
    profiling.check_before_run,  # a well-formed profile_steps window
)


def objective_for(config: ml_collections.ConfigDict, abstract: bool = False) -> seams.Objective:
    """The objective of `config`; `abstract`: parameters read beside the batch (a teacher's)
    are shapes from a config.json, not restored values (for memory estimates)."""
    for make in OBJECTIVES:
        objective = make(config, abstract=abstract)
        if objective is not None:
            return objective
    return seams.Objective(config)


def objective_terms(config: ml_collections.ConfigDict) -> list[seams.ObjectiveTerm]:
    return [term for term in (make(config) for make in OBJECTIVE_TERMS) if term is not None]


def after_optimizer(config: ml_collections.ConfigDict) -> list[seams.AfterOptimizer]:
    return [part for part in (make(config) for make in AFTER_OPTIMIZER) if part is not None]


def step_hooks(config: ml_collections.ConfigDict, workdir: str, log, params) -> list:
    """The step hooks of a run (`params`: the model's abstract parameters)."""
    hooks = (make(config, workdir, log, params) for make in STEP_HOOKS)
    return [hook for hook in hooks if hook is not None]


def step_loads(config: ml_collections.ConfigDict) -> balancing.StepLoads:
    """How the step collects the MoE layers' loads (for the global-batch loss and the bias)."""
    return balancing.StepLoads(config)


def check_before_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    for check in RUN_CHECKS:
        check(config, workdir)
