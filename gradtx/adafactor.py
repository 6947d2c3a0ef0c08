"""Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"),
as Keras 3 ``Adafactor`` computes it.

For a leaf of rank >= 2 the second moment is kept factored over its last two axes: a running mean of
``g^2`` over the last axis (``r``, shape ``[..., n]``) and over the second-to-last (``c``, shape
``[..., m]``), and ``v`` is rebuilt as ``r c^T / mean(r)`` for each matrix of the leaf. Leaves of rank
0 and 1 keep ``v`` itself. The step is clipped by its RMS, then scaled by the RMS of the weights and by
a relative step size ``min(learning_rate, 1/sqrt(t))``.

Keras's semantics, followed here: the decay of the second moment is ``beta_2(t) = 1 - t^beta_2_decay``;
``epsilon_1`` is added to ``g^2`` before averaging; the weights' scale is ``max(epsilon_2, RMS(theta))``;
there is no first moment. In Keras 3 the step size is ``min(learning_rate, 1/sqrt(t))`` whether or not
``relative_step`` is set (the flag only repeats that cap), so ``relative_step=False`` changes nothing
there, nor here (gradtx warns). Keras stores a full-size ``v`` for every leaf; gradtx stores only ``r``
and ``c`` for a factored leaf, which is the memory saving Adafactor is for.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Transformation, Updates, chain, is_float, leafwise, zeros_like_state
from gradtx.hyper import NONNEGATIVE, POSITIVE, Hyper, Hyperparams, HyperSpec, Range
from gradtx.keras_options import KerasOptions, with_keras_options

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

_NONPOSITIVE = Range(high=0.0)


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class FactoredRmsState(NamedTuple):
    row_mean: Updates  # r, shape [..., n] for a leaf of shape [..., n, m] (a placeholder for rank < 2)
    column_mean: Updates  # c, shape [..., m] (a placeholder for rank < 2)
    second_moment: Updates  # v for a leaf of rank < 2 (a placeholder for rank >= 2)
    hyperparams: Hyperparams


def _factored(p) -> bool:
    return is_float(p) and jnp.ndim(p) >= 2 and jnp.size(p) > 0  # an empty leaf has no row means


def _placeholder() -> jax.Array:
    return jnp.zeros([], jnp.float32)


def _flatten_like(owner: str, treedef, tree):
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{owner}: the updates' tree does not match the params it was built for: {error}"
        ) from None


def _check_shapes(owner: str, path, g, r, c, v) -> None:
    if not is_float(g):
        return
    shape = jnp.shape(g)
    if _factored(g):
        expected = ((shape[:-1], jnp.shape(r)), (shape[:-2] + shape[-1:], jnp.shape(c)))
    else:
        expected = ((shape, jnp.shape(v)),)
    if any(want != have for want, have in expected):
        raise ValueError(
            f"{owner}: the update at {jax.tree_util.keystr(path)} has shape {shape}, which does not match "
            "the params the state was built for"
        )


def scale_by_factored_rms(beta_2_decay: Hyper = -0.8, epsilon_1: Hyper = 1e-30) -> Transformation:
    """Adafactor's second moment, with ``b(t) = 1 - t^beta_2_decay`` and ``G = g^2 + epsilon_1``:

    rank >= 2:  ``r <- b*r + (1 - b)*mean(G, -1);  c <- b*c + (1 - b)*mean(G, -2);
    v = (r / mean(r, -1))[..., :, None] * c[..., None, :]``;
    rank < 2:  ``v <- b*v + (1 - b)*G``;  then  ``u <- g / sqrt(v)``.

    ``b(1) = 0``, so the first step divides by ``|g|`` (up to epsilon_1). ``beta_2_decay <= 0``.
    (Shazeer & Stern, 2018, Algorithms 4 and 5, with means in place of sums; Keras ``Adafactor``.)
    """
    owner = "scale_by_factored_rms"
    spec = HyperSpec(owner, beta_2_decay=(beta_2_decay, _NONPOSITIVE), epsilon_1=(epsilon_1, NONNEGATIVE))

    def init(params):
        def row(p):
            return zeros_like_state(p)[..., 0] if _factored(p) else _placeholder()

        def column(p):
            return zeros_like_state(p)[..., 0, :] if _factored(p) else _placeholder()

        def full(p):
            return _placeholder() if _factored(p) else zeros_like_state(p)

        trees = (jax.tree.map(f, params) for f in (row, column, full))
        return FactoredRmsState(*trees, spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if step is None:
            raise ValueError(f"{owner} needs the step count for its decay; use it inside gradtx.chain")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        t = jnp.asarray(step).astype(jnp.float32) + 1.0
        b = 1 - jnp.power(t, h["beta_2_decay"])

        def leaf(g, r, c, v):
            if not is_float(g):
                return g, r, c, v
            g32 = _f32(g)
            squared = jnp.square(g32) + h["epsilon_1"]
            if _factored(g):
                r = b * r + (1 - b) * jnp.mean(squared, axis=-1)
                c = b * c + (1 - b) * jnp.mean(squared, axis=-2)
                full = (r / jnp.mean(r, axis=-1, keepdims=True))[..., None] * c[..., None, :]
            else:
                v = full = b * v + (1 - b) * squared
            return (g32 / jnp.sqrt(full)).astype(g.dtype), r, c, v

        keyed, treedef = jax.tree_util.tree_flatten_with_path(updates)
        trees = [_flatten_like(owner, treedef, tree) for tree in state[:3]]
        if not keyed:
            return updates, FactoredRmsState(*state[:3], hp)
        for (path, g), r, c, v in zip(keyed, *trees, strict=True):
            _check_shapes(owner, path, g, r, c, v)
        out = [leaf(g, *s) for (_, g), *s in zip(keyed, *trees, strict=True)]
        new = [treedef.unflatten(list(column)) for column in zip(*out, strict=True)]
        return new[0], FactoredRmsState(*new[1:], hp)

    return Transformation(init, update)


class BlockRmsState(NamedTuple):
    hyperparams: Hyperparams


def clip_by_block_rms(clip_threshold: Hyper = 1.0) -> Transformation:
    """Update clipping:  ``u <- g / max(1, RMS(g) / d)``  per leaf, with ``d = clip_threshold``.

    (Shazeer & Stern, 2018, section 6; Keras ``Adafactor``'s ``clip_threshold``, which acts on the
    step, independently of the gradient clipping options ``clipnorm``, ``clipvalue``, ``global_clipnorm``.)
    """
    spec = HyperSpec("clip_by_block_rms", clip_threshold=(clip_threshold, POSITIVE))

    def init(params):
        return BlockRmsState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)

        def leaf(g):
            g32 = _f32(g)
            return ((g32 / jnp.maximum(1.0, _rms(g32) / h["clip_threshold"])).astype(g.dtype),)

        (updates,) = leafwise("clip_by_block_rms", leaf, updates)
        return updates, BlockRmsState(hp)

    return Transformation(init, update)


def scale_by_param_block_rms(epsilon_2: Hyper = 1e-3) -> Transformation:
    """Relative step:  ``u <- max(epsilon_2, RMS(theta)) * g``  per leaf, so that a leaf moves in
    proportion to its own scale (and by at least ``epsilon_2`` times the step, from zero).

    Needs the params. (Shazeer & Stern, 2018, section 8; Keras ``Adafactor``'s ``epsilon_2``.)
    """
    spec = HyperSpec("scale_by_param_block_rms", epsilon_2=(epsilon_2, NONNEGATIVE))

    def init(params):
        return BlockRmsState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError("scale_by_param_block_rms needs the params: call update(updates, state, params)")
        h, hp = spec.resolve(state.hyperparams, step, **extra)

        def leaf(g, p):
            scale = jnp.maximum(h["epsilon_2"], _rms(_f32(p)))
            return (scale * _f32(g)).astype(g.dtype), p

        updates, _ = leafwise("scale_by_param_block_rms", leaf, updates, params)
        return updates, BlockRmsState(hp)

    return Transformation(init, update)


class RelativeStepState(NamedTuple):
    hyperparams: Hyperparams


def scale_by_relative_step(learning_rate: Hyper = 0.001) -> Transformation:
    """Adafactor's step size:  ``u <- -min(eta, 1/sqrt(t)) * g``  (``t = step + 1``): the learning rate,
    capped by the decay ``1/sqrt(t)`` of Shazeer & Stern's relative step (their ``eta`` is 0.01).
    (Keras ``Adafactor``'s ``rho_t``.)"""
    spec = HyperSpec("scale_by_relative_step", learning_rate=(learning_rate, NONNEGATIVE))

    def init(params):
        return RelativeStepState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if step is None:
            raise ValueError("scale_by_relative_step needs the step count; use it inside gradtx.chain")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        t = jnp.asarray(step).astype(jnp.float32) + 1.0
        size = jnp.minimum(h["learning_rate"], 1 / jnp.sqrt(t))
        (updates,) = leafwise(
            "scale_by_relative_step", lambda g: ((-size * _f32(g)).astype(g.dtype),), updates
        )
        return updates, RelativeStepState(hp)

    return Transformation(init, update)


def adafactor(
    learning_rate: Hyper = 0.001,
    beta_2_decay: Hyper = -0.8,
    epsilon_1: Hyper = 1e-30,
    epsilon_2: Hyper = 1e-3,
    clip_threshold: Hyper = 1.0,
    relative_step: bool = True,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """Adafactor:  ``u_hat = clip_rms(g / sqrt(v_factored), d);
    theta <- theta - min(eta, 1/sqrt(t)) * max(eps_2, RMS(theta)) * u_hat``  (see the module docstring
    and `scale_by_factored_rms`).  (Keras ``Adafactor``.)

    ``relative_step`` is accepted for Keras's signature; in Keras 3 the cap ``1/sqrt(t)`` applies
    either way, so ``False`` changes nothing (a warning says so).
    """
    if not isinstance(relative_step, bool):
        raise ValueError(f"adafactor: relative_step must be a bool, got {relative_step!r}")
    if not relative_step:
        warnings.warn(
            "adafactor: relative_step=False changes nothing: Keras 3's Adafactor (which gradtx follows) "
            "caps the step at min(learning_rate, 1/sqrt(t)) whether or not relative_step is set",
            stacklevel=2,
        )
    core = chain(
        scale_by_factored_rms(beta_2_decay, epsilon_1),
        clip_by_block_rms(clip_threshold),
        scale_by_param_block_rms(epsilon_2),
        scale_by_relative_step(learning_rate),
    )
    return with_keras_options(core, owner="adafactor", **options)
