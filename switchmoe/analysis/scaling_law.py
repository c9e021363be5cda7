"""The scaling law of routed language models (Clark et al. 2022), fitted with intervals.

The form (their Eq. 1; logs base 10, as theirs):

    log L(N, E) = a·log N + b·log Ê + c·log N·log Ê + d

N: active non-embedding parameters of the model (the dense model a routed one is built on);
E: experts per MoE layer, E = 1 for the dense model. With `saturating=True`, Ê is their
saturating transform of E (Eq. 8), which lets the benefit of experts level off:

    1/Ê = 1 / (E − 1 + (1/E_start − 1/E_max)^−1) + 1/E_max        (Ê(1) = E_start, Ê → E_max)

and without it Ê = E. For fixed (E_start, E_max) the form is linear in (a, b, c, d), so it is
solved by least squares on log L; E_start and E_max are found by a grid search around it
(NumPy only: the library does not depend on SciPy). a is the dense scaling exponent, b + c·log N
the expert exponent at size N (c > 0: experts help less as the model grows).

Intervals. `bootstrap_fit` refits on resamples of the evidence: the documents of the eval set
(drawn once per resample and shared by every run, since every run scored the same documents)
and each setting's seeds (drawn with replacement within the setting). The percentile interval of
each coefficient over resamples is reported beside it, so a coefficient is read with both
uncertainties in it.

When experts stop paying. `experts_until_no_gain` walks E = 1, 2, 4, ... and returns the first E
whose doubling lowers the predicted loss by less than `min_gain` nats; with the plain form and
b + c·log N < 0 the gain per doubling only shrinks with L, with the saturating form it vanishes as
Ê nears E_max; b + c·log N ≥ 0 means experts never paid at that size (returns 1).

Clark et al.'s own fits (`CLARK_2022`) are printed beside ours by experiments/scaling_fit.py;
they were fitted on MassiveText at 15M–1.3B parameters and up to 512 experts, so they are a
reference for the signs and the orders of magnitude, not a target for a CPU-sized study.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

# Clark et al. 2022, Table 3: the fitted coefficients of Eq. 1 (the saturating form) for their
# three routing techniques. Transcribed for comparison; see the module docstring on what they fit.
# Not yet checked against the paper itself: a second, independent transcription (public notes on
# routed scaling laws) agrees on every value but Hash's d, which it reads as 1.157.
CLARK_2022 = {
    "S-BASE": {
        "a": -0.082,
        "b": -0.108,
        "c": 0.009,
        "d": 1.104,
        "e_start": 1.847,
        "e_max": 314.478,
    },
    "RL-R": {"a": -0.083, "b": -0.126, "c": 0.012, "d": 1.111, "e_start": 1.880, "e_max": 469.982},
    "Hash": {"a": -0.087, "b": -0.136, "c": 0.012, "d": 1.134, "e_start": 4.175, "e_max": 477.741},
}
COEFFICIENTS = ("a", "b", "c", "d")


def saturated_experts(experts, e_start: float, e_max: float) -> np.ndarray:
    """Ê of Clark et al.'s Eq. 8 (module docstring); float64, same shape as `experts`."""
    e = np.asarray(experts, np.float64)
    shift = 1.0 / (1.0 / e_start - 1.0 / e_max)
    return 1.0 / (1.0 / (e - 1.0 + shift) + 1.0 / e_max)


@dataclasses.dataclass(frozen=True)
class LawFit:
    """Coefficients of the form (module docstring); e_start/e_max None for the plain form."""

    a: float
    b: float
    c: float
    d: float
    e_start: float | None = None
    e_max: float | None = None
    rms: float = 0.0  # root-mean-square residual of log10 L over the points fitted

    def effective_experts(self, experts) -> np.ndarray:
        if self.e_start is None:
            return np.asarray(experts, np.float64)
        return saturated_experts(experts, self.e_start, self.e_max)

    def predict(self, params, experts) -> np.ndarray:
        """L(N, E) in the units of the fitted losses."""
        log_n = np.log10(np.asarray(params, np.float64))
        log_e = np.log10(self.effective_experts(experts))
        return 10.0 ** (self.a * log_n + self.b * log_e + self.c * log_n * log_e + self.d)

    def expert_exponent(self, params) -> float:
        """∂ log L / ∂ log Ê at size N: b + c·log N (negative while experts help)."""
        return float(self.b + self.c * np.log10(params))


