"""Parameter counts of a config, computed with jax.eval_shape (nothing is allocated).

python -m experiments.param_count --config=configs/switch.py:base128
python -m experiments.param_count --config=configs/switch_t5.py:base128   (encoder–decoder)

With `--out=experiments/results/param_counts/param_counts.csv` the counts also go into that CSV
(one row per config, replaced when the same config is counted again), which EXPERIMENTS.md's
parameter tables are generated from (`python -m experiments.docs`). The committed file is
written by

  for c in switch.py:base8 switch.py:base16 switch.py:base32 switch.py:base64 switch.py:base128 \\
      switch.py:large128 gshard.py:e128 gshard.py:e512 gshard.py:e2048 st_moe.py:large \\
      st_moe.py:b32 dense.py:base switch_t5.py:base8 switch_t5.py:base16 switch_t5.py:base32 \\
      switch_t5.py:base64 switch_t5.py:base128 switch_t5.py:base_dense switch_t5.py:large128 \\
      switch_t5.py:large_dense switch_t5.py:st_moe_l switch_t5.py:st_moe_l_dense; do
    python -m experiments.param_count --config=configs/$c \\
        --out=experiments/results/param_counts/param_counts.csv; done
"""

import csv
import os

from absl import flags
from ml_collections import config_flags

from switchmoe import cli
from switchmoe.models import count_params

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:variant])."
)
_OUT = flags.DEFINE_string("out", None, "CSV to add this config's row to (replacing its old row).")
flags.mark_flags_as_required(["config"])

COLUMNS = ("config", "arch", "shape", "total", "experts", "active_per_token")


def config_name(argument: str) -> str:
    """'configs/switch.py:base8' -> 'switch:base8' (the name the documents use)."""
    path, _, variant = argument.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}:{variant}" if variant else name


def shape(config) -> str:
    """'d_model / d_ff[ GEGLU] / blocks / experts (k)[, 1 in N]': what sets the counts."""
    m, moe = config.model, config.model.moe
    layers = str(m.num_layers)
    if m.get("arch", "decoder") == "encoder_decoder":
        layers = f"{m.num_layers}+{m.get('num_decoder_layers') or m.num_layers}"
    glu = " GEGLU" if m.get("activation") == "geglu" else ""
    experts = "–"
    if moe.num_experts:
        experts = f"{moe.num_experts} ({moe.num_selected})"
        if moe.moe_every != 2:
            experts += f", 1 in {moe.moe_every}"
    return f"{m.d_model} / {m.d_ff}{glu} / {layers} / {experts}"


def write_row(path: str, row: dict) -> None:
    """Adds `row` to the CSV at `path`, replacing the row of the same config; rows stay in the
    order they were first written."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = list(csv.DictReader(f))
    for i, old in enumerate(rows):
        if old["config"] == row["config"]:
            rows[i] = row
            break
    else:
        rows.append(row)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _config_argument() -> str:
    """The --config argument as given ('configs/switch.py:base8')."""
    return flags.FLAGS["config"].config_filename  # with its ':variant'


def main(argv):
    del argv
    config = _CONFIG.value
    counts = count_params(config)
    m = config.model
    print(
        f"{m.get('arch', 'decoder')} {shape(config)}, heads={m.num_heads}: "
        f"total {counts['total']:,} "
        f"({counts['total'] / 1e9:.3f}B), experts {counts['experts']:,}, "
        f"active per token {counts['active_per_token']:,} ({counts['active_per_token'] / 1e6:.1f}M)"
    )
    if _OUT.value:
        name = config_name(_config_argument())
        write_row(_OUT.value, {"config": name, "arch": m.get("arch", "decoder"),
                               "shape": shape(config), **counts})  # fmt: skip


if __name__ == "__main__":
    cli.run(main)
