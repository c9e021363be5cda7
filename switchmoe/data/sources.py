"""Where a config's documents come from: the TFDS builder of `data.dataset` (the embedded
stdlib corpus, built here without network, or a public dataset), its data directory, and a
split's documents as bytes. The bottom of the data wing: tokenizers, SentencePiece training and
the pipelines read documents through it, and it imports none of them.
"""

from __future__ import annotations

import importlib
import os
import time

import ml_collections
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming as tfds_naming
from tensorflow_datasets.core import registered as tfds_registered

from switchmoe.data.stdlib_corpus import StdlibSource

# The `data.dataset` value of the corpus built locally from the standard library.
STDLIB_DATASET = "stdlib_source"
# Environment variable that overrides the default TFDS data directory.
DATA_DIR_ENV = "SWITCHMOE_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/switchmoe/tfds"


def resolve_data_dir(data_config: ml_collections.ConfigDict) -> str:
    """`data.data_dir`, else `$SWITCHMOE_DATA_DIR`, else `~/.cache/switchmoe/tfds`."""
    data_dir = data_config.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return os.path.expanduser(data_dir)


def _tfds_builder_cls(name: str) -> type[tfds.core.DatasetBuilder]:
    """TFDS's builder class for dataset `name` (which may carry '/config:version').

    Raises:
      tfds_registered.DatasetNotFoundError: no such dataset.
      ValueError: `name` is not a valid TFDS name.
    """
    dataset_name, _ = tfds_naming.parse_builder_name_kwargs(name)
    try:
        return tfds.builder_cls(dataset_name.name)
    except tfds_registered.DatasetNotFoundError:
        # TFDS registers its older builders (c4, pg19, ... in `tensorflow_datasets.text`) by
        # importing all such packages in one loop that stops at the first ImportError. Without
        # TensorFlow-era extras that happens early (`nearest_neighbors` needs h5py), so
        # `tfds.builder('c4/en')` says "not found". Importing the text package ourselves
        # registers them; any other dataset keeps TFDS's error.
        try:
            importlib.import_module("tensorflow_datasets.text")
        except ImportError:
            pass
        return tfds.builder_cls(dataset_name.name)


def check_dataset(name) -> None:
    """Raises ValueError unless `name` is 'stdlib_source' or a TFDS dataset known here."""
    if name == STDLIB_DATASET:
        return
    allowed = f"allowed: {STDLIB_DATASET!r} or a TFDS dataset name such as 'lm1b' or 'c4/en'"
    if not isinstance(name, str) or not name:
        raise ValueError(f"data.dataset={name!r} is not a dataset name; {allowed}")
    try:
        if tfds_naming.parse_builder_name_kwargs(name)[0].namespace:
            return  # Community datasets ('namespace:name') are resolved by TFDS when read.
        _tfds_builder_cls(name)
    except ValueError:  # Includes DatasetNotFoundError; its message lists every dataset.
        raise ValueError(f"data.dataset={name!r} is not a known dataset; {allowed}") from None


def prepared_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `data.dataset`, prepared (built or downloaded) in array_record."""
    data_dir = resolve_data_dir(data_config)
    if data_config.dataset == STDLIB_DATASET:
        builder = StdlibSource(data_dir=data_dir, max_files=data_config.max_files)
    else:
        check_dataset(data_config.dataset)  # Registers c4 & co. (see _tfds_builder_cls).
        # array_record is the format `as_data_source` reads. A dataset already prepared in this
        # data_dir as TFRecord (TFDS's default) makes as_data_source raise; TFDS's message says so.
        builder = tfds.builder(data_config.dataset, data_dir=data_dir, file_format="array_record")
    # (Not `builder.is_prepared()`: it logs a warning about the missing folder first.)
    built = os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    if data_config.dataset == STDLIB_DATASET and not built:
        # Seconds, no network: one line instead of TFDS's download wording and progress bars.
        start = time.perf_counter()
        print(f"Building the embedded corpus (this Python's standard library) in {data_dir} ...")
        tfds.display_progress_bar(False)
        try:
            builder.download_and_prepare()
        finally:
            tfds.display_progress_bar(True)
        print(f"  built in {time.perf_counter() - start:.1f} s.")
        return builder
    # A no-op when the data is already there; otherwise downloads and prepares the public dataset
    # (network; c4 needs Apache Beam and hours).
    try:
        builder.download_and_prepare()
    except ModuleNotFoundError as e:
        if e.name != "apache_beam":
            raise
        raise ValueError(
            f"data.dataset={data_config.dataset!r} is not prepared under {data_dir}, and TFDS "
            "prepares it with Apache Beam (a Dataflow-sized job for c4): pip install -e '.[beam]', "
            "or point data.data_dir at a prepared ArrayRecord copy (README, 'Real datasets')"
        ) from e
    return builder


def load_texts(data_config: ml_collections.ConfigDict, split: str) -> list[bytes]:
    """The documents of `split`, in the dataset's stored order, as UTF-8 bytes.

    For a TFDS dataset other than stdlib_source, `data.max_files > 0` keeps the first
    `max_files` documents (for stdlib_source the limit already chose the files).
    """
    builder = prepared_builder(data_config)
    text_key = data_config.text_key
    if text_key not in builder.info.features:
        raise ValueError(
            f"data.text_key={text_key!r} is not a feature of {builder.info.name}; "
            f"allowed: {sorted(builder.info.features.keys())}"
        )
    source = builder.as_data_source(split)
    count = len(source)
    if data_config.dataset != STDLIB_DATASET and data_config.max_files:
        count = min(count, data_config.max_files)
    texts: list[bytes] = []
    chunk = 4096  # Batched reads: one array_record call per chunk rather than per document.
    for start in range(0, count, chunk):
        for example in source.__getitems__(list(range(start, min(count, start + chunk)))):
            text = example[text_key]
            texts.append(text.encode("utf-8") if isinstance(text, str) else bytes(text))
    return texts
