"""Language-model batches: documents -> token stream -> windows -> batches by (seed, step).

  1. Read a split's documents from TFDS with `as_data_source` (random access, no TensorFlow):
     the embedded `stdlib_source` corpus, or a public dataset such as lm1b or c4/en.
  2. Tokenize each document and append EOS; concatenate everything into one stream.
  3. Cut the stream into non-overlapping windows of `seq_len + 1` tokens: `inputs = w[:-1]`,
     `targets = w[1:]`. Windows cross document boundaries (EOS separates documents; there is no
     attention mask between them), which wastes no tokens on padding.
  4. Training batches are a pure function of (seed, step); evaluation batches are a fixed,
     ordered list. Nothing about the order lives in iterator state, so resuming from a
     checkpoint at step t needs only t.

Packing is done once per split and held in memory as a [N, seq_len + 1] array (uint16 when the
vocabulary fits, int32 otherwise): the whole stdlib corpus is ~12 MB of bytes, ~24 MB packed.
Public datasets are much larger (estimates, not measured here): lm1b's train split is ~0.8B
words, ~4 GB of text, so ~8 GB of uint16 byte tokens (~2 GB with a 32k SentencePiece vocabulary)
plus minutes of single-threaded tokenization at start-up; c4/en does not fit at all. Set
`max_files` to read a prefix of a split; a streaming packer is the fix if full passes are needed.

Training order. The global batch at step t holds examples p = t * B + i for i < B. Example p is
window `permutation(seed, epoch)[p % N]` with epoch = p // N, so every window is seen once per
epoch, each epoch in a new order, and step t's batch does not depend on what ran before it. The
permutation comes from a hash written here (splitmix64 over window indices, keyed by a BLAKE2
hash of (seed, epoch)), not from a NumPy Generator, whose streams NumPy does not promise to keep
across versions (NEP 19): a run resumed after an upgrade must still see the same batches.

Shapes: B global batch size, P process count, b = B / P rows per process, L = seq_len.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Iterator

import ml_collections
import numpy as np
from ml_collections import config_dict

from switchmoe.data import eval_set as eval_set_lib
from switchmoe.data.sources import (  # noqa: F401  (load_texts & co. are read from here too)
    DATA_DIR_ENV,
    STDLIB_DATASET,
    check_dataset,
    load_texts,
    prepared_builder,
    resolve_data_dir,
)
from switchmoe.data.spm_training import SPM_MODEL_TYPES
from switchmoe.data.tokenizers import TOKENIZER_KINDS, Tokenizer, make_tokenizer


Batch = dict[str, np.ndarray]
# The `data.pipeline` values: in-memory packing, or grain streaming (switchmoe.data.streaming).
PIPELINES = ("packed", "stream")
# Fewest pieces a trained SentencePiece model may have: 256 bytes + pad, EOS, unknown, newline.
MIN_SPM_VOCAB = 261


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` block with its defaults: the local stdlib corpus, byte tokens."""
    config = ml_collections.ConfigDict()
    # Corpus: 'stdlib_source' (built on first use from this interpreter's standard library; no
    # network) or a TFDS dataset name such as 'lm1b' or 'c4/en' (downloaded and prepared by TFDS
    # into data_dir, in the array_record format; needs network the first time).
    config.dataset = STDLIB_DATASET
    # Root directory of TFDS data. None: $SWITCHMOE_DATA_DIR, else ~/.cache/switchmoe/tfds. It is
    # resolved when data is read, not here, so a recorded config.json stays valid on another host.
    config.data_dir = config_dict.placeholder(str)
    # Feature holding each document's text ('text' for stdlib_source, lm1b and c4).
    config.text_key = "text"
    # Split for training batches; TFDS slices work ('train[:90%]').
    config.train_split = "train"
    # Split for evaluation batches ('validation' here and for c4; lm1b's is 'test').
    config.eval_split = "validation"
    # Periodic evaluations score whole documents of eval_split drawn at random until they hold
    # this share of its bytes (1.0: the whole split); the final evaluation always scores the whole
    # split (`final_eval`). The draw depends on eval_sample_seed only, not on the training seed,
    # so every run of a study is scored on the same documents (switchmoe/data/eval_set.py).
    config.eval_sample_fraction = 0.35
    config.eval_sample_seed = 0
    # Tokenizer: 'byte' (ids 0..255 are UTF-8 bytes, then pad/bos/eos, then sentinels),
    # 'sentencepiece' (a given spm_model_path, or one trained here with spm_vocab_size pieces) or
    # 't5' (spm_model_path in T5's id layout: no BOS, decoder start = pad 0, sentinels counted
    # down from the top as T5's <extra_id_i>; released Switch checkpoints).
    config.tokenizer = "byte"
    # SentencePiece .model file (local path or gs://), for tokenizer='sentencepiece' only.
    config.spm_model_path = config_dict.placeholder(str)
    # Without spm_model_path: train a SentencePiece model of this many pieces on train_split,
    # stored under data_dir/sentencepiece/ and rebuilt only when a setting changes
    # (switchmoe/data/spm_training.py). The papers use 32k; 4k-16k suit the embedded corpus.
    config.spm_vocab_size = config_dict.placeholder(int)
    # The trained model's algorithm: 'unigram' (T5's) or 'bpe'.
    config.spm_model_type = "unigram"
    # Sentinel ids reserved at the top of the vocabulary for T5 span corruption; 0 for plain LM.
    config.num_sentinels = 0
    # Span corruption (encoder–decoder models): fraction of raw tokens masked, and mean span
    # length (T5, Switch, ST-MoE: 0.15 and 3). Needs num_sentinels >= the spans per example.
    config.noise_density = 0.15
    config.mean_noise_span_length = 3.0
    # Tokens per training example (the model's context); packed windows hold seq_len + 1 tokens.
    config.seq_len = 128
    # Corpus limit, 0 = all. stdlib_source: number of files (>= 2; each setting is its own TFDS
    # config, built once). TFDS datasets: the first max_files documents of each split.
    config.max_files = 0
    # Seed of the training-example order; independent of model initialisation seeds.
    config.seed = 0
    # How batches are made. 'packed': the split is tokenized and packed in memory once, and
    # training batch t is a pure function of (seed, t) with a window-level shuffle per epoch
    # (the embedded corpus, the studies; lm1b at ~8 GB is about the limit). 'stream': grain
    # reads, tokenizes and packs documents while training, holding nothing proportional to
    # the split; the iterator's position is saved with each checkpoint (c4; see
    # switchmoe/data/streaming.py).
    config.pipeline = "packed"
    # 'stream' only: worker processes that tokenize and pack (0: in the training process), and
    # batches each worker prepares ahead.
    config.num_workers = 0
    config.prefetch = 2
    return config


