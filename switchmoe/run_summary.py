"""What a finished `experiments.train` prints: steps, parameters, eval loss per token and per
byte beside the validation split's unigram entropy and two compressors on the same bytes, the
expert load, and where the outputs are. A module of the library, so tests and notebooks can call
it without the entry point's absl flags.
"""

from __future__ import annotations

import numpy as np

from switchmoe.config import is_noncausal_ablation, noncausal_reason, resolve
from switchmoe.data import baselines
from switchmoe.data.pipeline import load_texts, text_statistics
from switchmoe.metrics import format_seconds
from switchmoe.models import count_params


def baseline_lines(config, result: dict) -> list[str]:
    """The validation split's unigram entropy and two compressors on the bytes eval scored."""
    texts = load_texts(config.data, config.data.eval_split)
    stats = text_statistics(texts)
    lines = [
        f"Validation split: {stats.num_bytes:,} bytes, unigram entropy "
        f"{stats.unigram_entropy_bits_per_byte:.3f} bits/byte (the model must beat this)."
    ]
    scored = int(result.get("eval/scored_bytes") or 0)
    if scored and "eval/bits_per_byte" in result:
        packed = baselines.compressor_bits_per_byte(baselines.split_prefix(texts, scored))
        rivals = ", ".join(f"{name} {bpb:.3f}" for name, bpb in packed.items())
        lines.append(
            f"On the {scored:,} bytes eval scored: this model {result['eval/bits_per_byte']:.3f} "
            f"bits/byte; {rivals} bits/byte."
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
    if "eval/loss" in result:
        per_byte = result.get("eval/bits_per_byte")
        lines.append(
            f"Eval loss: {result['eval/loss']:.4f} nats/token = "
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
        for i, load in enumerate(np.asarray(result["eval/expert_load"])):
            lines.append(f"  MoE layer {i} expert load: {load}")
    lines.append(f"Metrics: {workdir}/metrics.jsonl (TensorBoard: make tensorboard RUN={workdir})")
    lines.append(f"Checkpoints: {workdir}/checkpoints (switchmoe.runs.restore_run('{workdir}'))")
    return "\n".join(lines)
