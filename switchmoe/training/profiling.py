"""A profiler window over chosen train steps, and model FLOPs utilisation in the progress line.

`--config.profile_steps=START:COUNT` traces steps START … START+COUNT−1 (numbered as the
progress line numbers them) with `jax.profiler` into <workdir>/profile, viewable in TensorBoard's
profile plugin or Perfetto. Step START should come after the first (compiling) step. The trace
starts before step START is dispatched and stops once step START+COUNT−1 has finished on the
device, so the window holds exactly those steps' device work.

Model FLOPs (the accounting of PaLM, Chowdhery et al. 2022, App. B, extended to MoE), per
training example:
  6 · Σ over parameters that multiply activations of (its size × the tokens it multiplies)
      — matmul parameters do 2 FLOPs per token forward and 4 backward; a routed expert's
      parameters count k/E of their size (the experts a token uses); an encoder's parameters
      multiply the encoder's tokens, a decoder's the decoder's; a tied embedding is the output
      projection (a lookup on the input side costs nothing), an untied one's input table is
      left out; norm scales and biases are counted too, which over-counts by < 0.1%; with
      multi-token prediction the output head counts once per depth more;
  + 6 · Σ over attention layers of H·(Dqk + Dv)·(keys per query)·(queries) — the QKᵀ and AV
      products, forward and backward, every key of the causal mask counted as PaLM does
      (a sliding window caps the keys).
Dropped tokens, padding and recomputation (remat) are not subtracted or added: model FLOPs are
what the model needs, not what the hardware did, so MFU is comparable across implementations.

MFU = model FLOPs per second ÷ the device's peak. Peaks are the dense bfloat16 numbers of the
vendors' datasheets (`PEAK_BF16_FLOPS`, per chip), so MFU is reported for bfloat16 runs only;
otherwise, and on CPU, the progress line shows the achieved model FLOP/s.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import jax
import ml_collections
from flax import traverse_util

from switchmoe.models import (
    abstract_params,
    build_model,
    is_routed_expert_param,
    routed_expert_share,
    sequence_lengths,
)

# Dense bfloat16 peak FLOP/s per chip (vendor datasheets), matched against jax's device_kind by
# substring, first match wins (so "H100 PCIe" before "H100").
PEAK_BF16_FLOPS = (
    ("TPU v6 lite", 918e12),  # Trillium (v6e)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """The dense bfloat16 peak of one chip of this kind, or None when it is not in the table."""
    for name, peak in PEAK_BF16_FLOPS:
        if name in device_kind:
            return peak
    return None


def parse_window(value: str) -> Optional[tuple[int, int]]:
    """'START:COUNT' -> (START, COUNT); '' -> None. Raises ValueError naming the setting."""
    if not value:
        return None
    try:
        start, count = (int(part) for part in str(value).split(":"))
    except ValueError:
        start = count = 0
    if start < 1 or count < 1:
        raise ValueError(
            f"profile_steps={value!r}: expected 'START:COUNT' with START >= 1 and COUNT >= 1 "
            "(e.g. '10:5' traces steps 10-14), or '' for no trace."
        )
    return start, count


def check_before_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A RunCheck (training/seams.py): a malformed profile_steps is refused before anything."""
    del workdir
    parse_window(config.get("profile_steps", ""))


def _attention_flops(config: ml_collections.ConfigDict) -> float:
    """6·Σ H·(Dqk + Dv)·keys·queries over the attention layers of one example."""
    m = config.model
    heads = m.num_heads
    if m.get("attention", "standard") == "latent":
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    else:
        qk = v = m.get("head_dim") or m.d_model // m.num_heads
    lengths = sequence_lengths(config)
    per_key = 6 * heads * (qk + v)
    if m.get("arch", "decoder") != "encoder_decoder":
        L = lengths["decoder"]
        keys = min(L, m.get("sliding_window") or L)
        # Multi-token prediction adds one block per depth (models/mtp.py).
        return per_key * (m.num_layers + m.get("mtp_depth", 0)) * keys * L
    enc, dec = lengths["encoder"], lengths["decoder"]
    dec_layers = m.get("num_decoder_layers") or m.num_layers
    # Encoder self-attention; decoder self-attention and cross-attention to the encoder.
    return per_key * (m.num_layers * enc * enc + dec_layers * (dec * dec + dec * enc))


def model_flops_per_example(config: ml_collections.ConfigDict, params: Any = None) -> float:
    """Model FLOPs of one training example, forward and backward (module docstring); `params`:
    the model's (abstract) parameters if at hand, else traced from the config."""
    if params is None:
        params = abstract_params(build_model(config), config)
    m = config.model
    lengths = sequence_lengths(config)
    encoder_decoder = m.get("arch", "decoder") == "encoder_decoder"
    E, k = routed_expert_share(m)
    share = k / E if E else 1.0
    total = 0.0
    for path, leaf in traverse_util.flatten_dict(params).items():
        size = math.prod(leaf.shape)
        if path[-1] == "embedding" and not m.get("tie_embeddings", True):
            continue  # an untied input table is a lookup
        if is_routed_expert_param(path):
            size *= share
        if path[-1] == "embedding" or path[0] == "logits":
            size *= 1 + m.get("mtp_depth", 0)  # the output head serves every MTP depth too
        stack = "encoder" if encoder_decoder and str(path[0]).startswith("encoder") else "decoder"
        total += 6 * size * lengths[stack]
    return total + _attention_flops(config)


class StepWindow:
    """The StepHook (training/seams.py) of the profiler window and the FLOPs counters."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, log, params: Any = None):
        self.window = parse_window(config.get("profile_steps", ""))
        self.directory = os.path.join(workdir, "profile")
        self.log = log
        self.tracing = False
        self.flops_per_step = model_flops_per_example(config, params) * config.batch_size
        self.tokens_per_step = config.batch_size * config.data.seq_len
        device = jax.devices()[0]
        bf16 = config.model.get("dtype", "float32") == "bfloat16"
        peak = peak_flops(device.device_kind) if bf16 else None
        self.peak = None if peak is None else peak * jax.device_count()

    @classmethod
    def for_config(cls, config, workdir, log, params=None) -> "StepWindow":
        return cls(config, workdir, log, params)

    def before(self, step: int) -> None:
        """Before step `step` (1-based) is dispatched."""
        if self.window and step == self.window[0] and not self.tracing:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.tracing = True
            last = self.window[0] + self.window[1] - 1
            self.log(f"profiling steps {step}-{last} into {self.directory}")

    def after(self, step: int, pending: Any) -> None:
        """After step `step` was dispatched; `pending` is what it computes (waited on)."""
        if self.tracing and step == self.window[0] + self.window[1] - 1:
            self.close(pending)

    def close(self, pending: Any = None) -> None:
        """Stops a running trace (the window's end, or a run that stops inside it)."""
        if self.tracing:
            if pending is not None:
                jax.block_until_ready(pending)
            jax.profiler.stop_trace()
            self.tracing = False
            self.log(f"profile written to {self.directory}")

    def metrics(self, tokens_per_second: float) -> dict[str, float]:
        """Model FLOP/s at this throughput, and MFU where the device's peak is known."""
        flops = self.flops_per_step * tokens_per_second / self.tokens_per_step
        out = {"train/model_flops_per_second": flops}
        if self.peak:
            out["train/mfu"] = flops / self.peak
        return out
