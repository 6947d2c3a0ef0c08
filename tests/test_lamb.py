"""LAMB against Keras 3 ``Lamb`` (JAX backend), step by step (see keras_steps.py).

Tolerance: with float32-exact hyperparameters both libraries evaluate the same expressions, except
that Keras multiplies ``(ratio * lr) * r`` where gradtx multiplies ``lr * (ratio * r)``, and the ratio
is a quotient of two norms, float32 sums over the leaf: a few ulp of the step. The bound is 1e-6 of
``|theta_old| + |theta_new|``; measured over 40 steps, 4 seeds, two sets of hyperparameters and an
extra 64x32 leaf: at most 3.4e-7 of it (each side eager, or each side jitted). A jitted gradtx against
an eager Keras differs more, up to 1.1e-6 on the 64x32 leaf: XLA sums the norms in another order in a
fused program.

The zero-norm rule is compared too: ``dense/bias`` starts at zero (``||theta|| = 0``: ratio 1), and
``frozen`` gets zero gradients for its first steps (``||r|| = 0``: ratio 1, no step).
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

from gradtx.lamb import lamb, scale_by_trust_ratio

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (7,), "conv/kernel": (2, 2, 3), "scale": (), "frozen": (4,)}
STEPS = 40


def _problem(seed):
    params, grads = problem(SHAPES, STEPS, seed=seed)
    params["dense/bias"][:] = 0.0
    for g in grads[:5]:
        g["frozen"][:] = 0.0
    return params, grads


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_keras_step_by_step(jit):
    params, grads = _problem(0)
    kwargs = {"learning_rate": f32(0.01), "beta_1": f32(0.9), "beta_2": f32(0.999), "epsilon": f32(1e-7)}
    run_step_by_step(keras.optimizers.Lamb(**kwargs), lamb(**kwargs), params, grads, jit=jit, rtol=1e-6)


def test_matches_keras_with_other_hyperparameters():
    params, grads = _problem(1)
    kwargs = {"learning_rate": f32(0.05), "beta_1": f32(0.5), "beta_2": f32(0.9), "epsilon": f32(1e-3)}
    run_step_by_step(keras.optimizers.Lamb(**kwargs), lamb(**kwargs), params, grads, jit=True, rtol=1e-6)


def test_learning_rate_schedule_matches_keras():
    params, grads = _problem(2)
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=7, decay_rate=0.5)
    ours = lambda step: 0.02 * 0.5 ** (step / 7)  # noqa: E731
    betas = {"beta_1": f32(0.9), "beta_2": f32(0.999), "epsilon": f32(1e-7)}
    run_step_by_step(
        keras.optimizers.Lamb(learning_rate=keras_schedule, **betas),
        lamb(learning_rate=ours, **betas),
        params,
        grads,
        jit=True,
        rtol=1e-6,
    )


def test_trust_ratio_rescales_to_the_weight_norm():
    params = {"w": jnp.asarray([[3.0, 4.0]]), "b": jnp.zeros(2), "c": jnp.asarray([1.0, 1.0])}
    direction = {"w": jnp.asarray([[0.0, 0.5]]), "b": jnp.asarray([2.0, 0.0]), "c": jnp.zeros(2)}
    tx = scale_by_trust_ratio()
    out, _ = tx.update(direction, tx.init(params), params)
    np.testing.assert_allclose(out["w"], [[0.0, 5.0]])  # ||w|| / ||u|| = 5 / 0.5
    np.testing.assert_array_equal(out["b"], [2.0, 0.0])  # ||theta|| = 0: ratio 1
    np.testing.assert_array_equal(out["c"], [0.0, 0.0])  # ||u|| = 0: ratio 1


def test_trust_ratio_needs_the_params():
    tx = scale_by_trust_ratio()
    with pytest.raises(ValueError, match="scale_by_trust_ratio needs the params"):
        tx.update({"w": jnp.ones(2)}, tx.init(None))


def test_arguments_and_defaults_are_keras():
    assert_same_arguments(lamb, keras.optimizers.Lamb)


def test_vmap_over_learning_rate_equals_separate_runs():
    assert_vmap_matches_separate_runs(lamb, [1e-3, 1e-2, 1e-1], SHAPES)


def test_bfloat16_params_keep_float32_state():
    assert_bfloat16_params_keep_float32_state(lamb(0.01))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta_1": 1.0}, "scale_by_corrected_adam: beta_1 must be in \\[0, 1\\), got 1.0"),
        ({"beta_2": -0.5}, "scale_by_corrected_adam: beta_2 must be in \\[0, 1\\), got -0.5"),
        ({"epsilon": -1e-7}, "scale_by_corrected_adam: epsilon must be >= 0, got -1e-07"),
        ({"learning_rate": -1.0}, "scale_by_learning_rate: learning_rate must be >= 0, got -1.0"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lamb(**kwargs)
