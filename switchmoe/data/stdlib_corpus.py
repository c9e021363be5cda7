"""A TFDS builder for a text corpus made of the running interpreter's standard-library source.

Every machine that runs switchmoe has a Python standard library on disk, so this corpus needs no
network and no download: `StdlibSource` reads the `*.py` files under `sysconfig.get_paths()
["stdlib"]` and writes them as ArrayRecord files that `builder.as_data_source(split)` reads back
with random access and without TensorFlow.

What goes in, and why
  - Only `*.py` files, decoded with the encoding their PEP 263 cookie declares (UTF-8 when there
    is none), with newlines kept exactly as on disk: a document's text is the file's content.
  - `site-packages/` (and `dist-packages/`) are excluded: they hold whatever third-party packages
    the environment has installed, so including them would make the corpus depend on the venv
    rather than on the interpreter.
  - Test directories (`test/`, `tests/`, `idle_test/`) are excluded. They are more than half the
    bytes of the stdlib (CPython 3.11: ~920 files, ~21 MB against ~730 files, ~12 MB of library
    code), they are mostly repetitive assertion boilerplate, they contain files that are
    deliberately malformed or in legacy encodings (they test the tokenizer), and Linux
    distributions often ship them in a separate package, so including them would make "the
    stdlib corpus" differ between two machines with the same Python version.
  - `_sysconfigdata_*.py` is excluded: it is generated when Python is built and records the
    build machine's compiler flags and paths, so it is the one library file that differs between
    two installs of the same Python version.

Splits
  A file is in `validation` when a SHA-256 hash of its relative POSIX path falls in the lowest
  `VALIDATION_FRACTION` (5%) of the hash range, and in `train` otherwise. The assignment depends
  only on the path, so it is the same on every machine and stable when files are added or removed
  (a path never changes split).

Near-duplicates (version 1.1.0)
  Validation files that nearly copy a training file, or a validation file before them, are
  removed from validation (kept in train): Jaccard index of 3-line shingles >= 0.3
  (`near_duplicates.py` says why and how). 8 of the 43 validation files of Python 3.11.7 go,
  charmap and ISO-2022 codecs and one distutils MSVC compiler. What was removed, and the leakage
  before and after, is in the prepared dataset's metadata (`builder.info.metadata`) and printed by
  `experiments.prepare_data`. Version 1.0.0 (no removal) is no longer built.

Configs
  The default config holds every file. A config with `max_files=N` keeps N files (for tests and
  quick runs): `max(1, round(0.05 N))` from validation and the rest from train, each taken in
  the order of a second, independent path hash, so that a small corpus samples the whole library
  instead of its alphabetically first package. Config names carry the Python version
  (`all_py3.11.7`, `files64_py3.11.7`) because the stdlib differs between versions, and TFDS
  reuses whatever it finds under `data_dir/stdlib_source/<config>/<version>/`.

Determinism
  The file list is sorted and examples are written in relative-path order with TFDS shuffling
  disabled, so the same interpreter writes the same records in the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pathlib
import platform
import sysconfig
import tokenize
from typing import Iterator

import tensorflow_datasets as tfds
from etils import epath

from switchmoe.data.near_duplicates import DedupReport, deduplicate_validation

# Fraction of files (by path hash) held out as the `validation` split.
VALIDATION_FRACTION = 0.05
# Directory names never descended into; see the module docstring for why.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# File-name prefixes skipped (build-machine specific files).
EXCLUDED_PREFIXES = ("_sysconfigdata_",)

_PYTHON_VERSION = platform.python_version()


def stdlib_root() -> pathlib.Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: pathlib.Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus' `*.py` files under `root`, sorted.

    Args:
      root: the stdlib directory; defaults to `stdlib_root()`.

    Returns:
      Sorted relative paths such as `"json/decoder.py"`, excluding `EXCLUDED_DIRS` at any depth,
      `EXCLUDED_PREFIXES` and anything that is not a regular file.
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    paths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if rel.name.startswith(EXCLUDED_PREFIXES) or not path.is_file():
            continue
        paths.append(rel.as_posix())
    return sorted(paths)


def _unit_hash(salt: str, relpath: str) -> float:
    """A stable pseudo-random number in [0, 1) from a salted SHA-256 of `relpath`."""
    digest = hashlib.sha256(f"{salt}:{relpath}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(relpath: str) -> str:
    """`"validation"` or `"train"`: a pure function of the relative path (see module docstring)."""
    return "validation" if _unit_hash("split", relpath) < VALIDATION_FRACTION else "train"


def select_files(relpaths: list[str], max_files: int = 0) -> dict[str, list[str]]:
    """Assigns files to splits and applies the `max_files` limit.

    Args:
      relpaths: candidate relative paths (any order).
      max_files: 0 for every file, else the total number of files to keep (at least 2, so that
        both splits are non-empty).

    Returns:
      `{"train": [...], "validation": [...]}`, each list sorted by path.
    """
    if max_files < 0 or max_files == 1:
        raise ValueError(f"max_files must be 0 (all files) or >= 2, got {max_files}")
    by_split: dict[str, list[str]] = {"train": [], "validation": []}
    for rel in relpaths:
        by_split[split_of(rel)].append(rel)
    if max_files:
        num_val = min(len(by_split["validation"]), max(1, round(max_files * VALIDATION_FRACTION)))
        quota = {"validation": num_val, "train": max_files - num_val}
        for split, files in by_split.items():
            # A second hash with another salt orders the files for sampling; reusing the split
            # hash would keep only the validation files closest to the 5% boundary.
            sampled = sorted(files, key=lambda rel: _unit_hash("sample", rel))[: quota[split]]
            by_split[split] = sampled
    return {split: sorted(files) for split, files in by_split.items()}


def deduplicated_files(
    root: pathlib.Path | None = None, max_files: int = 0
) -> tuple[dict[str, list[str]], DedupReport]:
    """`select_files` with the near-duplicates of validation removed, and what was removed."""
    root = stdlib_root() if root is None else pathlib.Path(root)
    files = select_files(list_source_files(root), max_files)
    texts = {split: {rel: read_source(root / rel) for rel in rels} for split, rels in files.items()}
    report = deduplicate_validation(texts["train"], texts["validation"])
    files["validation"] = sorted(report.kept)
    return files, report


def read_source(path: pathlib.Path) -> str:
    """A Python file's text: decoded per its PEP 263 cookie, newlines untranslated."""
    raw = pathlib.Path(path).read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    return raw.decode(encoding)


