"""Kronecker-factored preconditioning: the matrix helpers that `gradtx.shampoo` and `gradtx.soap` share.

A gradient ``G`` of order ``k`` (a matrix: ``k = 2``) gets one statistic per axis ``i``, the contraction
of ``G`` with itself over every other axis (``G G^T`` and ``G^T G`` for a matrix), and is
preconditioned by mode products ``G x_1 M_1 x_2 M_2 ...`` (``M_1 G M_2^T`` for a matrix).

Layouts. `merged_shape` is the SOAP authors' dimension merging; `split_blocks` cuts every axis into
pieces of at most ``block_size`` (Shampoo's blocking, Anil et al. 2020; Shi et al. 2023) and stacks the
blocks of equal shape, so that one batched matmul serves all of them; `join_blocks` undoes it.

Matrix functions. Inverse roots (`inverse_root`) and eigenbases (`eigenbasis`, `refresh_eigenbasis`)
run in float32, one matrix at a time also under ``jax.vmap``: their batching rule (``custom_vmap``) maps
over the batch with ``lax.map`` instead of calling one batched decomposition. Measured with jaxlib 0.10.2
on 2 CPU cores: batched ``eigh``/``qr`` under ``vmap`` (a sweep of SOAP) hung intermittently, two
batched decompositions each holding a thread while waiting on the other; one matrix at a time did not.
A decomposition that fails (non-finite output) returns the previous matrix instead, so a preconditioner
that cannot be refreshed keeps its last value rather than turning the step into NaN.

Matrix products use ``Precision.HIGHEST``: on accelerators the default float32 matmul may round its
inputs to bfloat16 or TF32, too coarse for statistics whose eigenvalues span many decades.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

HIGHEST = lax.Precision.HIGHEST
Stack = jax.Array  # (blocks, *block_shape): blocks of one shape, stacked along axis 0


def one_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` of unbatched arrays whose ``jax.vmap`` is a ``lax.map``: one call per batch element (see the
    module docstring for why decompositions are never batched). No reverse-mode derivative."""

    @custom_vmap
    def single(*args):
        return fn(*args)

    @single.def_vmap
    def rule(axis_size, in_batched, *args):
        full = [
            a if b else jnp.broadcast_to(a, (axis_size, *jnp.shape(a)))
            for a, b in zip(args, in_batched, strict=True)
        ]
        out = lax.map(lambda xs: single(*xs), full)
        return out, jax.tree.map(lambda _: True, out)

    return single


def by_size(fn: Callable[..., Any], items: list[tuple[jax.Array, ...]], *shared: Any) -> list[Any]:
    """``[jax.vmap(fn)(*item, *shared) for item in items]`` with one vmapped call per distinct shape:
    the items (tuples of arrays with a leading batch axis) of equal shapes are concatenated first, so a
    model with many blocks of a few sizes compiles one loop per size."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(a.shape[1:] for a in item), []).append(i)
    out: list[Any] = [None] * len(items)
    for idx in groups.values():
        columns = [jnp.concatenate([items[i][j] for i in idx]) for j in range(len(items[idx[0]]))]
        axes = (0,) * len(columns) + (None,) * len(shared)
        result = jax.vmap(fn, in_axes=axes)(*columns, *shared)
        start = 0
        for i in idx:
            n = items[i][0].shape[0]
            out[i] = jax.tree.map(lambda r, start=start, n=n: r[start : start + n], result)
            start += n
    return out


def switch_on_clock(index_of: Callable[[jax.Array], jax.Array], branches: list[Callable[..., Any]]):
    """``f(clock, *operands) = lax.switch(index_of(clock), branches, *operands)`` that stays a switch
    under ``jax.vmap`` when every configuration holds the same ``clock`` (a sweep steps its runs
    together): vmap would otherwise turn it into a select that runs every branch (every refresh) at
    every step. Configurations at different clocks fall back to that select. No reverse-mode derivative.
    """

    def run(clock, *operands):
        return lax.switch(index_of(clock), branches, *operands)

    @custom_vmap
    def switch(clock, *operands):
        return run(clock, *operands)

    @switch.def_vmap
    def rule(axis_size, in_batched, clock, *operands):
        clock_batched, *batched = in_batched
        axes = [jax.tree.map(lambda b: 0 if b else None, b) for b in batched]

        def one_clock(c):
            return jax.vmap(run, in_axes=(None, *axes), axis_size=axis_size)(c, *operands)

        if not clock_batched:
            out = one_clock(clock)
        else:
            every = jax.vmap(run, in_axes=(0, *axes), axis_size=axis_size)
            out = lax.cond(
                jnp.all(clock == clock[0]), lambda: one_clock(clock[0]), lambda: every(clock, *operands)
            )
        return out, jax.tree.map(lambda _: True, out)

    return jax.jit(switch)  # jitted: called eagerly, the switch compiles once


def whole_number(owner: str, name: str, value: Any, low: int) -> int:
    """``value`` if it is an int ``>= low``, else a ValueError naming ``owner``, ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return value


