"""A SentencePiece vocabulary trained on a dataset's training split, built once per setting.

`data.tokenizer='sentencepiece'` with `data.spm_vocab_size=N` and no `data.spm_model_path`
trains a unigram (or BPE) model of N pieces on `data.train_split` of `data.dataset` and stores it
beside the TFDS data:

  <data_dir>/sentencepiece/<dataset>-<split>-<model_type><N>-<hash>.model

The hash covers everything that decides the model's bytes (dataset, split, file limit, vocabulary
size, model type and every trainer option below), so a change of any of them builds a new file and
an unchanged setting reuses the old one. Two builds of one setting give the same bytes (a test
compares them): the input is the split's lines in stored order, never shuffled or sampled.

Why these trainer options: the embedded corpus is Python source, where whitespace is syntax. The
default NFKC normalisation and `remove_extra_whitespaces` would collapse indentation and
`add_dummy_prefix` would add a space to every document, so decode(encode(text)) would not give
the text back; the identity rule, no dummy prefix and byte fallback (every byte a UTF-8 string
can hold has a piece) make the round trip exact for any text. A newline is a piece of its own
(the trainer sees one line per sentence, so it would never learn one otherwise); runs of spaces
may be pieces (indentation). Ids: 0 pad, 1 EOS, 2 unknown (as in T5), 3 BOS, so
the model's vocabulary is exactly `spm_vocab_size` ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Iterator

import ml_collections

from switchmoe.data.sources import load_texts, resolve_data_dir

SPM_MODEL_TYPES = ("unigram", "bpe")
# Bump when the trainer's input or options change, so old files are not mistaken for new ones.
_FORMAT_VERSION = 1
_TRAINER_OPTIONS = dict(
    character_coverage=1.0,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    user_defined_symbols=["\n"],
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=3,
    shuffle_input_sentence=False,
    input_sentence_size=0,  # every line
    max_sentence_length=8192,
    num_threads=2,  # part of the hashed settings: a different count gets its own file
)


def training_settings(data_config: ml_collections.ConfigDict) -> dict:
    """What decides the trained model's bytes (hashed into its file name)."""
    return {
        "format": _FORMAT_VERSION,
        "dataset": data_config.dataset,
        "split": data_config.train_split,
        "text_key": data_config.text_key,
        "max_files": data_config.max_files,
        "vocab_size": data_config.spm_vocab_size,
        "model_type": data_config.get("spm_model_type", "unigram"),
        "trainer": _TRAINER_OPTIONS,
    }


def model_path(data_config: ml_collections.ConfigDict) -> str:
    """Where the model of `data_config`'s settings lives (whether or not it is built yet)."""
    settings = training_settings(data_config)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    slug = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s))
    name = (
        f"{slug(settings['dataset'])}-{slug(settings['split'])}-"
        f"{settings['model_type']}{settings['vocab_size']}-{digest}.model"
    )
    return os.path.join(resolve_data_dir(data_config), "sentencepiece", name)


def _lines(texts: list[bytes]) -> Iterator[str]:
    for text in texts:
        for line in text.decode("utf-8", errors="replace").split("\n"):
            if line:
                yield line


def train_model(data_config: ml_collections.ConfigDict) -> bytes:
    """Trains the SentencePiece model of `data_config` on its training split; its bytes."""
    import sentencepiece  # noqa: PLC0415  (make_tokenizer says how to install it)

    texts = load_texts(data_config, data_config.train_split)
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_writer=out,
        vocab_size=int(data_config.spm_vocab_size),
        model_type=data_config.get("spm_model_type", "unigram"),
        minloglevel=2,
        **_TRAINER_OPTIONS,
    )
    return out.getvalue()


def ensure_model(data_config: ml_collections.ConfigDict, log=print) -> str:
    """The path of `data_config`'s trained model, training it first if it is not there yet.

    The file appears atomically (written beside, then renamed), so an interrupted build leaves
    nothing half-written and two processes building at once both end with the same file.
    """
    path = model_path(data_config)
    if os.path.exists(path):
        return path
    log(f"training a SentencePiece model ({data_config.spm_vocab_size} pieces) -> {path}")
    data = train_model(data_config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
