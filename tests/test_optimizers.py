"""The nine optimizers against Keras 3 (JAX backend), the course's reference, step by step.

Method: every optimizer state here is a function of the gradients alone, so at each step gradtx starts
from Keras's current params and must land on Keras's next params. A difference cannot accumulate and
hide; each step must agree on its own, for 60 steps of random gradients spanning five decades.

Tolerances. With hyperparameters that are exactly representable in float32 (what gradtx stores), both
libraries do the same float32 arithmetic up to the order of a few operations: each step may differ by
a couple of ulp, hence a bound of 1e-6 (8 ulp) of ``|theta_old| + |theta_new|``, the
magnitude of the operands of ``theta + u`` (a relative bound on the result alone fails where theta
crosses zero). With Keras's decimal defaults, Keras computes
``1 - beta`` in float64 but ``beta**t`` in float32, which shifts its Adam-family updates by up to
~1e-5 of the update (not of theta). With ``lr <= 0.01`` that is below 1e-7 of theta, well inside
the bound.
"""

import inspect

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import gradtx

K = keras.optimizers

# name -> (Keras class, shared keyword arguments, gradtx factory)
CASES = {
    "sgd": (K.SGD, {}, gradtx.sgd),
    "momentum": (K.SGD, {"momentum": 0.9}, gradtx.sgd),
    "nesterov": (K.SGD, {"momentum": 0.9, "nesterov": True}, gradtx.sgd),
    "adagrad": (K.Adagrad, {}, gradtx.adagrad),
    "rmsprop": (K.RMSprop, {}, gradtx.rmsprop),
    "rmsprop_centered": (K.RMSprop, {"centered": True}, gradtx.rmsprop),
    "rmsprop_momentum": (K.RMSprop, {"momentum": 0.5}, gradtx.rmsprop),
    "rmsprop_centered_momentum": (K.RMSprop, {"momentum": 0.5, "centered": True}, gradtx.rmsprop),
    "adam": (K.Adam, {}, gradtx.adam),
    "adam_amsgrad": (K.Adam, {"amsgrad": True}, gradtx.adam),
    "adamax": (K.Adamax, {}, gradtx.adamax),
    "nadam": (K.Nadam, {}, gradtx.nadam),
    "adamw": (K.AdamW, {"weight_decay": 0.05}, gradtx.adamw),
}
FLOAT_ARGS = ("learning_rate", "momentum", "rho", "beta_1", "beta_2", "epsilon", "weight_decay")
STEPS = 60
SHAPES = [(5, 3), (7,), (2, 2, 3), ()]


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    # Mixed scales: each entry's magnitude is drawn from 1e-3 to 1e2.
    grads = [
        [(rng.normal(size=s) * 10 ** rng.uniform(-3, 2, size=s)).astype(np.float32) for s in SHAPES]
        for _ in range(STEPS)
    ]
    return params, grads


def _float32_exact(keras_class, gradtx_factory, kwargs):
    """Every float hyperparameter (given or Keras's default) rounded to its float32 value."""
    keras_sig = inspect.signature(keras_class.__init__).parameters
    ours_sig = inspect.signature(gradtx_factory).parameters
    out = dict(kwargs)
    for name in FLOAT_ARGS:
        if name in keras_sig and name in ours_sig:
            out[name] = float(np.float32(out.get(name, keras_sig[name].default)))
    return out


