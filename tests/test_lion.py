"""Lion against Keras 3 ``Lion`` (JAX backend), step by step (see keras_steps.py).

Tolerance: the step is ``-lr * sign(c)``, so both libraries add the same float32 number to theta as long
as the sign of ``c = b1*m + (1 - b1)*g`` agrees; with float32-exact hyperparameters ``c`` is the same
float32 expression in the same order. A flipped sign would be an error of ``2 * lr`` (0.02 here), far
above the bound of 1e-6 of ``|theta_old| + |theta_new|`` kept for XLA's freedom to fuse. Measured
over 40 steps: bit-identical, eagerly and jitted.
"""

import jax.numpy as jnp
import keras
import numpy as np
import pytest
from keras_steps import (
    assert_bfloat16_params_keep_float32_state,
    assert_same_arguments,
    assert_vmap_matches_separate_runs,
    f32,
    problem,
    run_step_by_step,
)

from gradtx.lion import lion

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (7,), "conv/kernel": (2, 2, 3), "scale": ()}
STEPS = 40


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_keras_step_by_step(jit):
    params, grads = problem(SHAPES, STEPS)
    kwargs = {"learning_rate": f32(0.01), "beta_1": f32(0.9), "beta_2": f32(0.99)}
    run_step_by_step(keras.optimizers.Lion(**kwargs), lion(**kwargs), params, grads, jit=jit, rtol=1e-6)


def test_matches_keras_with_other_hyperparameters():
    params, grads = problem(SHAPES, STEPS, seed=1)
    kwargs = {"learning_rate": f32(0.003), "beta_1": f32(0.5), "beta_2": f32(0.9)}
    run_step_by_step(keras.optimizers.Lion(**kwargs), lion(**kwargs), params, grads, jit=True, rtol=1e-6)


def test_learning_rate_schedule_matches_keras():
    params, grads = problem(SHAPES, STEPS, seed=2)
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=7, decay_rate=0.5)
    ours = lambda step: 0.02 * 0.5 ** (step / 7)  # noqa: E731
    run_step_by_step(
        keras.optimizers.Lion(learning_rate=keras_schedule, beta_1=f32(0.9), beta_2=f32(0.99)),
        lion(learning_rate=ours, beta_1=f32(0.9), beta_2=f32(0.99)),
        params,
        grads,
        jit=True,
        rtol=1e-6,
    )


def test_every_coordinate_moves_by_the_learning_rate():
    params, grads = problem({"w": (50,)}, 5, seed=4)
    lr = 0.25  # a power of two: theta + u is exact for |theta| < 2, so the move is exactly lr
    tx = lion(lr)
    state = tx.init({"w": jnp.asarray(params["w"])})
    updates, _ = tx.update({"w": jnp.asarray(grads[0]["w"])}, state)
    np.testing.assert_array_equal(np.abs(updates["w"]), lr)


def test_arguments_and_defaults_are_keras():
    assert_same_arguments(lion, keras.optimizers.Lion)


def test_vmap_over_learning_rate_equals_separate_runs():
    assert_vmap_matches_separate_runs(lion, [1e-3, 1e-2, 1e-1], SHAPES)


def test_bfloat16_params_keep_float32_state():
    assert_bfloat16_params_keep_float32_state(lion(0.01))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta_1": 0.0}, "scale_by_lion: beta_1 must be in \\(0, 1\\], got 0.0"),
        ({"beta_1": 1.5}, "scale_by_lion: beta_1 must be in \\(0, 1\\], got 1.5"),
        ({"beta_2": -0.5}, "scale_by_lion: beta_2 must be in \\[0, 1\\], got -0.5"),
        ({"learning_rate": -1.0}, "scale_by_learning_rate: learning_rate must be >= 0, got -1.0"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lion(**kwargs)
