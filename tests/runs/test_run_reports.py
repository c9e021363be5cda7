"""What a run prints. The progress line's tokens/s is training throughput: evaluation and
checkpoint time (inside `Progress.paused`) and the first step's compilation (before `rebase`) are
left out; checked on a clock the test sets, against tokens / (wall seconds - paused seconds)
computed by hand. The summary's expert loads are shown against the uniform share 1/E."""

import numpy as np
import pytest

from switchmoe.runs import metrics, summary


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    return now


def test_tokens_per_second_leaves_out_paused_time_and_compilation(clock):
    progress = metrics.Progress(total_steps=100, tokens_per_step=256, start_step=0)
    clock[0] += 30.0  # step 1, compiling
    progress.rebase(1)
    clock[0] += 4.0  # training
    with progress.paused():
        clock[0] += 7.0  # an evaluation
    clock[0] += 2.0  # training: steps 2..10 took 6 s of the 14.5
    with progress.paused():
        clock[0] += 1.5  # a checkpoint write
    assert progress.tokens_per_second(10) == pytest.approx(9 * 256 / 6.0)
    clock[0] += 5.0  # the next 10 steps, nothing paused: the pauses were reset with the line
    assert progress.tokens_per_second(20) == pytest.approx(10 * 256 / 5.0)
    line = progress.line(20, {"train/loss": 2.0}, 512.0)
    assert "0.5k tok/s" in line and "ETA 40s" in line  # 80 steps x 256 tokens at 512 tok/s


def test_summary_shows_expert_loads_in_units_of_the_uniform_share():
    loads = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    lines = summary.expert_load_lines(loads)
    assert "1/E = 1/4" in lines[0]
    # shares 2, 1, 1, 0: std sqrt(((2-1)^2 + 0 + 0 + (0-1)^2) / 4) = 0.707 over mean 1
    assert lines[1] == "  layer 0: 2.00 1.00 1.00 0.00  (min 0.00, max 2.00, CV 0.71)"
    assert lines[2] == "  layer 1: 1.00 1.00 1.00 1.00  (min 1.00, max 1.00, CV 0.00)"
