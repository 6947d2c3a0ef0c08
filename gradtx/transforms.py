"""Primitive transformations: one update rule each, with its formula in the docstring.

Notation: ``g`` is the incoming update (a gradient, or what an earlier primitive made of it), ``u`` the
outgoing one, ``t = step + 1`` the 1-based step, ``theta`` the params. Every hyperparameter may be a
float, a JAX scalar or a schedule ``step -> value`` and lives in the state (see `gradtx.hyperparams`).

Accumulators are stored in at least float32 and the arithmetic runs in float32 (the hyperparameters
are float32), so low-precision params neither lose their moments nor round ``beta_2`` to 1. Each
outgoing update has the dtype of the incoming one. The epsilon placements and the bias corrections
follow Keras 3, which is the reference the course uses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Params, Transformation, Updates, abs_sq, leafwise, zeros_like_state
from gradtx.hyper import NONNEGATIVE, UNIT_INTERVAL, Hyper, Hyperparams, HyperSpec, check_value


def _like(x: jax.Array, ref: jax.Array) -> jax.Array:
    return x.astype(jnp.result_type(ref))


def _zeros(params: Params, dtype: Any = None, real: bool = False) -> Updates:
    """Zeros like each leaf (``real``: a real accumulator for complex leaves, for ``|g|^2``)."""
    return jax.tree.map(lambda p: zeros_like_state(p, dtype, real), params)


def _wide(g: jax.Array, state: jax.Array) -> jax.Array:
    """``g`` in the precision of the step: at least the state's (float32), complex if ``g`` is."""
    return g.astype(jnp.promote_types(g.dtype, state.dtype))


def _state_dtype(owner: str, name: str, dtype: Any) -> Any:
    """A storage dtype for a moment: None (the default precision) or a floating dtype."""
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"{owner}: {name} must be a floating dtype such as jnp.bfloat16, got {dtype!r}")
    return dtype


def _time(step: jax.Array | None, owner: str) -> jax.Array:
    if step is None:
        raise ValueError(f"{owner} needs the step count for its bias correction; use it inside gradtx.chain")
    return jnp.asarray(step).astype(jnp.float32) + 1.0


class LearningRateState(NamedTuple):
    hyperparams: Hyperparams


def scale_by_learning_rate(learning_rate: Hyper) -> Transformation:
    """Gradient-descent scaling:  ``u <- -eta * g``.

    The sign makes ``theta + u`` a descent step. ``learning_rate`` (eta) is read at the current step,
    so a schedule gives ``eta(step)`` with ``step = 0`` on the first update, as in Keras.
    """
    spec = HyperSpec("scale_by_learning_rate", learning_rate=(learning_rate, NONNEGATIVE))

    def init(params):
        return LearningRateState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        (updates,) = leafwise(
            "scale_by_learning_rate", lambda g: (_like(-h["learning_rate"] * g, g),), updates
        )
        return updates, LearningRateState(hp)

    return Transformation(init, update)


class MomentumState(NamedTuple):
    velocity: Updates
    hyperparams: Hyperparams