def per_leaf(owner: str, treedef: Any, tree: Any) -> list:
    """A state tree built per leaf of the params (leaf -> tuple of matrices), as a list in leaf order."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{owner}: the updates' tree does not match the params it was built for: {error}"
        ) from None


# --- layouts ----------------------------------------------------------------------------------------------


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """SOAP's ``merge_dims``: neighbouring axes multiplied into one while the product stays at most
    ``max_dim``; an axis longer than ``max_dim`` stays alone. ``(3, 3, 16, 32)`` with 10,000 is
    ``(4608,)``; ``(2, 3, 5000)`` is ``(6, 5000)``."""
    merged, run = [], 1
    for d in shape:
        if run * d <= max_dim:
            run *= d
        elif run > 1:
            merged.append(run)
            run = d
        else:
            merged.append(d)
    if run > 1 or not merged:
        merged.append(run)
    return tuple(merged)


def _pieces(d: int, size: int) -> list[tuple[int, int, int, int]]:
    """Along one axis of length ``d``: ``(start, stop, count, length)`` of the full blocks, then the rest."""
    full = d // size * size
    out = [(0, full, d // size, size)] if full else []
    return out + ([(full, d, 1, d - full)] if d > full else [])


def split_blocks(x: jax.Array, size: int) -> list[Stack]:
    """``x`` cut into blocks of at most ``size`` along every axis, blocks of one shape stacked:
    a ``(100, 70)`` matrix with ``size=32`` gives stacks ``(6, 32, 32)``, ``(3, 32, 6)``, ``(2, 4, 32)``,
    ``(1, 4, 6)``. The order of the stacks (and of the blocks in each) is fixed by the shape."""
    n = x.ndim
    stacks = []
    for combo in itertools.product(*(_pieces(d, size) for d in x.shape)):
        part = x[tuple(slice(a, b) for a, b, _, _ in combo)]
        part = part.reshape([v for _, _, c, m in combo for v in (c, m)])
        part = part.transpose([2 * i for i in range(n)] + [2 * i + 1 for i in range(n)])
        stacks.append(part.reshape(-1, *(m for *_, m in combo)))
    return stacks


def join_blocks(stacks: list[Stack], shape: tuple[int, ...], size: int) -> jax.Array:
    """The inverse of `split_blocks`: the array of ``shape`` the stacks were cut from."""
    n = len(shape)
    if n == 0:
        return stacks[0].reshape(())
    pieces = [_pieces(d, size) for d in shape]
    parts = []
    for combo, part in zip(itertools.product(*pieces), stacks, strict=True):
        part = part.reshape([c for *_, c, _ in combo] + [m for *_, m in combo])
        part = part.transpose([i + j * n for i in range(n) for j in (0, 1)])
        parts.append(part.reshape([b - a for a, b, *_ in combo]))

    def nest(axis: int, flat: list) -> Any:  # jnp.block's nested lists, the last axis innermost
        if axis == n:
            return flat[0]
        k = len(flat) // len(pieces[axis])
        return [nest(axis + 1, flat[i * k : (i + 1) * k]) for i in range(len(pieces[axis]))]

    return jnp.block(nest(0, parts))


def block_shapes(shape: tuple[int, ...], size: int) -> list[tuple[int, ...]]:
    """The shapes of the stacks `split_blocks` makes of an array of ``shape``."""
    return [
        (math.prod(c for *_, c, _ in combo), *(m for *_, m in combo))
        for combo in itertools.product(*(_pieces(d, size) for d in shape))
    ]


# --- statistics and mode products (batched over a stack's axis 0) -----------------------------------------


def factor(x: Stack, axis: int) -> jax.Array:
    """The statistic of block axis ``axis`` (0-based, after the stack axis): ``X_(i) X_(i)^T``, with
    ``X_(i)`` the block unfolded along that axis; ``(blocks, d_i, d_i)``."""
    unfolded = jnp.moveaxis(x, axis + 1, 1).reshape(x.shape[0], x.shape[axis + 1], -1)
    return jnp.matmul(unfolded, jnp.swapaxes(unfolded, 1, 2), precision=HIGHEST)


def mode_product(x: Stack, matrix: jax.Array, axis: int) -> Stack:
    """``x x_i M``: ``M`` (``(blocks, d_i, d_i)``) applied along block axis ``axis`` of every block,
    ``Y[.., a, ..] = sum_b M[a, b] X[.., b, ..]`` (``M X`` for ``axis=0`` of a matrix, ``X M^T`` for 1)."""
    moved = jnp.moveaxis(x, axis + 1, -1)
    flat = moved.reshape(x.shape[0], -1, x.shape[axis + 1])
    out = jnp.matmul(flat, jnp.swapaxes(matrix, 1, 2), precision=HIGHEST)
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis + 1)


# --- matrix functions, one matrix at a time ---------------------------------------------------------------


def _finite_or(new: jax.Array, previous: jax.Array) -> jax.Array:
    return jnp.where(jnp.all(jnp.isfinite(new)), new, previous)


@one_at_a_time
def inverse_root(stat: jax.Array, previous: jax.Array, root: jax.Array, epsilon: jax.Array) -> jax.Array:
    """``(S + eps I)^(-1/root)`` by ``eigh``, with Shi et al.'s guard: when the smallest computed eigenvalue
    is below ``eps`` (a singular ``S``, or rounding), every eigenvalue is raised by ``eps - lambda_min``,
    so the smallest is ``eps`` and the root is finite for a zero or rank-deficient ``S``. Then every
    eigenvalue is raised to at least ``n * ulp * lambda_max`` (``ulp`` of the statistics' float32): below
    that, float32's ``eigh`` returns rounding noise, different under jit, eager and vmap, which the
    ``-1/root`` power would turn into different steps (a sweep would not reproduce its runs). ``previous``
    where ``eigh`` fails (non-finite output)."""
    n = stat.shape[-1]
    eye = jnp.eye(n, dtype=stat.dtype)
    values, vectors = jnp.linalg.eigh(stat + epsilon * eye)
    lowest = jnp.min(values)
    values = values + jnp.where(lowest < epsilon, epsilon - lowest, 0.0)
    floor = n * jnp.finfo(values.dtype).eps * jnp.max(values)
    values = jnp.maximum(values, floor)
    new = jnp.matmul(vectors * values ** (-1.0 / root), vectors.T, precision=HIGHEST)
    return _finite_or(new, previous)


@one_at_a_time
def eigenbasis(stat: jax.Array, previous: jax.Array) -> jax.Array:
    """The eigenvectors of ``S`` as columns, largest eigenvalue first (``eigh``); ``previous`` where
    ``eigh`` fails. For a singular ``S`` the vectors of its null space are any orthonormal basis of it."""
    _, vectors = jnp.linalg.eigh(stat)
    return _finite_or(vectors[:, ::-1], previous)


@one_at_a_time
def refresh_eigenbasis(stat: jax.Array, basis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One power-iteration step from ``Q`` and a QR (the SOAP authors' refresh): the columns of ``Q`` are
    ordered by their Rayleigh quotients ``diag(Q^T S Q)``, largest first (``order``), then
    ``Q' R = S Q[:, order]``. Returns ``(Q', order)``; ``(Q, 0, 1, ...)`` where the QR fails."""
    estimate = jnp.sum(basis * jnp.matmul(stat, basis, precision=HIGHEST), axis=0)
    order = jnp.argsort(-estimate)
    new, _ = jnp.linalg.qr(jnp.matmul(stat, basis[:, order], precision=HIGHEST))
    ok = jnp.all(jnp.isfinite(new))
    return jnp.where(ok, new, basis), jnp.where(ok, order, jnp.arange(order.shape[0]))