def _solve(log_n, log_e, log_l) -> tuple[np.ndarray, float]:
    design = np.stack([log_n, log_e, log_n * log_e, np.ones_like(log_n)], axis=1)
    coef, *_ = np.linalg.lstsq(design, log_l, rcond=None)
    residual = log_l - design @ coef
    return coef, float(np.sqrt(np.mean(residual**2)))


def fit_law(
    params: Sequence[float],
    experts: Sequence[float],
    losses: Sequence[float],
    saturating: bool = False,
    e_start_grid: Sequence[float] | None = None,
    e_max_grid: Sequence[float] | None = None,
) -> LawFit:
    """Least-squares fit of log10 L on the form, one point per (N, E) (or per run).

    Needs at least two model sizes and two expert counts (and four distinct points): the
    interaction c is the change of the expert exponent between sizes.
    """
    n = np.asarray(params, np.float64)
    e = np.asarray(experts, np.float64)
    loss = np.asarray(losses, np.float64)
    if not (n.shape == e.shape == loss.shape) or n.ndim != 1:
        raise ValueError("fit_law needs three equal 1-D sequences: params, experts, losses.")
    if len(set(n.tolist())) < 2 or len(set(e.tolist())) < 2 or len(set(zip(n, e))) < 4:
        raise ValueError(
            "fit_law needs at least two model sizes, two expert counts and four (size, experts) "
            f"points; got sizes {sorted(set(n.tolist()))}, experts {sorted(set(e.tolist()))}."
        )
    if np.any(n <= 0) or np.any(e < 1) or np.any(loss <= 0):
        raise ValueError("fit_law needs params > 0, experts >= 1 and losses > 0.")
    log_n, log_l = np.log10(n), np.log10(loss)
    if not saturating:
        coef, rms = _solve(log_n, np.log10(e), log_l)
        return LawFit(*map(float, coef), rms=rms)
    starts = np.geomspace(1.0 + 1e-3, 16.0, 25) if e_start_grid is None else e_start_grid
    maxima = np.geomspace(max(e.max(), 2.0), 1e5, 25) if e_max_grid is None else e_max_grid
    best = None
    for e_start in starts:
        for e_max in maxima:
            if e_max <= e_start:
                continue
            coef, rms = _solve(log_n, np.log10(saturated_experts(e, e_start, e_max)), log_l)
            if best is None or rms < best[0]:
                best = (rms, coef, float(e_start), float(e_max))
    rms, coef, e_start, e_max = best
    return LawFit(*map(float, coef), e_start=e_start, e_max=e_max, rms=rms)


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained run's evidence: its size, experts, seed, and its final evaluation's
    per-document summed loss (nats) and tokens, in the eval set's document order."""

    params: float
    experts: int
    seed: int
    doc_loss: np.ndarray
    doc_tokens: np.ndarray

    def loss(self, documents: np.ndarray | None = None) -> float:
        if documents is None:
            return float(self.doc_loss.sum() / self.doc_tokens.sum())
        return float(self.doc_loss[documents].sum() / self.doc_tokens[documents].sum())


def setting_points(runs: Sequence[Run], documents=None, seed_draw: Callable | None = None):
    """(params, experts, mean loss over the setting's seeds) per (N, E) setting, in order."""
    settings: dict[tuple, list[Run]] = {}
    for run in runs:
        settings.setdefault((run.params, run.experts), []).append(run)
    points = []
    for (n, e), group in settings.items():
        chosen = group if seed_draw is None else seed_draw(group)
        points.append((n, e, float(np.mean([r.loss(documents) for r in chosen]))))
    return [np.array(col) for col in zip(*points)]


