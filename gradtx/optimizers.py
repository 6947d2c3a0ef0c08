"""The optimizers of the course, with Keras 3's argument names, defaults and numerics.

Each is a `chain` of primitives from `gradtx.transforms`, so its state holds one step counter and its
hyperparameters as float32 arrays: read them with `gradtx.hyperparams`, change them between steps with
`gradtx.set_hyperparams`, sweep them with `jax.vmap`. Every hyperparameter may be a float, a JAX scalar
or a schedule ``step -> value``.

Every factory also takes Keras's base-optimizer options (``weight_decay``, ``clipnorm``, ``clipvalue``,
``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``, ``loss_scale_factor``,
``gradient_accumulation_steps``), with Keras's defaults and order of operations: see
`gradtx.keras_options`. With none given, the optimizer is the bare chain.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from gradtx import transforms
from gradtx.base import Transformation, chain
from gradtx.hyper import Hyper, is_concrete
from gradtx.keras_options import KerasOptions, KerasOptionsWithoutDecay, with_keras_options

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack


def _is_zero(x: Hyper) -> bool:
    # A momentum of exactly 0 skips the velocity buffer, as Keras does. A traced or scheduled value
    # keeps it, so a vmapped sweep over momentum may include 0.
    return not callable(x) and is_concrete(x) and np.ndim(x) == 0 and float(np.asarray(x)) == 0.0


def sgd(
    learning_rate: Hyper = 0.01,
    momentum: Hyper = 0.0,
    nesterov: bool = False,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """Gradient descent, with momentum or Nesterov momentum (NAG):

    ``m <- momentum*m - eta*grad;  theta <- theta + m``  (``theta <- theta + momentum*m - eta*grad`` with
    ``nesterov``);  plain ``theta <- theta - eta*grad`` when ``momentum == 0``.  (Keras ``SGD``.)
    """
    if nesterov and _is_zero(momentum):
        raise ValueError("sgd: nesterov=True needs a momentum > 0, got momentum=0.0")
    parts = [transforms.scale_by_learning_rate(learning_rate)]
    if not _is_zero(momentum):
        parts.append(transforms.momentum(momentum, nesterov))
    return with_keras_options(chain(*parts), owner="sgd", **options)


def adagrad(
    learning_rate: Hyper = 0.001,
    initial_accumulator_value: float = 0.1,
    epsilon: Hyper = 1e-7,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """AdaGrad:  ``s <- s + grad^2;  theta <- theta - eta*grad / sqrt(s + eps)``.  (Keras ``Adagrad``.)"""
    core = chain(
        transforms.scale_by_adagrad(initial_accumulator_value, epsilon),
        transforms.scale_by_learning_rate(learning_rate),
    )
    return with_keras_options(core, owner="adagrad", **options)


def rmsprop(
    learning_rate: Hyper = 0.001,
    rho: Hyper = 0.9,
    momentum: Hyper = 0.0,
    epsilon: Hyper = 1e-7,
    centered: bool = False,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """RMSProp:  ``v <- rho*v + (1 - rho)*grad^2;  theta <- theta - eta*grad / sqrt(v + eps)``.

    ``centered`` divides by ``sqrt(v - gbar^2 + eps)`` with ``gbar`` the running mean of the gradient;
    ``momentum > 0`` accumulates the steps: ``m <- momentum*m + eta*grad/sqrt(...); theta <- theta - m``.
    (Keras ``RMSprop``.)
    """
    parts = [
        transforms.scale_by_rms(rho, epsilon, centered),
        transforms.scale_by_learning_rate(learning_rate),
    ]
    if not _is_zero(momentum):
        parts.append(transforms.momentum(momentum))
    return with_keras_options(chain(*parts), owner="rmsprop", **options)


def adam(
    learning_rate: Hyper = 0.001,
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-7,
    amsgrad: bool = False,
    mu_dtype: Any = None,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """Adam:  ``m <- b1*m + (1 - b1)*grad;  v <- b2*v + (1 - b2)*grad^2;
    theta <- theta - eta * sqrt(1 - b2^t)/(1 - b1^t) * m / (sqrt(v) + eps)``.  (Keras ``Adam``.)
    ``mu_dtype=jnp.bfloat16`` keeps ``m`` in bfloat16 (see `scale_by_adam`)."""
    core = chain(
        transforms.scale_by_adam(beta_1, beta_2, epsilon, amsgrad, mu_dtype),
        transforms.scale_by_learning_rate(learning_rate),
    )
    return with_keras_options(core, owner="adam", **options)


def adamax(
    learning_rate: Hyper = 0.001,
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-7,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """AdaMax:  ``m <- b1*m + (1 - b1)*grad;  n <- max(b2*n, |grad|);
    theta <- theta - eta * m / ((1 - b1^t)(n + eps))``.  (Keras ``Adamax``.)"""
    core = chain(
        transforms.scale_by_adamax(beta_1, beta_2, epsilon),
        transforms.scale_by_learning_rate(learning_rate),
    )
    return with_keras_options(core, owner="adamax", **options)


def nadam(
    learning_rate: Hyper = 0.001,
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-7,
    **options: Unpack[KerasOptions],
) -> Transformation:
    """Nadam: Adam with Nesterov momentum and Keras's momentum schedule (see `scale_by_nadam`).
    (Keras ``Nadam``.)"""
    core = chain(
        transforms.scale_by_nadam(beta_1, beta_2, epsilon),
        transforms.scale_by_learning_rate(learning_rate),
    )
    return with_keras_options(core, owner="nadam", **options)


def adamw(
    learning_rate: Hyper = 0.001,
    weight_decay: Hyper = 0.004,
    beta_1: Hyper = 0.9,
    beta_2: Hyper = 0.999,
    epsilon: Hyper = 1e-7,
    amsgrad: bool = False,
    mu_dtype: Any = None,
    **options: Unpack[KerasOptionsWithoutDecay],
) -> Transformation:
    """AdamW: Adam with decoupled weight decay,
    ``theta <- theta - eta * (adam_direction + weight_decay * theta)``.

    The decay is multiplied by the learning rate, as in Keras ``AdamW`` (and the paper's schedule
    multiplier). To decay every leaf except some, route with the masking transformations.
    ``mu_dtype=jnp.bfloat16`` keeps ``m`` in bfloat16 (see `scale_by_adam`). ``weight_decay`` is
    this optimizer's own (Keras's default 0.004); the other Keras options are as for every optimizer.
    """
    core = chain(
        transforms.scale_by_adam(beta_1, beta_2, epsilon, amsgrad, mu_dtype),
        transforms.add_decayed_weights(weight_decay),
        transforms.scale_by_learning_rate(learning_rate),
    )
    return with_keras_options(core, owner="adamw", **options)
