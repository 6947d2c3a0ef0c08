"""Adadelta (Zeiler, 2012): a per-coordinate step size from running averages of squared gradients and
of squared steps, so that the step has the units of the parameter.

Keras 3 ``Adadelta`` keeps a learning rate in front of Zeiler's rule (``learning_rate=1.0`` is the
paper's form; Keras's default is 0.001) and puts epsilon inside both square roots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Transformation, Updates, chain, leafwise, zeros_like_state
from gradtx.hyper import POSITIVE, UNIT_INTERVAL, Hyper, Hyperparams, HyperSpec
from gradtx.keras_options import KerasOptions, with_keras_options
from gradtx.transforms import scale_by_learning_rate

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11


class AdadeltaState(NamedTuple):
    accumulated_grad: Updates  # E[g^2], running mean of squared gradients
    accumulated_delta: Updates  # E[d^2], running mean of squared (unscaled) steps
    hyperparams: Hyperparams


def scale_by_adadelta(rho: Hyper = 0.95, epsilon: Hyper = 1e-7) -> Transformation:
    """Adadelta:  ``E[g^2] <- rho*E[g^2] + (1 - rho)*g^2;  d = sqrt(E[d^2] + eps) / sqrt(E[g^2] + eps) * g;
    E[d^2] <- rho*E[d^2] + (1 - rho)*d^2;  u <- d``.

    ``E[d^2]`` is the average of the steps before the learning rate (Keras's ``accumulated_delta_var``),
    so the rule is Keras's whatever the learning rate that follows. ``epsilon`` must be positive: with
    0 the first step is ``sqrt(0) * g = 0`` and every later one too. (Zeiler, 2012, Algorithm 1; Keras
    ``Adadelta``.)
    """
    spec = HyperSpec("scale_by_adadelta", rho=(rho, UNIT_INTERVAL), epsilon=(epsilon, POSITIVE))

    def init(params):
        zeros = lambda: jax.tree.map(zeros_like_state, params)  # noqa: E731
        return AdadeltaState(zeros(), zeros(), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        r, eps = h["rho"], h["epsilon"]

        def leaf(g, eg, ed):
            g32 = g.astype(eg.dtype)
            eg = r * eg + (1 - r) * jnp.square(g32)
            d = jnp.sqrt(ed + eps) * g32 / jnp.sqrt(eg + eps)
            ed = r * ed + (1 - r) * jnp.square(d)
            return d.astype(g.dtype), eg, ed

        updates, eg, ed = leafwise(
            "scale_by_adadelta", leaf, updates, state.accumulated_grad, state.accumulated_delta
        )
        return updates, AdadeltaState(eg, ed, hp)

    return Transformation(init, update)


def adadelta(
    learning_rate: Hyper = 0.001,
    rho: Hyper = 0.95,
    epsilon: Hyper = 1e-7,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """Adadelta:  ``theta <- theta - eta * sqrt(E[d^2] + eps) / sqrt(E[g^2] + eps) * grad``  (see
    `scale_by_adadelta`).  ``learning_rate=1.0`` is Zeiler's original rule.  (Keras ``Adadelta``.)"""
    core = chain(scale_by_adadelta(rho, epsilon), scale_by_learning_rate(learning_rate))
    return with_keras_options(core, owner="adadelta", **options)
