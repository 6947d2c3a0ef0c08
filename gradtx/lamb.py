"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"):
Adam's direction rescaled, per parameter tensor, by the trust ratio ``||theta|| / ||direction||``, so that
each layer moves by a fixed fraction of its own norm.

Keras 3 ``Lamb`` uses the bias-corrected moments with epsilon outside the root (``mhat / (sqrt(vhat) +
eps)``, not Keras Adam's form), takes the norms per variable, and uses a ratio of 1 where either norm is
0. Keras's (optional) weight decay is applied to the weights before the step, outside the trust ratio,
as for every Keras optimizer; the paper adds it to the direction before the ratio instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import EmptyState, Transformation, Updates, chain, leafwise, zeros_like_state
from gradtx.hyper import NONNEGATIVE, UNIT_INTERVAL, Hyper, Hyperparams, HyperSpec
from gradtx.keras_options import KerasOptions, with_keras_options
from gradtx.transforms import scale_by_learning_rate

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11


class CorrectedAdamState(NamedTuple):
    mu: Updates  # first moment
    nu: Updates  # second moment
    hyperparams: Hyperparams


def scale_by_corrected_adam(
    beta_1: Hyper = 0.9, beta_2: Hyper = 0.999, epsilon: Hyper = 1e-7
) -> Transformation:
    """Adam's direction from bias-corrected moments:  ``m <- m + (1 - b1)*(g - m);
    v <- v + (1 - b2)*(g*g - v);  u <- (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.

    Epsilon is added to the corrected ``sqrt(vhat)`` (Kingma & Ba, Algorithm 1; LAMB's and optax's
    form), where `gradtx.scale_by_adam` adds it to the uncorrected ``sqrt(v)`` as Keras ``Adam`` does.
    (Keras ``Lamb``'s direction.)
    """
    spec = HyperSpec(
        "scale_by_corrected_adam",
        beta_1=(beta_1, UNIT_INTERVAL),
        beta_2=(beta_2, UNIT_INTERVAL),
        epsilon=(epsilon, NONNEGATIVE),
    )

    def init(params):
        zeros = lambda: jax.tree.map(zeros_like_state, params)  # noqa: E731
        return CorrectedAdamState(zeros(), zeros(), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if step is None:
            raise ValueError("scale_by_corrected_adam needs the step count; use it inside gradtx.chain")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b1, b2, eps = h["beta_1"], h["beta_2"], h["epsilon"]
        t = jnp.asarray(step).astype(jnp.float32) + 1.0
        correction_1, correction_2 = 1 - jnp.power(b1, t), 1 - jnp.power(b2, t)

        def leaf(g, m, v):
            g32 = g.astype(m.dtype)
            m = m + (g32 - m) * (1 - b1)
            v = v + (jnp.square(g32) - v) * (1 - b2)
            u = (m / correction_1) / (jnp.sqrt(v / correction_2) + eps)
            return u.astype(g.dtype), m, v

        updates, mu, nu = leafwise("scale_by_corrected_adam", leaf, updates, state.mu, state.nu)
        return updates, CorrectedAdamState(mu, nu, hp)

    return Transformation(init, update)


def scale_by_trust_ratio() -> Transformation:
    """LAMB's layer-wise trust ratio:  ``u <- (||theta|| / ||g||) * g``  per leaf, with ratio 1 where
    ``||theta|| = 0`` or ``||g|| = 0`` (a fresh zero-initialized bias, a zero direction), as Keras does.

    The norms are the Euclidean norms of the whole leaf, computed in at least float32. Needs the params.
    (You et al., 2020, Algorithm 2; Keras ``Lamb``.)
    """

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("scale_by_trust_ratio needs the params: call update(updates, state, params)")

        def leaf(g, p):
            dtype = jnp.promote_types(g.dtype, jnp.float32)
            g32, p32 = g.astype(dtype), p.astype(dtype)
            w_norm, g_norm = jnp.sqrt(jnp.sum(jnp.square(p32))), jnp.sqrt(jnp.sum(jnp.square(g32)))
            ratio = jnp.where((w_norm > 0) & (g_norm > 0), w_norm / g_norm, 1.0)
            return (ratio * g32).astype(g.dtype), p

        updates, _ = leafwise("scale_by_trust_ratio", leaf, updates, params)
        return updates, state

    return Transformation(init, update)


def lamb(
    learning_rate: Hyper = 0.001,
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-7,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """LAMB:  ``r = mhat / (sqrt(vhat) + eps);  theta <- theta - eta * (||theta|| / ||r||) * r``  per
    parameter tensor (ratio 1 where a norm is 0).  (Keras ``Lamb``.)"""
    core = chain(
        scale_by_corrected_adam(beta_1, beta_2, epsilon),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )
    return with_keras_options(core, owner="lamb", **options)
