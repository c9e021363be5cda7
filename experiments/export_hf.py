"""A switchmoe run as a Hugging Face checkpoint.

  python -m experiments.export_hf --workdir=runs/switch_t5 --out=exported [--step=N]
  python -m experiments.export_hf --workdir=runs/olmoe --out=exported --model_type=olmoe

Writes <out>/config.json, the safetensors, generation_config.json and the run's tokenizer
(tokenizer.json for `AutoTokenizer`; a SentencePiece run's tokenizer.model too), all with the
run's special ids, so transformers' `generate` continues a prompt as switchmoe's generation does
(tests/interop/test_hf_tokenizer.py). A run imported from Hugging Face without a tokenizer keeps
its checkpoint's ids (recorded by import_hf) and gets no tokenizer.

An encoder–decoder run exports as Switch Transformers
(`SwitchTransformersForConditionalGeneration.from_pretrained(out)` loads it with the same logits,
tests/interop/test_hf_switch.py); a decoder-only run as Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE or
DeepSeek-V3 (`--model_type`, default: the family its settings match;
tests/interop/test_hf_decoders.py). What the chosen architecture cannot express (for Switch:
top-2 routing, gated experts, a shared expert; for a decoder family: another q/k norm, a
capacity-free router other than softmax top-k, ...) is refused before anything is written,
naming each setting. The other direction: `python -m experiments.import_hf`, or
`--config.init_from=hf:<dir>` to fine-tune, or `switchmoe.interop.hf.load(dir)` in a notebook.
"""

import json
import os
from typing import Optional

from absl import flags

from switchmoe import cli
from switchmoe.interop import hf
from switchmoe.runs import restore_run
from switchmoe.runs.restore import DERIVED_FILE

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to export.", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write (created).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_MODEL_TYPE = flags.DEFINE_enum(
    "model_type", None, list(hf.MODEL_TYPES), "The HF architecture (default: from the run)."
)


def _checkpoint_ids(workdir: str, config) -> Optional[dict]:
    """The special ids an imported run's checkpoint came with, when the run never got a tokenizer
    of its own (import_hf found none and data.tokenizer is still the default byte one)."""
    path = os.path.join(workdir, DERIVED_FILE)
    if config.data.tokenizer != "byte" or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("special_ids")


def main(argv):
    del argv
    config, params = restore_run(_WORKDIR.value, _STEP.value)
    ids = _checkpoint_ids(_WORKDIR.value, config)
    exported = hf.save(config, params, _OUT.value, _MODEL_TYPE.value, special_ids=ids)
    print(f"Wrote {_OUT.value} ({exported.model_type}): {', '.join(exported.files)}.")
    if exported.note:
        print(f"Note: {exported.note}.")


if __name__ == "__main__":
    cli.run(main)
