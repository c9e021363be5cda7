"""A switchmoe run as a Hugging Face checkpoint.

  python -m experiments.export_hf --workdir=runs/switch_t5 --out=exported [--step=N]
  python -m experiments.export_hf --workdir=runs/olmoe --out=exported --model_type=olmoe

Writes <out>/config.json and <out>/model.safetensors. An encoder–decoder run exports as Switch
Transformers (`SwitchTransformersForConditionalGeneration.from_pretrained(out)` loads it with
the same logits, tests/interop/test_hf_switch.py); a decoder-only run as Mixtral, OLMoE,
Qwen2-MoE or Qwen3-MoE (`--model_type`, default: the family its settings match;
tests/interop/test_hf_decoders.py). What the chosen architecture cannot express (for Switch:
top-2 routing, gated experts, a shared expert; for a decoder family: another q/k norm, a
capacity-free router other than softmax top-k, ...) is refused before anything is written,
naming each setting. The other direction: `python -m experiments.import_hf`, or
`--config.init_from=hf:<dir>` to fine-tune, or `switchmoe.interop.hf.load(dir)` in a notebook.
"""

from absl import flags

from switchmoe import cli
from switchmoe.interop import hf, hf_switch
from switchmoe.runs import restore_run

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to export.", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write (created).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_MODEL_TYPE = flags.DEFINE_enum(
    "model_type", None, list(hf.MODEL_TYPES), "The HF architecture (default: from the run)."
)


def main(argv):
    del argv
    config, params = restore_run(_WORKDIR.value, _STEP.value)
    model_type = hf.save(config, params, _OUT.value, _MODEL_TYPE.value)
    print(
        f"Wrote {_OUT.value}/{hf_switch.CONFIG_FILE} and {hf_switch.WEIGHTS_FILE} ({model_type})."
    )


if __name__ == "__main__":
    cli.run(main)
