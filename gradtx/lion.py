"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
interpolation between the momentum and the gradient, so every coordinate moves by the learning rate.

A suitable learning rate is typically 3-10x smaller than AdamW's (the sign has a larger norm), and a
decoupled weight decay 3-10x larger, to keep ``lr * wd`` similar (Keras ``Lion``'s advice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Transformation, Updates, chain, leafwise, zeros_like_state
from gradtx.hyper import CLOSED_UNIT_INTERVAL, Hyper, Hyperparams, HyperSpec, Range
from gradtx.keras_options import KerasOptions, with_keras_options
from gradtx.transforms import scale_by_learning_rate

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

# Keras refuses beta_1 <= 0 (the rule would be signSGD, no longer Lion) and beta_1 > 1.
_BETA_1 = Range(0.0, 1.0, low_open=True)


class LionState(NamedTuple):
    momentum: Updates  # m <- b2*m + (1 - b2)*g
    hyperparams: Hyperparams


def scale_by_lion(beta_1: Hyper = 0.9, beta_2: Hyper = 0.99) -> Transformation:
    """Lion:  ``u <- sign(b1*m + (1 - b1)*g);  m <- b2*m + (1 - b2)*g``.

    The step interpolates with ``beta_1``, the momentum is kept with ``beta_2`` (by default the slower
    one). ``beta_1`` must be in (0, 1] as in Keras; ``beta_2`` in [0, 1]. (Chen et al., 2023,
    Algorithm 2; Keras ``Lion``.)
    """
    spec = HyperSpec("scale_by_lion", beta_1=(beta_1, _BETA_1), beta_2=(beta_2, CLOSED_UNIT_INTERVAL))

    def init(params):
        return LionState(jax.tree.map(zeros_like_state, params), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b1, b2 = h["beta_1"], h["beta_2"]

        def leaf(g, m):
            g32 = g.astype(m.dtype)
            u = jnp.sign(m * b1 + g32 * (1 - b1))
            return u.astype(g.dtype), m * b2 + g32 * (1 - b2)

        updates, momentum = leafwise("scale_by_lion", leaf, updates, state.momentum)
        return updates, LionState(momentum, hp)

    return Transformation(init, update)


def lion(
    learning_rate: Hyper = 0.001,
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.99,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """Lion:  ``theta <- theta - eta * sign(b1*m + (1 - b1)*grad);  m <- b2*m + (1 - b2)*grad``.
    (Keras ``Lion``.)"""
    core = chain(scale_by_lion(beta_1, beta_2), scale_by_learning_rate(learning_rate))
    return with_keras_options(core, owner="lion", **options)
