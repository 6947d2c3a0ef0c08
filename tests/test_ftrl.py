"""FTRL against Keras 3 ``Ftrl`` (JAX backend), step by step (see keras_steps.py).

Tolerance: Keras assigns ``w_new`` where gradtx adds ``u = w_new - w`` to ``w``, one more rounding,
relative to ``|w| + |w_new|``; with float32-exact hyperparameters the rest is the same expression (two
powers of the accumulator, a clip and a quotient). The bound is 1e-6 (8 ulp) of
``|theta_old| + |theta_new|``; measured over 40 steps: at most 7e-8 of it, eagerly (both sides) and
jitted (both sides). The learning rate is 0.25 or more so that the steps are large against the bound.

FTRL is ill-conditioned in float32: ``z`` is a running sum of terms that largely cancel, and so is
``n'^p - n^p`` when ``g^2 << n``. A compiled program (which fuses the elementwise operations) and the
same operations run one by one then differ by up to 1.1e-5 of theta over 40 steps, for Keras against
itself as for gradtx against itself; so each side is compared with the other in the same mode.
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
    run,
    run_step_by_step,
)

from gradtx.ftrl import ftrl

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (7,), "conv/kernel": (2, 2, 3), "scale": ()}
STEPS = 40
ALL_TERMS = {
    "learning_rate": 0.25,
    "learning_rate_power": f32(-0.6),
    "initial_accumulator_value": 0.5,
    "l1_regularization_strength": 0.5,
    "l2_regularization_strength": f32(0.3),
    "l2_shrinkage_regularization_strength": f32(0.05),
    "beta": f32(0.7),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_keras_step_by_step(jit):
    params, grads = problem(SHAPES, STEPS)
    kwargs = {"learning_rate": 0.5}
    run_step_by_step(keras.optimizers.Ftrl(**kwargs), ftrl(**kwargs), params, grads, jit=jit, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_keras_with_every_term(jit):
    params, grads = problem(SHAPES, STEPS, seed=1, decades=(-2, 1))
    run_step_by_step(keras.optimizers.Ftrl(**ALL_TERMS), ftrl(**ALL_TERMS), params, grads, jit=jit, rtol=1e-6)


def test_learning_rate_schedule_matches_keras():
    params, grads = problem(SHAPES, STEPS, seed=2)
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=7, decay_rate=0.5)
    ours = lambda step: 1.0 * 0.5 ** (step / 7)  # noqa: E731
    run_step_by_step(
        keras.optimizers.Ftrl(learning_rate=keras_schedule, l2_regularization_strength=0.25),
        ftrl(learning_rate=ours, l2_regularization_strength=0.25),
        params,
        grads,
        jit=True,
        rtol=1e-6,
    )


def test_l1_sets_weights_exactly_to_zero():
    """Where ``|z| <= l1`` the weight is 0.0 exactly, after apply_updates too; elsewhere it is not."""
    params, grads = problem({"w": (200,)}, 30, seed=5, decades=(-2, 0))
    l1 = 1.0
    final, state = run(ftrl(learning_rate=0.5, l1_regularization_strength=l1), params, grads)
    w = np.asarray(final["w"])
    z = np.asarray(state.inner[0].linear["w"])
    inside = np.abs(z) <= l1
    assert 0.2 < inside.mean() < 0.95  # both kinds of weight are present
    assert np.all(w[inside] == 0.0)
    assert np.all(w[~inside] != 0.0)


def test_keras_ftrl_gives_the_same_zeros():
    params, grads = problem({"w": (200,)}, 30, seed=5, decades=(-2, 0))
    kwargs = {"learning_rate": 0.5, "l1_regularization_strength": 1.0}
    final, _ = run(ftrl(**kwargs), params, grads)
    variable = keras.Variable(params["w"])
    keras_opt = keras.optimizers.Ftrl(**kwargs)
    for g in grads:
        keras_opt.apply([jnp.asarray(g["w"])], [variable])
    np.testing.assert_array_equal(np.asarray(final["w"]) == 0.0, np.asarray(variable) == 0.0)


def test_arguments_and_defaults_are_keras():
    assert_same_arguments(ftrl, keras.optimizers.Ftrl)


def test_vmap_over_learning_rate_equals_separate_runs():
    assert_vmap_matches_separate_runs(
        lambda lr: ftrl(lr, l1_regularization_strength=0.1), [0.01, 0.1, 1.0], SHAPES
    )


def test_bfloat16_params_keep_float32_state():
    assert_bfloat16_params_keep_float32_state(ftrl(0.1))


def test_needs_the_params():
    tx = ftrl()
    with pytest.raises(ValueError, match="ftrl needs the params"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rate": 0.0}, "ftrl: learning_rate must be > 0, got 0.0"),
        ({"learning_rate_power": 0.5}, "ftrl: learning_rate_power must be <= 0, got 0.5"),
        ({"initial_accumulator_value": -0.1}, "ftrl: initial_accumulator_value must be >= 0, got -0.1"),
        ({"l1_regularization_strength": -1.0}, "ftrl: l1_regularization_strength must be >= 0, got -1.0"),
        ({"l2_regularization_strength": -1.0}, "ftrl: l2_regularization_strength must be >= 0, got -1.0"),
        (
            {"l2_shrinkage_regularization_strength": -1.0},
            "ftrl: l2_shrinkage_regularization_strength must be >= 0, got -1.0",
        ),
        ({"beta": -1.0}, "ftrl: beta must be >= 0, got -1.0"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ftrl(**kwargs)
