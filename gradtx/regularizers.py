"""Regularization: penalties on the weights (l1, l2 and l1_l2, as transformations and as loss terms),
decoupled weight decay, and dropout (a pure function for any JAX model).

The rates mean what they mean in Keras: ``l2(0.01)`` is the penalty ``0.01 * sum(w**2)`` (Keras
``L2(0.01)``), whose gradient ``0.02 * w`` is what the transformation adds to the incoming gradient.

Which one to use (the course's advice):

* ``l2`` (coupled): the penalty's gradient joins the loss's gradient *before* the optimizer, so it is
  rescaled with it. That is right for SGD, momentum and NAG, and it is what ``kernel_regularizer``
  does in Keras. With Adam (and the other adaptive optimizers) the division by ``sqrt(v)`` weakens the
  decay exactly where gradients are large; use decoupled weight decay (AdamW) there.
* decoupled weight decay: ``gradtx.adamw``, or after any optimizer
  ``with_weight_decay(adam(lr), wd)`` (AdamW) and
  ``with_weight_decay(sgd(lr, momentum=0.9), wd)`` (SGDW): the decay follows the optimizer's own
  learning rate, read from its state.
* ``l1`` pushes weights to exactly zero only on average: with a finite step they oscillate around zero
  (use `gradtx.pruning` for exact zeros).

MC dropout (Gal & Ghahramani, 2016): keep `dropout` on at inference, predict ``T`` times with ``T``
keys and average. The mean is usually a better prediction than the deterministic one, and the spread
across the ``T`` predictions estimates the model's uncertainty::

    keys = jax.random.split(key, 100)
    probs = jax.vmap(lambda k: jax.nn.softmax(model_fn(params, x, k, deterministic=False)))(keys)
    mean, spread = probs.mean(0), probs.std(0)

(``model_fn`` calls `dropout` with the key it is given.) See ``notebooks/03_regularization.ipynb``.

Place a penalty before the optimizer in the chain (``chain(l2(0.01), sgd(0.1))``) and route it with
``masked(l2(0.01), weights_only)`` to penalize kernels but not biases, as Keras does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Params, State, Transformation, accepts_extra, is_float, leafwise
from gradtx.hyper import (
    CLOSED_UNIT_INTERVAL,
    NONNEGATIVE,
    Hyper,
    Hyperparams,
    HyperSpec,
    check_value,
    find_hyperparam,
)
from gradtx.routing import MaskSpec, select_leaves


class PenaltyState(NamedTuple):
    hyperparams: Hyperparams


def _penalty(owner: str, **rates: Hyper) -> Transformation:
    spec = HyperSpec(owner, **{name: (rate, NONNEGATIVE) for name, rate in rates.items()})

    def init(params):
        return PenaltyState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError(f"{owner} needs the params: call update(updates, state, params)")
        h, hp = spec.resolve(state.hyperparams, step, **extra)

        def leaf(g, p):
            p32 = p.astype(jnp.promote_types(p.dtype, jnp.float32))
            grad = g.astype(p32.dtype)
            if "l1" in h:
                # sign(0) = 0: the subgradient of |w| at 0 that leaves a zero weight at zero.
                grad = grad + h["l1"] * jnp.sign(p32)
            if "l2" in h:
                grad = grad + 2 * h["l2"] * p32
            return grad.astype(g.dtype), p

        updates, _ = leafwise(owner, leaf, updates, params)
        return updates, PenaltyState(hp)

    return Transformation(init, update)


def l1(rate: Hyper = 0.01) -> Transformation:
    """L1 penalty ``rate * sum(|w|)``:  ``u <- g + rate * sign(theta)``.  (Keras ``L1(l1=rate)``.)

    At ``theta = 0`` the added term is 0 (``jax.grad`` of Keras's penalty gives ``+rate`` there, an
    arbitrary choice of subgradient). The rate is stored in the state as ``l1``.
    """
    return _penalty("l1", l1=rate)


def l2(rate: Hyper = 0.01) -> Transformation:
    """L2 penalty ``rate * sum(w**2)``:  ``u <- g + 2 * rate * theta``.  (Keras ``L2(l2=rate)``.)

    Note the factor 2: ``l2(rate)`` is ``add_decayed_weights(2 * rate)`` placed before the optimizer.
    The rate is stored in the state as ``l2``.
    """
    return _penalty("l2", l2=rate)


def l1_l2(l1: Hyper = 0.0, l2: Hyper = 0.0) -> Transformation:
    """L1 + L2 penalty ``l1 * sum(|w|) + l2 * sum(w**2)``:
    ``u <- g + l1 * sign(theta) + 2 * l2 * theta``.  (Keras ``L1L2(l1, l2)``.)"""
    return _penalty("l1_l2", l1=l1, l2=l2)


def _penalty_sum(owner: str, params: Params, mask: MaskSpec | None, term) -> jax.Array:
    leaves = jax.tree.leaves(params)
    keep = select_leaves(owner, params, mask)
    total = jnp.zeros([], jnp.float32)
    for p, k in zip(leaves, keep, strict=True):
        if k and is_float(p):
            total = total + term(jnp.asarray(p).astype(jnp.promote_types(jnp.result_type(p), jnp.float32)))
    return total


def l1_penalty(params: Params, rate: Hyper = 0.01, *, mask: MaskSpec | None = None) -> jax.Array:
    """``rate * sum(|w|)`` over the floating leaves of ``params`` (those ``mask`` selects), in float32.

    ``mask`` takes the forms of `gradtx.masked` (e.g. ``mask=gradtx.weights_only``). Add it to a loss.
    """
    check_value("l1_penalty", "l1", rate, NONNEGATIVE, scalar=False)
    return rate * _penalty_sum("l1_penalty", params, mask, lambda w: jnp.sum(jnp.abs(w)))


def l2_penalty(params: Params, rate: Hyper = 0.01, *, mask: MaskSpec | None = None) -> jax.Array:
    """``rate * sum(w**2)`` over the floating leaves of ``params`` (those ``mask`` selects), in float32."""
    check_value("l2_penalty", "l2", rate, NONNEGATIVE, scalar=False)
    return rate * _penalty_sum("l2_penalty", params, mask, lambda w: jnp.sum(jnp.square(w)))


def l1_l2_penalty(
    params: Params, l1: Hyper = 0.0, l2: Hyper = 0.0, *, mask: MaskSpec | None = None
) -> jax.Array:
    """``l1 * sum(|w|) + l2 * sum(w**2)`` over the floating leaves of ``params`` that ``mask`` selects."""
    return l1_penalty(params, l1, mask=mask) + l2_penalty(params, l2, mask=mask)


class DecoupledWeightDecayState(NamedTuple):
    hyperparams: Hyperparams


def decoupled_weight_decay(weight_decay: Hyper, learning_rate: Hyper) -> Transformation:
    """Decoupled weight decay after an optimizer:  ``u <- u - eta * lambda * theta``.

    Placed after any optimizer (whose output is already a step), it shrinks the weights by
    ``eta * lambda`` per step independently of the gradient statistics (Loshchilov & Hutter, 2019).
    ``learning_rate`` (eta) is this transformation's own hyperparameter, so the state then holds two
    learning rates: `with_weight_decay` instead reads the wrapped optimizer's own, and is the simpler
    choice (``with_weight_decay(adam(lr), wd)`` is Keras ``AdamW(lr, weight_decay=wd)``). Use this
    form to decay on another clock, or only some leaves: ``masked(decoupled_weight_decay(wd, lr),
    weights_only)``; address its rate with ``where="decoupled_weight_decay"`` in `set_hyperparams`.
    (`add_decayed_weights` is the building block to use *before* ``scale_by_learning_rate``.)
    """
    spec = HyperSpec(
        "decoupled_weight_decay",
        weight_decay=(weight_decay, NONNEGATIVE),
        learning_rate=(learning_rate, NONNEGATIVE),
    )

    def init(params):
        return DecoupledWeightDecayState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError("decoupled_weight_decay needs the params: call update(updates, state, params)")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        return _shrink("decoupled_weight_decay", updates, params, h["learning_rate"] * h["weight_decay"]), (
            DecoupledWeightDecayState(hp)
        )

    return Transformation(init, update)


def _shrink(owner: str, updates: Params, params: Params, rate: jax.Array, keep: list[bool] | None = None):
    """``u - rate * theta`` for the floating leaves (those ``keep`` selects), in at least float32, back in
    the update's dtype; the trees' structures are checked first."""
    leafwise(owner, lambda u, p: (u, p), updates, params)  # the structure and shape checks
    # None leaves kept in place: ``keep`` (from `select_leaves`) has an entry for each of them.
    flat_u, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
    flat_p = treedef.flatten_up_to(params)
    keep = [True] * len(flat_u) if keep is None else keep
    out = []
    for u, p, k in zip(flat_u, flat_p, keep, strict=True):
        if k and u is not None and is_float(u):
            wide = jnp.promote_types(jnp.result_type(p), jnp.float32)
            u = (u.astype(wide) - rate * p.astype(wide)).astype(u.dtype)
        out.append(u)
    return treedef.unflatten(out)


class WithWeightDecayState(NamedTuple):
    inner: State
    hyperparams: Hyperparams


def with_weight_decay(
    inner: Transformation, weight_decay: Hyper, mask: MaskSpec | None = None
) -> Transformation:
    """Decoupled weight decay at the wrapped optimizer's own learning rate, before its step:
    ``theta' = theta - eta_t * lambda * theta;  u <- inner(g, theta') - eta_t * lambda * theta``.

    This is Keras's ``weight_decay=`` option (``w <- w - w * lambda * eta``, then the optimizer's
    step on the decayed ``w``), exact also for optimizers whose step reads the params (FTRL, LAMB's
    trust ratio, Adafactor's parameter scale, schedule-free averaging): ``inner`` is handed ``theta'``.
    ``eta_t`` is the ``learning_rate`` the inner optimizer uses at this step, read from its state, so
    the state keeps one learning rate and ``set_hyperparams(state, learning_rate=...)`` changes the
    step and the decay together. (When that rate follows a schedule, its value at this step is known
    only by running ``inner``'s update: it is run once more for the rate alone, whose other outputs
    are unused and removed by ``jit``.) ``mask`` (the forms of `gradtx.masked`, e.g. `weights_only`)
    decays some leaves only; the others pass through as ``inner`` makes them.
    """
    spec = HyperSpec("with_weight_decay", weight_decay=(weight_decay, NONNEGATIVE))
    takes_extra = accepts_extra(inner.update)

    def init(params):
        state = WithWeightDecayState(inner.init(params), spec.init())
        find_hyperparam("with_weight_decay", state.inner, "learning_rate")  # fails now, not in a trace
        return state

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError("with_weight_decay needs the params: call update(updates, state, params)")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        kwargs = ({**extra, "step": step} if step is not None else extra) if takes_extra else {}
        rate = _rate_now(state.inner, lambda: inner.update(updates, state.inner, params, **kwargs)[1])
        keep = select_leaves("with_weight_decay", params, mask)
        decay = rate * h["weight_decay"]
        decayed = _shrink("with_weight_decay", params, params, decay, keep)  # in the params' dtypes
        new, inner_state = inner.update(updates, state.inner, decayed, **kwargs)
        return _shrink("with_weight_decay", new, params, decay, keep), WithWeightDecayState(inner_state, hp)

    return Transformation(init, update)


def _rate_now(state: State, run_inner) -> jax.Array:
    """The inner optimizer's learning rate at this step: its constant, or (a schedule) the value its
    update computes, from ``run_inner()``'s new state."""
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, Hyperparams))
    for node in nodes:
        if isinstance(node, Hyperparams) and "learning_rate" in node.constant:
            return find_hyperparam("with_weight_decay", state, "learning_rate")
    return find_hyperparam("with_weight_decay", run_inner(), "learning_rate")