def validate_data_config(data_config: ml_collections.ConfigDict) -> None:
    """Checks every `config.data` field this package reads.

    Raises:
      ValueError: naming the offending setting (`data.<field>`) and its allowed values.
    """
    c = data_config
    if c.tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"data.tokenizer={c.tokenizer!r}; allowed: {TOKENIZER_KINDS}")
    if c.tokenizer == "t5" and not c.spm_model_path:
        raise ValueError("data.tokenizer='t5' needs data.spm_model_path (T5's spiece.model).")
    if c.tokenizer == "sentencepiece" and not (c.spm_model_path or c.get("spm_vocab_size")):
        raise ValueError(
            "data.tokenizer='sentencepiece' needs data.spm_model_path (a .model file) or "
            "data.spm_vocab_size (train one on data.train_split, e.g. 8192)"
        )
    if c.get("spm_vocab_size") is not None and not (
        isinstance(c.spm_vocab_size, int) and c.spm_vocab_size >= MIN_SPM_VOCAB
    ):
        raise ValueError(
            f"data.spm_vocab_size={c.spm_vocab_size!r}; allowed: an integer >= {MIN_SPM_VOCAB} "
            "(the 256 byte-fallback pieces, pad, EOS, unknown and newline, plus at least one more)"
        )
    if c.get("spm_model_type", "unigram") not in SPM_MODEL_TYPES:
        raise ValueError(f"data.spm_model_type={c.spm_model_type!r}; allowed: {SPM_MODEL_TYPES}")
    if not isinstance(c.seq_len, int) or c.seq_len <= 0:
        raise ValueError(f"data.seq_len={c.seq_len!r}; allowed: a positive integer")
    if not isinstance(c.max_files, int) or c.max_files < 0:
        raise ValueError(f"data.max_files={c.max_files!r}; allowed: 0 (all) or a positive int")
    if c.dataset == STDLIB_DATASET and c.max_files == 1:
        raise ValueError(
            "data.max_files=1; allowed for stdlib_source: 0 (all) or >= 2 "
            "(one file for each split at least)"
        )
    if not isinstance(c.get("num_sentinels", 0), int) or c.get("num_sentinels", 0) < 0:
        raise ValueError(f"data.num_sentinels={c.num_sentinels!r}; allowed: an integer >= 0")
    if not 0 < c.get("noise_density", 0.15) < 1:
        raise ValueError(f"data.noise_density={c.noise_density!r}; allowed: in (0, 1)")
    if not c.get("mean_noise_span_length", 3.0) >= 1:
        raise ValueError(f"data.mean_noise_span_length={c.mean_noise_span_length!r}; allowed: >= 1")
    fraction = c.get("eval_sample_fraction", 0.35)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ValueError(
            f"data.eval_sample_fraction={fraction!r}; allowed: a share of the eval split's bytes "
            "in (0, 1] (1.0 = every document)"
        )
    if not isinstance(c.get("eval_sample_seed", 0), int):
        raise ValueError(f"data.eval_sample_seed={c.eval_sample_seed!r}; allowed: an integer")
    if not c.text_key:
        raise ValueError(f"data.text_key={c.text_key!r}; allowed: a feature name such as 'text'")
    if c.get("pipeline", "packed") not in PIPELINES:
        raise ValueError(f"data.pipeline={c.pipeline!r}; allowed: {PIPELINES}")
    if not isinstance(c.get("num_workers", 0), int) or c.get("num_workers", 0) < 0:
        raise ValueError(f"data.num_workers={c.num_workers!r}; allowed: an integer >= 0")
    if not isinstance(c.get("prefetch", 2), int) or c.get("prefetch", 2) < 1:
        raise ValueError(f"data.prefetch={c.prefetch!r}; allowed: an integer >= 1")
    check_dataset(c.dataset)


