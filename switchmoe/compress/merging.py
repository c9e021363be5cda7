"""Expert merging: a trained MoE layer of E experts made into one of E' < E experts.

Shape legend: E experts, E' merged experts, n = E/E' experts per group, D model width, F expert
hidden width, N routed tokens (the statistics' sample), K choices per token.

All experts sit in memory though each token uses K of them; merging groups of similar experts
trades some quality for E/E' times fewer expert parameters (the "aggregation of experts" the
Switch paper's closing section points to). Per MoE layer, independently:

1. **Groups.** The E experts are split into E' groups of n, greedily: the most used expert not
   yet placed opens a group and takes the n − 1 unplaced experts most similar to it. Similarity
   is either `router`: cosine of the experts' router columns W_r[:, i] (the input directions
   that select them), or `usage`: the correlation over tokens of their router probabilities
   p_i(x) (experts the router treats alike on real data).
2. **Alignment** (`align=True`). Hidden units of independently trained experts are not in
   corresponding order, so averaging them unit by unit mixes unrelated features. Each member's
   units are permuted to match the group's most used member (a linear assignment over the
   cosine similarity of the units' weights [w_in[:, f], w_gate[:, f], w_out[f, :]]), which
   leaves each member's function unchanged.
3. **Average.** The merged expert's matrices and router column are the members' weighted mean,
   weights ω_i ∝ tokens first routed to i (`weighting='usage'`, +1 each so that an unused expert
   still counts) or equal (`'uniform'`). A selection bias (auxiliary-loss-free balancing) is
   averaged the same way.
4. **Output scale** (`rescale=True`). Merged routing gives a group the probability of all its
   members, P_g = Σ_{i∈g} p_i, where the original gave the chosen member alone (raw gates). The
   merged expert's w_out is multiplied by c_g = Σ_x W_g(x) / Σ_x W'_g(x) over the sample, W_g
   being the gate weight the original layer gave group g's members for token x (before
   capacity) and W'_g the weight the merged gate rule gives P_g. For groups of identical
   experts with identical router columns c_g is exactly 1/n under raw gates and 1 under
   normalised top-1 gates, so such a merge changes no logit; in general it keeps each group's
   mean output scale.

K becomes min(K, E'); capacity factors stay (each merged expert gets n times the slots). Token
choice over a softmax (`router='top_k'`, granularity 1) only; other routers are refused.

    from switchmoe.compress import merging
    stats = merging.routing_statistics("runs/demo")                     # train-split tokens
    config2, params2, report = merging.merge_experts(config, params, 16, stats)
    merging.merge_run("runs/demo", "runs/demo_e16", 16)                  # a runnable workdir
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from scipy.optimize import linear_sum_assignment

from switchmoe import runs
from switchmoe.analysis.evaluation import load_run
from switchmoe.analysis.routing_capture import capture_routing
from switchmoe.moe import balancing
from switchmoe.moe.experts import EXPERT_MATRICES

SIMILARITIES = ("router", "usage")
WEIGHTINGS = ("usage", "uniform")


@dataclasses.dataclass
class RoutingStatistics:
    """Router probabilities of a sample of tokens, per MoE layer: {layer name: float32[N, E]}."""

    probs: dict[str, np.ndarray]


def routing_statistics(
    run: Any, num_batches: int = 8, split: Optional[str] = None, step: Optional[int] = None
) -> RoutingStatistics:
    """The router probabilities of `num_batches` batches of `split` (default: the run's training
    split, so that the statistics are not drawn from the data a merged model is evaluated on)."""
    config, params = load_run(run, step)
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.eval_split = split or config.data.train_split
    capture = capture_routing((config, params), num_batches=num_batches)
    E = capture.num_experts
    return RoutingStatistics(
        {name: capture.probs[i].reshape(-1, E) for i, name in enumerate(capture.layers)}
    )


def _check_mergeable(config: ml_collections.ConfigDict, num_experts: int) -> None:
    moe = config.model.moe
    E = moe.num_experts
    if not E:
        raise ValueError("model.moe.num_experts is 0: a dense model has no experts to merge.")
    if moe.router != "top_k" or moe.get("score_function", "softmax") != "softmax":
        raise ValueError(
            "expert merging needs token choice over a softmax (model.moe.router='top_k', "
            f"score_function='softmax'); got router={moe.router!r}, "
            f"score_function={moe.get('score_function')!r}."
        )
    if moe.get("block_routers") is not None:
        raise ValueError(
            "expert merging needs one router for every MoE block; got model.moe.block_routers="
            f"{tuple(moe.block_routers)} (allowed: None)."
        )
    if moe.get("granularity", 1) != 1:
        raise ValueError(f"expert merging needs model.moe.granularity=1; got {moe.granularity}.")
    if moe.get("expert_quantization", "none") != "none":
        raise ValueError("merge float experts, then quantize (model.moe.expert_quantization).")
    allowed = [d for d in range(1, E) if E % d == 0]
    if num_experts not in allowed:
        raise ValueError(
            f"num_experts={num_experts!r}: merged experts come in equal groups, so E' must "
            f"divide model.moe.num_experts={E} and be smaller; allowed: {allowed}."
        )


def _cosine(a: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of a[R, X] -> [R, R]."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return a @ a.T


def _first_choice_counts(probs: np.ndarray) -> np.ndarray:
    """int[E]: tokens whose first choice is each expert (top-1 of the probabilities)."""
    return np.bincount(np.argmax(probs, axis=1), minlength=probs.shape[1])


def group_experts(similarity: np.ndarray, usage: np.ndarray, num_groups: int) -> list[list[int]]:
    """E experts into `num_groups` groups of E/num_groups: the most used unplaced expert opens a
    group and takes the most similar unplaced experts (ties: lower index). Members in order of
    usage, most used first."""
    E = similarity.shape[0]
    n = E // num_groups
    free = list(range(E))
    by_usage = sorted(range(E), key=lambda i: (-usage[i], i))
    groups = []
    for seed in by_usage:
        if seed not in free:
            continue
        free.remove(seed)
        nearest = sorted(free, key=lambda j: (-similarity[seed, j], j))[: n - 1]
        for j in nearest:
            free.remove(j)
        groups.append([seed] + sorted(nearest, key=lambda j: (-usage[j], j)))
    return groups


def _align(reference: dict[str, np.ndarray], member: dict[str, np.ndarray]) -> dict:
    """`member`'s matrices with its hidden units permuted to best match `reference`'s."""
    features = lambda m: np.concatenate(
        [m["w_in"].T] + ([m["w_gate"].T] if "w_gate" in m else []) + [m["w_out"]], axis=1
    )  # [F, 2D or 3D]
    a, b = features(reference), features(member)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    _, perm = linear_sum_assignment(-(a @ b.T))  # reference unit f <- member unit perm[f]
    out = {"w_in": member["w_in"][:, perm], "w_out": member["w_out"][perm]}
    if "w_gate" in member:
        out["w_gate"] = member["w_gate"][:, perm]
    return out


def _gates(probs: np.ndarray, K: int, gate_norm: str) -> np.ndarray:
    """float[N, E]: each expert's gate weight for each token under top-K (0 if not chosen),
    before capacity: the router probability (raw) or it normalised over the K chosen."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :K]
    chosen = np.take_along_axis(probs, top, axis=1)
    if gate_norm == "normalized":
        chosen = chosen / np.sum(chosen, axis=1, keepdims=True)
    gates = np.zeros_like(probs)
    np.put_along_axis(gates, top, chosen, axis=1)
    return gates


