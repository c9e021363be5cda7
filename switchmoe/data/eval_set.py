"""What an evaluation scores: whole documents of the eval split, chosen up front, packed so that
every token of them is a target exactly once, and tagged with their document for the bootstrap.

Two eval sets per config:
  - `"split"`: every document of `data.eval_split`. The final evaluation of a run scores it, so a
    run's headline number is the whole split's loss, not a prefix's.
  - `"sample"`: whole documents drawn at random (seeded by `data.eval_sample_seed`, the same for
    every run of a config whatever its training seed) until they hold at least
    `data.eval_sample_fraction` of the split's bytes. Periodic evaluations score it: cheaper than
    the split, and, unlike the stored-order prefix it replaces, not two near-identical modules
    that happen to sort first. `num_eval_batches > 0` scores only its first batches; its order
    is the random draw's, so even a short prefix of it samples the whole split.

Packing (next-token prediction). The chosen documents, in scoring order, each followed by EOS,
are preceded by one EOS: a document is then always predicted after an EOS, as in training where
documents are EOS-separated. The stream [T] is cut into windows of L + 1 tokens that overlap by
one (stride L): window k holds stream[k·L : k·L + L + 1], its inputs are tokens k·L .. k·L+L−1
and its targets k·L+1 .. k·L+L, so every token after the leading EOS is a target once and the
scored tokens are exactly Σ_d (tokens(d) + 1). The price is one token of context: each window
starts without the text before it, as training windows do. The last window is padded (weight 0
after its real tokens) and the last batch is completed by all-pad rows of weight 0.

Span corruption (the encoder–decoder) needs full windows of its raw length and no overlap: a
window is corrupted once, the partial last window is dropped, and each row is one bootstrap unit
(its first token's document), since a corrupted target has no position in the text.

Shapes: D documents in the eval set, B global batch, b = B / P rows of this process,
L = data.seq_len, W window tokens (L + 1 for the LM).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterator

import numpy as np

# The eval sets a trainer can score.
EVAL_SETS = ("split", "sample")


def sample_documents(doc_bytes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of whole documents in a seeded random order, the shortest prefix of that order
    whose documents hold at least `fraction` of the bytes (every document when fraction >= 1).

    The order is a permutation keyed by a BLAKE2 hash of the seed (as training orders are), so it
    does not depend on NumPy's random streams. int64 [D'].
    """
    doc_bytes = np.asarray(doc_bytes, np.int64)
    n = len(doc_bytes)
    digest = lambda text: hashlib.blake2b(text.encode(), digest_size=8).digest()
    keys = np.array([digest(f"eval-sample/{seed}/{i}") for i in range(n)], dtype="S8")
    order = np.argsort(keys, kind="stable").astype(np.int64)
    if fraction >= 1.0 or n == 0:
        return order
    cumulative = np.cumsum(doc_bytes[order])
    needed = fraction * max(int(doc_bytes.sum()), 1)
    count = int(np.searchsorted(cumulative, needed, side="left")) + 1
    return order[: min(count, n)]


@dataclasses.dataclass
class EvalSet:
    """Documents of the eval split packed for scoring (see module docstring).

    name: "split" or "sample".
    documents: int64 [D] the split's document indices, in scoring order.
    doc_bytes: int64 [D] UTF-8 bytes of each (the bytes its targets stand for, EOS excluded).
    doc_tokens: int64 [D] tokens of each, its EOS included (what the LM scores of it).
    text: the scored documents' bytes joined in scoring order (what the baselines compress).
    windows: [N, W] token ids (pad after a window's real tokens); lengths: int32 [N] real tokens;
    units: int32 [N, W − 1] the eval-set position (0..D−1) of each target's document, −1 where
      there is no real target (LM); for span corruption [N] per window, broadcast per row.
    num_split_documents, num_split_bytes: the whole split's size, for "what was scored".
    pad_id: the token that fills padding.
    target_bytes: int32 [N, W − 1] bytes each target stands for (LM with `token_bytes`), else None.
    """

    name: str
    documents: np.ndarray
    doc_bytes: np.ndarray
    doc_tokens: np.ndarray
    text: bytes
    windows: np.ndarray
    lengths: np.ndarray
    units: np.ndarray
    num_split_documents: int
    num_split_bytes: int
    pad_id: int
    target_bytes: np.ndarray | None = None

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.windows) // batch_size)

    def describe(self) -> dict:
        """What this set scores: documents, bytes, and the share of the split they are."""
        return {
            "documents": int(self.num_documents),
            "bytes": int(self.doc_bytes.sum()),
            "split_documents": int(self.num_split_documents),
            "split_bytes": int(self.num_split_bytes),
        }


