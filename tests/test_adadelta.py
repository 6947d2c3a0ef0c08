"""Adadelta against Keras 3 ``Adadelta`` (JAX backend), step by step (see keras_steps.py).

Tolerance: with float32-exact hyperparameters both libraries evaluate the same float32 expressions in
the same order (two square roots, a product and a quotient per step), so a step may differ by an ulp or
two from XLA's fusion choices; the bound is 1e-6 (8 ulp) of ``|theta_old| + |theta_new|``. Measured
over 40 steps: bit-identical, eagerly and jitted (both sides in the same mode, see keras_steps.py); 3.6e-8
of it with the schedule. The
learning rate is 1.0 (Zeiler's form) or 0.5, so that each step is large against that bound.
"""

import keras
import pytest
from keras_steps import (
    assert_bfloat16_params_keep_float32_state,
    assert_same_arguments,
    assert_vmap_matches_separate_runs,
    f32,
    problem,
    run_step_by_step,
)

import gradtx

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (7,), "conv/kernel": (2, 2, 3), "scale": ()}
STEPS = 40


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_keras_step_by_step(jit):
    params, grads = problem(SHAPES, STEPS)
    kwargs = {"learning_rate": 1.0, "rho": f32(0.95), "epsilon": f32(1e-7)}
    run_step_by_step(
        keras.optimizers.Adadelta(**kwargs), gradtx.adadelta(**kwargs), params, grads, jit=jit, rtol=1e-6
    )


def test_matches_keras_with_other_hyperparameters():
    params, grads = problem(SHAPES, STEPS, seed=1)
    kwargs = {"learning_rate": 0.5, "rho": f32(0.7), "epsilon": f32(1e-4)}
    run_step_by_step(
        keras.optimizers.Adadelta(**kwargs), gradtx.adadelta(**kwargs), params, grads, jit=True, rtol=1e-6
    )


def test_learning_rate_schedule_matches_keras():
    params, grads = problem(SHAPES, STEPS, seed=2)
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(2.0, decay_steps=7, decay_rate=0.5)
    ours = lambda step: 2.0 * 0.5 ** (step / 7)  # noqa: E731
    run_step_by_step(
        keras.optimizers.Adadelta(learning_rate=keras_schedule, rho=f32(0.95), epsilon=f32(1e-7)),
        gradtx.adadelta(learning_rate=ours, rho=f32(0.95), epsilon=f32(1e-7)),
        params,
        grads,
        jit=True,
        rtol=1e-6,
    )


def test_arguments_and_defaults_are_keras():
    assert_same_arguments(gradtx.adadelta, keras.optimizers.Adadelta)


def test_vmap_over_learning_rate_equals_separate_runs():
    assert_vmap_matches_separate_runs(gradtx.adadelta, [0.1, 1.0, 3.0], SHAPES)


def test_bfloat16_params_keep_float32_state():
    assert_bfloat16_params_keep_float32_state(gradtx.adadelta(0.01))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": 1.0}, "scale_by_adadelta: rho must be in \\[0, 1\\), got 1.0"),
        ({"rho": -0.1}, "scale_by_adadelta: rho must be in \\[0, 1\\), got -0.1"),
        ({"epsilon": 0.0}, "scale_by_adadelta: epsilon must be > 0, got 0.0"),
        ({"learning_rate": -1.0}, "scale_by_learning_rate: learning_rate must be >= 0, got -1.0"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradtx.adadelta(**kwargs)
