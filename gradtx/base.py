"""The protocol: a gradient transformation is a pair of pure functions, composed with `chain`.

A `Transformation` is structurally the same as optax's ``GradientTransformation`` (a NamedTuple of
``init`` and ``update``), so gradtx and optax transformations can be used in place of each other:
in ``flax.nnx.Optimizer``, in Flax's ``TrainState``, and inside each other's ``chain``.

Step counting. `chain` owns the step counter of an optimizer: an int32 that counts the updates done so
far and saturates at 2**31 - 1 instead of overflowing. It hands the count to its members as the extra
keyword argument ``step`` (0 on the first update), which is what bias corrections and schedules read.
A chain nested in another chain uses the step it is given, so the outermost chain is the clock.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
Updates = Any
State = Any
Schedule = Callable[[jax.Array], jax.Array]  # step -> value, with step = updates done so far (int32)

MAX_STEP = int(jnp.iinfo(jnp.int32).max)


class Transformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None, **extra) -> (updates, state)``."""

    init: Callable[[Params], State]
    update: Callable[..., tuple[Updates, State]]


class EmptyState(NamedTuple):
    """The state of a transformation that keeps nothing."""


class ChainState(NamedTuple):
    step: jax.Array  # int32: updates done so far, saturating at MAX_STEP
    inner: tuple  # the members' states, in order


def identity() -> Transformation:
    """Leaves the updates as they are: ``u <- u``."""
    return Transformation(
        lambda params: EmptyState(), lambda updates, state, params=None, **extra: (updates, state)
    )


def accepts_extra(update: Callable) -> bool:
    # A plain optax GradientTransformation takes no extra keyword arguments; ours and optax's
    # GradientTransformationExtraArgs take **extra.
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def next_step(step: jax.Array) -> jax.Array:
    """``step + 1``, saturating at the largest int32 instead of wrapping to a negative count."""
    return jnp.where(step < MAX_STEP, step + 1, step)


def chain(*transforms: Transformation) -> Transformation:
    """Applies ``transforms`` one after the other, and counts the steps (see the module docstring).

    Extra keyword arguments of ``update`` (``step``, ``value``, ...) reach every member that accepts
    ``**extra``. ``step=`` overrides the chain's own count, as an enclosing chain does.
    """
    extra_ok = [accepts_extra(t.update) for t in transforms]

    def init(params):
        return ChainState(jnp.zeros([], jnp.int32), tuple(t.init(params) for t in transforms))

    def update(updates, state, params=None, **extra):
        step = extra.pop("step", state.step)
        if params is not None:
            updates = _floating_like_params(updates, params)
        inner = []
        for t, s, takes_extra in zip(transforms, state.inner, extra_ok, strict=True):
            kwargs = {**extra, "step": step} if takes_extra else {}
            updates, s = t.update(updates, s, params, **kwargs)
            inner.append(s)
        return updates, ChainState(next_step(jnp.asarray(step, jnp.int32)), tuple(inner))

    return Transformation(init, update)


def _floating_like_params(updates: Updates, params: Params) -> Updates:
    """Integer updates of floating params (a hand-made gradient) in the params' dtype, so that they are
    transformed like any gradient instead of passing through (and being added) unscaled. Integer params
    keep their integer (or float0) updates, which pass through."""
    flat_u, treedef = jax.tree.flatten(updates)
    try:
        flat_p = treedef.flatten_up_to(params)
    except (ValueError, TypeError):
        return updates  # mismatched trees: the members' own checks name the difference
    cast = [
        u.astype(jnp.result_type(p)) if _is_integer(u) and is_float(p) else u
        for u, p in zip(flat_u, flat_p, strict=True)
    ]
    return treedef.unflatten(cast)


def step_count(state: State) -> jax.Array:
    """The number of updates an optimizer has made: the count of the outermost `chain` in ``state``."""
    for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ChainState)):
        if isinstance(node, ChainState):
            return node.step
    raise ValueError("step_count: the state holds no gradtx chain, so there is no step counter to read")


