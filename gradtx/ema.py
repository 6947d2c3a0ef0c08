"""An exponential moving average (EMA) of the params, kept in the optimizer state (Keras ``use_ema``).

``chain(adam(1e-3), ema_of_params(0.99))`` is Keras ``Adam(1e-3, use_ema=True, ema_momentum=0.99)``:
after each step the state holds ``a <- 0.99*a + 0.01*theta`` of the new params, and `ema_params`
returns it (what Keras's ``finalize_variable_values`` writes into the model). Evaluate with the
average, train with the params; ``ema_overwrite_frequency=f`` also sets the params to the average
every ``f`` steps, as Keras does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import GetAttrKey

from gradtx.base import Params, State, Transformation, is_float, leafwise, zeros_like_state
from gradtx.hyper import CLOSED_UNIT_INTERVAL, Hyper, Hyperparams, HyperSpec


@jax.tree_util.register_pytree_with_keys_class
class Average:
    """The moving average of the params (floating leaves stored in at least float32) with, as static
    metadata, the params' dtypes, so that `ema_params` can return the params' dtypes."""

    __slots__ = ("dtypes", "tree")

    def __init__(self, tree: Params, dtypes: tuple[str, ...]):
        self.tree, self.dtypes = tree, dtypes

    def tree_flatten_with_keys(self):
        return ((GetAttrKey("tree"), self.tree),), self.dtypes

    @classmethod
    def tree_unflatten(cls, dtypes, children):
        return cls(children[0], dtypes)

    def __repr__(self) -> str:
        return f"Average({self.tree})"


class EmaState(NamedTuple):
    average: Average  # the moving average of the params (read it with ema_params)
    hyperparams: Hyperparams


def _start(p: Any) -> jax.Array:
    # Floating leaves: zeros (the first step copies the params). Others (step counters, keys) are
    # never averaged: their value at init is what `ema_params` returns for them.
    return zeros_like_state(p) if is_float(p) else jnp.asarray(p)


def ema_of_params(
    ema_momentum: Hyper = 0.99, ema_overwrite_frequency: int | None = None, steps_per_update: int = 1
) -> Transformation:
    """EMA of the params after the step:  ``theta' = theta + u;  a <- m*a + (1 - m)*theta'``, with
    ``m = 0`` while no update has been made (the first step copies ``theta'``) and ``m =
    ema_momentum`` afterwards. With ``ema_overwrite_frequency = f`` the update becomes ``u <- a -
    theta`` (the params take the average) at the real updates ``r`` with ``(r + 1) % f == 0``,
    ``r = 0, 1, ...`` counted before the step. (Keras ``use_ema``, ``ema_momentum``,
    ``ema_overwrite_frequency``.)

    Place it last in a chain, after the optimizer: it reads the update it is given and the params
    (``update(g, state, params)``). After `gradtx.accumulate_gradients` pass ``steps_per_update`` (the
    accumulation steps): as in Keras, the average then moves on every micro-step, but the first-step
    copy and the overwrite period count real updates, ``r = step // steps_per_update``. The overwrite
    is an update ``a - theta``, so ``theta + u`` is the average up to one rounding of ``theta``.
    """
    spec = HyperSpec("ema_of_params", ema_momentum=(ema_momentum, CLOSED_UNIT_INTERVAL))
    f = ema_overwrite_frequency
    if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 1):
        raise ValueError(f"ema_of_params: ema_overwrite_frequency must be an integer >= 1 or None, got {f!r}")
    if isinstance(steps_per_update, bool) or not isinstance(steps_per_update, int) or steps_per_update < 1:
        raise ValueError(f"ema_of_params: steps_per_update must be an integer >= 1, got {steps_per_update!r}")

    def init(params):
        dtypes = tuple(str(jnp.result_type(p)) for p in jax.tree.leaves(params))
        return EmaState(Average(jax.tree.map(_start, params), dtypes), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError("ema_of_params needs the params: call update(updates, state, params)")
        if step is None:
            raise ValueError("ema_of_params needs the step count; use it inside gradtx.chain")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        done = jnp.asarray(step, jnp.int32) // steps_per_update  # real updates before this step
        m = jnp.where(done == 0, jnp.float32(0), h["ema_momentum"])
        overwrite = None if f is None else (done + 1) % f == 0

        def leaf(u, a, p):
            new = (p + u).astype(p.dtype)  # the params after the step, as apply_updates makes them
            a = m * a + (1 - m) * new.astype(a.dtype)
            if overwrite is not None:
                u = jnp.where(overwrite, (a - p.astype(a.dtype)).astype(u.dtype), u)
            return u, a, p

        updates, average, _ = leafwise("ema_of_params", leaf, updates, state.average.tree, params)
        return updates, EmaState(Average(average, state.average.dtypes), hp)

    return Transformation(init, update)


def _averages(state: State) -> list[Average]:
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, Average))
    return [x for x in leaves if isinstance(x, Average)]


def ema_params(state: State) -> Params:
    """The moving average of the params held in an optimizer state (built with ``use_ema=True`` or
    with `ema_of_params`), with the params' tree structure and dtypes: Keras's
    ``finalize_variable_values``. Evaluate (or export) the model with these."""
    found = _averages(state)
    if len(found) != 1:
        problem = "holds no moving average" if not found else f"holds {len(found)} moving averages"
        raise ValueError(
            f"ema_params: the state {problem}; build the optimizer with use_ema=True (or chain one "
            "gradtx.ema_of_params after it)"
        )
    (average,) = found
    leaves, treedef = jax.tree.flatten(average.tree)
    return treedef.unflatten([a.astype(d) for a, d in zip(leaves, average.dtypes, strict=True)])