def bootstrap_fit(
    runs: Sequence[Run],
    saturating: bool = False,
    resamples: int = 500,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[LawFit, dict[str, tuple[float, float]]]:
    """The fit on every run, and a percentile interval per coefficient from refits on
    resamples of documents and seeds (module docstring). Every run must have scored the same
    documents (the same eval set)."""
    sizes = {len(r.doc_loss) for r in runs}
    if len(sizes) != 1:
        raise ValueError(f"runs scored different eval sets ({sorted(sizes)} documents).")
    num_docs = sizes.pop()
    fit = fit_law(*setting_points(runs), saturating=saturating)
    rng = np.random.default_rng(seed)
    names = COEFFICIENTS + (("e_start", "e_max") if saturating else ())
    samples = {name: [] for name in names}
    for _ in range(resamples):
        documents = rng.integers(0, num_docs, num_docs)
        draw = lambda group: [group[i] for i in rng.integers(0, len(group), len(group))]
        refit = fit_law(*setting_points(runs, documents, draw), saturating=saturating)
        for name in names:
            samples[name].append(getattr(refit, name))
    tail = (1.0 - level) / 2.0
    intervals = {
        name: tuple(float(q) for q in np.quantile(values, [tail, 1.0 - tail]))
        for name, values in samples.items()
    }
    return fit, intervals


def experts_until_no_gain(
    fit: LawFit, params: float, min_gain: float = 0.005, max_experts: int = 1 << 16
) -> int:
    """The first E (a power of two) whose doubling lowers the predicted loss by less than
    `min_gain` (same units as the fitted losses); `max_experts` if the gain never falls that
    low before it."""
    experts = 1
    while experts < max_experts:
        gain = float(fit.predict(params, experts) - fit.predict(params, 2 * experts))
        if gain < min_gain:
            return experts
        experts *= 2
    return max_experts


def report(runs: Sequence[Run], resamples: int = 500, min_gain: float = 0.005) -> dict:
    """Both forms fitted with intervals, the expert count where doubling stops paying at each
    size, and Clark et al.'s coefficients: what experiments/scaling_fit.py writes as fit.json."""
    out = {"runs": len(runs), "sizes": sorted({r.params for r in runs}), "fits": {}}
    for form, saturating in (("plain", False), ("saturating", True)):
        fit, intervals = bootstrap_fit(runs, saturating=saturating, resamples=resamples)
        out["fits"][form] = {
            "coefficients": {k: v for k, v in vars(fit).items() if v is not None},
            "intervals_95": intervals,
            "experts_until_gain_below_min": {
                str(int(n)): experts_until_no_gain(fit, n, min_gain) for n in out["sizes"]
            },
            "expert_exponent": {str(int(n)): fit.expert_exponent(n) for n in out["sizes"]},
        }
    out["min_gain_nats"] = min_gain
    out["clark_2022"] = CLARK_2022
    return out


def markdown(result: dict) -> str:
    """`report`'s result as the Markdown of fit.md: our coefficients [95%] beside Clark et al.'s."""
    names = ("a", "b", "c", "d", "e_start", "e_max")
    lines = [
        f"Runs: {result['runs']}; sizes N (active non-embedding parameters): "
        + ", ".join(f"{int(n):,}" for n in result["sizes"]),
        "",
        "| fit | " + " | ".join(names) + " | rms (log10 L) |",
        "|" + "---|" * (len(names) + 2),
    ]
    for form, fit in result["fits"].items():
        cells = []
        for name in names:
            value = fit["coefficients"].get(name)
            if value is None:
                cells.append("-")
                continue
            low, high = fit["intervals_95"][name]
            cells.append(f"{value:.4g} [{low:.4g}, {high:.4g}]")
        lines.append(
            f"| switchmoe, {form} | " + " | ".join(cells) + f" | {fit['coefficients']['rms']:.2g} |"
        )
    for router, coef in result["clark_2022"].items():
        lines.append(
            f"| Clark et al. 2022, {router} | "
            + " | ".join(f"{coef[n]:g}" for n in names)
            + " | - |"
        )
    lines += ["", f"Experts past which a doubling gains < {result['min_gain_nats']} nats:"]
    for form, fit in result["fits"].items():
        stops = ", ".join(
            f"N {int(n):,}: E {e}" for n, e in fit["experts_until_gain_below_min"].items()
        )
        lines.append(f"- {form}: {stops}")
    return "\n".join(lines)