@dataclasses.dataclass(eq=False)
class StdlibSourceConfig(tfds.core.BuilderConfig):
    """A `StdlibSource` config. `max_files`: 0 for the whole library, else the files kept."""

    max_files: int = 0

    @classmethod
    def named(cls, max_files: int) -> StdlibSourceConfig:
        """A fresh config whose name encodes `max_files` and the Python version."""
        size = "all" if max_files == 0 else f"files{max_files}"
        what = "every file" if max_files == 0 else f"{max_files} files"
        return cls(
            name=f"{size}_py{_PYTHON_VERSION}",
            max_files=max_files,
            description=f"Python {_PYTHON_VERSION} standard library source, {what}.",
        )


class StdlibSource(tfds.core.GeneratorBasedBuilder):
    """The running interpreter's standard-library source as a text corpus (see module docstring).

    Features per example: `text` (the file's content) and `path` (relative POSIX path, e.g.
    `"json/decoder.py"`). Read back as bytes: `as_data_source` decodes `Text` to `bytes`.

    Usage:
      builder = StdlibSource(data_dir=d)                  # every file
      builder = StdlibSource(data_dir=d, max_files=64)    # a small corpus for tests
      builder.download_and_prepare()                      # no network; idempotent
      source = builder.as_data_source("train")            # random access, no TensorFlow
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Near-duplicates of training files removed from validation.",
    }
    # The default (first) config is the full corpus; the small one is registered so that its
    # name resolves through `tfds.builder("stdlib_source/files64_py...")` too.
    BUILDER_CONFIGS = [StdlibSourceConfig.named(0), StdlibSourceConfig.named(64)]

    def __init__(
        self, *, max_files: int | None = None, file_format: str = "array_record", **kwargs
    ):
        """Args as `tfds.core.GeneratorBasedBuilder`, plus:

        Args:
          max_files: shorthand for `config=StdlibSource.config_for(max_files)`.
          file_format: defaults to `array_record` (the only format `as_data_source` reads).
        """
        if max_files is not None:
            if kwargs.get("config") is not None:
                raise ValueError("pass either max_files or config, not both")
            kwargs["config"] = self.config_for(max_files)
        elif isinstance(kwargs.get("config"), StdlibSourceConfig):
            # An unpickled builder (a grain worker's copy) brings an equal copy of a registered
            # config, which TFDS would refuse as a second config of the same name.
            kwargs["config"] = self.config_for(kwargs["config"].max_files)
        super().__init__(file_format=file_format, **kwargs)

    @classmethod
    def config_for(cls, max_files: int) -> StdlibSourceConfig:
        """The config for `max_files` (0 = all). Reuses a registered config of the same name:
        TFDS refuses a new config object that shares a registered config's name."""
        if max_files < 0 or max_files == 1:
            raise ValueError(f"max_files must be 0 (all files) or >= 2, got {max_files}")
        config = StdlibSourceConfig.named(max_files)
        return cls.builder_configs.get(config.name, config)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This module's file (TFDS looks for checksum/metadata files beside it).

        Overridden because TFDS 4.9.10's own version, for a builder defined inside a package,
        evaluates `importlib_resources.abc.Traversable`, and `importlib_resources` is only a TFDS
        dependency on Python < 3.9: without this, `download_and_prepare` fails with
        `ModuleNotFoundError: No module named 'importlib_resources'`.
        """
        return epath.Path(__file__)

    # TFDS announces every build as a download of "Unknown size", which reads like an error on
    # a machine without network; the data pipeline prints one line of its own instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: `self.dataset_info_from_configs` looks for metadata files next to this
        # module and fails when they are absent.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "path": tfds.features.Text(),
                }
            ),
            homepage="https://docs.python.org/3/library/",
            # Records stay in path order; consumers shuffle (the LM pipeline shuffles packed
            # windows, not files, anyway).
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        root = stdlib_root()
        files, report = deduplicated_files(root, self.builder_config.max_files)
        self.info.metadata["near_duplicates"] = report.to_dict()
        return {split: self._generate_examples(root, relpaths) for split, relpaths in files.items()}

    def _generate_examples(
        self, root: pathlib.Path, relpaths: list[str]
    ) -> Iterator[tuple[str, dict[str, str]]]:
        for rel in relpaths:
            yield rel, {"text": read_source(root / rel), "path": rel}