def momentum(momentum: Hyper = 0.9, nesterov: bool = False) -> Transformation:
    """Momentum:  ``m <- mu*m + g;  u <- m``;  Nesterov (NAG):  ``u <- mu*m + g`` with the new ``m``.

    Placed after `scale_by_learning_rate` this is the course's rule ``m <- beta*m - eta*grad;
    theta <- theta + m`` (Keras SGD): the learning rate is inside the velocity, so a changing learning
    rate acts on new gradients only. Nesterov evaluates the gradient at the look-ahead point
    ``theta + mu*m``, in Keras's reformulation that needs no second gradient.
    """
    spec = HyperSpec("momentum", momentum=(momentum, UNIT_INTERVAL))

    def init(params):
        return MomentumState(_zeros(params), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        mu = h["momentum"]

        def leaf(g, m):
            m = mu * m + g
            u = mu * m + g if nesterov else m
            return _like(u, g), m

        updates, velocity = leafwise("momentum", leaf, updates, state.velocity)
        return updates, MomentumState(velocity, hp)

    return Transformation(init, update)


class AdagradState(NamedTuple):
    accumulator: Updates
    hyperparams: Hyperparams


def scale_by_adagrad(initial_accumulator_value: float = 0.1, epsilon: Hyper = 1e-7) -> Transformation:
    """AdaGrad:  ``s <- s + g*g;  u <- g / sqrt(s + eps)``,  with ``s`` starting at
    ``initial_accumulator_value`` (Keras puts epsilon inside the square root)."""
    check_value("scale_by_adagrad", "initial_accumulator_value", initial_accumulator_value, NONNEGATIVE)
    spec = HyperSpec("scale_by_adagrad", epsilon=(epsilon, NONNEGATIVE))

    def init(params):
        start = jax.tree.map(
            lambda z: z + jnp.asarray(initial_accumulator_value, z.dtype), _zeros(params, real=True)
        )
        return AdagradState(start, spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)

        def leaf(g, s):
            s = s + abs_sq(_wide(g, s))
            return _like(g / jnp.sqrt(s + h["epsilon"]), g), s

        updates, accumulator = leafwise("scale_by_adagrad", leaf, updates, state.accumulator)
        return updates, AdagradState(accumulator, hp)

    return Transformation(init, update)


class RmsState(NamedTuple):
    nu: Updates  # running mean of g*g
    mean: Updates | None  # running mean of g (centered only)
    hyperparams: Hyperparams


def scale_by_rms(rho: Hyper = 0.9, epsilon: Hyper = 1e-7, centered: bool = False) -> Transformation:
    """RMSProp:  ``v <- rho*v + (1 - rho)*g*g;  u <- g / sqrt(v + eps)``.

    Centered:  ``gbar <- rho*gbar + (1 - rho)*g;  u <- g / sqrt(v - gbar*gbar + eps)``, which divides by
    an estimate of the variance instead of the second moment. Epsilon is inside the root, as in Keras.
    """
    spec = HyperSpec("scale_by_rms", rho=(rho, UNIT_INTERVAL), epsilon=(epsilon, NONNEGATIVE))

    def init(params):
        return RmsState(_zeros(params, real=True), _zeros(params) if centered else None, spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        r, eps = h["rho"], h["epsilon"]

        def leaf(g, v, *mean):
            g32 = _wide(g, v)
            v = r * v + (1 - r) * abs_sq(g32)
            if not centered:
                return _like(g32 / jnp.sqrt(v + eps), g), v
            (gbar,) = mean
            gbar = r * gbar + (1 - r) * g32
            return _like(g32 / jnp.sqrt(v - abs_sq(gbar) + eps), g), v, gbar

        trees = (state.nu, state.mean) if centered else (state.nu,)
        updates, nu, *mean = leafwise("scale_by_rms", leaf, updates, *trees)
        return updates, RmsState(nu, mean[0] if centered else None, hp)

    return Transformation(init, update)


class AdamState(NamedTuple):
    mu: Updates  # first moment
    nu: Updates  # second moment
    nu_max: Updates | None  # running maximum of nu (AMSGrad only)
    hyperparams: Hyperparams


def scale_by_adam(
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-7,
    amsgrad: bool = False,
    mu_dtype: Any = None,
) -> Transformation:
    """Adam:  ``m <- m + (1 - b1)*(g - m);  v <- v + (1 - b2)*(g*g - v);
    u <- m * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)``.

    This is the bias correction of Kingma & Ba's efficient form, as in Keras: epsilon is added to the
    uncorrected ``sqrt(v)``. With ``amsgrad`` the denominator uses ``vmax <- max(vmax, v)``
    (Reddi et al., 2018).

    ``mu_dtype`` (e.g. ``jnp.bfloat16``) stores ``m`` in a smaller dtype: the step computes in float32
    and rounds the new ``m`` once, when storing it. Only ``m``: ``v``'s increments, ``(1 - b2)`` of its
    size, would fall below bfloat16's resolution (2^-8) and be lost.
    """
    spec = HyperSpec(
        "scale_by_adam",
        beta_1=(beta_1, UNIT_INTERVAL),
        beta_2=(beta_2, UNIT_INTERVAL),
        epsilon=(epsilon, NONNEGATIVE),
    )
    mu_dtype = _state_dtype("scale_by_adam", "mu_dtype", mu_dtype)

    def init(params):
        nu_max = _zeros(params, real=True) if amsgrad else None
        return AdamState(_zeros(params, mu_dtype), _zeros(params, real=True), nu_max, spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b1, b2, eps = h["beta_1"], h["beta_2"], h["epsilon"]
        t = _time(step, "scale_by_adam")
        correction = jnp.sqrt(1 - jnp.power(b2, t)) / (1 - jnp.power(b1, t))

        def leaf(g, m, v, *vmax):
            g32 = _wide(g, v)  # the step computes in v's precision (complex for complex leaves)
            stored, m = m.dtype, m.astype(g32.dtype)
            m = m + (g32 - m) * (1 - b1)
            v = v + (abs_sq(g32) - v) * (1 - b2)
            vmax = tuple(jnp.maximum(w, v) for w in vmax)
            denominator = jnp.sqrt(vmax[0] if amsgrad else v) + eps
            return (_like(m * correction / denominator, g), m.astype(stored), v, *vmax)

        trees = (state.mu, state.nu, state.nu_max) if amsgrad else (state.mu, state.nu)
        updates, mu, nu, *nu_max = leafwise("scale_by_adam", leaf, updates, *trees)
        return updates, AdamState(mu, nu, nu_max[0] if amsgrad else None, hp)

    return Transformation(init, update)


class AdamaxState(NamedTuple):
    mu: Updates  # first moment
    norm: Updates  # exponentially weighted infinity norm
    hyperparams: Hyperparams


def scale_by_adamax(beta_1: Hyper = 0.9, beta_2: Hyper = 0.999, epsilon: Hyper = 1e-7) -> Transformation:
    """AdaMax:  ``m <- m + (1 - b1)*(g - m);  n <- max(b2*n, |g|);  u <- m / ((1 - b1^t) * (n + eps))``.

    Adam with the infinity norm in place of the l2 norm (Kingma & Ba, section 7.1); the scale ``n`` needs
    no bias correction.
    """
    spec = HyperSpec(
        "scale_by_adamax",
        beta_1=(beta_1, UNIT_INTERVAL),
        beta_2=(beta_2, UNIT_INTERVAL),
        epsilon=(epsilon, NONNEGATIVE),
    )

    def init(params):
        return AdamaxState(_zeros(params), _zeros(params, real=True), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b1, b2, eps = h["beta_1"], h["beta_2"], h["epsilon"]
        correction = 1 - jnp.power(b1, _time(step, "scale_by_adamax"))

        def leaf(g, m, n):
            g32 = g.astype(m.dtype)
            m = m + (g32 - m) * (1 - b1)
            n = jnp.maximum(b2 * n, jnp.abs(g32))
            return _like(m / (correction * (n + eps)), g), m, n

        updates, mu, norm = leafwise("scale_by_adamax", leaf, updates, state.mu, state.norm)
        return updates, AdamaxState(mu, norm, hp)

    return Transformation(init, update)


class NadamState(NamedTuple):
    mu: Updates
    nu: Updates
    mu_product: jax.Array  # float32 running product of the momentum schedule, prod_{i<=t} mu_i
    hyperparams: Hyperparams


def scale_by_nadam(beta_1: Hyper = 0.9, beta_2: Hyper = 0.999, epsilon: Hyper = 1e-7) -> Transformation:
    """Nadam (Dozat, 2016), with Keras's momentum schedule ``mu_t = b1 * (1 - 0.5 * 0.96^t)``:

    ``P_t = P_{t-1} * mu_t;  m <- m + (1 - b1)*(g - m);  v <- v + (1 - b2)*(g*g - v);``
    ``mhat = mu_{t+1} * m / (1 - P_t * mu_{t+1}) + (1 - mu_t) * g / (1 - P_t);  vhat = v / (1 - b2^t);``
    ``u <- mhat / (sqrt(vhat) + eps)``.

    ``P`` is kept as a running product in the state, as Keras does.
    """
    spec = HyperSpec(
        "scale_by_nadam",
        beta_1=(beta_1, UNIT_INTERVAL),
        beta_2=(beta_2, UNIT_INTERVAL),
        epsilon=(epsilon, NONNEGATIVE),
    )

    def init(params):
        return NadamState(_zeros(params), _zeros(params, real=True), jnp.ones([], jnp.float32), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b1, b2, eps = h["beta_1"], h["beta_2"], h["epsilon"]
        t = _time(step, "scale_by_nadam")
        mu_t = b1 * (1 - 0.5 * jnp.power(jnp.float32(0.96), t))
        mu_next = b1 * (1 - 0.5 * jnp.power(jnp.float32(0.96), t + 1))
        product = state.mu_product * mu_t
        product_next = product * mu_next
        v_correction = 1 - jnp.power(b2, t)

        def leaf(g, m, v):
            g32 = g.astype(m.dtype)
            m = m + (g32 - m) * (1 - b1)
            v = v + (abs_sq(g32) - v) * (1 - b2)
            m_hat = mu_next * m / (1 - product_next) + (1 - mu_t) * g32 / (1 - product)
            return _like(m_hat / (jnp.sqrt(v / v_correction) + eps), g), m, v

        updates, mu, nu = leafwise("scale_by_nadam", leaf, updates, state.mu, state.nu)
        return updates, NadamState(mu, nu, product, hp)

    return Transformation(init, update)


class WeightDecayState(NamedTuple):
    hyperparams: Hyperparams


def add_decayed_weights(weight_decay: Hyper) -> Transformation:
    """Adds the decay term to a direction:  ``u <- g + lambda * theta``  (the building block of AdamW).

    It belongs *before* `scale_by_learning_rate`, which turns ``g + lambda*theta`` into the decoupled
    step ``-eta*(g + lambda*theta)`` (Loshchilov & Hutter, 2019; as in `adamw`). Chained after a
    complete optimizer, whose output is already a step, it would add ``+lambda*theta`` and grow the
    weights: there use `gradtx.with_weight_decay` (or `gradtx.decoupled_weight_decay`), which subtract.
    """
    spec = HyperSpec("add_decayed_weights", weight_decay=(weight_decay, NONNEGATIVE))

    def init(params):
        return WeightDecayState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError("add_decayed_weights needs the params: call update(updates, state, params)")
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        wd = h["weight_decay"]
        (updates, _) = leafwise(
            "add_decayed_weights", lambda g, p: (_like(g + wd * p, g), p), updates, params
        )
        return updates, WeightDecayState(hp)

    return Transformation(init, update)
