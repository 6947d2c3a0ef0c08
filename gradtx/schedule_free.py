"""Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled"), as Keras 3
``ScheduleFreeAdamW`` computes it.

Three sequences replace a learning-rate schedule: ``z``, where the (Adam-scaled) gradient steps are
taken; ``x``, the running average of the ``z``'s, which is what to evaluate and deploy; and ``y``, an
interpolation of the two, where the gradients are computed. The model's params are ``y``. Keras keeps
``z`` (its ``momentum``) and the second moment only, and recovers ``x`` from ``y`` and ``z`` at each step;
so does gradtx, and `schedule_free_eval_params` gives ``x`` (Keras offers no way to read it).

Keras's form, followed here: the second moment is bias-corrected inside the root,
``denominator = sqrt(v / (1 - b2^t)) + eps``; a linear warmup ``min(t / warmup_steps, 1)`` multiplies the
learning rate; the averaging weight is ``1/t`` (the paper's ``c_t`` without its warmup-dependent
weighting); ``y`` and ``x`` use the same ``beta_1``. Keras's base ``weight_decay`` (which Keras applies to
``y`` before the step) is not part of this factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtx.base import Params, Transformation, Updates, chain, is_float, leafwise, zeros_like_state
from gradtx.hyper import COUNT, NONNEGATIVE, UNIT_INTERVAL, Hyper, Hyperparams, HyperSpec, Range
from gradtx.keras_options import KerasOptions, with_keras_options
from gradtx.transforms import scale_by_learning_rate

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

_BETA_1 = Range(0.0, 1.0, low_open=True)  # x is recovered as (y - (1 - b1) z) / b1


def _time(step: jax.Array | None, owner: str) -> jax.Array:
    if step is None:
        raise ValueError(f"{owner} needs the step count; use it inside gradtx.chain")
    return jnp.asarray(step).astype(jnp.float32) + 1.0


class CorrectedRmsState(NamedTuple):
    nu: Updates  # running mean of g*g
    hyperparams: Hyperparams


def scale_by_corrected_rms(beta_2: Hyper = 0.999, epsilon: Hyper = 1e-8) -> Transformation:
    """RMS scaling with a bias-corrected second moment:  ``v <- v + (1 - b2)*(g*g - v);
    u <- g / (sqrt(v / (1 - b2^t)) + eps)``.  (Keras ``ScheduleFreeAdamW``'s denominator.)"""
    owner = "scale_by_corrected_rms"
    spec = HyperSpec(owner, beta_2=(beta_2, UNIT_INTERVAL), epsilon=(epsilon, NONNEGATIVE))

    def init(params):
        return CorrectedRmsState(jax.tree.map(zeros_like_state, params), spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b2, eps = h["beta_2"], h["epsilon"]
        correction = 1 - jnp.power(b2, _time(step, owner))

        def leaf(g, v):
            g32 = g.astype(v.dtype)
            v = v + (jnp.square(g32) - v) * (1 - b2)
            return (g32 / (jnp.sqrt(v / correction) + eps)).astype(g.dtype), v

        updates, nu = leafwise(owner, leaf, updates, state.nu)
        return updates, CorrectedRmsState(nu, hp)

    return Transformation(init, update)


class WarmupState(NamedTuple):
    hyperparams: Hyperparams


def scale_by_linear_warmup(warmup_steps: Hyper = 0) -> Transformation:
    """Linear warmup:  ``u <- min(t / warmup_steps, 1) * g``  (``t = step + 1``); ``warmup_steps = 0``
    is no warmup.  (Keras ``ScheduleFreeAdamW``'s ``warmup_steps``.)"""
    owner = "scale_by_linear_warmup"
    spec = HyperSpec(owner, warmup_steps=(warmup_steps, COUNT))

    def init(params):
        return WarmupState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        # t / 0 = inf, so warmup_steps = 0 gives a factor of 1 without a branch (and may be vmapped).
        factor = jnp.minimum(_time(step, owner) / h["warmup_steps"], 1.0)
        (updates,) = leafwise(owner, lambda g: ((factor * g.astype(jnp.float32)).astype(g.dtype),), updates)
        return updates, WarmupState(hp)

    return Transformation(init, update)


class ScheduleFreeState(NamedTuple):
    z: Updates  # the sequence the steps are taken on (Keras's "momentum"), from the initial params
    hyperparams: Hyperparams


def schedule_free(beta_1: Hyper = 0.9) -> Transformation:
    """Schedule-free averaging of the incoming steps ``d``, with the params ``y`` (``t = step + 1``):

    ``x = (y - (1 - b1)*z) / b1;  z <- z + d;  x <- (1 - 1/t)*x + z/t;  y' = (1 - b1)*z + b1*x;
    u <- y' - y``.

    ``x`` is recovered from ``y`` and ``z`` with the ``beta_1`` that made ``y`` (the previous step's
    value, which is the current one unless ``beta_1`` follows a schedule); read it with
    `schedule_free_eval_params`. Chain it after a complete step (one that includes the learning rate
    and its sign). ``beta_1`` must be in (0, 1]. Needs the params. (Defazio et al., 2024, eq. (1)-(3);
    Keras ``ScheduleFreeAdamW``.)
    """
    owner = "schedule_free"
    spec = HyperSpec(owner, beta_1=(beta_1, _BETA_1))

    def init(params):
        return ScheduleFreeState(
            jax.tree.map(lambda p: zeros_like_state(p) + p if is_float(p) else zeros_like_state(p), params),
            spec.init(),
        )

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError(f"{owner} needs the params: call update(updates, state, params)")
        previous = {**state.hyperparams.constant, **state.hyperparams.scheduled}["beta_1"]
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        b1, weight = h["beta_1"], 1.0 / _time(step, owner)

        def leaf(d, z, y):
            y32 = y.astype(z.dtype)
            x = (y32 - (1 - previous) * z) / previous
            z = z + d.astype(z.dtype)
            x = (1 - weight) * x + weight * z
            return ((1 - b1) * z + b1 * x - y32).astype(d.dtype), z, y

        updates, z, _ = leafwise(owner, leaf, updates, state.z, params)
        return updates, ScheduleFreeState(z, hp)

    return Transformation(init, update)


def _schedule_free_nodes(state: Any) -> list[ScheduleFreeState]:
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScheduleFreeState))
    return [node for node in leaves if isinstance(node, ScheduleFreeState)]