def _run_step_by_step(keras_opt, tx, jit):
    params, grads = _problem()
    variables = [keras.Variable(p) for p in params]
    state = tx.init([jnp.asarray(p) for p in params])
    update = jax.jit(tx.update) if jit else tx.update
    for step, g in enumerate(grads):
        current = [np.asarray(v) for v in variables]
        keras_opt.apply([jnp.asarray(x) for x in g], variables)
        updates, state = update([jnp.asarray(x) for x in g], state, [jnp.asarray(p) for p in current])
        ours = gradtx.apply_updates([jnp.asarray(p) for p in current], updates)
        for i, (a, b, before) in enumerate(zip(ours, variables, current, strict=True)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            # theta + u rounds relative to its operands: |u| <= |theta_old| + |theta_new|.
            bound = 1e-6 * (np.abs(before) + np.abs(b))
            assert np.all(np.abs(a - b) <= bound), (
                f"step {step}, leaf {i}: max excess {np.max(np.abs(a - b) - bound):.3g}\n{a}\n{b}"
            )
    assert int(gradtx.step_count(state)) == STEPS == int(keras_opt.iterations)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_keras_step_by_step(name, jit):
    keras_class, kwargs, factory = CASES[name]
    kwargs = _float32_exact(keras_class, factory, {"learning_rate": 0.01, **kwargs})
    _run_step_by_step(keras_class(**kwargs), factory(**kwargs), jit)


@pytest.mark.parametrize("name", list(CASES))
def test_keras_defaults_match(name):
    """The same defaults as Keras: neither side is given a learning rate, beta, epsilon, ..."""
    keras_class, kwargs, factory = CASES[name]
    _run_step_by_step(keras_class(**kwargs), factory(**kwargs), jit=True)


def test_adamw_default_weight_decay_is_keras():
    assert inspect.signature(gradtx.adamw).parameters["weight_decay"].default == 0.004
    assert inspect.signature(K.AdamW.__init__).parameters["weight_decay"].default == 0.004


@pytest.mark.parametrize("name", list(CASES))
def test_learning_rate_schedule_matches_keras(name):
    """A learning-rate schedule is read at the step before the update, as Keras reads it at `iterations`."""
    keras_class, kwargs, factory = CASES[name]
    kwargs = _float32_exact(keras_class, factory, kwargs)
    del kwargs["learning_rate"]
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=7, decay_rate=0.5)
    ours_schedule = lambda step: 0.02 * 0.5 ** (step / 7)  # noqa: E731
    _run_step_by_step(
        keras_class(learning_rate=keras_schedule, **kwargs),
        factory(learning_rate=ours_schedule, **kwargs),
        jit=True,
    )


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (
            gradtx.sgd,
            {"learning_rate": -0.1},
            "sgd|scale_by_learning_rate: learning_rate must be >= 0, got -0.1",
        ),
        (gradtx.sgd, {"momentum": 1.5}, "momentum: momentum must be in \\[0, 1\\), got 1.5"),
        (gradtx.sgd, {"nesterov": True}, "sgd: nesterov=True needs a momentum > 0"),
        (gradtx.adam, {"beta_1": 1.0}, "scale_by_adam: beta_1 must be in \\[0, 1\\), got 1.0"),
        (gradtx.adam, {"beta_2": -0.1}, "scale_by_adam: beta_2 must be in \\[0, 1\\), got -0.1"),
        (gradtx.adam, {"epsilon": -1e-7}, "scale_by_adam: epsilon must be >= 0"),
        (gradtx.adamax, {"learning_rate": float("nan")}, "learning_rate must be finite, got nan"),
        (gradtx.nadam, {"beta_1": 2.0}, "scale_by_nadam: beta_1 must be in \\[0, 1\\), got 2.0"),
        (gradtx.rmsprop, {"rho": 1.0}, "scale_by_rms: rho must be in \\[0, 1\\), got 1.0"),
        (
            gradtx.adagrad,
            {"initial_accumulator_value": -1.0},
            "initial_accumulator_value must be >= 0, got -1.0",
        ),
        (gradtx.adamw, {"weight_decay": -0.01}, "add_decayed_weights: weight_decay must be >= 0, got -0.01"),
        (gradtx.adam, {"learning_rate": jnp.ones(8)}, "learning_rate must be a scalar .* got shape \\(8,\\)"),
    ],
)
def test_rejects_bad_hyperparameters(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_traced_hyperparameters_are_not_validated():
    """Inside vmap a hyperparameter is a tracer: it cannot be checked and must not fail construction."""
    params = jnp.ones(3)
    states = jax.vmap(lambda lr: gradtx.adam(lr).init(params))(jnp.array([1e-3, 1e-2]))
    np.testing.assert_array_equal(gradtx.hyperparams(states)["learning_rate"], np.float32([1e-3, 1e-2]))
