"""SOAP: Adam run in the eigenbasis of Shampoo's statistics (Vyas et al., 2024, "SOAP: Improving and
Stabilizing Shampoo using Adam"), with the options and step order of the authors' reference
implementation (github.com/nikhilvyas/SOAP).

For a matrix ``G`` with statistics ``L ~ G G^T``, ``R ~ G^T G`` and their eigenvectors ``Q_L``, ``Q_R``,
Adam's moments live in the rotated coordinates ``G' = Q_L^T G Q_R`` and its step is rotated back. The
bases are refreshed every ``precondition_frequency`` steps, not by a new eigendecomposition but, as in
the reference code, by one power-iteration step and a QR from the previous basis, which keeps the
columns (and the second moment) in step with the previous ones. Leaves of any order get one statistic
per axis; axes longer than ``max_precond_dim`` and (by default) 1-D leaves keep the identity basis,
i.e. plain Adam.

The reference's step order, kept here (``s`` = updates done before this one):

* ``s = 0``: the statistics take the first gradient and the basis is its ``eigh`` (columns by
  decreasing eigenvalue); nothing moves and the moments stay zero;
* ``s >= 1``: project ``g``, update Adam's moments there, step ``-eta * c_s * Q (m / (sqrt(v) + eps)) Q^T``
  with ``c_s = sqrt(1 - b2^s) / (1 - b1^s)``; then the statistics take ``g``, and when ``s`` is a multiple
  of ``precondition_frequency`` the basis is refreshed, ``v`` permuted with the new column order and
  ``m`` carried into the new basis.

The eigenbasis of a rank-deficient statistic (a ``(6, 4)`` weight's ``6 x 6`` factor after one gradient)
is not unique: eigensolvers (and float32 against float64) choose different vectors for its null space,
so runs of SOAP may legitimately differ there, and Adam's normalisation turns the gradient's (rounding
size) components along those vectors into full-size steps: the same run jitted, eager or inside a
`gradtx.sweep` can then differ by more than rounding (in a small MLP fed batches narrower than its
layers, by several percent of the loss after 20 steps). Batches at least as wide as the layers avoid
it. The decompositions run in float32, one matrix at a time also under ``jax.vmap`` (see
`gradtx.preconditioning`); a failed one keeps the previous basis.
Statistics, bases and moments are float32 whatever the params' dtype; they are created replicated.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import transforms
from gradtx.base import Transformation, Updates, chain, is_float, zeros_like_state
from gradtx.hyper import POSITIVE, UNIT_INTERVAL, Hyper, Hyperparams, HyperSpec
from gradtx.keras_options import KerasOptionsWithoutDecay, with_keras_options
from gradtx.preconditioning import (
    by_size,
    eigenbasis,
    factor,
    merged_shape,
    mode_product,
    per_leaf,
    refresh_eigenbasis,
    switch_on_clock,
    whole_number,
)

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack


class SoapState(NamedTuple):
    mu: Updates  # Adam's first moment, in the eigenbasis (float32, the leaf's shape)
    nu: Updates  # Adam's second moment, in the eigenbasis
    statistics: Any  # per leaf, per (merged) axis: the (d, d) moving average of the Gram matrix, or None
    bases: Any  # the same: the eigenbasis Q (columns), or None for an axis kept in the identity basis
    hyperparams: Hyperparams


def _project(x: jax.Array, bases: tuple, back: bool = False) -> jax.Array:
    """``x x_i Q_i^T`` over the axes that have a basis (``Q_L^T X Q_R``); ``back``: ``x x_i Q_i``
    (``Q_L X Q_R^T``)."""
    for i, q in enumerate(bases):
        if q is not None:
            x = mode_product(x[None], (q if back else q.T)[None], i)[0]
    return x


def scale_by_soap(
    beta_1: Hyper = 0.95,
    beta_2: Hyper = 0.95,
    shampoo_beta: Hyper | None = None,
    epsilon: Hyper = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
) -> Transformation:
    """SOAP (step ``s``, see the module docstring):  ``g' = Q_L^T g Q_R;  m <- b1*m + (1 - b1)*g';
    v <- b2*v + (1 - b2)*g'^2;  u <- c_s * Q_L (m / (sqrt(v) + eps)) Q_R^T;
    L <- sb*L + (1 - sb)*g g^T;  R <- sb*R + (1 - sb)*g^T g``,  ``u = 0`` at ``s = 0``.

    ``sb`` is ``shampoo_beta`` (``None``: ``beta_2``'s value at each step, the reference's ``-1``);
    ``c_s = sqrt(1 - b2^s) / (1 - b1^s)`` with ``correct_bias``, else 1. ``merge_dims`` merges
    neighbouring axes while their product is at most ``max_precond_dim`` (SOAP's rule,
    `gradtx.preconditioning.merged_shape`); ``precondition_1d`` gives 1-D leaves a ``d x d``
    statistic; ``normalize_grads`` divides each leaf's rotated-back step by its RMS (``+ 1e-30``)
    before ``c_s``. Leaves are taken in their own axis order
    (the reference's ``data_format`` permutes 4-D PyTorch kernels; gradtx has no layout to guess).
    """
    owner = "scale_by_soap"
    frequency = whole_number(owner, "precondition_frequency", precondition_frequency, 1)
    max_dim = whole_number(owner, "max_precond_dim", max_precond_dim, 1)
    for name, flag in (("merge_dims", merge_dims), ("precondition_1d", precondition_1d),
                       ("normalize_grads", normalize_grads), ("correct_bias", correct_bias)):  # fmt: skip
        if not isinstance(flag, bool):
            raise ValueError(f"{owner}: {name} must be True or False, got {flag!r}")
    given = {
        "beta_1": (beta_1, UNIT_INTERVAL),
        "beta_2": (beta_2, UNIT_INTERVAL),
        "epsilon": (epsilon, POSITIVE),
    }
    if shampoo_beta is not None:
        given["shampoo_beta"] = (shampoo_beta, UNIT_INTERVAL)
    spec = HyperSpec(owner, **given)

    def layout(p) -> tuple[int, ...]:
        shape = jnp.shape(p)
        return merged_shape(shape, max_dim) if merge_dims and len(shape) >= 2 else shape

    def matrices(p, eye: bool):
        if (
            not is_float(p)
            or jnp.size(p) == 0
            or jnp.ndim(p) == 0
            or (jnp.ndim(p) == 1 and not precondition_1d)
        ):
            return tuple(None for _ in jnp.shape(p))
        make = jnp.eye if eye else (lambda d, dtype: jnp.zeros((d, d), dtype))
        return tuple(make(d, dtype=jnp.float32) if d <= max_dim else None for d in layout(p))

    def init(params):
        return SoapState(
            jax.tree.map(zeros_like_state, params),
            jax.tree.map(lambda p: zeros_like_state(p, real=True), params),
            jax.tree.map(lambda p: matrices(p, eye=False), params),
            jax.tree.map(lambda p: matrices(p, eye=True), params),
            spec.init(),
        )

    def matrices_of(stats, bases):
        # Every (statistic, basis) pair with a batch axis of one, for by_size (one loop per size).
        return [
            (st[None], q[None])
            for ss, qs in zip(stats, bases, strict=True)
            for st, q in zip(ss, qs, strict=True)
            if q is not None
        ]

    def in_place_of(bases, fresh):
        fresh = iter(fresh)
        return [tuple(q if q is None else next(fresh) for q in qs) for qs in bases]

    def keep(stats, bases, mus, nus):
        return list(bases), list(mus), list(nus)

    def first(stats, bases, mus, nus):  # s = 0: the eigenvectors of the first statistics
        fresh = [q[0] for q in by_size(eigenbasis, matrices_of(stats, bases))]
        return in_place_of(bases, fresh), list(mus), list(nus)

    def refreshed(stats, bases, mus, nus):  # a power-iteration step and a QR; v follows the new order
        fresh = [(q[0], order[0]) for q, order in by_size(refresh_eigenbasis, matrices_of(stats, bases))]
        new_bases = in_place_of(bases, [q for q, _ in fresh])
        orders = iter(order for _, order in fresh)
        new_mus, new_nus = [], []
        for qs, new_qs, m, v in zip(bases, new_bases, mus, nus, strict=True):
            for i, q in enumerate(qs):
                if q is not None:
                    v = jnp.take(v, next(orders), axis=i)
            new_mus.append(_project(_project(m, qs, back=True), new_qs))
            new_nus.append(v)
        return new_bases, new_mus, new_nus

    def branch(s):  # the first step, a refresh, or neither
        return jnp.where(s == 0, 1, jnp.where(s % frequency == 0, 2, 0))

    change_basis = switch_on_clock(branch, [keep, first, refreshed])

    def update(updates, state, params=None, *, step=None, **extra):
        if step is None:
            raise ValueError(f"{owner} needs the step count; use it inside gradtx.chain")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b1, b2, eps = h["beta_1"], h["beta_2"], h["epsilon"]
        sb = h.get("shampoo_beta", b2)
        s = jnp.asarray(step, jnp.int32)
        first = s == 0
        ts = jnp.maximum(s, 1).astype(jnp.float32)
        correction = jnp.sqrt(1 - b2**ts) / (1 - b1**ts) if correct_bias else 1.0
        flat, treedef = jax.tree.flatten(updates)
        stats = per_leaf(owner, treedef, state.statistics)
        bases, mus, nus = (treedef.flatten_up_to(t) for t in (state.bases, state.mu, state.nu))
        out, new_stats, new_mus, new_nus, shapes = [], [], [], [], []
        for g, ss, qs, m, v in zip(flat, stats, bases, mus, nus, strict=True):
            if not is_float(g):
                out.append(g)
                new_stats.append(ss)
                new_mus.append(m)
                new_nus.append(v)
                shapes.append(None)
                continue
            shape = layout(g)
            x = g.astype(jnp.float32).reshape(shape)
            rotated = _project(x, qs)
            m, v = m.reshape(shape), v.reshape(shape)
            m = jnp.where(first, m, b1 * m + (1 - b1) * rotated)
            v = jnp.where(first, v, b2 * v + (1 - b2) * rotated * rotated)
            direction = _project(m / (jnp.sqrt(v) + eps), qs, back=True)
            if normalize_grads:
                direction = direction / (1e-30 + jnp.sqrt(jnp.mean(direction * direction)))
            out.append(jnp.where(first, 0.0, correction * direction).reshape(g.shape).astype(g.dtype))
            new_stats.append(
                tuple(
                    st if st is None else sb * st + (1 - sb) * factor(x[None], i)[0]
                    for i, st in enumerate(ss)
                )
            )
            new_mus.append(m)
            new_nus.append(v)
            shapes.append(g.shape)
        new_bases, new_mus, new_nus = change_basis(s, new_stats, bases, new_mus, new_nus)
        new_mus = [m if shape is None else m.reshape(shape) for m, shape in zip(new_mus, shapes, strict=True)]
        new_nus = [v if shape is None else v.reshape(shape) for v, shape in zip(new_nus, shapes, strict=True)]
        new_state = SoapState(*(treedef.unflatten(t) for t in (new_mus, new_nus, new_stats, new_bases)), hp)
        return treedef.unflatten(out), new_state

    return Transformation(init, update)


def soap(
    learning_rate: Hyper = 0.003,
    beta_1: Hyper = 0.95,
    beta_2: Hyper = 0.95,
    shampoo_beta: Hyper | None = None,
    epsilon: Hyper = 1e-8,
    weight_decay: Hyper | None = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    **options: Unpack[KerasOptionsWithoutDecay],
) -> Transformation:
    """SOAP:  ``theta <- theta - eta * (c_t * Q_L (m / (sqrt(v) + eps)) Q_R^T + weight_decay * theta)``,
    Adam in the eigenbasis of Shampoo's statistics (see `scale_by_soap`, which holds the formula).

    Arguments and defaults are those of the authors' reference implementation (``lr=3e-3``,
    ``betas=(0.95, 0.95)``, ``shampoo_beta=-1`` written ``None``, ``eps=1e-8``, ``weight_decay=0.01``,
    ``precondition_frequency=10``, ``max_precond_dim=10000``, ...). ``weight_decay`` is decoupled and
    multiplied by the learning rate as there, but applied in Keras's order (before the step, as every
    gradtx optimizer's ``weight_decay``) where the reference decays the already-updated weights: the two
    differ by ``eta * weight_decay * step``, second order in the learning rate (and the first call, which
    moves nothing in the reference, decays here). ``None`` (or 0) turns it off. The other Keras
    base-optimizer options (``clipnorm``, ``use_ema``, ...) as for every optimizer.
    """
    core = chain(
        scale_by_soap(
            beta_1,
            beta_2,
            shampoo_beta,
            epsilon,
            precondition_frequency,
            max_precond_dim,
            merge_dims,
            precondition_1d,
            normalize_grads,
            correct_bias,
        ),
        transforms.scale_by_learning_rate(learning_rate),
    )
    return with_keras_options(core, owner="soap", weight_decay=weight_decay, **options)
