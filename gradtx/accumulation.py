"""Gradient accumulation: one optimizer update per ``steps`` micro-batches, with the mean gradient.

``accumulate_gradients(adam(1e-3), steps=4)`` is Keras ``Adam(1e-3, gradient_accumulation_steps=4)``
and optax ``MultiSteps(adam(1e-3), 4)``: call it on every micro-batch's gradient; three calls in four
it only adds the gradient to a running sum and returns zero updates, the fourth hands the mean of the
four to the optimizer and returns its update.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from gradtx.base import (
    State,
    Transformation,
    Updates,
    accepts_extra,
    is_float,
    leafwise,
    next_step,
    zeros_like_state,
)


class AccumulationState(NamedTuple):
    micro_step: jax.Array  # int32: micro-steps done (calls of update), saturating like a chain's count
    accumulated: Updates  # the sum of the gradients since the last update (at least float32)
    inner: State  # the wrapped optimizer's state, advanced only on update micro-steps


def stand_in(fn, grads: Updates) -> Updates:
    """A value with the shapes of the first output of ``fn(None)`` (traced for its shapes only): the
    leaves of ``grads`` where they match, zeros elsewhere."""
    shapes = jax.eval_shape(fn, None)[0]
    if jax.tree.structure(shapes) != jax.tree.structure(grads):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

    def one(x, g):
        same = jnp.shape(g) == x.shape and jnp.result_type(g) == x.dtype
        return g if same else jnp.zeros(x.shape, x.dtype)

    return jax.tree.map(one, shapes, grads)


def accumulate_gradients(inner: Transformation, steps: int) -> Transformation:
    """Gradient accumulation (Keras ``gradient_accumulation_steps``, optax ``MultiSteps``):

    ``a <- a + g`` on the micro-steps ``n`` with ``(n + 1) % steps != 0`` (updates are zero); on the
    others ``u <- inner((a + g) * (1 / steps));  a <- 0``.

    The micro-steps that do not update do not run ``inner`` at all (a ``lax.cond``): they cost one pass
    over the gradients and the running sum (and the zero updates). The mean is a product with
    ``1/steps``, which fuses into the optimizer's passes (Keras divides: the same number when
    ``steps`` is a power of two, within one rounding otherwise). Clipping placed inside
    (``accumulate_gradients(chain(clip_by_global_norm(1.0), adam(lr)), 4)``) clips the mean gradient,
    as Keras does.

    Clocks, as in Keras: ``inner`` counts its real updates (its bias corrections see ``t = 1, 2, ...``),
    while its schedules follow the micro-steps (they are given ``schedule_step``, see
    `gradtx.hyper.HyperSpec.resolve`), so a schedule written in micro-steps needs no change. The count
    of micro-steps is the enclosing `chain`'s ``step`` when there is one, else this state's own.

    Under ``jax.vmap`` (a sweep) the micro-step counter is one per configuration, and vmap would turn a
    cond on it into a select that runs ``inner`` on every micro-step. A custom batching rule keeps the
    cond: ``inner`` runs (for all configurations) when at least one of them updates, so in a sweep,
    whose configurations step together, the micro-steps skip ``inner`` as they do unbatched; and
    configurations at different micro-steps (a sweep whose early-stopped runs are frozen) stay
    correct. Each configuration then keeps ``inner``'s result only if it updates, a select on the
    inner state that XLA implements with copies of that state: measured on a CPU, such a vmapped
    micro-step cost more than a full step (``experiments/bench/options.md``). Passing the micro-step
    unbatched removes the selects: ``jax.vmap(lambda g, s, p: tx.update(g, s, p, step=n), in_axes=(None, 0,
    0))`` with ``n`` the common count (an enclosing `chain` hands ``step`` on). ``update`` has no
    reverse-mode derivative (``jax.custom_batching.custom_vmap`` has none), which an optimizer update
    seldom needs.
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

    def micro_step(micro, takes, run, grads, accumulated, inner_state, params, extra):
        """``(updates, accumulated, inner_state)`` after the micro-step ``micro``. ``run`` (one bool for
        all configurations of a vmap) decides whether ``inner`` runs at all, a ``lax.cond``; ``takes``
        (this configuration's) whether its result is kept (``None``: it is, whenever it runs)."""

        def updated(_):
            def mean(g, a):
                return (((g.astype(a.dtype) + a) * (1.0 / steps)).astype(g.dtype), a)

            mean_grads, _ = leafwise("accumulate_gradients", mean, grads, accumulated)
            return run_inner(micro, mean_grads, inner_state, params, extra)

        def apply(_):
            new, s = updated(None)
            if takes is None:
                return new, s, jnp.bool_(True)
            return new, jax.tree.map(lambda a, b: jnp.where(takes, a, b), s, inner_state), takes

        def skip(_):
            # The incoming gradients stand in for the (unused) updates where they have their shapes:
            # returning them writes nothing, where zeros would be a new buffer and one more pass.
            return stand_in(updated, grads), inner_state, jnp.bool_(False)

        new, inner_state, applied = lax.cond(run, apply, skip, None)
        new = jax.tree.map(lambda u: jnp.where(applied, u, jnp.zeros_like(u)) if is_float(u) else u, new)
        # Outside the cond, one fused pass that writes the running sum in place. It reads the cond's
        # flag (not ``run``), so that XLA orders it after the cond, which reads the old sum; otherwise
        # XLA copies the sum into a new buffer first, which costs more than the micro-step itself.
        _, accumulated = leafwise(
            "accumulate_gradients",
            lambda g, a: (g, jnp.where(applied, jnp.zeros_like(a), g.astype(a.dtype) + a)),
            grads,
            accumulated,
        )
        return new, accumulated, inner_state

    @custom_vmap
    def one_clock(micro, *args):
        is_update = (micro + 1) % steps == 0
        return micro_step(micro, None, is_update, *args)

    @one_clock.def_vmap
    def one_clock_batched(axis_size, in_batched, micro, *args):
        micro_batched, *args_batched = in_batched
        axes = [jax.tree.map(lambda b: 0 if b else None, b) for b in args_batched]
        is_update = (micro + 1) % steps == 0
        run = jnp.any(is_update)  # one bool for all configurations: the cond stays a cond
        if micro_batched:
            vmapped = jax.vmap(micro_step, in_axes=(0, 0, None, *axes), axis_size=axis_size)
            out = vmapped(micro, is_update, run, *args)
        else:
            vmapped = jax.vmap(micro_step, in_axes=(None, None, None, *axes), axis_size=axis_size)
            out = vmapped(micro, None, run, *args)
        return out, jax.tree.map(lambda _: True, out)

    # jit: called eagerly, the lax.cond compiles once per transformation, not at every call.
    shared = jax.jit(one_clock)

    def init(params):
        accumulated = jax.tree.map(zeros_like_state, params)
        return AccumulationState(jnp.zeros([], jnp.int32), accumulated, inner.init(params))

    def update(updates, state, params=None, *, step=None, **extra):
        micro = state.micro_step if step is None else jnp.asarray(step, jnp.int32)
        new, accumulated, inner_state = shared(micro, updates, state.accumulated, state.inner, params, extra)
        return new, AccumulationState(next_step(micro), accumulated, inner_state)

    return Transformation(init, update)
