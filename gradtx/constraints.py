"""Weight constraints, applied to the parameters after each step as Keras applies ``kernel_constraint``.

Each constraint ``c`` is a transformation that replaces the step ``u`` by ``c(theta + u) - theta``, so
that ``apply_updates`` lands on ``c(theta + u)``: put it last in the chain,
``chain(sgd(0.1), masked(max_norm(2.0), "*/kernel"))``. It needs the params.

Axis convention. The norms are taken over ``axis`` and there is one norm per remaining index. Flax
kernels have Keras's layout, with the output units last: ``nnx.Linear``/``Dense`` kernels are
``(in, out)``, so ``axis=0`` (the default) bounds the incoming weight vector of each output neuron;
``nnx.Conv``/``Conv2D`` kernels are ``(h, w, in, out)``, so ``axis=(0, 1, 2)`` bounds each filter.

The norms follow Keras 3 exactly, including its fuzz factor:  ``norms = sqrt(sum(w**2, axis))``, and
``w * desired / (1e-7 + norms)``; so a constrained vector lands just inside the bound, not on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Transformation, leafwise
from gradtx.hyper import CLOSED_UNIT_INTERVAL, NONNEGATIVE, Hyper, Hyperparams, HyperSpec, is_concrete

KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), the fuzz factor in Keras's norm constraints

Axis = int | Sequence[int]


class ConstraintState(NamedTuple):
    hyperparams: Hyperparams


def _axes(owner: str, axis: Axis) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or not all(isinstance(a, int) for a in axes):
        raise ValueError(f"{owner}: axis must be an int or a non-empty sequence of ints, got {axis!r}")
    return axes


def _norms(owner: str, w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    if any(not -w.ndim <= a < w.ndim for a in axes):
        raise ValueError(
            f"{owner}: axis {axes} does not exist in a parameter of shape {w.shape}; route the "
            "constraint to the kernels with gradtx.masked (e.g. mask=gradtx.weights_only)"
        )
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))


def _constraint(owner: str, project: Callable, **hyper: Hyper) -> Transformation:
    """The transformation ``u <- project(theta + u, h) - theta`` for a projection ``project(w, h)``."""
    spec = HyperSpec(owner, **hyper)

    def init(params):
        return ConstraintState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError(f"{owner} needs the params: call update(updates, state, params)")
        h, hp = spec.resolve(state.hyperparams, step, **extra)

        def leaf(u, p):
            # The value apply_updates would produce, then its projection, in at least float32.
            wide = jnp.promote_types(p.dtype, jnp.float32)
            after = (p + u).astype(p.dtype).astype(wide)
            return (project(after, h) - p.astype(wide)).astype(u.dtype), p

        updates, _ = leafwise(owner, leaf, updates, params)
        return updates, ConstraintState(hp)

    return Transformation(init, update)


def max_norm(max_value: Hyper = 2.0, axis: Axis = 0) -> Transformation:
    """Max-norm:  ``n = ||w||_axis;  w <- w * clip(n, 0, max_value) / (eps + n)``,  ``eps = 1e-7``.
    (Keras ``MaxNorm``; Srivastava et al., 2014.)

    Each weight vector along ``axis`` (the incoming weights of an output unit for a Dense kernel; use
    ``axis=(0, 1, 2)`` for a Conv kernel) is scaled back onto the ball of radius ``max_value``.
    """
    axes = _axes("max_norm", axis)

    def project(w, h):
        n = _norms("max_norm", w, axes)
        return w * (jnp.clip(n, 0, h["max_value"]) / (KERAS_EPSILON + n))

    return _constraint("max_norm", project, max_value=(max_value, NONNEGATIVE))


def unit_norm(axis: Axis = 0) -> Transformation:
    """Unit norm:  ``w <- w / (eps + ||w||_axis)``,  ``eps = 1e-7``.  (Keras ``UnitNorm``.)"""
    axes = _axes("unit_norm", axis)
    return _constraint("unit_norm", lambda w, h: w / (KERAS_EPSILON + _norms("unit_norm", w, axes)))


def min_max_norm(
    min_value: Hyper = 0.0, max_value: Hyper = 1.0, rate: Hyper = 1.0, axis: Axis = 0
) -> Transformation:
    """Min-max norm:  ``n = ||w||_axis;  d = rate * clip(n, min_value, max_value) + (1 - rate) * n;
    w <- w * d / (eps + n)``,  ``eps = 1e-7``.  (Keras ``MinMaxNorm``.)

    ``rate = 1`` enforces the bounds at every step; a smaller rate moves the norms towards them.
    """
    if (
        not callable(min_value)
        and not callable(max_value)
        and is_concrete(min_value)
        and is_concrete(max_value)
        and float(min_value) > float(max_value)
    ):
        raise ValueError(f"min_max_norm: min_value must be <= max_value, got {min_value} > {max_value}")
    axes = _axes("min_max_norm", axis)

    def project(w, h):
        n = _norms("min_max_norm", w, axes)
        desired = h["rate"] * jnp.clip(n, h["min_value"], h["max_value"]) + (1 - h["rate"]) * n
        return w * (desired / (KERAS_EPSILON + n))

    return _constraint(
        "min_max_norm",
        project,
        min_value=(min_value, NONNEGATIVE),
        max_value=(max_value, NONNEGATIVE),
        rate=(rate, CLOSED_UNIT_INTERVAL),
    )


def non_neg() -> Transformation:
    """Non-negativity:  ``w <- max(w, 0)``.  (Keras ``NonNeg``.)

    The clipped weights land on exactly 0: ``theta + (0 - theta)`` is exact.
    """
    return _constraint("non_neg", lambda w, h: jnp.maximum(w, 0))
