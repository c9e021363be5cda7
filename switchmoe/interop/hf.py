"""Any supported Hugging Face checkpoint in and out: the converter is chosen by config.json's
`model_type` (Switch Transformers: hf_switch; Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE: hf_decoders),
and on export by the run's architecture.

    from switchmoe.interop import hf
    config, params = hf.load("Mixtral-tiny")        # (config, params), logits equal to HF's
    hf.save(config, params, "out")                  # config.json + safetensors, back out
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import ml_collections

from switchmoe.interop import hf_decoders, hf_switch, hf_tokenizer

SWITCH = "switch_transformers"
MODEL_TYPES = (SWITCH, *hf_decoders.FAMILIES)
SPECIAL_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


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


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `save` wrote: the architecture, the files, and what it could not write (or None)."""

    model_type: str
    files: tuple[str, ...]
    note: Optional[str] = None


def save(
    config: ml_collections.ConfigDict,
    params: Any,
    directory: str,
    model_type: Optional[str] = None,
    special_ids: Optional[Mapping[str, int]] = None,
) -> Exported:
    """Writes the run's HF layout to `directory`: Switch Transformers for an encoder–decoder, a
    decoder family (`model_type`, or the one its settings say: hf_decoders.infer_model_type) for
    a decoder-only LM; config.json with the run's special ids, generation_config.json and the
    run's tokenizer (hf_tokenizer).

    special_ids: config.json's pad/bos/eos(/decoder_start) ids when they are not the run's
      tokenizer's (a model imported without its tokenizer keeps its checkpoint's ids); then no
      tokenizer is written.
    """
    arch = config.model.get("arch", "decoder")
    if arch == "encoder_decoder" and model_type not in (None, SWITCH):
        raise ValueError(
            f"model_type={model_type!r}: an encoder–decoder exports as {SWITCH!r} only."
        )
    if arch != "encoder_decoder" and model_type not in (None, *hf_decoders.FAMILIES):
        raise ValueError(
            f"model_type={model_type!r}; a decoder-only LM exports as one of "
            f"{tuple(hf_decoders.FAMILIES)}."
        )
    ids = dict(special_ids) if special_ids is not None else hf_tokenizer.special_ids(config)
    if arch == "encoder_decoder":
        model_type = SWITCH
        hf_switch.save(config, params, directory, special_ids=ids)
    else:
        model_type = model_type or hf_decoders.infer_model_type(config)
        hf_decoders.save(config, params, directory, model_type, special_ids=ids)
    files = [hf_switch.CONFIG_FILE, *hf_decoders.weight_files(directory)]
    if special_ids is not None:
        hf_tokenizer.write_generation_config(directory, ids)
        note = (
            "no tokenizer written: the special ids are the checkpoint's, not the run's tokenizer's"
        )
        return Exported(model_type, (*files, hf_tokenizer.GENERATION_CONFIG_FILE), note)
    written, note = hf_tokenizer.export_files(config, directory, ids)
    return Exported(model_type, (*files, *written), note)
