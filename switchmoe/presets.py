"""Accelerator presets: how a paper-sized config is laid out on a TPU slice or a GPU cluster.

A preset follows the variant after a comma: `--config=configs/switch_t5.py:base128,tpu_v5p_64`.
It sets, for its device count n:

  mesh        expert = gcd(E, n) (experts split as far as both allow: E/expert experts per
              device), data = n / expert, model = 1 (tensor parallelism pays off above
              Switch-Large's widths, which none of these configs reach); the expert axis is also a
              data axis for the dense layers, so every device holds distinct batch rows
  batch       256 sequences x 512 tokens (the configs' for_accelerators; T5's and Switch-Base's
              2^17 tokens per batch), which divides over up to 256 devices
  microbatch  grad_accum_steps so that a device runs at most 8 sequences at a time from d_model
              1024 up (32 below): Switch-Large and ST-MoE-L on 8 GPUs hold 32 sequences per
              GPU, which `experiments/fit.py` measured at 114 and 103 GiB per device in one pass
  precision   bfloat16 compute, float32 parameters and optimizer state
  remat       'dots' (keep matmul outputs, recompute the element-wise rest) from d_model 1024
              up; 'none' below, where activations are small beside the experts
  dispatch    TPU: the einsum backend (one-hot dispatch on the MXU, GShard's), ragged_dot for
              dropless (XLA:TPU lowers it to a grouped matmul); GPU: the gather backend, the
              blocked dropless implementation (public reports measure XLA:GPU's ragged_dot far
              below a grouped-GEMM kernel). These choices are assumed, not yet measured here:
              BENCHMARKS.md's GPU command settles them on the hardware
  data        C4 (c4/en:3.1.0) streamed with grain (data.pipeline='stream'), 16 worker
              processes per host; a SentencePiece vocabulary (give data.spm_model_path)

`experiments/fit.py` checks a preset before the hardware is rented (EXPERIMENTS.md, "Will it
fit?", has the numbers for each).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections


@dataclasses.dataclass(frozen=True)
class Platform:
    kind: str  # 'tpu' or 'gpu'
    devices: int  # chips (TPU) or GPUs in the whole job
    memory_gib: float  # HBM per device
    hosts: int

    def describe(self) -> str:
        return (
            f"{self.devices} {'TPU chips' if self.kind == 'tpu' else 'GPUs'} on {self.hosts} "
            f"host(s), {self.memory_gib:g} GiB each"
        )


# TPU slices are named by chips here (v5p-64 in Cloud TPU's naming counts TensorCores: 32 chips).
PRESETS = {
    "tpu_v4_32": Platform("tpu", 32, 32, 8),
    "tpu_v5p_32": Platform("tpu", 32, 95, 8),
    "tpu_v5p_64": Platform("tpu", 64, 95, 16),
    "gpu_8xh100": Platform("gpu", 8, 80, 1),
    "gpu_32xh100": Platform("gpu", 32, 80, 4),
}


def split_variant(variant: str | None, config_file: str) -> tuple[str | None, str | None]:
    """'base128,tpu_v5p_64' -> ('base128', 'tpu_v5p_64'); checks the preset's name."""
    if not variant or "," not in variant:
        return variant or None, None
    name, preset = variant.split(",", 1)
    if preset not in PRESETS:
        raise ValueError(
            f"{config_file}: unknown accelerator preset {preset!r}; allowed: {', '.join(PRESETS)}"
        )
    return name or None, preset


def apply_preset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Lays `config` out on the preset's devices (see the module docstring)."""
    platform = PRESETS[name]
    n = platform.devices
    moe = config.model.moe
    experts = moe.num_experts or 1
    config.mesh.expert = math.gcd(experts, n) if moe.num_experts else 1
    config.mesh.data = n // config.mesh.expert
    config.mesh.model = 1
    config.batch_size = 256
    config.data.seq_len = 512
    large = config.model.d_model >= 1024
    rows = config.batch_size // n  # sequences per device and step
    config.grad_accum_steps = max(1, rows // (8 if large else 32))
    config.model.dtype = "bfloat16"
    config.model.remat = "dots" if large else "none"
    if platform.kind == "tpu":
        moe.backend = "einsum"
        moe.dropless_implementation = "ragged_dot"
    else:
        moe.backend = "gather"
        moe.dropless_implementation = "blocked"
    config.data.dataset = "c4/en:3.1.0"
    config.data.pipeline = "stream"
    config.data.num_workers = 16
    config.data.prefetch = 4
    return config


def build(sized_config, variant: str | None, config_file: str) -> ml_collections.ConfigDict:
    """`sized_config(variant)` with the preset after the comma applied (a config file's
    get_config)."""
    name, preset = split_variant(variant, config_file)
    config = sized_config(name)
    return apply_preset(config, preset) if preset else config
