"""Grouped layout: small leaves of the same shape and dtype are stacked, so one op updates them all.

What XLA spends the time on. Compiling an optimizer step for a tree of many leaves, XLA's time goes
to (measured on CPU, 2,048 leaves, Adam): its HLO passes, about twenty ops per leaf, of which copy
insertion, layout assignment and fusion grow faster than linearly with the number of ops; and LLVM
code generation, one kernel per fused loop. Kernels whose fused computations are identical (same
shapes, same ops, same constants) are generated once and shared, which is why a trivial per-leaf
``p - lr*g`` compiles fast: all same-shaped leaves share one kernel.

The mechanism. A model with thousands of leaves has few distinct leaf shapes (every block of a
transformer repeats the same ones), so

    grouped(tx).update(g) == unstack(tx.update(stack(g)))

runs the inner transformation once per *group*: up to ``max_group_leaves`` leaves of shape ``s`` and
dtype ``d`` become one array of shape ``(k, *s)`` (the grouped layout, also the layout of the inner
state). What is left per leaf is one operand of a concatenate (the stacking) and one slice of the
result. A slice at a constant offset would make every leaf's kernel different (the offset is baked
into the code, and each distinct kernel costs LLVM tens of milliseconds), so the leaf is read with a
``dynamic_slice`` at a row that is *data*: the state keeps the row numbers ``0, 1, ...`` as int32
scalars, one tuple shared by all groups (a scalar per leaf would add thousands of arguments to the
compiled step, which cost copy insertion and layout assignment time). All the leaves of a group then
share one kernel, which XLA generates once. Groups are capped at ``max_group_leaves`` leaves because
LLVM's time for one concatenate grows faster than its number of operands (measured: 0.12, 0.24,
0.54, 1.33 s for the five groups of 256, 512, 1,024, 2,048 leaves), while equal-sized groups of one
shape share their kernels.

Numerics. The optimizers' rules are elementwise, so each element sees the float32 arithmetic of the
per-leaf mode; the results are the same bits except where XLA compiles a leaf's kernel differently
from the stacked one (seen: a scalar leaf under Nadam, 1 ulp). A transformation that looks at a
whole leaf (``max_norm``, ``unit_norm``, ``min_max_norm``, per-leaf ``magnitude_pruning``) would
see a group as one leaf, and routing by path or leaf (``masked``, ``partition``) would see the group
names, not the params' paths: put them around the grouped optimizer, ``chain(grouped(adam(lr)),
masked(max_norm(), weights_only))``, not inside ``grouped``.

Cost at run time. Stacking copies the gradients (and, for transformations that read them, the
params) once per step, and the per-leaf slices still run one kernel per leaf: on 2,048 small leaves
the step is slower than in the per-leaf mode (see the benchmark), and the stacked copies raise the
peak memory. Leaves larger than ``max_group_size``
elements are therefore left alone (a group of one is the leaf itself, as in the per-leaf mode):
large leaves are few, so they cost little compile time, and they are where bandwidth matters.

The grouping is decided by the shapes and dtypes of the leaves, which are static under ``jit``:
``update`` must receive updates with the dtypes of the params given to ``init`` (as ``jax.grad``
produces them). Leaves that are not floating point and ``None`` leaves pass through untouched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Params, State, Transformation, Updates, accepts_extra, is_float

GroupKey = str  # a group's name in the state, e.g. "float32[64,256]"


class GroupedState(NamedTuple):
    inner: State  # the inner state over {group key: stacked leaves (k, *shape), or a lone leaf}
    rows: tuple[jax.Array, ...]  # int32 scalars 0, 1, ..., k-1 for the largest group: a leaf's row


def group_indices(leaves: list[Any], max_group_size: int, max_group_leaves: int) -> dict[GroupKey, list[int]]:
    """The positions of the floating leaves by group, in order of first appearance. A leaf of more
    than ``max_group_size`` elements is a group of its own; the leaves of one shape and dtype are cut
    into groups of ``max_group_leaves`` (the last one holds the rest)."""
    by_shape: dict[GroupKey, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if leaf is None or not is_float(leaf):
            continue
        key = f"{jnp.result_type(leaf).name}[{','.join(map(str, jnp.shape(leaf)))}]"
        if jnp.size(leaf) > max_group_size:
            key = f"{key}#{i}"
        by_shape.setdefault(key, []).append(i)
    return {
        key if start == 0 else f"{key}@{start}": idx[start : start + max_group_leaves]
        for key, idx in by_shape.items()
        for start in range(0, len(idx), max_group_leaves)
    }


def _stack(leaves: list[Any], groups: dict[GroupKey, list[int]]) -> dict[GroupKey, jax.Array]:
    # A group of one is the leaf itself, unstacked: even a free reshape to (1, *shape) made XLA add a
    # copy of donated params (AdamW reads them). (Writing each leaf into its row with a
    # dynamic_update_slice, to share one kernel as the unstacking does, measured no faster to
    # compile than one concatenate per group.)
    return {
        key: leaves[idx[0]] if len(idx) == 1 else jnp.stack([leaves[i] for i in idx])
        for key, idx in groups.items()
    }


def _check_groups(groups: dict[GroupKey, list[int]], leaves: list[Any], state: GroupedState):
    """Each state array kept under a group's key must have that group's stacked shape: updates for
    another tree would otherwise fail deep inside ``tx`` or, worse, pair leaves with wrong rows."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.inner):
        for entry in path:
            idx = groups.get(getattr(entry, "key", None))
            if idx is None:
                continue
            shape = jnp.shape(leaves[idx[0]])
            expected = shape if len(idx) == 1 else (len(idx), *shape)
            if jnp.shape(leaf) != expected:
                raise ValueError(
                    f"grouped: the updates make group {entry.key} of shape {expected} but the state "
                    f"holds {jnp.shape(leaf)}; pass updates shaped like the params given to init"
                )
    largest = max(map(len, groups.values()), default=0)
    if largest > 1 and largest > len(state.rows):
        raise ValueError(
            f"grouped: the updates have a group of {largest} leaves but the state was built for at "
            f"most {len(state.rows)}; pass updates shaped like the params given to init"
        )