@dataclasses.dataclass(frozen=True)
class CorpusStatistics:
    """Size and unigram byte entropy of a split.

    `unigram_entropy_bits_per_byte` is the entropy of the split's byte histogram: the loss, in
    bits per byte, of the best model that ignores context. Any LM must beat it.
    """

    num_documents: int
    num_bytes: int
    unigram_entropy_bits_per_byte: float


def text_statistics(texts: Iterable[str | bytes]) -> CorpusStatistics:
    """`CorpusStatistics` of documents given as `str` (UTF-8 encoded here) or `bytes`."""
    counts = np.zeros(256, dtype=np.int64)
    num_documents = 0
    for text in texts:
        raw = text.encode("utf-8") if isinstance(text, str) else text
        counts += np.bincount(np.frombuffer(raw, dtype=np.uint8), minlength=256)
        num_documents += 1
    total = int(counts.sum())
    probs = counts[counts > 0] / max(total, 1)
    entropy = float(-(probs * np.log2(probs)).sum()) if total else 0.0
    return CorpusStatistics(num_documents, total, entropy)


def corpus_statistics(
    data_config: ml_collections.ConfigDict, split: str | None = None
) -> CorpusStatistics:
    """`CorpusStatistics` of `split` (default `data.train_split`) of `data.dataset`."""
    validate_data_config(data_config)
    return text_statistics(load_texts(data_config, split or data_config.train_split))


