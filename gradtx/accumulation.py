"""Gradient accumulation: one optimizer update per ``steps`` micro-batches, with the mean gradient.

``accumulate_gradients(adam(1e-3), steps=4)`` is Keras ``Adam(1e-3, gradient_accumulation_steps=4)``
and optax ``MultiSteps(adam(1e-3), 4)``: call it on every micro-batch's gradient; three calls in four
it only adds the gradient to a running sum and returns zero updates, the fourth hands the mean of the
four to the optimizer and returns its update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from gradtx.base import State, Transformation, Updates, accepts_extra, leafwise, next_step, zeros_like_state


class AccumulationState(NamedTuple):
    micro_step: jax.Array  # int32: micro-steps done (calls of update), saturating like a chain's count
    accumulated: Updates  # the sum of the gradients since the last update (at least float32)
    inner: State  # the wrapped optimizer's state, advanced only on update micro-steps


def accumulate_gradients(inner: Transformation, steps: int) -> Transformation:
    """Gradient accumulation (Keras ``gradient_accumulation_steps``, optax ``MultiSteps``):

    ``a <- a + g`` on the micro-steps ``n`` with ``(n + 1) % steps != 0`` (updates are zero); on the
    others ``u <- inner((a + g) * (1 / steps));  a <- 0``.

    The micro-steps that do not update do not run ``inner`` at all (a ``lax.cond``): they cost one pass
    over the gradients and the running sum (and the zero updates). The mean is a product with
    ``1/steps``, which fuses into the optimizer's passes (Keras divides: the same number when ``steps``
    is a power of two, within one rounding otherwise). Clipping placed inside (``accumulate_gradients(chain(clip_by_global_norm(1.0),
    adam(lr)), 4)``) clips the mean gradient, as Keras does.

    Clocks, as in Keras: ``inner`` counts its real updates (its bias corrections see ``t = 1, 2, ...``),
    while its schedules follow the micro-steps (they are given ``schedule_step``, see
    `gradtx.hyper.HyperSpec.resolve`), so a schedule written in micro-steps needs no change. The count
    of micro-steps is the enclosing `chain`'s ``step`` when there is one, else this state's own.

    Under ``jax.vmap`` (a sweep) the step counter is one per configuration, so the predicate of the
    ``lax.cond`` is batched, and vmap would turn the cond into a select that runs ``inner`` on every
    micro-step. A custom batching rule avoids that: when all configurations are at the same micro-step
    (every sweep steps them together) one unbatched cond decides for all of them; otherwise (states at
    different counts) it falls back to the select, correct but as costly as a full step. A consequence:
    ``update`` has no reverse-mode derivative (``jax.custom_batching.custom_vmap`` has none), which an
    optimizer update seldom needs.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"accumulate_gradients: steps must be an integer >= 2, got {steps!r}")
    takes_extra = accepts_extra(inner.update)

    def run_inner(micro, mean, inner_state, params, extra):
        if not takes_extra:
            return inner.update(mean, inner_state, params)
        # ``step`` (the bias corrections' clock) counts real updates; schedules keep an enclosing
        # clock if there is one, else follow the micro-steps.
        clocks = {"step": micro // steps, "schedule_step": extra.get("schedule_step", micro)}
        return inner.update(mean, inner_state, params, **{**extra, **clocks})

    def micro_step(micro, grads, accumulated, inner_state, params, extra):
        """``(updates, accumulated, inner_state)`` after the micro-step ``micro``, with one lax.cond."""

        def apply(_):
            def mean(g, a):
                return (((g.astype(a.dtype) + a) * (1.0 / steps)).astype(g.dtype), a)

            mean_grads, _ = leafwise("accumulate_gradients", mean, grads, accumulated)
            return (*run_inner(micro, mean_grads, inner_state, params, extra), jnp.bool_(True))

        def keep(_):
            shapes = jax.eval_shape(apply, None)[0]
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            return zeros, inner_state, jnp.bool_(False)

        new, inner_state, applied = lax.cond((micro + 1) % steps == 0, apply, keep, None)
        # Outside the cond, one fused pass that writes the running sum in place. It reads the cond's
        # flag (not ``is_update``), so that XLA orders it after the cond, which reads the old sum;
        # otherwise XLA copies the sum into a new buffer first, which costs more than the micro-step.
        _, accumulated = leafwise(
            "accumulate_gradients",
            lambda g, a: (g, jnp.where(applied, jnp.zeros_like(a), g.astype(a.dtype) + a)),
            grads,
            accumulated,
        )
        return new, accumulated, inner_state

    # jit: called eagerly, the lax.cond compiles once per transformation, not at every call.
    shared = jax.jit(_shared_clock(micro_step))

    def init(params):
        accumulated = jax.tree.map(zeros_like_state, params)
        return AccumulationState(jnp.zeros([], jnp.int32), accumulated, inner.init(params))

    def update(updates, state, params=None, *, step=None, **extra):
        micro = state.micro_step if step is None else jnp.asarray(step, jnp.int32)
        new, accumulated, inner_state = shared(micro, updates, state.accumulated, state.inner, params, extra)
        return new, AccumulationState(next_step(micro), accumulated, inner_state)

    return Transformation(init, update)


def _shared_clock(fn):
    """``fn(clock, *args)`` whose batching rule keeps ``clock`` unbatched when every configuration of a
    vmap holds the same value (checked at run time), so a ``lax.cond`` on it stays a cond."""

    @custom_vmap
    def shared(clock: jax.Array, *args: Any):
        return fn(clock, *args)

    @shared.def_vmap
    def rule(axis_size, in_batched, clock, *args):
        clock_batched, *args_batched = in_batched
        axes = [jax.tree.map(lambda b: 0 if b else None, b) for b in args_batched]

        def with_one_clock(c):
            return jax.vmap(fn, in_axes=(None, *axes), axis_size=axis_size)(c, *args)

        if not clock_batched:
            out = with_one_clock(clock)
        else:
            out = lax.cond(
                jnp.all(clock == clock[0]),
                lambda: with_one_clock(clock[0]),
                lambda: jax.vmap(fn, in_axes=(0, *axes), axis_size=axis_size)(clock, *args),
            )
        return out, jax.tree.map(lambda _: True, out)

    return shared
