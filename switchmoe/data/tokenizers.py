"""Tokenizers: a byte-level one (the default, no files needed) and a SentencePiece wrapper.

Both share one small interface, which is all the data pipeline and the models rely on:

  encode(text)   -> np.ndarray int32 [T]   no BOS/EOS added; the pipeline adds EOS per document
  decode(ids)    -> str                    special ids (pad, bos, eos, sentinels) are skipped
  vocab_size     -> int                    embedding rows the model needs (all ids are < this)
  pad_id, bos_id, eos_id -> int
  num_sentinels  -> int; sentinel_id(i)    T5 span-corruption sentinels, at the top of the vocab
  token_bytes()  -> np.ndarray int32 [V]   UTF-8 bytes each id stands for (bits/byte needs it)

Byte vocabulary (`ByteTokenizer(num_sentinels=S)`):
  0..255               the UTF-8 bytes themselves
  256, 257, 258        pad, bos, eos
  259 .. 259+S-1       sentinels, numbered downwards: sentinel_id(0) == vocab_size - 1
so `vocab_size == 259 + S`. Unlike ByT5, bytes keep their own values (id == byte) and pad is
not 0: code that masks padding must read the pipeline's `weights`, never compare ids with 0.
The vocabulary is not rounded up to a hardware-friendly multiple here; a model that wants that
pads its embedding table itself.

T5's layout (`data.tokenizer='t5'`: a SentencePiece model with pad 0, eos 1, unk 2 and no BOS,
as T5's and the released Switch checkpoints' spiece.model): no id is added for the missing BOS;
the decoder starts from pad (`bos_id == pad_id == 0`, HF's decoder_start_token_id) and sentinel i
is `num_pieces + S - 1 - i` (`<extra_id_i>` at 32099 - i for S = 100), so a released checkpoint
fine-tunes through switchmoe's span corruption with the ids it was trained with.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from switchmoe.data import spm_training

TOKENIZER_KINDS = ("byte", "sentencepiece", "t5")


@runtime_checkable
class Tokenizer(Protocol):
    """The interface the pipeline and models use (see the module docstring)."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    num_sentinels: int

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def sentinel_id(self, i: int) -> int: ...

    def token_bytes(self) -> np.ndarray: ...


