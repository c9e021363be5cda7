"""A Hugging Face checkpoint as a switchmoe run: restore_run, evaluation at any capacity,
generation and the analysis notebooks then open it like any trained run.

  python -m experiments.import_hf --hf_dir=OLMoE-1B-7B --workdir=runs/olmoe [--step=0]

Reads <hf_dir>/config.json (any supported model_type: switch_transformers, mixtral, olmoe,
qwen2_moe, qwen3_moe; anything switchmoe does not build is refused by name before a weight is
read) and its safetensors, and writes <workdir>/config.json, one checkpoint at --step and
derived_from.json naming the source. The tokenizer: a SentencePiece `tokenizer.model` beside the
weights (Mixtral's) becomes the run's `data.tokenizer`; otherwise the run keeps switchmoe's
byte tokenizer, for work on token ids (set `--config.data.*` when training on text). Downloading
is the caller's business: this machine reads local directories only.
"""

import os

from absl import flags

from switchmoe import cli
from switchmoe.interop import hf
from switchmoe.runs import write_run

_HF_DIR = flags.DEFINE_string("hf_dir", None, "The Hugging Face model directory.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to write (new).", required=True)
_STEP = flags.DEFINE_integer("step", 0, "The step the checkpoint is saved as.")


def main(argv):
    del argv
    config, params = hf.load(_HF_DIR.value)
    spm = os.path.join(_HF_DIR.value, "tokenizer.model")
    if os.path.exists(spm):
        config.data.tokenizer = "sentencepiece"
        config.data.spm_model_path = os.path.abspath(spm)
    hf_config = hf.hf_decoders.read_hf_config(_HF_DIR.value)
    source = {
        "hf_dir": os.path.abspath(_HF_DIR.value),
        "model_type": hf_config.get("model_type"),
        # The checkpoint's own ids: an export of this run without its tokenizer writes them back.
        "special_ids": {
            k: hf_config[k] for k in hf.SPECIAL_ID_KEYS if hf_config.get(k) is not None
        },
    }
    write_run(_WORKDIR.value, config, params, _STEP.value, derived_from=source)
    print(f"Wrote {_WORKDIR.value} ({source['model_type']}, step {_STEP.value}).")


if __name__ == "__main__":
    cli.run(main)
