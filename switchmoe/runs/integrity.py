"""Checksums of the arrays a checkpoint holds, and the checks a restored tree must pass.

Every save records, in the step's metadata, two 32-bit checksums of every array it writes
(computed on the devices: one small transfer per save); every restore recomputes them from what
it read. Orbax finalises a step atomically (the items, the metadata among them, appear together or
not at all), so a step either carries its checksums or is not listed. A checksum mismatch, an
array that cannot be read, a non-finite value or a shape other than the config's marks the step
damaged (`DamagedCheckpoint`, naming the step, the item and what is wrong); the trainer then falls
back to the newest intact step, and `restore_run` warns and does the same.

The checksums are Fletcher-like sums over the array's bits read as unsigned integers, modulo 2³²:
Σ u_i and Σ (i + 1)·u_i. Integer addition modulo 2³² is associative, so they do not depend on how
XLA orders the reduction or splits it over devices; one flipped bit changes the first sum, and
swapped values change the second.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


class DamagedCheckpoint(Exception):
    """A checkpoint step that cannot be trusted: `step`, `item` ('params', 'opt_state', ...) and
    what is wrong."""

    def __init__(self, step: int, item: str, problem: str):
        super().__init__(f"checkpoint {step} is damaged: {item}: {problem}")
        self.step, self.item, self.problem = step, item, problem


def _as_uint32(x: jax.Array) -> jax.Array:
    bits = jnp.dtype(x.dtype).itemsize * 8
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if bits == 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if bits == 16:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if bits == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"no checksum for dtype {x.dtype}")


@jax.jit
def _checksums(leaves):
    out = []
    for x in leaves:
        u = _as_uint32(jnp.asarray(x)).reshape(-1)
        weights = jnp.arange(1, u.size + 1, dtype=jnp.uint32)
        out.append(
            jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weights, dtype=jnp.uint32)])
        )
    return out


def checksums(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of every array leaf of `tree` (JSON-ready)."""
    paths_leaves = [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(leaf, "dtype")
    ]
    if not paths_leaves:
        return {}
    sums = jax.device_get(_checksums([leaf for _, leaf in paths_leaves]))
    return {path: [int(s[0]), int(s[1])] for (path, _), s in zip(paths_leaves, sums)}


def verify(
    step: int, item: str, tree: Any, expected: Optional[dict], shapes: Optional[Any] = None
) -> None:
    """Raises DamagedCheckpoint when `tree` (restored `item` of `step`) differs from its saved
    checksums `expected` (None: a checkpoint written before checksums, not checked), holds a
    non-finite float, or has shapes other than `shapes` (a tree of ShapeDtypeStructs)."""
    if shapes is not None:
        got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
        want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), shapes)
        if got != want:
            raise DamagedCheckpoint(step, item, "shapes or dtypes differ from the config's")
    if expected is not None:
        actual = checksums(tree)
        if set(actual) != set(expected):
            raise DamagedCheckpoint(step, item, "the arrays differ from those saved")
        for path, sums in actual.items():
            if list(expected[path]) != sums:
                raise DamagedCheckpoint(
                    step, item, f"{path} does not match its checksum (the data were altered)"
                )
    bad = first_non_finite(tree)
    if bad is not None:
        raise DamagedCheckpoint(step, item, f"{bad} holds NaN or infinite values")


@jax.jit
def _finite_leaves(leaves):
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def first_non_finite(tree: Any) -> Optional[str]:
    """The path of the first floating-point leaf of `tree` holding a NaN or an infinity, or None.

    One reduction per leaf on the devices and one small transfer: cheap enough for every save.
    """
    pairs = [
        (jax.tree_util.keystr(path), x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not pairs:
        return None
    finite = jax.device_get(_finite_leaves([x for _, x in pairs]))
    return next((p for (p, _), ok in zip(pairs, finite) if not np.all(ok)), None)
