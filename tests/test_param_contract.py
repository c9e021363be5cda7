"""The parameter tree is a contract: checkpoints written by one version restore in the next.

tests/param_contract.json pins every parameter's path, shape, dtype and logical axes for the demo
model and the CPU encoder–decoder. A change that renames, reshapes or re-annotates a parameter
breaks every checkpoint already written, so it must be deliberate: regenerate the file with
`SWITCHMOE_WRITE_PARAM_CONTRACT=1 python -m pytest tests/test_param_contract.py` and say why in the
commit.
"""

import json
import os

import flax.linen as nn
import jax
import pytest

from switchmoe import models, sweeps
from switchmoe.models import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT = os.path.join(ROOT, "tests", "param_contract.json")
CONFIGS = ("configs/demo.py", "configs/switch_t5.py")


def param_tree(config_arg: str) -> dict:
    path, variant = sweeps.split_config_arg(config_arg)
    module = sweeps.load_config_module(os.path.join(ROOT, path))
    config = resolve(module.get_config(variant) if variant else module.get_config())
    model = models.build_model(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *models.dummy_inputs(config)))
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    out = {}
    for key_path, leaf in leaves:
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        out[jax.tree_util.keystr(key_path)] = {
            "shape": list(value.shape),
            "dtype": str(value.dtype),
            "axes": list(leaf.names) if isinstance(leaf, nn.Partitioned) else None,
        }
    return out


def test_parameter_trees_match_the_committed_contract():
    trees = {arg: param_tree(arg) for arg in CONFIGS}
    if os.environ.get("SWITCHMOE_WRITE_PARAM_CONTRACT"):
        with open(CONTRACT, "w") as f:
            json.dump(trees, f, indent=1, sort_keys=True)
            f.write("\n")
        pytest.skip(f"wrote {CONTRACT}")
    with open(CONTRACT) as f:
        contract = json.load(f)
    for arg in CONFIGS:
        missing = sorted(set(contract[arg]) - set(trees[arg]))
        added = sorted(set(trees[arg]) - set(contract[arg]))
        assert not missing and not added, f"{arg}: missing {missing}, new {added}"
        changed = {k: (contract[arg][k], v) for k, v in trees[arg].items() if contract[arg][k] != v}
        assert not changed, f"{arg}: changed (contract, now): {changed}"
