"""Experiment configs: each loads and validates; paper-sized parameter counts match a hand count."""

import importlib.util
import os

import pytest
from tiny import apply_overrides

from switchmoe.config import validate_config
from switchmoe.moe.blocks import router_names
from switchmoe.models import count_params, resolve

ROOT = os.path.dirname(os.path.dirname(__file__))


def load(name, variant=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


@pytest.mark.parametrize("name", ["demo", "switch", "gshard", "st_moe", "dense", "finetune"])
def test_cpu_configs_validate(name):
    validate_config(resolve(load(name)))


def test_switch_base_parameter_count_by_hand():
    V, D, F, E, blocks = 32128, 768, 3072, 8, 12
    attention = 4 * D * D  # query, key, value, out; heads × head_dim = D
    norms = 2 * D  # two RMSNorm scales per block
    dense_ffn = 2 * D * F
    moe = D * E + E * 2 * D * F  # router + E experts
    moe_blocks = blocks // 2  # blocks 1, 3, ..., 11
    expected = (
        V * D
        + blocks * (attention + norms)
        + (blocks - moe_blocks) * dense_ffn
        + moe_blocks * moe
        + D
    )  # + final norm
    counts = count_params(load("switch", "base8"))
    assert counts["total"] == expected == 307_845_888
    assert counts["experts"] == moe_blocks * E * 2 * D * F
    # Active per token: the same model with one expert's FFN per MoE block (plus the router).
    assert counts["active_per_token"] == expected - moe_blocks * (E - 1) * 2 * D * F


def test_dense_counterpart_has_the_active_parameters_of_the_demo():
    # The demo's top-2 experts are half as wide as the dense FFN: two of them are one FFN.
    moe, dense = count_params(load("demo")), count_params(load("dense"))
    routers = 2 * 128 * 32  # the only extra active parameters: two routers of D × E
    assert moe["active_per_token"] == dense["total"] + routers


def _studies_module():
    module_path = os.path.join(ROOT, "configs", "studies.py")
    spec = importlib.util.spec_from_file_location("studies", module_path)
    studies = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(studies)
    return studies


@pytest.mark.parametrize("study", _studies_module().STUDIES)
def test_every_study_trial_validates(study):
    studies = _studies_module()
    for overrides in studies.get_sweep(study):
        config = apply_overrides(studies.get_config(study), overrides)
        if "hash" in router_names(config.model.moe):
            config.model.moe.hash_kind = "random"  # the balanced table would read the corpus
        if config.data.tokenizer == "sentencepiece":
            config.model.vocab_size = config.data.spm_vocab_size  # no tokenizer training here
        validate_config(resolve(config))


@pytest.mark.parametrize("preset", ["tpu_v4_32", "tpu_v5p_64", "gpu_8xh100", "gpu_32xh100"])
@pytest.mark.parametrize(
    "name,variant",
    [("switch_t5", "base128"), ("switch_t5", "st_moe_l"), ("switch", "base8"),
     ("st_moe", "large"), ("gshard", "e128"), ("dense", "base")],
)  # fmt: skip
def test_accelerator_presets_lay_the_paper_configs_on_their_devices(name, variant, preset):
    from switchmoe.presets import PRESETS  # noqa: PLC0415

    config = resolve(load(name, f"{variant},{preset}"))
    devices = PRESETS[preset].devices
    mesh = config.mesh
    assert mesh.data * mesh.expert * mesh.model == devices
    E = config.model.moe.num_experts
    assert mesh.expert == (min(E, devices) if E else 1)  # E and devices are powers of two here
    assert config.batch_size % devices == 0 and config.model.dtype == "bfloat16"
    assert config.data.pipeline == "stream" and config.data.dataset.startswith("c4/en")
    gpu = preset.startswith("gpu")
    assert config.model.moe.backend == ("gather" if gpu else "einsum")
    assert config.model.moe.dropless_implementation == ("blocked" if gpu else "ragged_dot")
    large = config.model.d_model >= 1024
    assert config.model.remat == ("dots" if large else "none")
    microbatch = config.batch_size // devices // config.grad_accum_steps
    assert microbatch == min(config.batch_size // devices, 8 if large else 32)
    # Everything but the vocabulary file validates for the preset's device count.
    config.data.tokenizer, config.data.spm_vocab_size = "byte", None
    validate_config(config, devices)


def test_an_unknown_preset_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown accelerator preset 'tpu9'; allowed: tpu_v4_32"):
        load("switch", "base8,tpu9")
