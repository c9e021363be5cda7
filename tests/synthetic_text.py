"""A generated text dataset for the streaming tests: TFDS, array_record, several shards.

`synthetic_text/mb<N>` holds about N MB of train text (documents of pseudo-random words, a
pure function of the document index) and a small validation split. Importing this module
registers the builder with TFDS, so `data.dataset='synthetic_text/mb24'` resolves like lm1b.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

DOC_BYTES = 4000  # about c4's mean document length
WORDS = [f"w{i:x}" for i in range(4096)]


def document(index: int) -> str:
    """Document `index`: a few thousand bytes of words, some lines, from a seeded generator."""
    rng = np.random.default_rng(index)
    words = rng.choice(len(WORDS), size=rng.integers(DOC_BYTES // 8, DOC_BYTES // 3))
    return " ".join(WORDS[w] if i % 17 else "\n" + WORDS[w] for i, w in enumerate(words))


class SyntheticTextConfig(tfds.core.BuilderConfig):
    def __init__(self, *, megabytes: int, **kwargs):
        super().__init__(name=f"mb{megabytes}", **kwargs)
        self.megabytes = megabytes


class SyntheticText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [SyntheticTextConfig(megabytes=mb) for mb in (2, 24, 100)]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        from etils import epath  # noqa: PLC0415

        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        num_train = self.builder_config.megabytes * 10**6 // 4600  # 4.6 kB a document
        return {
            "train": self._generate_examples(range(num_train)),
            "validation": self._generate_examples(range(10**7, 10**7 + 200)),
        }

    def _generate_examples(self, indices):
        for i in indices:
            yield i, {"text": document(i)}


def prepare(data_dir: str, megabytes: int, num_shards: int = 4) -> str:
    """Builds synthetic_text/mb<megabytes> under data_dir in `num_shards` train shards."""
    name = f"synthetic_text/mb{megabytes}"
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    tfds.display_progress_bar(False)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=num_shards)
    )
    return name