def build_eval_set(
    name: str,
    texts: list[bytes],
    encode: Callable[[bytes], np.ndarray],
    *,
    eos_id: int,
    pad_id: int,
    window: int,
    overlap: bool,
    fraction: float = 1.0,
    seed: int = 0,
    token_bytes: np.ndarray | None = None,
) -> EvalSet:
    """The eval set `name` of a split given as its documents' bytes (see module docstring).

    Args:
      encode: document bytes -> int token ids (without EOS).
      window: W, tokens per window.
      overlap: True for next-token prediction (stride W − 1, a leading EOS, a padded tail);
        False for span corruption (stride W, full windows only).
      fraction, seed: the sample's share of bytes and its seed (name "sample" only).
      token_bytes: int [V] bytes each token id stands for (LM only), for bits per byte.
    """
    if name not in EVAL_SETS:
        raise ValueError(f"eval set {name!r} is not one of {EVAL_SETS}")
    doc_bytes_all = np.array([len(t) for t in texts], np.int64)
    if name == "split":
        documents = np.arange(len(texts), dtype=np.int64)
    else:
        documents = sample_documents(doc_bytes_all, fraction, seed)
    pieces, owners, doc_tokens = [], [], []
    if overlap:
        pieces.append(np.array([eos_id], np.int64))
        owners.append(np.array([-1], np.int32))  # the leading EOS is context, never a target
    for position, index in enumerate(documents):
        ids = np.concatenate([np.asarray(encode(texts[index]), np.int64), [eos_id]])
        pieces.append(ids)
        owners.append(np.full([len(ids)], position, np.int32))
        doc_tokens.append(len(ids))
    stream = np.concatenate(pieces) if pieces else np.zeros([0], np.int64)
    owner = np.concatenate(owners) if owners else np.zeros([0], np.int32)
    stride = window - 1 if overlap else window
    if overlap:
        count = max(0, -(-(len(stream) - 1) // stride))  # windows holding at least one target
    else:
        count = len(stream) // window
    dtype = np.uint16 if max(int(stream.max(initial=0)), pad_id) < 2**16 else np.int32
    windows = np.full([count, window], pad_id, dtype=dtype)
    lengths = np.zeros([count], np.int32)
    window_owner = np.full([count, window], -1, np.int32)
    for k in range(count):
        chunk = stream[k * stride : k * stride + window]
        windows[k, : len(chunk)] = chunk
        lengths[k] = len(chunk)
        window_owner[k, : len(chunk)] = owner[k * stride : k * stride + window]
    units = window_owner[:, 1:] if overlap else window_owner[:, 0]
    target_bytes = None
    if overlap and token_bytes is not None:
        target_bytes = np.where(units >= 0, np.asarray(token_bytes)[windows[:, 1:]], 0)
        target_bytes = target_bytes.astype(np.int32)
    return EvalSet(
        name=name,
        documents=documents,
        doc_bytes=doc_bytes_all[documents],
        doc_tokens=np.array(doc_tokens, np.int64),
        text=b"".join(texts[i] for i in documents),
        windows=windows,
        lengths=lengths,
        units=units,
        num_split_documents=len(texts),
        num_split_bytes=int(doc_bytes_all.sum()),
        pad_id=pad_id,
        target_bytes=target_bytes,
    )


def eval_set_batches(
    eval_set: EvalSet,
    batch_size: int,
    rows: range,
    examples: Callable[[np.ndarray, np.ndarray, list[str]], dict],
    key_prefix: str,
    num_batches: int | None = None,
) -> Iterator[tuple[dict, np.ndarray, np.ndarray | None]]:
    """(batch, units, unit_bytes) for each global batch of `eval_set`'s windows.

    batch: this process's `rows` of the global batch, made by `examples(windows, lengths, keys)`.
    units: int32 [B, T] for the WHOLE global batch (every process can attribute every row's
      losses, which the eval step returns replicated): each target's document position in the
      eval set, −1 where nothing real is scored. T is the batch's target length.
    unit_bytes: int32 [B, T] the bytes each target stands for (LM only; None for span
      corruption, whose targets are not a text stream).
    The first `num_batches` batches when given (never more than the set has); always the same.
    """
    total = eval_set.num_batches(batch_size)
    if num_batches is not None:
        total = min(total, num_batches)
    n, width = eval_set.windows.shape
    for k in range(total):
        everyone = np.arange(k * batch_size, (k + 1) * batch_size)
        real = everyone < n
        indices = everyone[rows.start : rows.stop]
        mine = real[rows.start : rows.stop]
        windows = np.full([len(indices), width], eval_set.pad_id, dtype=eval_set.windows.dtype)
        lengths = np.zeros([len(indices)], np.int32)
        windows[mine] = eval_set.windows[indices[mine]]
        lengths[mine] = eval_set.lengths[indices[mine]]
        batch = examples(windows, lengths, [f"{key_prefix}/{i}" for i in indices])
        target_len = batch["weights"].shape[1]
        unit_bytes = None
        if eval_set.units.ndim == 2:
            units = np.full([batch_size, target_len], -1, np.int32)
            units[real] = eval_set.units[everyone[real]]
            if eval_set.target_bytes is not None:
                unit_bytes = np.zeros([batch_size, target_len], np.int32)
                unit_bytes[real] = eval_set.target_bytes[everyone[real]]
        else:
            per_row = np.full([batch_size], -1, np.int32)
            per_row[real] = eval_set.units[everyone[real]]
            units = np.repeat(per_row[:, None], target_len, axis=1)
        yield batch, units, unit_bytes
