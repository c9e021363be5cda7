"""The routed scaling law fit (Clark et al. 2022's form) against data drawn from known
coefficients, and its transform and predictions against their formulas."""

import numpy as np
import pytest

from switchmoe.analysis import scaling_law as sl

TRUE = sl.LawFit(a=-0.06, b=-0.05, c=0.004, d=0.75)
SIZES = (2.0e5, 8.0e5)
EXPERTS = (1, 8, 16, 32, 64, 128)


def _synthetic_runs(seeds=4, docs=30, seed=0):
    """Runs whose per-document losses average to TRUE's prediction, with seed noise (shared by
    a run's documents) and document noise (each document's difficulty, shared by every run)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(500, 3000, docs).astype(np.float64)
    difficulty = np.exp(rng.normal(0.0, 0.2, docs))
    difficulty /= (difficulty * tokens).sum() / tokens.sum()  # token-weighted mean 1
    runs = []
    for n in SIZES:
        for e in EXPERTS:
            for s in range(seeds):
                level = float(TRUE.predict(n, e)) * 10 ** rng.normal(0.0, 0.002)
                per_token = level * difficulty * np.exp(rng.normal(0.0, 0.01, docs))
                runs.append(sl.Run(n, e, s, per_token * tokens, tokens))
    return runs


def test_fit_recovers_planted_coefficients_within_its_intervals():
    fit, intervals = sl.bootstrap_fit(_synthetic_runs(), resamples=300)
    for name in sl.COEFFICIENTS:
        low, high = intervals[name]
        assert low <= getattr(TRUE, name) <= high, (name, getattr(fit, name), low, high)
        assert low <= getattr(fit, name) <= high
    # The intervals are informative: experts help (b < 0) beyond doubt, and the interval of
    # the dense exponent is narrow beside its value.
    assert intervals["b"][1] < 0 and intervals["a"][1] - intervals["a"][0] < 0.2 * abs(TRUE.a)


def test_noise_free_points_are_fitted_exactly():
    n, e = np.meshgrid(SIZES, EXPERTS)
    loss = TRUE.predict(n.ravel(), e.ravel())
    fit = sl.fit_law(n.ravel(), e.ravel(), loss)
    for name in sl.COEFFICIENTS:
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), abs=1e-9)
    assert fit.rms < 1e-12


def test_saturating_transform_and_its_fit():
    e_start, e_max = 2.0, 300.0
    assert sl.saturated_experts(1, e_start, e_max) == pytest.approx(e_start)
    assert sl.saturated_experts(1e9, e_start, e_max) == pytest.approx(e_max, rel=1e-5)
    # Eq. 8 by hand at E = 10.
    by_hand = 1 / (1 / (10 - 1 + 1 / (1 / e_start - 1 / e_max)) + 1 / e_max)
    assert sl.saturated_experts(10, e_start, e_max) == pytest.approx(by_hand)
    truth = sl.LawFit(-0.06, -0.05, 0.004, 0.75, e_start=e_start, e_max=e_max)
    n, e = np.meshgrid(SIZES, (1, 4, 16, 64, 256, 1024))
    loss = truth.predict(n.ravel(), e.ravel())
    fit = sl.fit_law(
        n.ravel(),
        e.ravel(),
        loss,
        saturating=True,
        e_start_grid=[1.5, 2.0, 3.0],
        e_max_grid=[100.0, 300.0, 1000.0],
    )
    assert (fit.e_start, fit.e_max) == (2.0, 300.0) and fit.rms < 1e-10


def test_when_experts_stop_paying():
    # Doubling E multiplies L by 2^(b + c log N): the gain halves as L falls, so by hand the
    # first E whose doubling gains < min_gain is found by walking the powers of two.
    n = 8.0e5
    walk = 1
    while TRUE.predict(n, walk) - TRUE.predict(n, 2 * walk) >= 0.04:
        walk *= 2
    assert sl.experts_until_no_gain(TRUE, n, min_gain=0.04) == walk > 1
    never = sl.LawFit(a=-0.06, b=0.01, c=0.0, d=0.75)  # experts make it worse
    assert never.expert_exponent(n) > 0 and sl.experts_until_no_gain(never, n) == 1


def test_bad_input_names_what_is_missing():
    with pytest.raises(ValueError, match="two model sizes"):
        sl.fit_law([1e5] * 4, [1, 2, 4, 8], [2.0] * 4)
    runs = _synthetic_runs(seeds=1)
    runs[0] = sl.Run(
        runs[0].params, runs[0].experts, 0, runs[0].doc_loss[:5], runs[0].doc_tokens[:5]
    )
    with pytest.raises(ValueError, match="different eval sets"):
        sl.bootstrap_fit(runs, resamples=2)


def test_scaling_fit_report_prints_both_forms_beside_clark():
    result = sl.report(_synthetic_runs(seeds=2), resamples=20, min_gain=0.04)
    assert set(result["fits"]) == {"plain", "saturating"}
    assert set(result["fits"]["plain"]["experts_until_gain_below_min"]) == {"200000", "800000"}
    text = sl.markdown(result)
    assert "| switchmoe, plain |" in text and "| Clark et al. 2022, S-BASE |" in text
