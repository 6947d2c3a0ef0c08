"""Shampoo: per weight matrix, left and right statistics ``L ~ G G^T`` and ``R ~ G^T G``, and the step
``L^(-1/4) G R^(-1/4)``, its length grafted from Adam (Gupta, Koren & Singer, 2018, "Shampoo:
Preconditioned Stochastic Tensor Optimization"; Anil et al., 2020, "Scalable Second Order Optimization
for Deep Learning"; Shi et al., 2023, "A Distributed Data-Parallel PyTorch Implementation of the
Distributed Shampoo Optimizer for Training Neural Networks At-Scale").

`shampoo` is ``chain(graft(adam, chain(precondition_by_shampoo, momentum)), scale_by_learning_rate)``:

* `precondition_by_shampoo` keeps, for every block of every leaf, one statistic per axis (an
  exponential moving average of the gradient's Gram matrices) and their inverse roots, recomputed every
  ``precondition_frequency`` steps under a ``lax.cond`` (the other steps pay two matrix products per
  block); its direction is ``L^(-1/4) G R^(-1/4)`` per block (``-1/(2k)`` for a block of order ``k``);
* `graft` gives that direction, block by block, the length of Adam's step (Agarwal et al., 2020,
  "Disentangling Adaptive Gradient Methods from Learning Rates"; per block as Shi et al.), so the
  learning rate is Adam's and can be tuned like Adam's; leaves and steps without a Shampoo direction
  (1-D leaves, the steps before the first inverse roots) take Adam's step itself.

Choices of defaults and their sources (in `shampoo`'s docstring): see the table there.

Order of operations. Shi et al. precondition the running mean of the gradients; here the momentum acts
on the preconditioned gradients (as in Anil et al. and in Gupta et al.'s experiments), which is the
same between two refreshes, composes as a chain, and starts cleanly at the first inverse roots.

State. The statistics and roots are float32 whatever the params' dtype, kept per leaf as a tuple (per
stack of equal blocks) of tuples (per axis) of ``(blocks, d, d)`` arrays. They are created replicated
(not sharded like the params): a block's matrices are small next to the leaf.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import transforms
from gradtx.base import Transformation, accepts_extra, chain, is_float
from gradtx.hyper import CLOSED_UNIT_INTERVAL, POSITIVE, Hyper, Hyperparams, HyperSpec
from gradtx.keras_options import KerasOptions, with_keras_options
from gradtx.preconditioning import (
    block_shapes,
    by_size,
    factor,
    inverse_root,
    join_blocks,
    merged_shape,
    mode_product,
    per_leaf,
    split_blocks,
    switch_on_clock,
    whole_number,
)

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack


def _preconditioned(p: Any, precondition_1d: bool) -> bool:
    # An empty leaf (a zero-length axis) has no statistics: it goes with the grafted method.
    return is_float(p) and jnp.size(p) > 0 and (jnp.ndim(p) >= 2 or (precondition_1d and jnp.ndim(p) == 1))


def _layout(shape: tuple[int, ...], block_size: int, merge_dims: bool) -> tuple[int, ...]:
    return merged_shape(shape, block_size) if merge_dims else shape


class ShampooState(NamedTuple):
    statistics: Any  # per leaf, per stack of blocks, per axis: (blocks, d, d) float32 EMA of the Gram matrix
    roots: Any  # the same shapes: the inverse roots of the last refresh (zeros before the first)
    hyperparams: Hyperparams


def precondition_by_shampoo(
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-12,
    precondition_frequency: int = 10,
    start_preconditioning_step: int | None = None,
    block_size: int = 1024,
    exponent_override: float | None = None,
    precondition_1d: bool = False,
    merge_dims: bool = False,
) -> Transformation:
    """Shampoo's direction per block ``G`` of order ``k``:  ``S_i <- b2*S_i + w*G_(i) G_(i)^T``  for every
    axis ``i`` (``w = 1 - b2``, or ``1`` when ``b2 = 1``: AdaGrad's sum);  every ``precondition_frequency``
    steps ``P_i <- (S_i / (1 - b2^t) + eps I)^(-1/(2k))``;  ``u <- G x_1 P_1 x_2 P_2``, a mode product per
    axis (for a matrix, ``u = P_L G P_R``).

    ``t = step + 1``. The roots are first computed at ``t = start_preconditioning_step`` (default
    ``precondition_frequency``, as Shi et al.), then at every ``t`` divisible by
    ``precondition_frequency``; until the first time they are zero, so the direction is zero. ``eps``
    regularizes as Shi et al.'s eigendecomposition does (see `gradtx.preconditioning.inverse_root`): no
    NaN from a zero or rank-deficient statistic; a failed ``eigh`` keeps the previous roots.

    Every axis is cut into blocks of at most ``block_size`` (each block has its own statistics, Anil et
    al.'s and Shi et al.'s blocking); with ``merge_dims`` neighbouring axes are first merged while their
    product is at most ``block_size`` (Anil et al.'s shape interpretation, SOAP's rule). Leaves of
    order ``< 2`` give a zero direction (`graft` then gives them the grafted method's step), except 1-D
    leaves with ``precondition_1d`` (order 1: ``S^(-1/2) g``, full-matrix AdaGrad/RMSProp per block).
    ``exponent_override`` ``p`` replaces ``2k`` by ``p``.

    Caution (measured): when a statistic has low rank (fewer gradient samples than rows since the start)
    and the roots are refreshed rarely, ``eps = 1e-12`` magnifies a new gradient's component outside the
    old statistic's range by ``eps^(-1/(2k))``, and the direction follows it. Fed one sample per step, a
    ``6 x 4`` least-squares weight refreshed every 3 steps drifted (loss 907 to 4,469 in 60 steps), where
    refreshing every step, or ``eps`` at ~2% of the statistic's largest eigenvalue, converged. Batches
    wider than the layer, a later ``start_preconditioning_step`` or a larger ``epsilon`` avoid it.
    """
    owner = "precondition_by_shampoo"
    frequency = whole_number(owner, "precondition_frequency", precondition_frequency, 1)
    start = frequency if start_preconditioning_step is None else start_preconditioning_step
    start = whole_number(owner, "start_preconditioning_step", start, 1)
    block_size = whole_number(owner, "block_size", block_size, 1)
    if exponent_override is not None and not (
        isinstance(exponent_override, int | float)
        and math.isfinite(exponent_override)
        and exponent_override > 0
    ):
        raise ValueError(
            f"{owner}: exponent_override must be a number > 0 or None, got {exponent_override!r}"
        )
    spec = HyperSpec(owner, beta_2=(beta_2, CLOSED_UNIT_INTERVAL), epsilon=(epsilon, POSITIVE))

    def layout(p) -> tuple[int, ...]:
        return _layout(jnp.shape(p), block_size, merge_dims)

    def zeros(p):
        if not _preconditioned(p, precondition_1d):
            return ()
        return tuple(
            tuple(jnp.zeros((s[0], d, d), jnp.float32) for d in s[1:])
            for s in block_shapes(layout(p), block_size)
        )

    def init(params):
        matrices = jax.tree.map(zeros, params)
        return ShampooState(matrices, jax.tree.map(jnp.zeros_like, matrices), spec.init())

    def refresh(flat_stats, flat_roots, correction, eps):
        # One eigh loop per matrix size: every statistic of that size, from every leaf and block.
        items = [
            (s / correction, r, jnp.full(s.shape[:1], exponent_override or 2.0 * len(ss)))
            for stats, roots in zip(flat_stats, flat_roots, strict=True)
            for ss, rs in zip(stats, roots, strict=True)
            for s, r in zip(ss, rs, strict=True)
        ]
        fresh = iter(by_size(inverse_root, items, eps))
        return [tuple(tuple(next(fresh) for _ in rs) for rs in roots) for roots in flat_roots]

    def due(t):  # 1: the roots are recomputed at step t (1-based), 0: kept
        return ((t == start) | ((t > start) & (t % frequency == 0))).astype(jnp.int32)

    shared_refresh = switch_on_clock(due, [lambda stats, roots, *_: list(roots), refresh])

    def update(updates, state, params=None, *, step=None, **extra):
        if step is None:
            raise ValueError(f"{owner} needs the step count; use it inside gradtx.chain")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b2 = h["beta_2"]
        t = jnp.asarray(step, jnp.int32) + 1
        weight = jnp.where(b2 < 1, 1 - b2, 1.0)
        correction = jnp.where(b2 < 1, 1 - b2 ** t.astype(jnp.float32), 1.0)
        flat, treedef = jax.tree.flatten(updates)
        flat_stats = per_leaf(owner, treedef, state.statistics)
        flat_roots = treedef.flatten_up_to(state.roots)
        blocks, new_stats = [], []
        for g, stats in zip(flat, flat_stats, strict=True):
            if not stats:
                blocks.append(None)
                new_stats.append(stats)
                continue
            stacks = split_blocks(g.astype(jnp.float32).reshape(layout(g)), block_size)
            blocks.append(stacks)
            new_stats.append(
                tuple(
                    tuple(b2 * s + weight * factor(x, i) for i, s in enumerate(ss))
                    for x, ss in zip(stacks, stats, strict=True)
                )
            )
        roots = shared_refresh(t, new_stats, flat_roots, correction, h["epsilon"])
        out = []
        for g, stacks, rs in zip(flat, blocks, roots, strict=True):
            if stacks is None:
                out.append(jnp.zeros_like(g) if is_float(g) else g)
                continue
            directions = []
            for x, ps in zip(stacks, rs, strict=True):
                for i, p in enumerate(ps):
                    x = mode_product(x, p, i)
                directions.append(x)
            out.append(join_blocks(directions, layout(g), block_size).reshape(g.shape).astype(g.dtype))
        new_state = ShampooState(treedef.unflatten(new_stats), treedef.unflatten(list(roots)), hp)
        return treedef.unflatten(out), new_state

    return Transformation(init, update)


class GraftState(NamedTuple):
    magnitude: Any  # the state of the transformation whose step length is kept
    direction: Any  # the state of the transformation whose direction is kept


def graft(
    magnitude: Transformation, direction: Transformation, block_size: int = 1024, merge_dims: bool = False
) -> Transformation:
    """Learning-rate grafting, block by block:  ``u <- d * ||m|| / ||d||``,  with ``m = magnitude(g)`` and
    ``d = direction(g)`` computed from the same ``g``; where ``||d|| = 0`` (no direction), ``u <- m``.

    Blocks are those of `precondition_by_shampoo` with the same ``block_size`` and ``merge_dims`` (one
    block per leaf when every axis is at most ``block_size``). Norms are taken in float32. (Agarwal et
    al., 2020; per block as in Shi et al., 2023.) Both transformations receive ``step`` and the other
    extra arguments.
    """
    block_size = whole_number("graft", "block_size", block_size, 1)
    extra_ok = (accepts_extra(magnitude.update), accepts_extra(direction.update))

    def init(params):
        return GraftState(magnitude.init(params), direction.init(params))

    def leaf(m, d):
        if not is_float(d) or jnp.size(d) == 0:  # an empty leaf: no blocks, nothing to scale
            return d
        shape = _layout(jnp.shape(d), block_size, merge_dims)
        pieces = []
        for mb, db in zip(
            split_blocks(m.astype(jnp.float32).reshape(shape), block_size),
            split_blocks(d.astype(jnp.float32).reshape(shape), block_size),
            strict=True,
        ):
            axes = tuple(range(1, mb.ndim))
            m_norm = jnp.sqrt(jnp.sum(mb * mb, axis=axes, keepdims=True))
            d_norm = jnp.sqrt(jnp.sum(db * db, axis=axes, keepdims=True))
            ratio = m_norm / jnp.where(d_norm > 0, d_norm, 1.0)
            pieces.append(jnp.where(d_norm > 0, db * ratio, mb))
        return join_blocks(pieces, shape, block_size).reshape(d.shape).astype(d.dtype)

    def update(updates, state, params=None, **extra):
        kwargs = [extra if ok else {} for ok in extra_ok]
        m, m_state = magnitude.update(updates, state.magnitude, params, **kwargs[0])
        d, d_state = direction.update(updates, state.direction, params, **kwargs[1])
        return jax.tree.map(leaf, m, d), GraftState(m_state, d_state)

    return Transformation(init, update)


def shampoo(
    learning_rate: Hyper = 0.001,
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-12,
    precondition_frequency: int = 10,
    start_preconditioning_step: int | None = None,
    block_size: int = 1024,
    grafting_beta_2: Hyper = 0.999,
    grafting_epsilon: Hyper = 1e-7,
    grafting: Transformation | None = None,
    exponent_override: float | None = None,
    precondition_1d: bool = False,
    merge_dims: bool = False,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """Shampoo with Adam grafting:  ``d <- momentum_b1(P_L G P_R);  u <- -eta * d * ||a|| / ||d||``  per
    block, ``a`` being Adam's step (`gradtx.adam` without its learning rate) and ``P_L, P_R`` the inverse
    fourth roots of `precondition_by_shampoo`; 1-D leaves and the steps before the first roots take
    ``-eta * a``. Every step has Adam's length, so ``learning_rate`` is tuned as Adam's.

    | argument | default | source |
    |---|---|---|
    | ``learning_rate`` | 0.001 | Keras Adam's, since the step length is Adam's |
    | ``beta_1`` | 0.9 | Anil et al. 2020; Shi et al. 2023 (momentum of both branches) |
    | ``beta_2`` | 0.999 | Anil et al. 2020 (the statistics' average; 1.0, AdaGrad's sum, is Shi et al.'s) |
    | ``epsilon`` | 1e-12 | Shi et al. 2023 (added to the statistics before the root) |
    | ``precondition_frequency`` | 10 | SOAP's authors (Vyas et al. 2024); Shi et al. use 1 to 100 |
    | ``start_preconditioning_step`` | ``precondition_frequency`` | Shi et al. 2023 |
    | ``block_size`` | 1024 | Shi et al. 2023 (``max_preconditioner_dim``) |
    | ``grafting_beta_2``, ``grafting_epsilon`` | 0.999, 1e-7 | Keras Adam's |

    ``grafting`` replaces Adam by another transformation whose step length is grafted (e.g.
    `gradtx.scale_by_adagrad`, or `gradtx.identity` for SGD's). ``exponent_override``,
    ``precondition_1d`` and ``merge_dims``: see `precondition_by_shampoo`. Keras's base-optimizer options
    (``weight_decay``, ``clipnorm``, ``use_ema``, ...) as for every gradtx optimizer.
    """
    if grafting is None:
        grafting = transforms.scale_by_adam(beta_1, grafting_beta_2, grafting_epsilon)
    elif not isinstance(grafting, Transformation):
        raise ValueError(f"shampoo: grafting must be a gradtx Transformation or None, got {grafting!r}")
    direction = chain(
        precondition_by_shampoo(
            beta_2,
            epsilon,
            precondition_frequency,
            start_preconditioning_step,
            block_size,
            exponent_override,
            precondition_1d,
            merge_dims,
        ),
        transforms.momentum(beta_1),
    )
    core = chain(
        graft(grafting, direction, block_size, merge_dims), transforms.scale_by_learning_rate(learning_rate)
    )
    return with_keras_options(core, owner="shampoo", **options)
