"""Muon for switchmoe's parameters: orthogonalised momentum on the network's matrices, one expert
at a time, and AdamW on everything else (`optimizer.name='muon'`).

Muon (Jordan et al. 2024; at scale, Liu et al. 2025, arXiv 2502.16982) replaces a matrix's
update by an approximately orthogonal one: the Nesterov momentum M of its gradients, scaled to
unit Frobenius norm, goes through five steps of the quintic Newton–Schulz iteration
X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ, (a, b, c) = (3.4445, −4.7750, 2.0315), which pushes every
singular value of M towards 1 while keeping its singular vectors. optax.contrib.scale_by_muon
does the momentum and the iteration; this module decides what a "matrix" is for each parameter,
and which parameters are not Muon's at all.

Which axes form the matrix, read from a parameter's logical axis names (the names sharding.py
places it by; shape legend E experts, D model width, F hidden width, H heads, Dh head width):

  expert stacks   w_in/w_gate [E, D, F], w_out [E, F, D]: `expert` is a batch axis, so each
                  expert's [D, F] matrix is orthogonalised on its own. Orthogonalising the
                  flattened [E·D, F] stack instead would make one expert's update depend on the
                  gradients of experts that never saw the same tokens (and on E).
  into the stream a kernel whose last axis is `embed` (attention out [H, Dh, D], a dense or shared
                  expert's w_out [F, D]) reduces over all its other axes: the matrix is
                  [H·Dh, D] or [F, D].
  out of it       any other kernel (query/key/value [D, H, Dh], w_in [D, F], latent
                  attention's down- and up-projections) reduces over its first axis and outputs
                  the rest: [D, H·Dh], [D, F].
  not Muon's      a parameter with a `vocab` axis (the embedding, an untied output head), with
                  an unnamed axis (the router [D, E], T5's relative-position table [H, buckets]),
                  with fewer than two axes (norm scales, biases) or without axis names: AdamW,
                  the same transformation `optimizer.name='adamw'` applies (optim._adamw), as in
                  every Muon recipe. The routers stay on AdamW on purpose: their E columns are
                  not a linear map whose conditioning matters, and orthogonalising them would
                  give every expert an update of the same size whatever its gradient.

Update scale: Muon's update of an m×n matrix has RMS about 1/sqrt(max(m, n)); it is multiplied by
`optimizer.muon_rms`·sqrt(max(m, n)) (Liu et al.: 0.2, the RMS of a typical AdamW update), so the
AdamW learning rate and weight decay carry over unchanged and one `optimizer.learning_rate`
serves both partitions. Weight decay is decoupled and, like optax.adamw's, multiplied by the
learning rate.

Sharding: Muon's state is one momentum per parameter, of the parameter's shape, so
sharding.optimizer_state_shardings places it like the parameter (experts split over `expert`).
The Newton–Schulz iteration contracts over D and F only, never over E, so an expert-sharded
stack is orthogonalised where it lives; a parameter split over `model` is gathered by the
partitioner for the contraction (correct; a cost only with mesh.model > 1).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import ml_collections
import optax
from flax import traverse_util
from optax.contrib import MuonDimensionNumbers

from switchmoe.models import build_model, dummy_inputs, resolve
from switchmoe.sharding import path_keys

MUON, ADAMW = "muon", "adamw"  # the two partitions


def matrix_axes(names: Optional[tuple]) -> Optional[MuonDimensionNumbers]:
    """How a parameter with these logical axis names is orthogonalised (module docstring): its
    reduction and output axes (the rest are batch axes, e.g. `expert`), or None for AdamW."""
    if not names or None in names or "vocab" in names:
        return None
    matrix = [i for i, name in enumerate(names) if name != "expert"]
    if len(matrix) < 2:
        return None
    if names[matrix[-1]] == "embed":  # a projection back into the residual stream
        return MuonDimensionNumbers(reduction_axis=tuple(matrix[:-1]), output_axis=matrix[-1])
    return MuonDimensionNumbers(reduction_axis=matrix[0], output_axis=tuple(matrix[1:]))


def parameter_axes(
    config: ml_collections.ConfigDict, boxed: Any = None
) -> dict[tuple, Optional[tuple]]:
    """{parameter path: its logical axis names (None where it has none)} of `config`'s model.

    boxed: the model's partitioned (abstract) parameter tree where the caller has traced it
    already (the trainer does, for the shardings); otherwise traced here from an abstract init
    (nothing allocated)."""
    if boxed is None:
        config = resolve(config)
        model = build_model(config)
        init = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
        boxed = init["params"]
    flat = traverse_util.flatten_dict(boxed)
    return {path: getattr(leaf, "names", None) for path, leaf in flat.items()}


def _per_leaf(tree: Any, fn) -> Any:
    # Over a tree that may hold optax.MaskedNode (another partition's leaves): those have no
    # leaves of their own, so they stay where they are and the structures keep matching.
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_keys(path)), tree)


def _scale_by_rms_match(dimension_numbers, rms: float) -> optax.GradientTransformation:
    """Multiplies each orthogonalised update by rms·sqrt(max(fan_in, fan_out)) (Liu et al.).

    optax.contrib.muon applies the same factor (its `consistent_rms`) through
    `optax.contrib._muon.scale_by_shape`, which optax does not export: these lines are the
    formula itself rather than an import from a private module that may move between releases.
    (optax's `muon` wrapper is not used: it pairs Muon with its own Adam, where the other
    parameters must get exactly the project's AdamW, masks and decay included.)"""

    def update_fn(updates, state, params=None):
        del params
        dims = dimension_numbers(updates)

        def scale(update, dim):
            fans = [
                math.prod(update.shape[a] for a in ((axes,) if isinstance(axes, int) else axes))
                for axes in (dim.reduction_axis, dim.output_axis)
            ]
            return update * (rms * max(fans) ** 0.5)

        is_dim = lambda x: isinstance(x, MuonDimensionNumbers)  # noqa: E731
        return jax.tree.map(scale, updates, dims, is_leaf=is_dim), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(
    opt: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    axes: dict[tuple, Optional[tuple]],
    adamw: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """Muon on the matrices `axes` names (module docstring), `adamw` on the rest.

    opt: the `optimizer` block (muon_beta, muon_ns_steps, muon_rms, weight_decay);
    schedule: the learning rate; axes: `parameter_axes` of the model; adamw: the transformation
    of the other parameters (the project's AdamW of the same block)."""
    dims_of = {path: matrix_axes(names) for path, names in axes.items()}

    def label(path: tuple) -> str:
        if path not in dims_of:
            raise ValueError(
                f"optimizer.name='muon': parameter {'/'.join(map(str, path))} is not in the "
                "model the optimizer was built for"
            )
        return ADAMW if dims_of[path] is None else MUON

    def dimension_numbers(tree):
        return _per_leaf(tree, lambda path: dims_of[path])

    matrices = optax.chain(
        optax.contrib.scale_by_muon(
            ns_steps=opt.muon_ns_steps,
            beta=opt.muon_beta,
            nesterov=True,
            weight_dimension_numbers=dimension_numbers,
        ),
        _scale_by_rms_match(dimension_numbers, opt.muon_rms),
        optax.add_decayed_weights(opt.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    return optax.partition({MUON: matrices, ADAMW: adamw}, lambda params: _per_leaf(params, label))


def muon_parameters(axes: dict[tuple, Optional[tuple]]) -> list[str]:
    """The '/'-joined paths Muon updates (the rest are AdamW's), for logs and tests."""
    return ["/".join(map(str, p)) for p, names in axes.items() if matrix_axes(names) is not None]
