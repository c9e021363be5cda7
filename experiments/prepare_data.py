"""Build (or find) a config's dataset and print its size and unigram entropy.

  python -m experiments.prepare_data --config=configs/demo.py

For the embedded corpus this builds the TFDS `stdlib_source` dataset from this interpreter's
standard library (no network). The unigram byte entropy is what a model that ignores context
scores: any LM must get below it. experiments.sweep runs this once before starting trials in
parallel, so that they do not all build the same dataset at the same time.
"""

from absl import flags, logging
from ml_collections import config_flags

from switchmoe import cli
from switchmoe.data.near_duplicates import DedupReport, Leakage, Removal
from switchmoe.data.pipeline import STDLIB_DATASET, corpus_statistics, prepared_builder
from switchmoe.data.pipeline import resolve_data_dir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:variant])."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    data = _CONFIG.value.data
    print(f"dataset {data.dataset!r} in {resolve_data_dir(data)}")
    for split in (data.train_split, data.eval_split):
        stats = corpus_statistics(data, split)
        print(
            f"  {split}: {stats.num_documents:,} documents, {stats.num_bytes:,} bytes, unigram "
            f"entropy {stats.unigram_entropy_bits_per_byte:.4f} bits/byte"
        )
    if data.dataset == STDLIB_DATASET:
        saved = prepared_builder(data).info.metadata.get("near_duplicates")
        if saved:
            report = DedupReport(
                threshold=saved["threshold"],
                removed=tuple(Removal(**r) for r in saved["removed"]),
                kept=tuple(saved["kept"]),
                before=Leakage(**saved["before"]),
                after=Leakage(**saved["after"]),
            )
            print("\n".join(report.lines()))


if __name__ == "__main__":
    cli.run(main)
