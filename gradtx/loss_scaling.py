"""Reduced-precision training: loss scaling, and skipping the steps whose gradients are not finite.

In float16 small gradients underflow to 0. Multiplying the loss by a scale ``S`` before
differentiating multiplies every gradient by ``S`` and keeps them representable; the optimizer divides
them by ``S`` again. A fixed ``S`` is `unscale_gradients` (Keras ``loss_scale_factor=``);
`loss_scale_optimizer` adapts it (Keras ``LossScaleOptimizer``)::

    tx = gradtx.loss_scale_optimizer(gradtx.adam(1e-3))
    def step(params, state, batch):
        scale = gradtx.current_loss_scale(state)
        grads = jax.grad(lambda p: scale * loss_fn(p, batch))(params)   # float16 model, scaled loss
        updates, state = tx.update(grads, state, params)                # unscales, or skips the step
        return gradtx.apply_updates(params, updates), state

The unscaled gradients are computed and handed on in at least float32: dividing a float16 gradient by
``S`` in float16 would underflow again, which is what the scale was for.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gradtx.base import State, Transformation, Updates, accepts_extra, is_float, leafwise, next_step
from gradtx.hyper import POSITIVE, Hyper, Hyperparams, HyperSpec, Range, check_value, find_hyperparam

WHOLE_POSITIVE = Range(1.0, whole=True)


def _unscaled(g: jax.Array, inverse: jax.Array) -> jax.Array:
    # A product with 1/S, not a quotient: XLA fuses it into each pass of the optimizer that reads the
    # gradient, where a division (not duplicated into several consumers) would be one more pass over
    # the gradients. Equal to g / S when S is a power of two (loss scales are), else within a rounding.
    return g.astype(jnp.promote_types(g.dtype, jnp.float32)) * inverse


def all_finite(updates: Updates) -> jax.Array:
    """Whether every floating leaf of ``updates`` is free of inf and NaN (one bool; True if none)."""
    checks = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(updates) if is_float(g)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def _zeros_like_output(fn, *args) -> Updates:
    shapes = jax.eval_shape(fn, *args)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _without_step(extra: dict) -> dict:
    # The wrapped optimizer counts only the steps it makes (as Keras's inner optimizer does): a skipped
    # step does not advance its bias corrections or schedules, so the enclosing clock is not passed on.
    return {k: v for k, v in extra.items() if k != "step"}


class UnscaleState(NamedTuple):
    hyperparams: Hyperparams


def unscale_gradients(loss_scale_factor: Hyper) -> Transformation:
    """Undoes a fixed loss scale:  ``u <- g * (1 / loss_scale_factor)``  (in at least float32; Keras
    divides, which is the same number for a power of two and within one rounding otherwise).

    Multiply the loss by the same factor (`current_loss_scale` reads it from the state). Place it first
    in the chain. (Keras ``loss_scale_factor=``.)
    """
    spec = HyperSpec("unscale_gradients", loss_scale_factor=(loss_scale_factor, POSITIVE))

    def init(params):
        return UnscaleState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        inverse = 1.0 / h["loss_scale_factor"]
        (updates,) = leafwise("unscale_gradients", lambda g: (_unscaled(g, inverse),), updates)
        return updates, UnscaleState(hp)

    return Transformation(init, update)


class LossScaleState(NamedTuple):
    loss_scale: jax.Array  # float32: the scale the next loss is multiplied by
    growth_count: jax.Array  # int32: finite steps since the scale last changed
    inner: State  # untouched by a skipped step
    hyperparams: Hyperparams


def loss_scale_optimizer(
    inner: Transformation, initial_scale: float = 2.0**15, dynamic_growth_steps: Hyper = 2000
) -> Transformation:
    """Dynamic loss scaling (Keras ``LossScaleOptimizer``):

    if every gradient is finite:  ``u <- inner(g / S)``, and ``S <- 2*S`` after ``dynamic_growth_steps``
    finite steps in a row;  else:  ``u <- 0``, ``inner``'s state is left as it was (the step is skipped,
    and is not counted by ``inner``'s bias corrections and schedules) and ``S <- S/2``.

    Scale the loss by `current_loss_scale` (``S`` before the step) to compute the gradients. The check
    for inf and NaN is on the scaled gradients, before ``inner`` runs (a ``lax.cond``: a skipped step
    does not compute ``inner``'s update). ``dynamic_growth_steps`` is a hyperparameter in the state.
    An ``inner`` that unscales as well (built with ``loss_scale_factor=``) is refused at ``init``.
    """
    check_value("loss_scale_optimizer", "initial_scale", initial_scale, POSITIVE)
    spec = HyperSpec("loss_scale_optimizer", dynamic_growth_steps=(dynamic_growth_steps, WHOLE_POSITIVE))
    takes_extra = accepts_extra(inner.update)

    def init(params):
        scale = jnp.asarray(initial_scale, jnp.float32)
        inner_state = inner.init(params)
        _check_unscaled_once(inner_state)
        return LossScaleState(scale, jnp.zeros([], jnp.int32), inner_state, spec.init())

    @jax.jit  # called eagerly, the lax.cond compiles once per transformation, not at every call
    def run(updates, state, params, step, extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        scale = state.loss_scale
        kwargs = _without_step(extra) if takes_extra else {}

        def finite(_):
            inverse = 1.0 / scale
            (unscaled,) = leafwise("loss_scale_optimizer", lambda g: (_unscaled(g, inverse),), updates)
            return inner.update(unscaled, state.inner, params, **kwargs)

        def skip(_):
            return _zeros_like_output(finite, None)[0], state.inner

        ok = all_finite(updates)
        new, inner_state = lax.cond(ok, finite, skip, None)
        grow = ok & (state.growth_count.astype(jnp.float32) == h["dynamic_growth_steps"] - 1)
        new_scale = jnp.where(ok, jnp.where(grow, scale * 2.0, scale), scale * 0.5)
        count = jnp.where(ok & ~grow, state.growth_count + 1, 0)
        return new, LossScaleState(new_scale, count, inner_state, hp)

    def update(updates, state, params=None, *, step=None, **extra):
        return run(updates, state, params, step, extra)

    return Transformation(init, update)


def _check_unscaled_once(inner_state: State) -> None:
    """Refuses an ``inner`` that unscales too (its ``loss_scale_factor=`` or another
    `loss_scale_optimizer`): the gradients would be divided twice while the loss is scaled once.
    (Keras's ``LossScaleOptimizer`` sets the inner optimizer's ``loss_scale_factor`` to None instead;
    a built transformation cannot be changed, so the choice is left to the user.)"""
    nodes = jax.tree.leaves(inner_state, is_leaf=lambda x: isinstance(x, Hyperparams | LossScaleState))
    for node in nodes:
        if isinstance(node, LossScaleState):
            raise ValueError("loss_scale_optimizer: the inner optimizer is a loss_scale_optimizer already")
        if isinstance(node, Hyperparams) and node.owner == "unscale_gradients":
            factor = node.constant.get("loss_scale_factor", "a schedule")
            raise ValueError(
                f"loss_scale_optimizer: the inner optimizer unscales by loss_scale_factor={factor} too, "
                "so the gradients would be divided twice; build it without loss_scale_factor"
            )


def current_loss_scale(state: State) -> jax.Array:
    """The factor to multiply the loss by before differentiating: the dynamic scale of a
    `loss_scale_optimizer` in ``state``, else its ``loss_scale_factor`` (Keras's ``scale_loss``)."""
    found = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, LossScaleState))
        if isinstance(x, LossScaleState)
    ]
    if len(found) > 1:
        raise ValueError(f"current_loss_scale: the state holds {len(found)} loss_scale_optimizers")
    if found:
        return found[0].loss_scale
    try:
        return find_hyperparam("current_loss_scale", state, "loss_scale_factor")
    except ValueError:
        raise ValueError(
            "current_loss_scale: the state has no loss scale; wrap the optimizer in "
            "gradtx.loss_scale_optimizer or give it loss_scale_factor="
        ) from None