def grouped(tx: Transformation, max_group_size: int = 1 << 16, max_group_leaves: int = 64) -> Transformation:
    """``tx`` run on the grouped layout:  ``u <- unstack(tx.update(stack(g), stack(theta)))``,
    where ``stack`` puts up to ``max_group_leaves`` leaves of equal shape and dtype (each of at most
    ``max_group_size`` elements) into one array (see the module docstring for why this compiles fast).

    Same results as ``tx`` for elementwise rules (to rounding, mostly to the bit). The state is a
    `GroupedState` holding ``tx``'s state over the stacked leaves; `gradtx.hyperparams`,
    `gradtx.set_hyperparams` and `gradtx.step_count` read through it. Wrap the whole optimizer
    (``grouped(adam(1e-3))``), so that its step counter and hyperparameters stay scalars shared by
    all groups.
    """
    if max_group_size < 0:
        raise ValueError(f"grouped: max_group_size must be >= 0, got {max_group_size}")
    if max_group_leaves < 1:
        raise ValueError(f"grouped: max_group_leaves must be >= 1, got {max_group_leaves}")
    takes_extra = accepts_extra(tx.update)

    def init(params: Params) -> GroupedState:
        leaves = jax.tree.leaves(params)
        groups = group_indices(leaves, max_group_size, max_group_leaves)
        largest = max(map(len, groups.values()), default=0)
        rows = tuple(jnp.asarray(j, jnp.int32) for j in range(largest if largest > 1 else 0))
        return GroupedState(tx.init(_stack(leaves, groups)), rows)

    def update(updates: Updates, state: GroupedState, params: Params | None = None, **extra):
        flat, treedef = jax.tree.flatten(updates)
        groups = group_indices(flat, max_group_size, max_group_leaves)
        _check_groups(groups, flat, state)
        stacked_params = None
        if params is not None:
            stacked_params = _stack(treedef.flatten_up_to(params), groups)
        stacked, inner = tx.update(
            _stack(flat, groups), state.inner, stacked_params, **(extra if takes_extra else {})
        )
        out = list(flat)
        for key, idx in groups.items():
            if len(idx) == 1:
                out[idx[0]] = stacked[key]
                continue
            shape = jnp.shape(flat[idx[0]])
            # The row numbers' 0 (data) for the other dimensions, not a literal: jax would emit a
            # constant per leaf, thousands of ops for XLA to lower and deduplicate.
            zeros = (state.rows[0],) * len(shape)
            for row, i in zip(state.rows, idx, strict=False):
                # Positions are known to be in range: skipping jax's negative-index fix-up saves
                # three ops per leaf.
                part = jax.lax.dynamic_slice(
                    stacked[key], (row, *zeros), (1, *shape), allow_negative_indices=False
                )
                out[i] = part.reshape(shape)
        return treedef.unflatten(out), GroupedState(inner, state.rows)

    return Transformation(init, update)
