"""Schedules: pure functions ``step -> value``, for the learning rate or any other hyperparameter.

``step`` is the number of updates done before the current one (0 on the first update), the count that
`gradtx.chain` passes to its members and that Keras's ``optimizer.iterations`` holds, so a schedule
gives the same value here as the Keras schedule of the same name at the same update.

Every numeric argument may be a Python number or a JAX array, so ``jax.vmap`` can sweep a schedule's
own hyperparameters (build the optimizer inside the vmapped function). Concrete arguments are checked
when the schedule is built; a negative concrete step raises, a traced one is clamped at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.base import Schedule
from gradtx.hyper import (
    CLOSED_UNIT_INTERVAL,
    NONNEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    Range,
    check_value,
    is_concrete,
)

Number = Any  # float | int | jax.Array

_NONNEGATIVE, _POSITIVE = NONNEGATIVE, POSITIVE


def _check(owner: str, **named: tuple[Number, Range]) -> None:
    for name, (value, rule) in named.items():
        check_value(owner, name, value, rule, scalar=False)


def _steps(owner: str, step: Number) -> jax.Array:
    """The step as float32 (as Keras computes schedules), refusing a concrete negative step."""
    if is_concrete(step) and np.any(np.asarray(step) < 0):
        raise ValueError(f"{owner}: step must be >= 0, got {step}")
    return jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)


def _f32(x: Number) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def constant_schedule(value: Number) -> Schedule:
    """``eta(t) = value`` at every step."""
    _check("constant_schedule", value=(value, _NONNEGATIVE))

    def schedule(step):
        _steps("constant_schedule", step)
        return _f32(value)

    return schedule


def power_schedule(initial_value: Number, decay_steps: Number, power: Number = 1.0) -> Schedule:
    """Power scheduling:  ``eta(t) = eta0 / (1 + t/s)^c``  with ``s = decay_steps``, ``c = power``.

    After ``s`` steps the value is ``eta0 / 2^c``, after ``3s`` steps ``eta0 / 4^c``: it drops fast,
    then more and more slowly. With ``c = 1`` this is Keras's ``InverseTimeDecay(eta0, s, 1.0)``.
    """
    _check(
        "power_schedule",
        initial_value=(initial_value, _NONNEGATIVE),
        decay_steps=(decay_steps, _POSITIVE),
        power=(power, _NONNEGATIVE),
    )

    def schedule(step):
        t = _steps("power_schedule", step)
        return _f32(initial_value) / jnp.power(1.0 + t / _f32(decay_steps), _f32(power))

    return schedule


def exponential_schedule(
    initial_value: Number, decay_steps: Number, decay_rate: Number = 0.1, staircase: bool = False
) -> Schedule:
    """Exponential scheduling:  ``eta(t) = eta0 * r^(t/s)``  (``r^floor(t/s)`` with ``staircase``).

    The value is divided by ``1/r`` every ``s`` steps. Keras's ``ExponentialDecay``.
    """
    _check(
        "exponential_schedule",
        initial_value=(initial_value, _NONNEGATIVE),
        decay_steps=(decay_steps, _POSITIVE),
        decay_rate=(decay_rate, _POSITIVE),
    )

    def schedule(step):
        p = _steps("exponential_schedule", step) / _f32(decay_steps)
        if staircase:
            p = jnp.floor(p)
        return _f32(initial_value) * jnp.power(_f32(decay_rate), p)

    return schedule


def _increasing(owner: str, name: str, boundaries: Sequence[Number]) -> None:
    if all(is_concrete(b) for b in boundaries):
        b = np.asarray([np.asarray(x, np.float64) for x in boundaries])
        if np.any(b < 0) or np.any(np.diff(b, axis=0) <= 0):
            raise ValueError(f"{owner}: {name} must be >= 0 and strictly increasing, got {list(b)}")


def piecewise_constant_schedule(boundaries: Sequence[Number], values: Sequence[Number]) -> Schedule:
    """Piecewise constant:  ``values[0]`` while ``t <= boundaries[0]``, ``values[i]`` while
    ``boundaries[i-1] < t <= boundaries[i]``, ``values[-1]`` after the last boundary.

    The same intervals (closed on the right) as Keras's ``PiecewiseConstantDecay``.
    """
    owner = "piecewise_constant_schedule"
    if len(boundaries) == 0 or len(values) != len(boundaries) + 1:
        raise ValueError(
            f"{owner}: needs len(values) == len(boundaries) + 1 and at least one boundary, "
            f"got {len(boundaries)} boundaries and {len(values)} values"
        )
    _increasing(owner, "boundaries", boundaries)
    for i, v in enumerate(values):
        check_value(owner, f"values[{i}]", v, _NONNEGATIVE, scalar=False)

    def schedule(step):
        t = _steps(owner, step)
        index = sum((t > _f32(b)).astype(jnp.int32) for b in boundaries)
        return jnp.stack([_f32(v) for v in values])[index]

    return schedule


def cosine_decay_schedule(initial_value: Number, decay_steps: Number, alpha: Number = 0.0) -> Schedule:
    """Cosine decay:  ``eta(t) = eta0 * ((1 - alpha) * (1 + cos(pi * min(t, s)/s)) / 2 + alpha)``.

    Falls from ``eta0`` to ``alpha * eta0`` over ``s = decay_steps`` steps and stays there
    (Loshchilov & Hutter's SGDR without restarts; Keras's ``CosineDecay``).
    """
    _check(
        "cosine_decay_schedule",
        initial_value=(initial_value, _NONNEGATIVE),
        decay_steps=(decay_steps, _POSITIVE),
        alpha=(alpha, CLOSED_UNIT_INTERVAL),
    )

    def schedule(step):
        done = jnp.minimum(_steps("cosine_decay_schedule", step), _f32(decay_steps)) / _f32(decay_steps)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * done))
        return _f32(initial_value) * ((1.0 - _f32(alpha)) * cosine + _f32(alpha))

    return schedule


def linear_warmup(peak_value: Number, warmup_steps: Number, init_value: Number = 0.0) -> Schedule:
    """Linear warm-up:  ``eta(t) = init + (peak - init) * min(t, w) / w``, then ``peak`` from step ``w`` on.

    Follow it with a decay through `join_schedules`; ``join_schedules([linear_warmup(p, w, a),
    cosine_decay_schedule(p, s)], [w])`` is Keras's ``CosineDecay(a, s, warmup_target=p, warmup_steps=w)``.
    """
    _check(
        "linear_warmup",
        peak_value=(peak_value, _NONNEGATIVE),
        warmup_steps=(warmup_steps, _NONNEGATIVE),
        init_value=(init_value, _NONNEGATIVE),
    )

    def schedule(step):
        t, w = _steps("linear_warmup", step), _f32(warmup_steps)
        # With w = 0 there is no warm-up: the fraction is 1 from the first step.
        fraction = jnp.where(w > 0, jnp.minimum(t, w) / jnp.maximum(w, 1.0), 1.0)
        return _f32(init_value) + (_f32(peak_value) - _f32(init_value)) * fraction

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[Number]) -> Schedule:
    """Runs ``schedules`` one after the other: ``schedules[i]`` from step ``boundaries[i-1]`` on, with its
    step counted from there (``t - boundaries[i-1]``). ``len(schedules) == len(boundaries) + 1``."""
    owner = "join_schedules"
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"{owner}: needs len(schedules) == len(boundaries) + 1, "
            f"got {len(schedules)} schedules and {len(boundaries)} boundaries"
        )
    _increasing(owner, "boundaries", boundaries)
    for i, s in enumerate(schedules):
        if not callable(s):
            raise ValueError(f"{owner}: schedules[{i}] must be a function step -> value, got {s!r}")

    def schedule(step):
        t = _steps(owner, step)
        starts = [jnp.zeros([], jnp.float32)] + [_f32(b) for b in boundaries]
        index = sum((t >= b).astype(jnp.int32) for b in starts[1:])
        # Each piece sees a step >= 0 (clamped where it is not the one in effect): only the selected
        # value is used, but every piece is evaluated so the result is one array op under jit/vmap.
        pieces = [_f32(s(jnp.maximum(t - start, 0.0))) for s, start in zip(schedules, starts, strict=True)]
        return jnp.stack(pieces)[index]

    return schedule


def _one_cycle_phases(owner: str, total_steps: Number, last_steps: Number | None):
    total = jnp.asarray(total_steps, jnp.float32)
    last = jnp.floor(total / 10) + 1 if last_steps is None else jnp.asarray(last_steps, jnp.float32)
    half = jnp.floor((total - last) / 2)
    if is_concrete(total) and is_concrete(last) and np.any(np.asarray(half) < 1):
        raise ValueError(
            f"{owner}: total_steps={total_steps} with last_steps={last_steps} leaves no room for the "
            "rising and falling halves; use more steps or a shorter last phase"
        )
    return total, half


def _interpolate(t, t0, t1, v0, v1, anneal: str):
    fraction = jnp.clip((t - t0) / jnp.maximum(t1 - t0, 1.0), 0.0, 1.0)
    if anneal == "cos":
        fraction = 0.5 * (1.0 - jnp.cos(jnp.pi * fraction))
    # This form (not v0 + (v1 - v0) * f) gives both endpoints exactly, the last value included.
    return v0 * (1.0 - fraction) + v1 * fraction


def _check_anneal(owner: str, anneal: str) -> None:
    if anneal not in ("linear", "cos"):
        raise ValueError(f"{owner}: anneal must be 'linear' or 'cos', got {anneal!r}")


def one_cycle_schedule(
    total_steps: Number,
    max_value: Number,
    start_value: Number | None = None,
    last_steps: Number | None = None,
    last_value: Number | None = None,
    anneal: str = "linear",
) -> Schedule:
    """1cycle (Smith, 2018; the course's ``OneCycleScheduler``), with ``h = (T - L) // 2``:

    * ``0 <= t < h``: rise from ``start_value`` to ``max_value``;
    * ``h <= t < 2h``: come back down to ``start_value``;
    * ``2h <= t <= T``: drop to ``last_value`` over the last ``T - 2h`` steps, and stay there.

    ``T = total_steps``. Defaults as in the course: ``start_value = max_value / 10``, ``L = last_steps =
    T // 10 + 1``, ``last_value = start_value / 1000``. ``anneal="cos"`` follows half cosines between the
    same points instead of straight lines. Pair it with `one_cycle_momentum`.
    """
    owner = "one_cycle_schedule"
    _check_anneal(owner, anneal)
    start = _f32(max_value) / 10 if start_value is None else _f32(start_value)
    last = start / 1000 if last_value is None else _f32(last_value)
    _check(
        owner,
        total_steps=(total_steps, _POSITIVE),
        max_value=(max_value, _NONNEGATIVE),
        start_value=(start, _NONNEGATIVE),
        last_value=(last, _NONNEGATIVE),
    )
    total, half = _one_cycle_phases(owner, total_steps, last_steps)

    def schedule(step):
        t = _steps(owner, step)
        rise = _interpolate(t, 0.0, half, start, _f32(max_value), anneal)
        fall = _interpolate(t, half, 2 * half, _f32(max_value), start, anneal)
        drop = _interpolate(t, 2 * half, total, start, last, anneal)
        return jnp.where(t < half, rise, jnp.where(t < 2 * half, fall, drop))

    return schedule


def one_cycle_momentum(
    total_steps: Number,
    max_momentum: Number = 0.95,
    min_momentum: Number = 0.85,
    last_steps: Number | None = None,
    anneal: str = "linear",
) -> Schedule:
    """The momentum that goes with `one_cycle_schedule`: the mirror image of the learning rate.

    Falls from ``max_momentum`` to ``min_momentum`` while the rate rises (``0 <= t < h``), climbs back
    while it falls (``h <= t < 2h``) and stays at ``max_momentum`` for the last phase. Give it as the
    ``momentum`` of `gradtx.sgd` or the ``beta_1`` of `gradtx.adam`.
    """
    owner = "one_cycle_momentum"
    _check_anneal(owner, anneal)
    in_unit = UNIT_INTERVAL
    _check(
        owner,
        total_steps=(total_steps, _POSITIVE),
        max_momentum=(max_momentum, in_unit),
        min_momentum=(min_momentum, in_unit),
    )
    _, half = _one_cycle_phases(owner, total_steps, last_steps)

    def schedule(step):
        t = _steps(owner, step)
        high, low = _f32(max_momentum), _f32(min_momentum)
        down = _interpolate(t, 0.0, half, high, low, anneal)
        up = _interpolate(t, half, 2 * half, low, high, anneal)
        return jnp.where(t < half, down, jnp.where(t < 2 * half, up, high))

    return schedule