class ApplyIfFiniteState(NamedTuple):
    notfinite_count: jax.Array  # int32: non-finite steps in a row, skipped (0 after a step is applied)
    last_finite: jax.Array  # bool: whether the last gradient was finite
    total_notfinite: jax.Array  # int32: non-finite steps seen in all
    inner: State  # untouched by a skipped step


def apply_if_finite(inner: Transformation, max_consecutive_errors: int) -> Transformation:
    """Skips the steps whose gradients hold an inf or NaN (optax ``apply_if_finite``):

    if ``g`` is finite:  ``u <- inner(g)``;  else ``u <- 0`` and ``inner``'s state is left as it was,
    unless this is the ``(max_consecutive_errors + 1)``-th non-finite step in a row: then it gives up
    and applies it.

    ``notfinite_count`` counts the skipped steps in a row and returns to 0 whenever a step is applied,
    the given-up one included. (optax keeps counting after giving up, so every later non-finite step
    is applied until a finite one comes; google-deepmind/optax#1746.) A skipped step does not run
    ``inner`` (a ``lax.cond``) and is not counted by its bias corrections and schedules.
    """
    n = max_consecutive_errors
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"apply_if_finite: max_consecutive_errors must be an integer >= 1, got {n!r}")
    takes_extra = accepts_extra(inner.update)

    def init(params):
        zero = jnp.zeros([], jnp.int32)
        return ApplyIfFiniteState(zero, jnp.bool_(True), zero, inner.init(params))

    @jax.jit  # called eagerly, the lax.cond compiles once per transformation, not at every call
    def run(updates, state, params, extra):
        kwargs = _without_step(extra) if takes_extra else {}

        def apply_inner(_):
            return inner.update(updates, state.inner, params, **kwargs)

        def skip(_):
            return _zeros_like_output(apply_inner, None)[0], state.inner

        ok = all_finite(updates)
        streak = jnp.where(ok, 0, state.notfinite_count + 1)
        apply = ok | (streak > max_consecutive_errors)
        new, inner_state = lax.cond(apply, apply_inner, skip, None)
        total = jnp.where(ok, state.total_notfinite, next_step(state.total_notfinite))
        return new, ApplyIfFiniteState(jnp.where(apply, 0, streak), ok, total, inner_state)

    def update(updates, state, params=None, *, step=None, **extra):
        return run(updates, state, params, extra)

    return Transformation(init, update)