def tokenize_stream(texts: Iterable[str | bytes], tokenizer: Tokenizer) -> np.ndarray:
    """All documents' tokens, each document followed by EOS, as one int32 stream [T]."""
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces = []
    for text in texts:
        pieces.append(tokenizer.encode(text))
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


@dataclasses.dataclass(frozen=True)
class PackedSplit:
    """A split packed into windows.

    windows: [N, L + 1] uint16 or int32 token ids; rows of a padded tail are `pad_id` after the
      real tokens.
    lengths: [N] int32, real tokens in each window (L + 1 except, for eval, a padded last one).
    """

    windows: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.windows)


def pack_stream(
    stream: np.ndarray, seq_len: int, *, pad_id: int, keep_tail: bool = False
) -> PackedSplit:
    """Cuts a token stream [T] into non-overlapping windows of `seq_len + 1` tokens.

    Args:
      stream: int [T] token ids.
      seq_len: L; each window holds L + 1 tokens (L inputs and L targets, shifted by one).
      pad_id: fills the end of a kept tail window.
      keep_tail: keep the last T mod (L + 1) tokens as a padded window (when there are at least
        two, i.e. one prediction). Eval keeps it so that every token is scored; training drops
        it so that every training example is full (it is less than one window of data).

    Returns:
      `PackedSplit`; windows are uint16 when every id (including pad) is < 2**16, else int32.
      Non-overlapping windows leave each window's first token unpredicted: 1/(L+1) of the
      targets, the price of examples that are independent rows of one array.
    """
    width = seq_len + 1
    num_full = len(stream) // width
    tail = len(stream) - num_full * width
    keep = keep_tail and tail >= 2
    max_id = max(int(stream.max()) if len(stream) else 0, pad_id)
    dtype = np.uint16 if max_id < 2**16 else np.int32
    windows = np.full([num_full + keep, width], pad_id, dtype=dtype)
    windows[:num_full] = stream[: num_full * width].reshape(num_full, width)
    lengths = np.full([num_full + keep], width, dtype=np.int32)
    if keep:
        windows[num_full, :tail] = stream[num_full * width :]
        lengths[num_full] = tail
    return PackedSplit(windows, lengths)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 [n]: a bijection that scrambles every bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation of range(n) [n] int64, a pure function of (seed, epoch, n).

    Sorts indices by `splitmix64(index + key(seed, epoch))`. Both steps are bijections of
    uint64, so sort keys never tie and the result does not depend on the sort algorithm or on
    NumPy's random streams.
    """
    key = int.from_bytes(
        hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest(), "little"
    )
    x = np.arange(n, dtype=np.uint64) + np.uint64(key & _MASK64)  # Wraps mod 2**64.
    return np.argsort(_splitmix64(x)).astype(np.int64)


def _process_rows(batch_size: int, process_index: int, process_count: int) -> range:
    """Rows [process_index * B/P, (process_index + 1) * B/P) of a global batch of B."""
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})"
        )
    if batch_size % process_count:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by process_count={process_count}"
        )
    rows = batch_size // process_count
    return range(process_index * rows, (process_index + 1) * rows)


class LMDataPipeline:
    """Packed LM batches of one dataset: `batch(step)` for training, `eval_batches()` for eval.

    Every batch is a dict of NumPy arrays, rows of this process only ([b, L], b = B / P):
      inputs  int32    window[:-1]
      targets int32    window[1:]
      weights float32  1.0 where the target is a real token, 0.0 on padding (eval tail only)

    Args:
      data_config: `config.data` (see `default_data_config`); validated here.
      batch_size: global batch size B (all processes together), from the training config.
      tokenizer: overrides `make_tokenizer(data_config)`.

    Packed splits are built on first use and cached on this object; the object holds no
    iteration state, so any number of them give identical batches.
    """

    def __init__(
        self,
        data_config: ml_collections.ConfigDict,
        batch_size: int,
        *,
        tokenizer: Tokenizer | None = None,
    ):
        validate_data_config(data_config)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        self.config = ml_collections.ConfigDict(data_config.to_dict())  # Frozen copy of values.
        self.batch_size = batch_size
        self.seq_len = data_config.seq_len
        self.window = self.seq_len + 1  # raw tokens per packed window
        self.seed = data_config.seed
        self.tokenizer = tokenizer if tokenizer is not None else make_tokenizer(data_config)
        self._packed: dict[str, PackedSplit] = {}
        self._eval_sets: dict[str, eval_set_lib.EvalSet] = {}
        self._permutations: dict[int, np.ndarray] = {}

    # -- Packing -------------------------------------------------------------------------

    def packed(self, split: str) -> PackedSplit:
        """`split` packed into windows [N, L + 1], built once and cached.

        The eval split keeps its padded tail window; every other split drops it.
        """
        if split not in self._packed:
            stream = tokenize_stream(load_texts(self.config, split), self.tokenizer)
            packed = pack_stream(
                stream,
                self.window - 1,
                pad_id=self.tokenizer.pad_id,
                keep_tail=self.keeps_tail and split == self.config.eval_split,
            )
            if not len(packed):
                raise ValueError(
                    f"split {split!r} of {self.config.dataset!r} has {len(stream)} tokens, fewer "
                    f"than one window of {self.window}"
                )
            self._packed[split] = packed
        return self._packed[split]

    # Whether the eval split keeps its partial last window (padded, weight 0 after its end).
    keeps_tail = True

    @property
    def num_train_examples(self) -> int:
        """N, the number of training windows (one epoch is N examples)."""
        return len(self.packed(self.config.train_split))

    def prepare(self) -> None:
        """Builds or downloads the data and packs the training split (once per object)."""
        self.packed(self.config.train_split)

    # -- Training ------------------------------------------------------------------------

    def train_batches(
        self,
        start_step: int = 0,
        state: dict | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ) -> "StepStream":
        """This process's batches from `start_step` on, with the iterator interface of
        `streaming.StreamingPipeline` (a state {'step': t} that checkpoints keep)."""
        if state is not None and state.get("step", start_step) != start_step:
            raise ValueError(
                f"the data iterator state is at step {state['step']}, the checkpoint at step "
                f"{start_step}"
            )
        return StepStream(self, start_step, process_index, process_count)

    def _permutation(self, epoch: int, n: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 4:  # A batch touches one or two epochs at a time.
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = epoch_permutation(self.seed, epoch, n)
        return self._permutations[epoch]

    def train_positions(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> np.ndarray:
        """Global example positions p = step · B + i [b] int64 of this process's rows."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        rows = _process_rows(self.batch_size, process_index, process_count)
        return int(step) * self.batch_size + np.arange(rows.start, rows.stop, dtype=np.int64)

    def train_indices(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> np.ndarray:
        """Window indices [b] int64 of this process's rows of training batch `step`."""
        n = self.num_train_examples
        positions = self.train_positions(step, process_index, process_count)
        epochs, offsets = np.divmod(positions, n)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            indices[mask] = self._permutation(int(epoch), n)[offsets[mask]]
        return indices

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        """This process's rows of global training batch `step` (a pure function of seed, step).

        Returns:
          {'inputs': int32 [b, L], 'targets': int32 [b, L], 'weights': float32 [b, L]},
          b = batch_size // process_count.

        Raises:
          ValueError: batch_size not divisible by process_count, or a bad index or step.
        """
        packed = self.packed(self.config.train_split)
        indices = self.train_indices(step, process_index, process_count)
        keys = [
            f"{self.seed}/train/{p}"
            for p in self.train_positions(step, process_index, process_count)
        ]
        return self.examples(packed.windows[indices], packed.lengths[indices], keys)

    # -- Evaluation ----------------------------------------------------------------------

    # Next-token prediction scores overlapping windows (every token of an eval set a target
    # once); span corruption needs whole, disjoint windows (switchmoe/data/eval_set.py).
    eval_overlap = True

    def eval_set(self, which: str) -> eval_set_lib.EvalSet:
        """The eval set `which` ('split' or 'sample') of this config, built once and cached."""
        if which not in self._eval_sets:
            texts = load_texts(self.config, self.config.eval_split)
            self._eval_sets[which] = eval_set_lib.build_eval_set(
                which,
                texts,
                self.tokenizer.encode,
                eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id,
                window=self.window,
                overlap=self.eval_overlap,
                fraction=float(self.config.get("eval_sample_fraction", 0.35)),
                seed=int(self.config.get("eval_sample_seed", 0)),
                token_bytes=self.tokenizer.token_bytes() if self.eval_overlap else None,
            )
        return self._eval_sets[which]

    def eval_set_batches(
        self,
        which: str,
        num_batches: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        """(batch, units, unit_bytes) of eval set `which` (see `eval_set.eval_set_batches`)."""
        rows = _process_rows(self.batch_size, process_index, process_count)
        yield from eval_set_lib.eval_set_batches(
            self.eval_set(which), self.batch_size, rows, self.examples,
            f"{self.seed}/eval-{which}", num_batches,
        )  # fmt: skip

    @property
    def num_eval_batches(self) -> int:
        """Batches needed to cover the eval split once (the last one padded)."""
        return -(-len(self.packed(self.config.eval_split)) // self.batch_size)

    def eval_batches(
        self, num_batches: int | None = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """The eval split's windows in stored order, no shuffling, as fixed batches.

        The last batch is padded with all-pad rows of weight 0 (not dropped), and the split's
        last, partial window is kept with weight 0 after its real tokens, so a full pass scores
        every eval token exactly once: sum(loss * weights) / sum(weights) is the split's loss.

        Args:
          num_batches: the first `num_batches` batches (all when None, or when larger than
            `num_eval_batches`); always the same ones, so eval numbers compare across steps.
          process_index, process_count: which rows of each global batch to return.

        Yields:
          Batches as in `batch`, [b, L] each.
        """
        rows = _process_rows(self.batch_size, process_index, process_count)
        packed = self.packed(self.config.eval_split)
        total = (
            self.num_eval_batches
            if num_batches is None
            else min(num_batches, self.num_eval_batches)
        )
        width = self.window
        for k in range(total):
            start = k * self.batch_size
            indices = np.arange(start + rows.start, start + rows.stop)
            real = indices < len(packed)
            windows = np.full(
                [len(indices), width], self.tokenizer.pad_id, dtype=packed.windows.dtype
            )
            lengths = np.zeros([len(indices)], dtype=np.int32)
            windows[real] = packed.windows[indices[real]]
            lengths[real] = packed.lengths[indices[real]]
            yield self.examples(windows, lengths, [f"{self.seed}/eval/{i}" for i in indices])

    def examples(self, windows: np.ndarray, lengths: np.ndarray, keys: list[str]) -> Batch:
        """Model examples from packed windows [b, window] with `lengths` real tokens each.

        `keys` name each row (data seed, split, position) for objectives that draw per example;
        next-token prediction does not.
        """
        del keys
        return _make_batch(windows, lengths)


class StepStream:
    """`LMDataPipeline.batch(t)` for t = start, start + 1, ... as an iterator with a state."""

    def __init__(self, pipeline: LMDataPipeline, start: int, process_index: int, count: int):
        self._pipeline, self._step = pipeline, int(start)
        self._process = (process_index, count)

    def __iter__(self) -> "StepStream":
        return self

    def __next__(self) -> Batch:
        batch = self._pipeline.batch(self._step, *self._process)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step}

    def close(self) -> None:
        pass


def _make_batch(windows: np.ndarray, lengths: np.ndarray) -> Batch:
    """inputs/targets/weights [b, L] from windows [b, L + 1] with `lengths` real tokens each."""
    seq_len = windows.shape[1] - 1
    # Target position j holds token j + 1 of the window: real iff j + 1 < length.
    weights = (np.arange(1, seq_len + 1)[None, :] < lengths[:, None]).astype(np.float32)
    return {
        "inputs": windows[:, :-1].astype(np.int32),
        "targets": windows[:, 1:].astype(np.int32),
        "weights": weights,
    }
