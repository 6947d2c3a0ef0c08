"""Gradient clipping, with the arithmetic of Keras 3's ``clipvalue``, ``clipnorm`` and ``global_clipnorm``.

Place a clip before the optimizer: ``chain(clip_by_global_norm(1.0), adam(1e-3))`` is Keras
``Adam(1e-3, global_clipnorm=1.0)`` (and what the factories build from that option). Each threshold is
a hyperparameter in the state (``clipvalue``, ``clipnorm``, ``global_clipnorm``): read it with
`gradtx.hyperparams`, change it with `gradtx.set_hyperparams`, sweep it with `gradtx.sweep`.

Keras skips a clip whose threshold is 0 or negative; here such a threshold is an error (a clip that
does nothing should not be asked for). The norms are summed in at least float32, so bfloat16 and
float16 gradients do not overflow their sum of squares; each clipped gradient keeps its dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Transformation, is_float, leafwise
from gradtx.hyper import POSITIVE, Hyper, Hyperparams, HyperSpec


class ClipState(NamedTuple):
    hyperparams: Hyperparams


def _wide(g: jax.Array) -> jax.Array:
    return g.astype(jnp.promote_types(g.dtype, jnp.float32))


def _clip(owner: str, name: str, threshold: Hyper, rule) -> Transformation:
    """A stateless clip ``rule(updates, c) -> updates`` with one positive threshold ``name`` in the state."""
    spec = HyperSpec(owner, **{name: (threshold, POSITIVE)})

    def init(params):
        return ClipState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        return rule(updates, h[name]), ClipState(hp)

    return Transformation(init, update)


def clip_by_value(clipvalue: Hyper) -> Transformation:
    """Element-wise clipping:  ``u <- min(max(g, -c), c)``  with ``c = clipvalue > 0``.

    (Keras ``clipvalue=``; optax ``clip``.)
    """

    def rule(updates, c):
        (out,) = leafwise("clip_by_value", lambda g: (jnp.clip(_wide(g), -c, c).astype(g.dtype),), updates)
        return out

    return _clip("clip_by_value", "clipvalue", clipvalue, rule)


def clip_by_norm(clipnorm: Hyper) -> Transformation:
    """Per-tensor norm clipping:  ``u <- g * c / max(||g||, c)``  for each leaf, ``c = clipnorm > 0``.

    Each leaf is rescaled on its own so that its l2 norm is at most ``c``; computed as Keras computes
    it (``g * c`` first, then the division; a zero gradient stays zero). (Keras ``clipnorm=``.)
    """

    def leaf(g, c):
        w = _wide(g)
        squares = jnp.sum(jnp.square(w))
        positive = squares > 0
        # sqrt only where the sum is positive, so that the gradient of sqrt at 0 never appears.
        norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), squares)
        return ((w * c) / jnp.maximum(norm, c)).astype(g.dtype)

    def rule(updates, c):
        (out,) = leafwise("clip_by_norm", lambda g: (leaf(g, c),), updates)
        return out

    return _clip("clip_by_norm", "clipnorm", clipnorm, rule)


def global_norm(updates) -> jax.Array:
    """``sqrt(sum over the floating leaves of sum(g**2))``, in at least float32 (one reduction per leaf
    and one over the leaves)."""
    squares = [jnp.sum(jnp.square(_wide(g))) for g in jax.tree.leaves(updates) if is_float(g)]
    if not squares:
        return jnp.zeros([], jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.stack(squares)))


def clip_by_global_norm(global_clipnorm: Hyper) -> Transformation:
    """Global norm clipping:  ``u <- g * c * min(1/N, 1/c)``  with ``N = sqrt(sum_leaves ||g||^2)`` and
    ``c = global_clipnorm > 0``.

    All leaves are scaled by the same factor, so the direction of the whole update is kept. As in Keras,
    a non-finite ``N`` makes every update NaN (rather than clipping an infinite gradient to a finite
    one); wrap the optimizer in `gradtx.apply_if_finite` to skip such steps. (Keras
    ``global_clipnorm=``; optax ``clip_by_global_norm``.)
    """

    def rule(updates, c):
        n = global_norm(updates)
        # Keras's form: exactly c/N when N > c; (n - n) turns an inf or NaN norm into a NaN scale.
        scale = c * jnp.minimum(1.0 / n, 1.0 / c) + (n - n)
        (out,) = leafwise("clip_by_global_norm", lambda g: ((_wide(g) * scale).astype(g.dtype),), updates)
        return out

    return _clip("clip_by_global_norm", "global_clipnorm", global_clipnorm, rule)
