"""A switchmoe encoder–decoder run as a Hugging Face Switch Transformers checkpoint.

  python -m experiments.export_hf --workdir=runs/switch_t5 --out=exported [--step=N]

Writes <out>/config.json and <out>/model.safetensors, which
`transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out)` loads with the
same logits (tests/interop/test_hf_switch.py). A run HF's architecture cannot express (top-2 routing,
gated experts, a shared expert, MoE other than every block or every other one) is refused
before anything is written, naming each setting. The other direction needs no command:
`--config.init_from=hf:<dir>` fine-tunes from an HF checkpoint, and `hf_switch.load(dir)`
gives (config, params) in a notebook.
"""

from absl import flags

from switchmoe import cli
from switchmoe.interop import hf_switch
from switchmoe.runs import restore_run

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to export.", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write (created).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")


def main(argv):
    del argv
    config, params = restore_run(_WORKDIR.value, _STEP.value)
    hf_switch.save(config, params, _OUT.value)
    print(f"Wrote {_OUT.value}/{hf_switch.CONFIG_FILE} and {hf_switch.WEIGHTS_FILE}.")


if __name__ == "__main__":
    cli.run(main)