def _noise_shape(x: jax.Array, noise_shape: Sequence[int | None] | None) -> tuple[int, ...]:
    if noise_shape is None:
        return x.shape
    if len(noise_shape) != x.ndim:
        raise ValueError(f"dropout: noise_shape {tuple(noise_shape)} must have x's rank {x.ndim} ({x.shape})")
    # As in Keras, None stands for x's size along that axis.
    shape = tuple(n if d is None else d for d, n in zip(noise_shape, x.shape, strict=True))
    if any(d not in (1, n) for d, n in zip(shape, x.shape, strict=True)):
        raise ValueError(
            f"dropout: noise_shape {tuple(noise_shape)} must broadcast to x's shape {x.shape} "
            "(each entry 1 or the size of x along that axis)"
        )
    return shape


def dropout(
    key: jax.Array,
    x: jax.Array,
    rate: float | jax.Array,
    *,
    deterministic: bool = False,
    noise_shape: Sequence[int | None] | None = None,
) -> jax.Array:
    """Inverted dropout:  ``y = x * b / (1 - rate)`` with ``b ~ Bernoulli(1 - rate)``;  ``y = x`` when
    ``deterministic``.

    Each unit is zeroed with probability ``rate`` and the kept ones are scaled by ``1 / (1 - rate)``, so
    ``E[y] = x`` and nothing changes at inference. ``rate`` may be a JAX array (``jax.vmap`` sweeps it);
    ``rate = 1`` drops everything. ``noise_shape`` (as in Keras) draws one keep/drop decision per
    entry of that shape and broadcasts it: ``(batch, 1, 1, channels)`` drops whole feature maps; a
    ``None`` entry means x's size on that axis. The same ``key`` gives the same mask.
    """
    check_value("dropout", "rate", rate, CLOSED_UNIT_INTERVAL)
    x = jnp.asarray(x)
    shape = _noise_shape(x, noise_shape)
    if deterministic:
        return x
    keep_prob = 1 - jnp.asarray(rate, jnp.float32)
    keep = jax.random.bernoulli(key, keep_prob, shape)
    # rate = 1 keeps nothing; dividing by 1 instead of 0 there keeps the (unused) branch and its
    # gradient finite, so the result and its gradient are zeros rather than NaN.
    divisor = jnp.where(keep_prob > 0, keep_prob, 1).astype(x.dtype)
    return jnp.where(keep, x / divisor, jnp.zeros((), x.dtype))
