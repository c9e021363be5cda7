"""Any supported Hugging Face checkpoint in and out: the converter is chosen by config.json's
`model_type` (Switch Transformers: hf_switch; Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE: hf_decoders),
and on export by the run's architecture.

    from switchmoe.interop import hf
    config, params = hf.load("Mixtral-tiny")        # (config, params), logits equal to HF's
    hf.save(config, params, "out")                  # config.json + safetensors, back out
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections

from switchmoe.interop import hf_decoders, hf_switch

SWITCH = "switch_transformers"
MODEL_TYPES = (SWITCH, *hf_decoders.FAMILIES)


def _converter(hf_config: dict):
    model_type = hf_config.get("model_type")
    if model_type == SWITCH:
        return hf_switch
    hf_decoders.family_of(hf_config)  # refuses an unknown or unbuilt family by name
    return hf_decoders


def config_from_directory(directory: str) -> ml_collections.ConfigDict:
    """The switchmoe config of an HF checkpoint directory, from its config.json alone (refused
    by name when switchmoe does not build what it describes)."""
    hf_config = hf_decoders.read_hf_config(directory)
    return _converter(hf_config).config_from_hf(hf_config)


def load(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of an HF checkpoint directory of any supported `model_type`."""
    return _converter(hf_decoders.read_hf_config(directory)).load(directory)


def save(
    config: ml_collections.ConfigDict,
    params: Any,
    directory: str,
    model_type: Optional[str] = None,
) -> str:
    """Writes the run's HF layout to `directory` and returns the model_type written: Switch
    Transformers for an encoder–decoder, a decoder family (`model_type`, or the one its settings
    say: hf_decoders.infer_model_type) for a decoder-only LM."""
    if config.model.get("arch", "decoder") == "encoder_decoder":
        if model_type not in (None, SWITCH):
            raise ValueError(
                f"model_type={model_type!r}: an encoder–decoder exports as {SWITCH!r} only."
            )
        hf_switch.save(config, params, directory)
        return SWITCH
    if model_type is not None and model_type not in hf_decoders.FAMILIES:
        raise ValueError(
            f"model_type={model_type!r}; a decoder-only LM exports as one of "
            f"{tuple(hf_decoders.FAMILIES)}."
        )
    model_type = model_type or hf_decoders.infer_model_type(config)
    hf_decoders.save(config, params, directory, model_type)
    return model_type