def schedule_free_eval_params(state: Any, params: Params) -> Params:
    """The averaged sequence ``x = (y - (1 - b1)*z) / b1``: the params to evaluate and deploy, from the
    optimizer ``state`` and the training params ``y`` (in the params' dtypes).

    ``state`` must hold exactly one `schedule_free` transformation (as `schedule_free_adamw`'s does).
    Keras ``ScheduleFreeAdamW`` keeps ``x`` implicit and gives no way to read it.
    """
    nodes = _schedule_free_nodes(state)
    if len(nodes) != 1:
        raise ValueError(
            f"schedule_free_eval_params: the state must hold exactly one schedule_free transformation, "
            f"it holds {len(nodes)}"
        )
    node = nodes[0]
    b1 = {**node.hyperparams.constant, **node.hyperparams.scheduled}["beta_1"]

    def leaf(y, z):
        return ((y.astype(z.dtype) - (1 - b1) * z) / b1).astype(y.dtype), z

    out, _ = leafwise("schedule_free_eval_params", leaf, params, node.z)
    return out


def schedule_free_adamw(
    learning_rate: Hyper = 0.0025,
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-8,
    warmup_steps: Hyper = 0,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """Schedule-Free AdamW:  ``z <- z - eta * min(t / warmup_steps, 1) * g / (sqrt(v / (1 - b2^t)) + eps);
    x <- (1 - 1/t)*x + z/t;  y <- (1 - b1)*z + b1*x``,  the params being ``y`` (see `schedule_free`).

    Evaluate with ``schedule_free_eval_params(state, params)`` (the average ``x``), train with ``params``
    (``y``). With bfloat16 params, ``y`` is rounded each step and ``x``, recovered from it, carries that
    rounding (as in Keras). (Defazio et al., 2024; Keras ``ScheduleFreeAdamW``.)
    """
    core = chain(
        scale_by_corrected_rms(beta_2, epsilon),
        scale_by_linear_warmup(warmup_steps),
        scale_by_learning_rate(learning_rate),
        schedule_free(beta_1),
    )
    return with_keras_options(core, owner="schedule_free_adamw", **options)
