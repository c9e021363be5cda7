"""Data for switchmoe's language models: corpus, tokenizers and packed, step-indexed batches.

- `stdlib_corpus`: `StdlibSource`, a TFDS builder whose corpus is the running interpreter's
  standard-library source (the default data; no network), stored as ArrayRecord.
- `tokenizers`: `ByteTokenizer` (default), `SentencePieceTokenizer`, `make_tokenizer`.
- `pipeline`: `default_data_config` (`config.data`), `LMDataPipeline` (training batches as a
  pure function of (seed, step); fixed eval batches) and `corpus_statistics`.
"""

from switchmoe.data.pipeline import (
    CorpusStatistics,
    LMDataPipeline,
    PackedSplit,
    corpus_statistics,
    default_data_config,
    epoch_permutation,
    load_texts,
    pack_stream,
    resolve_data_dir,
    text_statistics,
    tokenize_stream,
    validate_data_config,
)
from switchmoe.data.stdlib_corpus import StdlibSource, StdlibSourceConfig
from switchmoe.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    make_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "CorpusStatistics",
    "LMDataPipeline",
    "PackedSplit",
    "SentencePieceTokenizer",
    "StdlibSource",
    "StdlibSourceConfig",
    "Tokenizer",
    "corpus_statistics",
    "default_data_config",
    "epoch_permutation",
    "load_texts",
    "make_tokenizer",
    "pack_stream",
    "resolve_data_dir",
    "text_statistics",
    "tokenize_stream",
    "validate_data_config",
]
