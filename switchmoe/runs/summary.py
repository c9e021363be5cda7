"""What a finished `experiments.train` prints: steps, parameters, the final evaluation (the whole
eval split, with its bootstrap interval) beside the unigram entropy, zlib, xz and xz after the
training split on exactly the bytes it scored, the expert load, and where the outputs are. A module of the library, so tests and notebooks can call
it without the entry point's absl flags.
"""

from __future__ import annotations

import os
import platform

import jax
import numpy as np

from switchmoe.config import is_noncausal_ablation, noncausal_reason
from switchmoe.data import baselines
from switchmoe.data.pipeline import STDLIB_DATASET, load_texts, resolve_data_dir
from switchmoe.data.span_corruption import make_pipeline
from switchmoe.models import count_params, resolve
from switchmoe.runs.metrics import final_line, format_seconds


def scored_text_baselines(config, which: str) -> dict:
    """`baselines.scored_baselines` on exactly the bytes eval set `which` scores, with the
    training split as xz's context when xz can hold it (the embedded corpus, or a `max_files`
    prefix of another dataset); cached under the data directory."""
    pipeline = make_pipeline(config)
    scored = pipeline.eval_set(which).text
    context = None
    if config.data.dataset == STDLIB_DATASET or config.data.max_files:
        context = b"".join(load_texts(config.data, config.data.train_split))
    cache = os.path.join(resolve_data_dir(config.data), "baselines")
    return baselines.scored_baselines(scored, context, cache_dir=cache)


def baseline_lines(config, result: dict) -> list[str]:
    """The final evaluation's bytes: this model beside the unigram entropy, zlib and xz cold, and
    xz after reading the training split, all on exactly those bytes."""
    if "final/bits_per_byte" not in result:
        return []
    which = "split" if result.get("final/whole_split") else "sample"
    if which == "sample" and not result.get("final/whole_sample"):
        return []  # a capped final evaluation: its bytes are not a set of whole documents
    rivals = scored_text_baselines(config, which)
    what = "the whole eval split" if which == "split" else "the eval sample"
    model = result["final/bits_per_byte"]
    lines = [
        f"On the {result['final/scored_bytes']:,.0f} bytes scored ({what}), bits/byte: this model "
        f"{model:.3f}; " + ", ".join(f"{name} {value:.3f}" for name, value in rivals.items()) + "."
    ]
    if "xz -9 after train" in rivals:
        gap = model - rivals["xz -9 after train"]
        lines.append(
            f"Distance to xz -9 with the training split as context: {gap:+.3f} bits/byte "
            f"({'behind' if gap > 0 else 'ahead of'} it); to cold xz -9: "
            f"{model - rivals['xz -9']:+.3f}."
        )
    return lines


def expert_load_lines(loads: np.ndarray) -> list[str]:
    """Each MoE layer's expert loads [L, E] (fractions of its kept token-expert pairs) in units of
    the uniform share 1/E, so 1.00 is balanced, with the range and the coefficient of variation."""
    loads = np.atleast_2d(loads)
    E = loads.shape[-1]
    lines = [f"Eval expert load per MoE layer, in units of the uniform share 1/E = 1/{E} "
             "(1.00 = balanced):"]  # fmt: skip
    for i, load in enumerate(loads):
        share = load * E
        shown = " ".join(f"{x:.2f}" for x in share)
        lines.append(
            f"  layer {i}: {shown}  (min {share.min():.2f}, max {share.max():.2f}, "
            f"CV {share.std() / max(share.mean(), 1e-12):.2f})"
        )
    return lines


def summary(config, workdir: str, result: dict, seconds: float, start_step: int = 0) -> str:
    """What the run reached, beside the corpus's unigram entropy (the no-context baseline)."""
    config = resolve(config)
    params = count_params(config)
    lines = [
        (
            f"Trained steps {start_step + 1}-{config.num_train_steps} in "
            f"{format_seconds(seconds)} ({config.num_train_steps - start_step} steps this invocation)."
            if start_step < config.num_train_steps
            else f"Already trained to step {config.num_train_steps}; nothing to do."
        ),
        f"Parameters: {params['total']:,} total, {params['active_per_token']:,} active per token.",
    ]
    if "final/loss" in result:
        lines.append(final_line(result))
    elif "eval/loss" in result:  # a run from before the final evaluation (and not rerun since)
        per_byte = result.get("eval/bits_per_byte")
        lines.append(
            f"Eval loss (its last periodic evaluation, {result.get('eval/scored_bytes', 0):,.0f} "
            f"bytes): {result['eval/loss']:.4f} nats/token = "
            f"{result['eval/bits_per_token']:.3f} bits/token"
            + ("" if per_byte is None else f" = {per_byte:.4f} bits/byte")
        )
    if is_noncausal_ablation(config):
        lines.append(
            f"NON-CAUSAL ROUTING ABLATION ({noncausal_reason(config.model.moe)}): later tokens "
            "reach earlier predictions through the routing, so this eval loss is not comparable "
            "with a causal model's."
        )
    if config.model.get("arch", "decoder") == "decoder":
        lines += baseline_lines(config, result)
    if "eval/expert_load" in result:
        np.set_printoptions(precision=3, suppress=True)
        lines.append(
            f"Eval dropped fraction: {100 * result['eval/dropped_fraction']:.2f}% "
            f"(capacity factor {config.model.moe.eval_capacity_factor})"
        )
        lines += expert_load_lines(np.asarray(result["eval/expert_load"]))
    lines.append(f"Metrics: {workdir}/metrics.jsonl (TensorBoard: make tensorboard RUN={workdir})")
    lines.append(f"Checkpoints: {workdir}/checkpoints (switchmoe.runs.restore_run('{workdir}'))")
    return "\n".join(lines)


def results_record(config, workdir: str, result: dict, seconds: float, start_step: int) -> dict:
    """What a run reached, as a results file records it (experiments.train --results=DIR): the
    final evaluation, the baselines on its bytes, the wall time, and the machine."""
    config = resolve(config)
    record = {
        "workdir": workdir,
        "num_train_steps": config.num_train_steps,
        "steps_this_invocation": config.num_train_steps - start_step,
        "seconds_this_invocation": round(seconds, 1),
        "parameters": count_params(config),
        "final": {k: v for k, v in result.items() if k.startswith("final/")},
        "machine": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "cpu_count": os.cpu_count(),
        },
    }
    if (
        record["final"].get("final/whole_split")
        and config.model.get("arch", "decoder") == "decoder"
    ):
        record["baselines_on_scored_bytes"] = scored_text_baselines(config, "split")
    return record


def results_table(record: dict) -> str:
    """The record as a Markdown table: this run beside the baselines, on the same bytes."""
    final = record["final"]
    rows = [
        "| code | bits/byte | on |",
        "|---|---|---|",
    ]
    scored = (
        f"the whole validation split: {final['final/documents']:.0f} documents, "
        f"{final['final/scored_bytes']:,.0f} bytes"
    )
    interval = ""
    if "final/bits_per_byte_low" in final:
        interval = (
            f" [{final['final/bits_per_byte_low']:.3f}, {final['final/bits_per_byte_high']:.3f}]"
        )
    rows.append(
        f"| this model, {record['num_train_steps']} steps in "
        f"{format_seconds(record['seconds_this_invocation'])} | "
        f"**{final['final/bits_per_byte']:.3f}**{interval} | {scored} |"
    )
    for name, value in record.get("baselines_on_scored_bytes", {}).items():
        rows.append(f"| {name} | {value:.3f} | the same bytes |")
    return "\n".join(rows)
