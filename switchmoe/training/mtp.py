"""The multi-token prediction term of the training objective (the modules: models/mtp.py).

Shape legend: K depth (`model.mtp_depth`), B batch, L sequence length, V vocabulary.

Depth k's logits at position i predict the label k places after position i's own: targets[i + k]
(a window's targets are its inputs moved one place), scored with weights[i + k]; the last k
positions have none and are not scored. As in DeepSeek-V3 (§2.2, eqs. 24-25), each depth's
summed cross-entropy is divided by the main tokens' count T, and the K depths are averaged with
the weight λ (`model.mtp_loss_weight`; DeepSeek-V3: 0.3, later 0.1):
  L_MTP = (λ / K) Σ_k (1/T) Σ_i w_{i+k} · CE(logits^k_i, t_{i+k}),     T = Σ_i w_i,
and the step minimises L_main + L_MTP (+ the MoE losses). Under gradient accumulation the sums
are the whole batch's, like the main loss's. train/loss stays the main tokens' loss; each depth's
mean cross-entropy over its own scored tokens is logged as train/mtp_loss_<k>, their mean as
train/mtp_loss. Evaluation scores the main tokens only: the reported loss is the model's.

Plugs into the trainer as an objective term (seams.ObjectiveTerm): it adds to whatever the
objective is (the language model's, or distillation's) and reads the model's "mtp_logits".
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from switchmoe.models.mtp import ahead


def mtp_token_sums(mtp_logits, targets, weights) -> tuple[jax.Array, jax.Array]:
    """(Σ_i w_{i+k}·CE per depth [K], Σ_i w_{i+k} per depth [K]) of mtp_logits[K, B, L, V]."""
    ce, counts = [], []
    for k in range(1, mtp_logits.shape[0] + 1):
        t, w = ahead(targets, k), ahead(weights, k, 0)
        tokens = optax.softmax_cross_entropy_with_integer_labels(mtp_logits[k - 1], t)
        ce.append(jnp.sum(tokens * w))
        counts.append(jnp.sum(w))
    return jnp.stack(ce), jnp.stack(counts).astype(jnp.float32)


class MultiTokenPrediction:
    """The term (module docstring): `add` puts λ/K·Σ_k CE_k into the objective's sums."""

    aux_keys = ("mtp_logits",)  # what it reads from the model's aux (the trainer drops them)

    def __init__(self, depth: int, weight: float):
        self.depth, self.weight = depth, weight

    @classmethod
    def for_config(cls, config: ml_collections.ConfigDict) -> Optional["MultiTokenPrediction"]:
        depth = config.model.get("mtp_depth", 0)
        if not depth:
            return None
        return cls(depth, float(config.model.mtp_loss_weight))

    def add(self, sums: dict, aux: dict, rows: dict) -> dict:
        ce, counts = mtp_token_sums(aux["mtp_logits"], rows["targets"], rows["weights"])
        out = dict(sums)
        out["objective"] = sums["objective"] + self.weight / self.depth * jnp.sum(ce)
        out["mtp"], out["mtp_count"] = ce, counts
        return out

    def train_metrics(self, sums: dict, count) -> dict:
        per_depth = sums["mtp"] / jnp.maximum(sums["mtp_count"], 1.0)
        out = {"train/mtp_loss": jnp.mean(per_depth)}
        out.update({f"train/mtp_loss_{k + 1}": per_depth[k] for k in range(self.depth)})
        return out
