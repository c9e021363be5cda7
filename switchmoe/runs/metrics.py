"""Metrics: metrics.jsonl (read by notebooks and reports) beside TensorBoard events, and a
progress line.

JSONL holds every metric, vectors included (expert load per layer); TensorBoard gets the scalar
ones. tensorboardX writes event files without TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

# The final evaluation's per-document sums (documents, loss, tokens, bytes) in a workdir:
# analyses that resample documents (the scaling fit's intervals) read it instead of evaluating
# every run again.
FINAL_DOCUMENTS_FILE = "final_eval_documents.npz"
METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
    """Appends one JSON object per logged step; on resume, drops lines past the restored step.

    Lines after the last checkpoint were written by steps that the resumed run recomputes; keeping
    them would leave two records of one step. Everything up to the checkpoint is kept as written.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        from tensorboardX import SummaryWriter  # imported late: only training needs it

        self.path = os.path.join(workdir, METRICS_FILE)
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [
                    line for line in f if line.strip() and json.loads(line)["step"] <= resume_step
                ]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self.tensorboard = SummaryWriter(logdir=workdir, purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def bits_per_byte(nats_per_token: float, num_tokens: float, num_bytes: float) -> float:
    """Loss in bits per UTF-8 byte of text: nats/token × tokens ÷ (bytes · ln 2).

    What byte-level and subword models compare on: a subword token stands for several bytes, so
    its loss per token is larger for the same quality of prediction. `num_bytes` counts the bytes
    the scored target tokens stand for (`Tokenizer.token_bytes`); special tokens (EOS) count 0.
    """
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be > 0 to express a loss per byte; got {num_bytes}.")
    return nats_per_token * num_tokens / (num_bytes * math.log(2))


def first_non_finite(metrics: dict[str, Any]) -> str | None:
    """The name of the first metric holding a NaN or infinity, or None."""
    for name, value in metrics.items():
        if not np.all(np.isfinite(np.asarray(value, np.float64))):
            return name
    return None


class Progress:
    """One line per log step: step, loss, aux loss, dropped fraction, tokens/s, ETA.

    tokens/s is training throughput: the seconds spent inside `paused()` (evaluation, checkpoint
    writes) since the last line are not counted, and `rebase` after the first step leaves its
    compilation out. The ETA divides the remaining tokens by that rate, so it does not include
    the evaluations and saves still to come.
    """

    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int):
        self.total, self.tokens_per_step = total_steps, tokens_per_step
        self.rebase(start_step)

    def rebase(self, step: int) -> None:
        """Measure from now, as if the last line were at `step`."""
        self.last_step, self.last_time, self.paused_seconds = step, time.perf_counter(), 0.0

    def elapsed(self) -> float:
        """Seconds since the last progress line (or the start)."""
        return time.perf_counter() - self.last_time

    @contextlib.contextmanager
    def paused(self, pending: Any = None):
        """Time inside does not count toward tokens/s. `pending` (e.g. the parameters) is waited
        for first: JAX dispatches asynchronously, so without the wait the training steps still
        running on the device would be timed as the pause."""
        if pending is not None:
            jax.block_until_ready(pending)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def tokens_per_second(self, step: int) -> float:
        now = time.perf_counter()
        busy = max(now - self.last_time - self.paused_seconds, 1e-9)
        rate = (step - self.last_step) * self.tokens_per_step / busy
        self.last_step, self.last_time, self.paused_seconds = step, now, 0.0
        return rate

    def line(self, step: int, metrics: dict[str, Any], tokens_per_second: float) -> str:
        remaining = (self.total - step) * self.tokens_per_step / max(tokens_per_second, 1e-9)
        loss = float(metrics["train/loss"])
        parts = [
            f"step {step}/{self.total}",
            f"loss {loss:.4f} ({loss / math.log(2):.3f} bits/tok)",
        ]
        if "train/aux_loss" in metrics:
            parts.append(f"aux {float(metrics['train/aux_loss']):.4f}")
        if "train/dropped_fraction" in metrics:
            parts.append(f"dropped {100 * float(metrics['train/dropped_fraction']):.1f}%")
        parts.append(f"{tokens_per_second / 1e3:.1f}k tok/s")
        if "train/mfu" in metrics:
            parts.append(f"MFU {100 * float(metrics['train/mfu']):.1f}%")
        elif "train/model_flops_per_second" in metrics:  # no known peak (CPU, float32)
            parts.append(f"{float(metrics['train/model_flops_per_second']) / 1e9:.1f} GFLOP/s")
        parts.append(f"ETA {format_seconds(remaining)}")
        return " | ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def final_line(record: dict) -> str:
    """The final evaluation in one line: loss, bits/byte with its interval, what was scored."""
    line = f"final eval: loss {record['final/loss']:.4f}"
    if "final/loss_low" in record:
        line += f" [{record['final/loss_low']:.4f}, {record['final/loss_high']:.4f}]"
    if "final/bits_per_byte" in record:
        line += f", {record['final/bits_per_byte']:.4f} bits/byte"
        if "final/bits_per_byte_low" in record:
            line += (
                f" [{record['final/bits_per_byte_low']:.4f}, "
                f"{record['final/bits_per_byte_high']:.4f}] (95% bootstrap over documents)"
            )
    return line + (
        f" on {record['final/documents']:.0f} documents, {record['final/scored_tokens']:,.0f} "
        f"tokens, {record['final/scored_bytes']:,.0f} bytes"
        + (" (the whole eval split)" if record.get("final/whole_split") else "")
    )
