"""How the evaluation protocol moves a run's number: the old prefix, the old split, the new split.

  python -m experiments.eval_protocols --workdir=runs/demo --out=experiments/results/eval_protocols

Scores one trained run's final checkpoint three ways, at its eval capacity factor:
  - "old prefix": the first 16 batches of the validation split *before* near-duplicate removal
    (all 43 files, stored order), what every study before 2026-12-07 reported;
  - "old split": every token of those 43 files;
  - "new split": every token of today's validation split (near-duplicates of training files
    removed), what a run's final evaluation now reports;
and, for each, the baselines on exactly the bytes scored (unigram entropy, zlib, xz cold, xz after
the training split) and the 95% bootstrap interval over documents. Writes protocols.json and
protocols.md under --out. The old split is rebuilt from this interpreter's standard library with
`stdlib_corpus.select_files` (the split rule, which did not change), so it needs the embedded
corpus (data.dataset='stdlib_source', data.max_files=0).
"""

import json
import os

from absl import app, flags, logging

from switchmoe import cli
from switchmoe.analysis.evaluation import _single_device_trainer, load_run, single_device_config
from switchmoe.data import baselines, stdlib_corpus
from switchmoe.data import eval_set as eval_set_lib
from switchmoe.data.eval_set import build_eval_set
from switchmoe.data.pipeline import STDLIB_DATASET, _process_rows, load_texts, resolve_data_dir
from switchmoe.data.span_corruption import make_pipeline

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A trained decoder-only run on the embedded corpus."
)
_OUT = flags.DEFINE_string("out", None, "Directory for protocols.json and protocols.md.")
flags.mark_flags_as_required(["workdir"])

OLD_PREFIX_BATCHES = 16  # what the studies' num_eval_batches was


class _FixedEvalSets:
    """A pipeline whose eval sets are given (the trainer reads `eval_set` and `eval_set_batches`)."""

    def __init__(self, pipeline, sets):
        self._pipeline, self._sets = pipeline, sets
        self.tokenizer = pipeline.tokenizer

    def eval_set(self, which):
        return self._sets[which]

    def eval_set_batches(self, which, num_batches=None, process_index=0, process_count=1):
        rows = _process_rows(self._pipeline.batch_size, process_index, process_count)
        yield from eval_set_lib.eval_set_batches(
            self._sets[which], self._pipeline.batch_size, rows, self._pipeline.examples,
            f"protocols-{which}", num_batches,
        )  # fmt: skip


def old_validation_texts() -> list[bytes]:
    """The 43 validation files of the corpus before near-duplicate removal, in stored order."""
    root = stdlib_corpus.stdlib_root()
    files = stdlib_corpus.select_files(stdlib_corpus.list_source_files(root), 0)["validation"]
    return [stdlib_corpus.read_source(root / rel).encode("utf-8") for rel in files]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config, params = load_run(_WORKDIR.value)
    config = single_device_config(config)
    if config.data.dataset != STDLIB_DATASET or config.data.max_files:
        raise app.UsageError("eval_protocols needs a run on the whole embedded corpus.")
    pipeline = make_pipeline(config)
    tok = pipeline.tokenizer
    build = lambda texts: build_eval_set(
        "split", texts, tok.encode, eos_id=tok.eos_id, pad_id=tok.pad_id, window=pipeline.window,
        overlap=True, token_bytes=tok.token_bytes(),
    )  # fmt: skip
    old, new = old_validation_texts(), load_texts(config.data, config.data.eval_split)
    sets = {"old": build(old), "new": build(new)}
    trainer = _single_device_trainer(config)
    fixed = _FixedEvalSets(pipeline, sets)
    train = b"".join(load_texts(config.data, config.data.train_split))
    cache = os.path.join(resolve_data_dir(config.data), "baselines")
    rows = []
    for name, which, batches in (
        ("old prefix", "old", OLD_PREFIX_BATCHES),
        ("old split", "old", 0),
        ("new split", "new", 0),
    ):
        result = trainer.evaluate(params, fixed, which, batches, "final", keep_documents=True)
        sums = result.pop("per_document")
        # The scored bytes: whole documents, and for the prefix the documents' bytes up to the
        # last scored byte (the prefix ends inside a document).
        scored_bytes = int(result["final/scored_bytes"])
        text = sets[which].text[:scored_bytes]
        row = {
            "protocol": name,
            "documents": int((sums["tokens"] > 0).sum()),
            "scored_bytes": scored_bytes,
            "bits_per_byte": result["final/bits_per_byte"],
            "interval_95": (
                [result["final/bits_per_byte_low"], result["final/bits_per_byte_high"]]
                if "final/bits_per_byte_low" in result and batches == 0
                else None
            ),
            **baselines.scored_baselines(text, train, cache_dir=cache),
        }
        rows.append(row)
        print(json.dumps(row))
    if _OUT.value:
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "protocols.json"), "w") as f:
            json.dump({"workdir": _WORKDIR.value, "rows": rows}, f, indent=2)
        with open(os.path.join(_OUT.value, "protocols.csv"), "w") as f:
            keys = [k for k in rows[0] if k != "interval_95"] + ["low", "high"]
            f.write(",".join(keys) + "\n")
            for r in rows:
                low, high = r["interval_95"] or ("", "")
                f.write(",".join(str(r[k]) for k in keys[:-2]) + f",{low},{high}\n")


if __name__ == "__main__":
    cli.run(main)
