"""Train an MoE language model from a config; rerun with the same workdir to resume.

  python -m experiments.train --config=configs/demo.py --workdir=runs/demo \
      [--config.model.moe.num_experts=16 ...]

Writes under the workdir: config.json, metrics.jsonl, TensorBoard events, checkpoints/.
"""

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from switchmoe import distributed
from switchmoe.config import is_noncausal_ablation, noncausal_reason, resolve
from switchmoe.data.pipeline import corpus_statistics
from switchmoe.metrics import format_seconds
from switchmoe.train import count_params, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:variant])."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if it has checkpoints.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs (jax.distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes)."
)
flags.mark_flags_as_required(["config", "workdir"])


def summary(config, workdir: str, result: dict, seconds: float) -> str:
    """What the run reached, beside the corpus's unigram entropy (the no-context baseline)."""
    config = resolve(config)
    params = count_params(config)
    lines = [
        f"Trained {config.num_train_steps} steps in {format_seconds(seconds)} (this invocation).",
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
    if config.data.tokenizer == "byte":
        stats = corpus_statistics(config.data, config.data.eval_split)
        lines.append(
            f"Validation split: {stats.num_bytes:,} bytes, unigram entropy "
            f"{stats.unigram_entropy_bits_per_byte:.3f} bits/byte (byte tokens: bits/token ≈ "
            "bits/byte; the model must beat this)."
        )
    if "eval/expert_load" in result:
        np.set_printoptions(precision=3, suppress=True)
        lines.append(
            f"Eval dropped fraction: {100 * result['eval/dropped_fraction']:.2f}% "
            f"(capacity factor {config.model.moe.eval_capacity_factor})"
        )
        for i, load in enumerate(np.asarray(result["eval/expert_load"])):
            lines.append(f"  MoE layer {i} expert load: {load}")
    lines.append(f"Metrics: {workdir}/metrics.jsonl (TensorBoard: tensorboard --logdir {workdir})")
    lines.append(f"Checkpoints: {workdir}/checkpoints (switchmoe.runs.restore_run('{workdir}'))")
    return "\n".join(lines)


def main(argv):
    del argv
    import time

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    start = time.perf_counter()
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print(summary(_CONFIG.value, _WORKDIR.value, result, time.perf_counter() - start))


if __name__ == "__main__":
    app.run(main)
