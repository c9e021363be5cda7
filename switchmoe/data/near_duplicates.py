"""Near-duplicate documents between and within splits, found by Jaccard similarity of line shingles.

Why. A validation document that nearly copies a training document measures memory, not
modelling: the embedded corpus holds families of generated or forked modules (the charmap codecs
`encodings/cp*.py`, the ISO-2022 codecs, the distutils MSVC compilers) whose members share most of
their lines. A path-hash split puts some members in each split.

How. A document's shingles are the 64-bit BLAKE2 hashes of every run of `k` consecutive non-blank
lines, each stripped of surrounding whitespace (so re-indentation and blank lines do not hide a
copy). Two documents' similarity is the Jaccard index |A ∩ B| / |A ∪ B| of their shingle sets,
computed exactly: at this corpus' size (≈ 700 × 40 pairs) MinHash would only add an
approximation. A validation document is removed when its Jaccard index with any training
document, or with a validation document kept before it (path order), reaches `threshold`; the
training split is never changed. On the Python 3.11 standard library the best match of each
validation file is either ≥ 0.40 (8 files: codecs and one MSVC compiler) or ≤ 0.18 (the rest),
so the default threshold 0.3 sits in an empty gap.

Leakage, reported before and after: the fraction of the validation split's distinct shingles that
also occur in the training split, and the largest Jaccard index of a validation document with any
training document.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

# Lines per shingle, and the Jaccard index from which two documents count as near-duplicates.
SHINGLE_LINES = 3
DEFAULT_THRESHOLD = 0.3


def line_shingles(text: str | bytes, k: int = SHINGLE_LINES) -> frozenset[int]:
    """Hashes of every run of `k` consecutive non-blank, stripped lines (one run when shorter)."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    lines = [line.strip() for line in raw.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return frozenset()
    runs = [b"\n".join(lines[i : i + k]) for i in range(max(1, len(lines) - k + 1))]
    return frozenset(
        int.from_bytes(hashlib.blake2b(run, digest_size=8).digest(), "little") for run in runs
    )


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a ∩ b| / |a ∪ b|; 0 for two empty sets."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


@dataclasses.dataclass(frozen=True)
class Removal:
    """A validation document removed as a near-copy of `match` (in split `match_split`)."""

    name: str
    match: str
    match_split: str
    jaccard: float


@dataclasses.dataclass(frozen=True)
class Leakage:
    """How much of validation the training split already holds (module docstring)."""

    shingle_overlap: float  # distinct validation shingles also in train / all of them
    max_jaccard: float  # the largest Jaccard index of a validation document with a train one


@dataclasses.dataclass(frozen=True)
class DedupReport:
    """What `deduplicate_validation` removed, and the leakage before and after."""

    threshold: float
    removed: tuple[Removal, ...]
    kept: tuple[str, ...]
    before: Leakage
    after: Leakage

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """A human summary: one line of totals, one per removed document."""
        out = [
            f"near-duplicates (Jaccard of {SHINGLE_LINES}-line shingles >= {self.threshold}): "
            f"{len(self.removed)} validation documents removed, {len(self.kept)} kept; "
            f"validation shingles also in train {100 * self.before.shingle_overlap:.1f}% -> "
            f"{100 * self.after.shingle_overlap:.1f}%, largest Jaccard with a train document "
            f"{self.before.max_jaccard:.3f} -> {self.after.max_jaccard:.3f}"
        ]
        for r in self.removed:
            out.append(
                f"  removed {r.name} (Jaccard {r.jaccard:.3f} with {r.match_split} {r.match})"
            )
        return out


def _leakage(train: dict[str, frozenset], validation: dict[str, frozenset]) -> Leakage:
    seen = frozenset().union(*train.values()) if train else frozenset()
    distinct = frozenset().union(*validation.values()) if validation else frozenset()
    overlap = len(distinct & seen) / len(distinct) if distinct else 0.0
    best = max((jaccard(v, t) for v in validation.values() for t in train.values()), default=0.0)
    return Leakage(float(overlap), float(best))


def deduplicate_validation(
    train: dict[str, str | bytes],
    validation: dict[str, str | bytes],
    threshold: float = DEFAULT_THRESHOLD,
) -> DedupReport:
    """Which validation documents to keep: those whose Jaccard index stays below `threshold`
    with every training document and with every validation document kept before them (in sorted
    name order). Deterministic: a function of the texts, names and threshold only.

    Args:
      train, validation: {document name: text}.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold={threshold!r}; allowed: (0, 1].")
    train_sh = {name: line_shingles(text) for name, text in sorted(train.items())}
    val_sh = {name: line_shingles(text) for name, text in sorted(validation.items())}
    removed, kept = [], {}
    for name, shingles in val_sh.items():
        best = (0.0, "", "")
        for split, pool in (("train", train_sh), ("validation", kept)):
            for other, other_sh in pool.items():
                score = jaccard(shingles, other_sh)
                if score > best[0]:
                    best = (score, other, split)
        if best[0] >= threshold:
            removed.append(Removal(name, best[1], best[2], round(best[0], 6)))
        else:
            kept[name] = shingles
    return DedupReport(
        threshold=threshold,
        removed=tuple(removed),
        kept=tuple(kept),
        before=_leakage(train_sh, val_sh),
        after=_leakage(train_sh, kept),
    )


def fraction_removed(report: DedupReport, sizes: dict[str, int]) -> float:
    """The share of validation bytes removed, given {name: bytes} of the original split."""
    total = sum(sizes.values())
    return float(np.sum([sizes[r.name] for r in report.removed]) / total) if total else 0.0