def output_scales(
    probs: np.ndarray, groups: list[list[int]], K: int, K_merged: int, gate_norm: str
) -> np.ndarray:
    """c_g = Σ_x W_g(x) / Σ_x W'_g(x) per group (module docstring, step 4); 1 where unused."""
    member_gates = _gates(probs, K, gate_norm)  # [N, E]
    W = np.stack([member_gates[:, g].sum(axis=1) for g in groups], axis=1)  # [N, E']
    P = np.stack([probs[:, g].sum(axis=1) for g in groups], axis=1)  # [N, E']
    W_merged = _gates(P, K_merged, gate_norm)
    num, den = W.sum(axis=0), W_merged.sum(axis=0)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)


def merge_experts(
    config: ml_collections.ConfigDict,
    params: Any,
    num_experts: int,
    statistics: RoutingStatistics,
    *,
    similarity: str = "usage",
    weighting: str = "usage",
    align: bool = True,
    rescale: bool = True,
) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """(config, params, report) of the model with every MoE layer merged to `num_experts`.

    `statistics` (routing_statistics) gives each layer's usage, the `usage` similarity and the
    output scales. The report holds, per layer, the groups and scales chosen."""
    _check_mergeable(config, num_experts)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}.")
    moe = config.model.moe
    E, K = moe.num_experts, moe.num_selected
    K_merged = min(K, num_experts)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}
    layers = sorted({k[: k.index("moe") + 1] for k in flat if "moe" in k})
    report: dict[str, Any] = {"num_experts": num_experts, "num_selected": K_merged, "layers": {}}
    for layer in layers:
        name = "/".join(layer[:-1])  # 'block_1': the name capture_routing gives the layer
        probs = statistics.probs.get(name)
        if probs is None:
            raise ValueError(f"the statistics hold no routing for MoE layer {name!r}.")
        if probs.shape[1] != E:
            raise ValueError(f"statistics of {name!r} have {probs.shape[1]} experts, not {E}.")
        kernel = flat[layer + ("router_kernel",)]  # [D, E]
        usage = _first_choice_counts(probs).astype(np.float64)
        if similarity == "router":
            sim = _cosine(kernel.T)
        else:
            centred = probs - probs.mean(axis=0)
            sim = _cosine(centred.T)
        groups = group_experts(sim, usage, num_experts)
        scales = output_scales(probs, groups, K, K_merged, moe.gate_norm) if rescale else None
        matrices = [m for m in EXPERT_MATRICES if layer + (m,) in flat]
        merged = {m: [] for m in matrices}
        columns, biases = [], []
        selection = flat.get(layer + (balancing.BIAS,))
        for g, members in enumerate(groups):
            omega = usage[members] + 1.0 if weighting == "usage" else np.ones(len(members))
            omega = omega / omega.sum()
            expert = lambda i: {m: flat[layer + (m,)][i] for m in matrices}
            reference = expert(members[0])
            parts = [reference] + [
                _align(reference, expert(i)) if align else expert(i) for i in members[1:]
            ]
            for m in matrices:
                avg = sum(w * p[m] for w, p in zip(omega, parts))
                if m == "w_out" and scales is not None:
                    avg = avg * scales[g]
                merged[m].append(avg.astype(flat[layer + (m,)].dtype))
            columns.append(kernel[:, members] @ omega)
            if selection is not None:
                biases.append(float(selection[members] @ omega))
        for m in matrices:
            flat[layer + (m,)] = np.stack(merged[m])
        flat[layer + ("router_kernel",)] = np.stack(columns, axis=1).astype(kernel.dtype)
        bias_key = layer + ("router_bias",)
        if bias_key in flat:
            old = flat[bias_key]
            flat[bias_key] = np.array([old[members].mean() for members in groups], old.dtype)
        if selection is not None:
            flat[layer + (balancing.BIAS,)] = np.asarray(biases, selection.dtype)
        report["layers"][name] = {
            "groups": groups,
            "scales": None if scales is None else [float(s) for s in scales],
        }
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.moe.num_experts = num_experts
    config.model.moe.num_selected = K_merged
    return config, traverse_util.unflatten_dict(flat), report


def merge_run(
    source: str,
    target: str,
    num_experts: int,
    *,
    step: Optional[int] = None,
    num_batches: int = 8,
    **options,
) -> dict:
    """Merges `source`'s run (checkpoint `step`, default the newest intact) to `num_experts`
    per MoE layer and writes it as a new workdir `target` (runs.write_run); returns the report.
    The statistics come from `num_batches` batches of the run's training split; `options` go to
    `merge_experts`."""
    config, params, restored = runs.restore_run_at(source, step)
    _check_mergeable(config, num_experts)
    stats = routing_statistics((config, params), num_batches=num_batches)
    config, params, report = merge_experts(config, params, num_experts, stats, **options)
    runs.write_run(
        target, config, params, step=restored,
        derived_from={"source": source, "step": restored, "method": "expert merging",
                      "num_batches": num_batches, **options, **report},
    )  # fmt: skip
    return report
