"""Performance scheduling: shrink the steps when a monitored value (e.g. validation loss) stops improving.

`reduce_on_plateau` is a transformation chained after an optimizer. Its plateau logic is the one of
Keras's ``ReduceLROnPlateau`` callback, run on device: arrays in the state, `jnp.where` instead of
Python branches, so it runs under ``jit`` and, under ``vmap``, every configuration of a sweep keeps its
own best value, counters and scale.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Transformation, leafwise
from gradtx.hyper import (
    CLOSED_UNIT_INTERVAL,
    COUNT,
    NONNEGATIVE,
    OPEN_UNIT_INTERVAL,
    Hyper,
    Hyperparams,
    HyperSpec,
    find_hyperparam,
)


class PlateauState(NamedTuple):
    best: jax.Array  # float32: best monitored value so far
    wait: jax.Array  # int32: measurements since the last improvement (or reduction)
    cooldown_counter: jax.Array  # int32: measurements left before waiting counts again
    count: jax.Array  # int32: measurements seen (the first one is always an improvement)
    scale: jax.Array  # float32: the factor applied to the updates, 1 until the first reduction
    hyperparams: Hyperparams


def reduce_on_plateau(
    factor: Hyper = 0.1,
    patience: Hyper = 10,
    min_delta: Hyper = 1e-4,
    cooldown: Hyper = 0,
    min_scale: Hyper = 0.0,
    mode: str = "min",
) -> Transformation:
    """Performance scheduling:  ``u <- scale * g``,  with ``scale <- max(scale * factor, min_scale)`` once
    the monitored value has not improved for ``patience`` measurements.

    Pass the monitored value at every update, ``update(..., value=v, measured=m)``: ``measured`` (a bool,
    default True) says whether ``v`` is a new measurement; at the steps in between pass the last value
    with ``measured=False``, which leaves the plateau logic untouched (one signature for every step, as
    a compiled loop needs; `gradtx.fit` does this with ``plateau_metric=``). A missing ``value`` is an
    error rather than a silent no-op: it is what happens inside ``optax.chain``, which drops the extra
    arguments of transformations that are not optax's own. A reduction decided at a step already
    scales that step's update.

    Per measurement ``v``, as Keras's ``ReduceLROnPlateau`` (``min_lr = min_scale * learning_rate``):

    * during a cooldown, ``cooldown_counter -= 1`` and ``wait <- 0``;
    * if ``v < best - min_delta`` (``mode="min"``; ``v > best + min_delta`` for ``"max"``), or ``v`` is the
      first measurement: ``best <- v``, ``wait <- 0``;
    * else, if no longer in cooldown: ``wait += 1``, and when ``wait >= patience`` and
      ``scale > min_scale``: reduce, ``cooldown_counter <- cooldown``, ``wait <- 0``.

    Read the scale with `plateau_scale`, the learning rate in effect with `current_learning_rate`.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"reduce_on_plateau: mode must be 'min' or 'max', got {mode!r}")
    spec = HyperSpec(
        "reduce_on_plateau",
        factor=(factor, OPEN_UNIT_INTERVAL),
        patience=(patience, COUNT),
        min_delta=(min_delta, NONNEGATIVE),
        cooldown=(cooldown, COUNT),
        min_scale=(min_scale, CLOSED_UNIT_INTERVAL),
    )
    sign = 1.0 if mode == "min" else -1.0  # compare sign*v, so "max" is "min" of the negated value

    def init(params):
        zero = jnp.zeros([], jnp.int32)
        return PlateauState(
            jnp.array(jnp.inf, jnp.float32), zero, zero, zero, jnp.ones([], jnp.float32), spec.init()
        )

    def observe(state: PlateauState, h: dict[str, jax.Array], value: jax.Array) -> PlateauState:
        v = sign * jnp.asarray(value, jnp.float32)
        cooling = state.cooldown_counter > 0
        cooldown_counter = jnp.where(cooling, state.cooldown_counter - 1, state.cooldown_counter)
        wait = jnp.where(cooling, 0, state.wait)
        improved = (state.count == 0) | (v < state.best - h["min_delta"])
        # Keras checks the cooldown again after counting it down: the last cooldown step already waits.
        waiting = ~improved & (cooldown_counter == 0)
        wait = jnp.where(improved, 0, jnp.where(waiting, wait + 1, wait))
        reduce = waiting & (wait.astype(jnp.float32) >= h["patience"]) & (state.scale > h["min_scale"])
        return PlateauState(
            best=jnp.where(improved, v, state.best),
            wait=jnp.where(reduce, 0, wait),
            cooldown_counter=jnp.where(reduce, h["cooldown"].astype(jnp.int32), cooldown_counter),
            count=state.count + 1,
            scale=jnp.where(reduce, jnp.maximum(state.scale * h["factor"], h["min_scale"]), state.scale),
            hyperparams=state.hyperparams,
        )

    def update(updates, state, params=None, *, step=None, value=None, measured=True, **extra):
        if value is None:
            raise ValueError(
                "reduce_on_plateau: update needs value= (the monitored value) at every step, with "
                "measured=False at the steps where nothing new was measured. None arrived: inside "
                "optax.chain this happens because optax drops the extra arguments of transformations "
                "that are not its own; chain reduce_on_plateau with gradtx.chain instead"
            )
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        state = state._replace(hyperparams=hp)
        if jnp.ndim(value) != 0:
            raise ValueError(f"reduce_on_plateau: value must be a scalar, got shape {jnp.shape(value)}")
        new = observe(state, h, value)
        state = jax.tree.map(lambda a, b: jnp.where(measured, a, b), new, state)
        (updates,) = leafwise("reduce_on_plateau", lambda g: ((g * state.scale).astype(g.dtype),), updates)
        return updates, state

    return Transformation(init, update)


def _plateau_states(state: Any) -> list[PlateauState]:
    is_node = lambda x: isinstance(x, PlateauState)  # noqa: E731
    return [x for x in jax.tree.leaves(state, is_leaf=is_node) if is_node(x)]


def plateau_scale(state: Any) -> jax.Array:
    """The product of the scales of every `reduce_on_plateau` in ``state`` (1 before any reduction)."""
    scale = jnp.ones([], jnp.float32)
    for node in _plateau_states(state):
        scale = scale * node.scale
    return scale


def current_learning_rate(state: Any, where: str | None = None) -> jax.Array:
    """The learning rate the last update used: the ``learning_rate`` hyperparameter (a schedule's value
    at the last step) times the `plateau_scale`. For logging and plots. ``where`` chooses among several
    learning rates (the members of a `partition`), as in `gradtx.hyperparams`."""
    return find_hyperparam("current_learning_rate", state, "learning_rate", where) * plateau_scale(state)