def _as_id_array(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """`ids` as a 1-D int64 array, checked to lie in [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"decode expects integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}); got range [{arr.min()}, {arr.max()}]")
    return arr


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus pad/bos/eos and optional sentinels (layout: module docstring).

    Args:
      num_sentinels: how many T5-style sentinel ids to reserve at the top of the vocabulary.
    """

    NUM_BYTES = 256

    def __init__(self, num_sentinels: int = 0):
        if num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
        self.num_sentinels = int(num_sentinels)
        self.pad_id = self.NUM_BYTES
        self.bos_id = self.NUM_BYTES + 1
        self.eos_id = self.NUM_BYTES + 2
        self.vocab_size = self.NUM_BYTES + 3 + self.num_sentinels

    def encode(self, text: str | bytes) -> np.ndarray:
        """The UTF-8 bytes of `text` (a `str`, or `bytes` taken as already UTF-8) as int32 [T]."""
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text from ids [T]: special ids dropped, invalid UTF-8 replaced by U+FFFD."""
        arr = _as_id_array(ids, self.vocab_size)
        return (
            arr[arr < self.NUM_BYTES].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        )

    def sentinel_id(self, i: int) -> int:
        """The id of sentinel `i` (0-based); sentinel 0 is the last id of the vocabulary."""
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} out of range [0, {self.num_sentinels})")
        return self.vocab_size - 1 - i

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, int32 [vocab_size]: 1 per byte, 0 for special ids."""
        lengths = np.zeros([self.vocab_size], np.int32)
        lengths[: self.NUM_BYTES] = 1
        return lengths

    def __repr__(self) -> str:
        return f"ByteTokenizer(num_sentinels={self.num_sentinels})"


def _import_sentencepiece():
    try:
        import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(
            "tokenizer='sentencepiece' needs the `sentencepiece` package, which is not "
            "installed: run `pip install sentencepiece` (or use tokenizer='byte')."
        ) from e
    return sentencepiece


class SentencePieceTokenizer:
    """A SentencePiece model behind the same interface as `ByteTokenizer`.

    For public TFDS datasets (lm1b, c4) with a trained `.model` file, e.g. T5's. The model's
    pieces keep their ids. Special ids the model defines (`pad_id()`, `bos_id()`, `eos_id()`
    >= 0) are used as they are; those it lacks (-1; T5's model has no BOS) get new ids right after
    its pieces, and the sentinels follow at the very top, sentinel 0 last.

    Args:
      model_path: path of the `.model` file; anything `etils.epath` opens (local, `gs://`).
      num_sentinels: sentinel ids reserved at the top of the vocabulary.

    Raises:
      ImportError: when the `sentencepiece` package is not installed.
    """

    def __init__(self, model_path: str, num_sentinels: int = 0, t5_layout: bool = False):
        sentencepiece = _import_sentencepiece()
        from etils import epath  # pylint: disable=g-import-not-at-top  (a TFDS dependency)

        if num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
        # Reading the bytes ourselves lets the model live on any filesystem epath knows.
        self._sp = sentencepiece.SentencePieceProcessor(
            model_proto=epath.Path(model_path).read_bytes()
        )
        self.model_path = model_path
        self.num_pieces = self._sp.get_piece_size()
        next_id = self.num_pieces

        def special(model_id: int) -> int:
            nonlocal next_id
            if model_id >= 0:
                return model_id
            next_id += 1
            return next_id - 1

        self.t5_layout = t5_layout
        if t5_layout:
            ids = (self._sp.pad_id(), self._sp.eos_id())
            if min(ids) < 0 or self._sp.bos_id() >= 0:
                raise ValueError(
                    f"data.tokenizer='t5' needs a SentencePiece model in T5's layout (pad and eos "
                    f"defined, no bos); {model_path} has pad {ids[0]}, eos {ids[1]}, bos "
                    f"{self._sp.bos_id()}. Use data.tokenizer='sentencepiece' for it."
                )
        self.pad_id = special(self._sp.pad_id())
        # T5: the decoder starts from pad, and no id is added for the BOS the model lacks.
        self.bos_id = self.pad_id if t5_layout else special(self._sp.bos_id())
        self.eos_id = special(self._sp.eos_id())
        self.num_sentinels = int(num_sentinels)
        self.vocab_size = next_id + self.num_sentinels
        # Ids decode() drops: the model's control pieces (<pad>, <s>, </s>) and every id we added.
        self._skip = np.zeros(self.vocab_size, dtype=bool)
        self._skip[self.num_pieces :] = True
        for i in range(self.num_pieces):
            self._skip[i] = self._sp.is_control(i)
        self._skip[[self.pad_id, self.bos_id, self.eos_id]] = True

    def encode(self, text: str | bytes) -> np.ndarray:
        """Piece ids of `text` as int32 [T] (no BOS/EOS)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text from ids [T], special ids dropped."""
        arr = _as_id_array(ids, self.vocab_size)
        return self._sp.decode(arr[~self._skip[arr]].tolist())

    def sentinel_id(self, i: int) -> int:
        """The id of sentinel `i` (0-based); sentinel 0 is the last id of the vocabulary."""
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} out of range [0, {self.num_sentinels})")
        return self.vocab_size - 1 - i

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, int32 [vocab_size] (0 for control and added ids).

        A byte-fallback piece ('<0x0A>') is one byte; any other piece is its text with '▁' read
        as a space. Summed over a text's ids this is the text's byte length whenever decoding
        adds nothing (models without a dummy prefix, such as the ones spm_training builds).
        """
        lengths = np.zeros([self.vocab_size], np.int32)
        for i in range(self.num_pieces):
            if self._skip[i] or self._sp.is_unknown(i):
                continue
            piece = self._sp.id_to_piece(i)
            if self._sp.is_byte(i):
                lengths[i] = 1
            else:
                lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return lengths

    def __repr__(self) -> str:
        layout = ", t5_layout=True" if self.t5_layout else ""
        return (
            f"SentencePieceTokenizer({self.model_path!r}, num_sentinels={self.num_sentinels}"
            f"{layout})"
        )


def make_tokenizer(data_config) -> Tokenizer:
    """The tokenizer `data_config` names (`config.data`; see `pipeline.default_data_config`).

    Reads `tokenizer`, `spm_model_path` and `num_sentinels`.

    Raises:
      ValueError: unknown `data.tokenizer`, or `sentencepiece` without `data.spm_model_path`.
    """
    kind = data_config.tokenizer
    num_sentinels = data_config.get("num_sentinels", 0)
    if kind == "byte":
        return ByteTokenizer(num_sentinels=num_sentinels)
    if kind == "t5":
        path = data_config.get("spm_model_path")
        if not path:
            raise ValueError("data.tokenizer='t5' needs data.spm_model_path (T5's spiece.model).")
        return SentencePieceTokenizer(path, num_sentinels=num_sentinels, t5_layout=True)
    if kind == "sentencepiece":
        path = data_config.get("spm_model_path")
        if not path and data_config.get("spm_vocab_size"):
            _import_sentencepiece()
            path = spm_training.ensure_model(data_config)
        if not path:
            raise ValueError(
                "data.tokenizer='sentencepiece' needs data.spm_model_path (the .model file) or "
                "data.spm_vocab_size (train one on data.train_split)"
            )
        return SentencePieceTokenizer(path, num_sentinels=num_sentinels)
    raise ValueError(f"data.tokenizer={kind!r} is not one of {TOKENIZER_KINDS}")