def is_float(x: Any) -> bool:
    """Whether a leaf is transformed: floating and complex arrays are; integer, bool and float0 leaves
    pass through. (Complex leaves follow optax's convention: the update of ``z`` is computed from the
    conjugate of ``jax.grad``'s output, which `gradtx.fit` passes; second moments use ``|g|^2``.)"""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def real_dtype(dtype: Any) -> Any:
    """The real counterpart of a floating or complex dtype (``complex64 -> float32``)."""
    return jnp.finfo(dtype).dtype


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2``: ``x*x`` for real ``x``, ``re^2 + im^2`` (real) for complex ``x``."""
    return jnp.square(x.real) + jnp.square(x.imag) if jnp.iscomplexobj(x) else jnp.square(x)


def zeros_like_state(p: Any, dtype: Any = None, real: bool = False) -> jax.Array:
    """An accumulator for leaf ``p``: at least float32, so bf16 params do not get bf16 moments
    (unless ``dtype`` asks for a given floating dtype, e.g. a reduced-precision first moment);
    ``real`` gives a complex leaf a real accumulator (a second moment ``|g|^2``).

    It has ``p``'s sharding (also inside ``jit`` under a mesh with explicit axes) and is committed to
    a device only if ``p`` is: a state built from uncommitted params would otherwise differ from the
    params in the eyes of ``jax.jit``, and a jitted step would compile twice.
    """
    if not is_float(p):
        return jnp.zeros([], jnp.float32)  # a placeholder: non-float leaves are never updated
    dtype = jnp.promote_types(jnp.result_type(p), jnp.float32) if dtype is None else dtype
    return jnp.zeros_like(p, dtype=real_dtype(dtype) if real else dtype)


def _mismatch(owner: str, updates: Any, reference: Any) -> ValueError:
    paths_u = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(updates)[0]}
    paths_r = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(reference)[0]}
    only_u, only_r = sorted(paths_u - paths_r), sorted(paths_r - paths_u)
    if only_u or only_r:
        detail = f"paths only in the updates: {only_u or 'none'}; only in the state: {only_r or 'none'}"
    else:
        detail = (
            f"the paths agree but the containers differ: {jax.tree.structure(updates)} "
            f"vs {jax.tree.structure(reference)}"
        )
    return ValueError(f"{owner}: the updates' tree does not match the params it was built for: {detail}")


def leafwise(owner: str, fn: Callable[..., tuple], updates: Updates, *trees: Any) -> tuple:
    """Maps ``fn(u, *s) -> (u', *s')`` over the floating leaves of ``updates`` and the matching leaves of
    ``trees`` (state trees that mirror the params). Other leaves pass through unchanged.

    Returns ``(updates', *trees')``. The tree structures and the leaf shapes are checked first, so a
    gradient tree that does not match the state fails with the path that differs instead of
    broadcasting silently.
    """
    flat_u, treedef = jax.tree.flatten(updates)
    flat_trees = []
    for tree in trees:
        if jax.tree.structure(tree) != treedef:
            raise _mismatch(owner, updates, tree)
        flat_trees.append(treedef.flatten_up_to(tree))
    if not flat_u:
        return (updates, *trees)
    outs = []
    for i, (u, *ss) in enumerate(zip(flat_u, *flat_trees, strict=True)):
        if not is_float(u):
            outs.append((u, *ss))
            continue
        for s in ss:
            if jnp.shape(s) != jnp.shape(u):
                path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(updates)[0][i][0])
                raise ValueError(
                    f"{owner}: the update at {path} has shape {jnp.shape(u)} but its state has shape "
                    f"{jnp.shape(s)}"
                )
        outs.append(fn(u, *ss))
    return tuple(treedef.unflatten(list(column)) for column in zip(*outs, strict=True))


def _is_integer(x: Any) -> bool:
    return x is not None and jnp.issubdtype(jnp.result_type(x), jnp.integer)


def apply_updates(params: Params, updates: Updates) -> Params:
    """``theta <- theta + u`` for every floating (or complex) leaf, keeping each leaf's dtype.

    Non-floating leaves (integers, bools) and leaves whose update is ``None`` are returned untouched.
    """

    def apply(p, u):
        if u is None or p is None or not is_float(p):
            return p
        return (p + u).astype(jnp.result_type(p))

    return jax.tree.map(apply, params, updates, is_leaf=lambda x: x is None)
