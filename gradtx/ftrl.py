"""FTRL-Proximal (McMahan et al., 2013, "Ad Click Prediction: a View from the Trenches", Algorithm 1),
with Keras 3 ``Ftrl``'s generalizations: any ``learning_rate_power`` (the paper's is -1/2), an l2 term,
an "l2 shrinkage" term on the gradient, and ``beta``.

FTRL does not move the weights by a step: it computes the new weights in closed form from two
accumulators, ``n`` (squared gradients) and ``z`` (the "linear" term). Its l1 term sets a weight to
exactly 0 whenever ``|z| <= l1``, which is what makes FTRL produce sparse models. In gradtx an update is
added to the params, so `ftrl` returns ``u = w_new - w``: `gradtx.apply_updates` then gives
``w + (w_new - w)``, which is ``w_new`` up to one float32 rounding relative to ``|w| + |w_new|``, and
exactly 0 where ``w_new`` is 0 (``w + (0 - w) = 0`` in IEEE arithmetic), so the zeros stay exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Transformation, Updates, chain, leafwise, zeros_like_state
from gradtx.hyper import NONNEGATIVE, POSITIVE, Hyper, Hyperparams, HyperSpec, Range, check_value
from gradtx.keras_options import KerasOptions, with_keras_options

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

_NONPOSITIVE = Range(high=0.0)


class FtrlState(NamedTuple):
    accumulator: Updates  # n <- n + g^2, from initial_accumulator_value
    linear: Updates  # z, whose clipped excess over l1 gives the weights
    hyperparams: Hyperparams


def ftrl(
    learning_rate: Hyper = 0.001,
    learning_rate_power: Hyper = -0.5,
    initial_accumulator_value: float = 0.1,
    l1_regularization_strength: Hyper = 0.0,
    l2_regularization_strength: Hyper = 0.0,
    l2_shrinkage_regularization_strength: Hyper = 0.0,
    beta: Hyper = 0.0,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """FTRL-Proximal, with ``p = -learning_rate_power``:  ``n' = n + g^2;
    z <- z + (g + 2*l2s*w) - (n'^p - n^p) / eta * w;  n <- n';
    w_new = (clip(z, -l1, l1) - z) / (n^p / eta + 2*l2 + beta / eta);  u <- w_new - w``.

    ``l1``, ``l2`` and ``l2s`` are ``l1_regularization_strength``, ``l2_regularization_strength`` and
    ``l2_shrinkage_regularization_strength``. The shrinkage term enters ``z`` only, not ``n``. ``w_new``
    is exactly 0 where ``|z| <= l1``. Needs the params. (McMahan et al., 2013; Keras ``Ftrl``.)

    ``learning_rate`` must be positive (it divides); ``learning_rate_power <= 0``; the strengths,
    ``beta`` and ``initial_accumulator_value`` (used by ``init`` only) must be ``>= 0``, as in Keras.
    """
    check_value("ftrl", "initial_accumulator_value", initial_accumulator_value, NONNEGATIVE)
    spec = HyperSpec(
        "ftrl",
        learning_rate=(learning_rate, POSITIVE),
        learning_rate_power=(learning_rate_power, _NONPOSITIVE),
        l1_regularization_strength=(l1_regularization_strength, NONNEGATIVE),
        l2_regularization_strength=(l2_regularization_strength, NONNEGATIVE),
        l2_shrinkage_regularization_strength=(l2_shrinkage_regularization_strength, NONNEGATIVE),
        beta=(beta, NONNEGATIVE),
    )

    def init(params):
        start = lambda p: zeros_like_state(p) + jnp.float32(initial_accumulator_value)  # noqa: E731
        return FtrlState(jax.tree.map(start, params), jax.tree.map(zeros_like_state, params), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError("ftrl needs the params: call update(updates, state, params)")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        lr, power, l1 = h["learning_rate"], -h["learning_rate_power"], h["l1_regularization_strength"]
        l2 = h["l2_regularization_strength"] + h["beta"] / (2.0 * lr)
        shrinkage = 2 * h["l2_shrinkage_regularization_strength"]

        def leaf(g, n, z, w):
            g32, w32 = g.astype(n.dtype), w.astype(n.dtype)
            new_n = n + jnp.square(g32)
            z = z + ((g32 + shrinkage * w32) - (jnp.power(new_n, power) - jnp.power(n, power)) / lr * w32)
            quadratic = jnp.power(new_n, power) / lr + 2 * l2
            new_w = (jnp.clip(z, -l1, l1) - z) / quadratic
            return (new_w - w32).astype(g.dtype), new_n, z, w

        updates, n, z, _ = leafwise("ftrl", leaf, updates, state.accumulator, state.linear, params)
        return updates, FtrlState(n, z, hp)

    return with_keras_options(chain(Transformation(init, update)), owner="ftrl", **options)
