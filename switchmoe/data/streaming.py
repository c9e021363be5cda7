"""Streaming LM batches on grain: documents are tokenized and packed while they are read.

`data.pipeline='stream'` (see `pipeline.default_data_config`). Nothing proportional to a split
is held in memory, so lm1b and c4 train from their first batch; the embedded corpus runs the
same way with the same setting.

Rows and slots. The global batch has B rows; row i of every batch comes from *slot* i, its own
packer. Slot i reads documents q = i, i + B, i + 2B, ... of the split's order (for training:
grain's per-epoch index shuffle of the split, repeated, seeded by data.seed; for evaluation:
the stored order, once), tokenizes each, appends EOS and cuts the concatenation into windows
of W tokens (W = seq_len + 1 for next-token prediction, the raw span-corruption length for T5).
Why per-row packers rather than one stream dealt out in turn:
  - process p of P owns slots [p·b, (p+1)·b) (b = B / P) and reads only their documents, so
    the union of the processes' rows is exactly the one-process batch, whatever P is;
  - worker w of n holds slots w, w + n, ... of its process, so the batch does not depend on
    the number of worker processes either;
  - a slot's position is three integers (document j, token offset, windows emitted k), so the
    iterator's state is B cursors, saved with each checkpoint, and a resumed run reads exactly
    the batches an uninterrupted one would (restoring re-tokenizes one document per slot).
The price: documents are shuffled, windows are not (each window is a run of consecutive
documents of one slot), and the cut of a document depends on its slot's neighbours rather than
on a global stream. `data.pipeline='packed'` keeps the in-memory, window-level exact shuffle.

Workers. With data.num_workers = n > 0, grain's `mp_prefetch` runs the slot packers in n
processes; each element is one worker's rows of one batch, tagged with their slots and
cursors, and the main process assembles batches and tracks the cursors of what it handed out
(so prefetched, unconsumed rows never enter a checkpoint).

Shapes: B global batch, P processes, b = B / P rows of this process, W window tokens,
L = data.seq_len, n workers.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags

from switchmoe.data import pipeline as _pipeline

STATE_VERSION = 1
Cursor = tuple[int, int, int]  # (document j of the slot, token offset in it, windows emitted k)


def grain_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed (what grain's shuffle takes) from data.seed, hashed with its purpose."""
    digest = hashlib.blake2b(f"{seed}/{purpose}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class EncodeDocument:
    """A document's text -> int32 token ids [T + 1], EOS appended (picklable for workers)."""

    def __init__(self, tokenizer, text_key: str):
        self.tokenizer = tokenizer
        self.text_key = text_key

    def __call__(self, example) -> np.ndarray:
        text = example[self.text_key]
        ids = self.tokenizer.encode(text if isinstance(text, (str, bytes)) else bytes(text))
        return np.append(ids.astype(np.int32), np.int32(self.tokenizer.eos_id))


def documents(data_config, split: str, tokenizer, *, shuffle: bool) -> grain.MapDataset:
    """Token ids of `split`'s documents as a random-access grain dataset.

    shuffle: the training order, an index shuffle per epoch (O(1) memory, grain's) repeated
      forever; otherwise the stored order, finite.
    """
    builder = _pipeline.prepared_builder(data_config)
    if data_config.text_key not in builder.info.features:
        raise ValueError(
            f"data.text_key={data_config.text_key!r} is not a feature of {builder.info.name}; "
            f"allowed: {sorted(builder.info.features.keys())}"
        )
    docs = grain.MapDataset.source(builder.as_data_source(split))
    if data_config.dataset != _pipeline.STDLIB_DATASET and data_config.max_files:
        docs = docs[: data_config.max_files]
    if not len(docs):
        raise ValueError(f"split {split!r} of {data_config.dataset!r} has no documents")
    if shuffle:
        docs = docs.shuffle(seed=grain_seed(data_config.seed, "documents")).repeat()
    return docs.map(EncodeDocument(tokenizer, data_config.text_key))


class SlotRows(grain.IterDataset):
    """Windows of a set of slots, one element per batch (see the module docstring).

    Element: {'slots': int64 [m], 'windows': [m, W] uint16|int32, 'lengths': int32 [m],
    'cursors': int64 [m, 3] (each slot's cursor after this window), 'batch': int64 []} for this
    dataset's m slots (after `set_slice`, a worker's share).

    Args:
      docs: `documents(...)`, token ids per document position.
      slots: the slot ids to pack (this process's rows of the global batch).
      stride: B, the number of slots of the global batch (slot i reads documents i + j·B).
      width: W tokens per window.
      pad_id: fills a window after its real tokens.
      cursors: {slot: (j, offset, k)} to start from; slots not named start at (0, 0, 0).
      batch: the number of batches already emitted (what element 'batch' counts from).
      keep_tail: finite splits only: keep a slot's last, partial window (padded) when it holds
        at least two tokens; otherwise a partial window ends the slot. A finished slot emits
        all-pad rows of length 0.
    """

    def __init__(
        self,
        docs: grain.MapDataset,
        slots: Sequence[int],
        *,
        stride: int,
        width: int,
        pad_id: int,
        cursors: dict[int, Cursor] | None = None,
        batch: int = 0,
        keep_tail: bool = False,
    ):
        super().__init__()
        self.docs = docs
        self.slots = [int(s) for s in slots]
        self.stride = int(stride)
        self.width = int(width)
        self.pad_id = int(pad_id)
        self.cursors = {int(s): tuple(int(v) for v in c) for s, c in (cursors or {}).items()}
        self.batch = int(batch)
        self.keep_tail = keep_tail

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's hook for `mp_prefetch`: worker w of n keeps slots[w::n]."""
        del sequential_slice  # a strided share keeps rows interleaved; either way is exact
        self.slots = self.slots[sl]

    def __iter__(self) -> "_SlotRowsIterator":
        return _SlotRowsIterator(self)

    def __str__(self) -> str:
        return f"SlotRows(slots={len(self.slots)}, stride={self.stride}, width={self.width})"


class _SlotRowsIterator(grain.DatasetIterator):
    def __init__(self, ds: SlotRows):
        super().__init__()
        self._ds = ds
        self._finite = len(ds.docs) < 2**62
        self._set(ds.cursors, ds.batch)

    def _set(self, cursors: dict[int, Cursor], batch: int) -> None:
        self._cursor = {s: list(cursors.get(s, (0, 0, 0))) for s in self._ds.slots}
        self._batch = batch
        self._current: dict[int, tuple[int, np.ndarray]] = {}  # slot -> (j, tokens of doc j)

    def _document(self, slot: int, j: int) -> np.ndarray | None:
        cached = self._current.get(slot)
        if cached is not None and cached[0] == j:
            return cached[1]
        q = slot + j * self._ds.stride
        if self._finite and q >= len(self._ds.docs):
            return None
        tokens = self._ds.docs[q]
        self._current[slot] = (j, tokens)
        return tokens

    def _window(self, slot: int, out: np.ndarray) -> int:
        """Fills out [W] with the slot's next window; returns its real length (0: finished)."""
        j, offset, k = self._cursor[slot]
        filled = 0
        while filled < len(out):
            tokens = self._document(slot, j)
            if tokens is None:
                break
            take = tokens[offset : offset + len(out) - filled]
            out[filled : filled + len(take)] = take
            filled += len(take)
            offset += len(take)
            if offset >= len(tokens):
                j, offset = j + 1, 0
        if filled < len(out):  # the split ran out: a tail, kept or not
            if not (self._ds.keep_tail and filled >= 2):
                filled = 0
            out[filled:] = self._ds.pad_id
            self._cursor[slot] = [j, offset, k + (filled > 0)]
            return filled
        self._cursor[slot] = [j, offset, k + 1]
        return filled

    def __next__(self) -> dict[str, np.ndarray]:
        slots = self._ds.slots
        windows = np.full([len(slots), self._ds.width], self._ds.pad_id, dtype=np.int32)
        lengths = np.zeros([len(slots)], np.int32)
        for row, slot in enumerate(slots):
            lengths[row] = self._window(slot, windows[row])
        element = {
            "slots": np.asarray(slots, np.int64),
            "windows": windows.astype(np.uint16) if windows.max(initial=0) < 2**16 else windows,
            "lengths": lengths,
            "cursors": np.asarray([self._cursor[s] for s in slots], np.int64).reshape(-1, 3),
            "batch": np.int64(self._batch),
        }
        self._batch += 1
        return element

    def get_state(self) -> dict[str, Any]:
        return {"cursors": {str(s): list(c) for s, c in self._cursor.items()}, "batch": self._batch}

    def set_state(self, state: dict[str, Any]) -> None:
        self._set({int(s): tuple(c) for s, c in state["cursors"].items()}, int(state["batch"]))


class TrainStream(grain.DatasetIterator):
    """This process's training batches, in order; `get_state()` is what a checkpoint keeps.

    Batches are `objective.examples(...)` of the windows: next-token rows, or span-corrupted
    ones keyed by (data seed, slot, window k). The state names the stream it belongs to, and
    `set_state` refuses a state of another (different seed, batch size, window or dataset).
    """

    def __init__(self, stream: "StreamingPipeline", process_index: int, process_count: int):
        super().__init__()
        self._stream = stream
        rows = _pipeline._process_rows(stream.batch_size, process_index, process_count)
        self._slots = list(rows)
        self._first = rows.start
        self._cursors: dict[int, Cursor] = {}
        self._batches = 0
        self._iterator = None

    def _fingerprint(self) -> dict[str, Any]:
        c = self._stream.config
        return {
            "dataset": c.dataset,
            "split": c.train_split,
            "seed": c.seed,
            "batch_size": self._stream.batch_size,
            "window": self._stream.window,
            "tokenizer": repr(self._stream.tokenizer),
            "max_files": c.max_files,
        }

    def _start(self):
        s = self._stream
        rows = SlotRows(
            s.train_documents(),
            self._slots,
            stride=s.batch_size,
            width=s.window,
            pad_id=s.tokenizer.pad_id,
            cursors=self._cursors,
            batch=self._batches,
        )
        workers = min(s.num_workers, len(self._slots))
        self._workers = max(workers, 1)
        if workers:
            # grain reads its settings from absl flags, which a library user (a notebook, a
            # test) never parsed: their defaults are what it would get anyway.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = rows.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=s.prefetch)
            )
        else:
            ds = rows
        return iter(ds)

    def __next__(self) -> _pipeline.Batch:
        if self._iterator is None:
            self._iterator = self._start()
        b, width = len(self._slots), self._stream.window
        windows = np.empty([b, width], np.int32)
        lengths = np.empty([b], np.int32)
        for _ in range(self._workers):  # one element from each worker, in turn
            element = next(self._iterator)
            if int(element["batch"]) != self._batches:
                raise RuntimeError(
                    f"worker rows of batch {int(element['batch'])} arrived for batch "
                    f"{self._batches}: grain interleaved its workers out of turn"
                )
            rows = element["slots"] - self._first
            windows[rows] = element["windows"]
            lengths[rows] = element["lengths"]
            for slot, cursor in zip(element["slots"], element["cursors"]):
                self._cursors[int(slot)] = tuple(int(v) for v in cursor)
        keys = [f"{self._stream.seed}/train/{s}/{self._cursors[s][2] - 1}" for s in self._slots]
        self._batches += 1
        return self._stream.objective.examples(windows, lengths, keys)

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "stream": self._fingerprint(),
            "batches": self._batches,
            "cursors": {str(s): list(self._cursors.get(s, (0, 0, 0))) for s in self._slots},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; "
                             f"allowed: {STATE_VERSION}")  # fmt: skip
        mine = self._fingerprint()
        theirs = state.get("stream", {})
        differ = sorted(k for k in mine if theirs.get(k) != mine[k])
        if differ:
            raise ValueError(
                "the checkpoint's data iterator belongs to another stream: "
                + ", ".join(f"{k} {theirs.get(k)!r} (now {mine[k]!r})" for k in differ)
            )
        missing = [s for s in self._slots if str(s) not in state["cursors"]]
        if missing:
            raise ValueError(
                f"the checkpoint's data iterator has no cursor for rows {missing[:4]}...; it was "
                "saved with another process count"
            )
        self.close()
        self._cursors = {s: tuple(state["cursors"][str(s)]) for s in self._slots}
        self._batches = int(state["batches"])

    def close(self) -> None:
        """Stops the worker processes (a new `next` starts them again from the cursors)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


class StreamingPipeline:
    """`data.pipeline='stream'`: the objective's batches from streamed, packed documents.

    The interface the trainer uses, shared with `pipeline.LMDataPipeline`: `tokenizer`,
    `batch_size`, `prepare()`, `train_batches(start_step, state, process_index, process_count)`,
    `eval_batches(num_batches, process_index, process_count)`.

    Args:
      objective: the packed pipeline of the same config (`LMDataPipeline` or span
        corruption); its window, tokenizer and `examples()` are used, never its in-memory
        packing.
    """

    def __init__(self, objective: _pipeline.LMDataPipeline):
        self.objective = objective
        self.config = objective.config
        self.batch_size = objective.batch_size
        self.seq_len = objective.seq_len
        self.window = objective.window
        self.seed = objective.seed
        self.tokenizer = objective.tokenizer
        self.num_workers = int(self.config.get("num_workers", 0))
        self.prefetch = int(self.config.get("prefetch", 2))
        self._eval_cache: dict[tuple, list[_pipeline.Batch]] = {}
        self._num_eval_batches: int | None = None

    def prepare(self) -> None:
        """Builds (embedded corpus) or downloads and prepares (TFDS) the data, once."""
        _pipeline.prepared_builder(self.config)

    def train_documents(self) -> grain.MapDataset:
        return documents(self.config, self.config.train_split, self.tokenizer, shuffle=True)

    def train_batches(
        self,
        start_step: int = 0,
        state: dict | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ) -> TrainStream:
        """This process's training batches from `state` (a checkpoint's), or from the start.

        Raises ValueError for a resumed run (start_step > 0) without a saved state: the stream
        cannot be positioned by a step number alone.
        """
        stream = TrainStream(self, process_index, process_count)
        if state is not None:
            stream.set_state(state)
            if state["batches"] != start_step:
                raise ValueError(
                    f"the data iterator state is at batch {state['batches']}, the checkpoint "
                    f"at step {start_step}"
                )
        elif start_step:
            raise ValueError(
                f"data.pipeline='stream' resumes from a checkpoint's data iterator state, and "
                f"the checkpoint of step {start_step} has none (it was written with "
                "data.pipeline='packed'); resume with data.pipeline='packed'"
            )
        return stream

    # -- Evaluation ----------------------------------------------------------------------

    def eval_set(self, which: str):
        """The objective's eval set: whole documents, the same as with data.pipeline='packed'
        (an eval set is built from the split's documents, not from the training stream)."""
        return self.objective.eval_set(which)

    def eval_set_batches(self, which, num_batches=None, process_index=0, process_count=1):
        return self.objective.eval_set_batches(which, num_batches, process_index, process_count)

    def _eval_rows(self, process_index: int, process_count: int) -> Iterator[_pipeline.Batch]:
        rows = _pipeline._process_rows(self.batch_size, process_index, process_count)
        slot_rows = SlotRows(
            documents(self.config, self.config.eval_split, self.tokenizer, shuffle=False),
            list(rows),
            stride=self.batch_size,
            width=self.window,
            pad_id=self.tokenizer.pad_id,
            keep_tail=self.objective.keeps_tail,
        )
        for element in slot_rows:
            keys = [
                f"{self.seed}/eval/{s}/{c[2] - 1}"
                for s, c in zip(element["slots"], element["cursors"])
            ]
            yield element, self.objective.examples(element["windows"], element["lengths"], keys)

    @property
    def num_eval_batches(self) -> int:
        """Batches until every slot of the eval split is finished (one length-only pass over
        the split, in every process alike, so all processes agree)."""
        if self._num_eval_batches is None:
            count = 0
            for element, _ in self._eval_rows(0, 1):
                if not element["lengths"].any():
                    break
                count += 1
            if not count:
                raise ValueError(
                    f"split {self.config.eval_split!r} of {self.config.dataset!r} has fewer "
                    f"tokens than one window of {self.window} per batch row"
                )
            self._num_eval_batches = count
        return self._num_eval_batches

    def eval_batches(
        self, num_batches: int | None = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[_pipeline.Batch]:
        """The eval split's first `num_batches` batches (all when None), always the same ones.

        Streamed in stored order through the same slots as training, without shuffling: a full
        pass scores every eval token once, except the first token of each window and, for
        span corruption, a slot's partial last window. With `num_batches` given the batches
        are kept after the first pass (b · L tokens each).
        """
        total = self.num_eval_batches if num_batches is None else num_batches
        key = (total, process_index, process_count)
        if key in self._eval_cache:
            yield from self._eval_cache[key]
            return
        kept = []
        rows = self._eval_rows(process_index, process_count)
        for _ in range(total):
            _, batch = next(rows)
            if num_batches is not None:
                kept.append(batch)
            yield batch
        if num_batches is not None:
            self._eval_cache[key] = kept
