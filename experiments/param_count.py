"""Parameter counts of a config, computed with jax.eval_shape (nothing is allocated).

python -m experiments.param_count --config=configs/switch.py:base128
python -m experiments.param_count --config=configs/switch_t5.py:base128   (encoder–decoder)
"""

from absl import flags
from ml_collections import config_flags

from switchmoe import cli
from switchmoe.models import count_params

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:variant])."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config = _CONFIG.value
    counts = count_params(config)
    m, moe = config.model, config.model.moe
    layers = m.num_layers
    if m.get("arch", "decoder") == "encoder_decoder":
        layers = f"{m.num_layers}+{m.get('num_decoder_layers') or m.num_layers}"
    print(
        f"{m.get('arch', 'decoder')} d_model={m.d_model} d_ff={m.d_ff} layers={layers} "
        f"heads={m.num_heads} "
        f"experts={moe.num_experts} k={moe.num_selected} moe_every={moe.moe_every}: "
        f"total {counts['total']:,} "
        f"({counts['total'] / 1e9:.3f}B), experts {counts['experts']:,}, "
        f"active per token {counts['active_per_token']:,} ({counts['active_per_token'] / 1e6:.1f}M)"
    )


if __name__ == "__main__":
    cli.run(main)
