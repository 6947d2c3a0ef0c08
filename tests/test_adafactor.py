"""Adafactor against Keras 3 ``Adafactor`` (JAX backend), step by step (see keras_steps.py), on leaves
of rank 0 to 4 (factored from rank 2 on).

Tolerance: with float32-exact hyperparameters the expressions are Keras's, except that gradtx
multiplies ``-rho * (scale * u)`` where Keras multiplies ``(scale * rho) * u``; the three RMS values and
the row/column means are float32 reductions. A step may differ by a few ulp; the bound is 1e-6 of
``|theta_old| + |theta_new|``. Measured over 40 steps (30 eagerly; each side eager, or each side
jitted): at most 1.7e-7 of it.
"""

import warnings

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

from gradtx.adafactor import adafactor, clip_by_block_rms, scale_by_factored_rms
from gradtx.base import chain

SHAPES = {
    "dense/kernel": (6, 4),
    "dense/bias": (7,),
    "conv/kernel": (3, 2, 5),
    "attention/kernel": (2, 3, 4, 5),
    "scale": (),
}
STEPS = 40
# Eagerly every operation is compiled for every shape it meets: fewer steps and leaves keep it fast.
EAGER_STEPS, EAGER_SHAPES = 30, {p: SHAPES[p] for p in ("dense/kernel", "dense/bias", "attention/kernel")}
KERAS_DEFAULTS = {
    "beta_2_decay": -0.8,
    "epsilon_1": f32(1e-30),
    "epsilon_2": f32(1e-3),
    "clip_threshold": 1.0,
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_keras_step_by_step(jit):
    """``learning_rate`` 0.3: the cap ``1/sqrt(t)`` takes over from step 12 on."""
    params, grads = problem(SHAPES, STEPS) if jit else problem(EAGER_SHAPES, EAGER_STEPS)
    kwargs = {"learning_rate": f32(0.3), **KERAS_DEFAULTS}
    run_step_by_step(
        keras.optimizers.Adafactor(**kwargs), adafactor(**kwargs), params, grads, jit=jit, rtol=1e-6
    )


def test_matches_keras_with_other_hyperparameters():
    """A smaller clipping threshold (clipping most steps), a slower decay, larger epsilons."""
    params, grads = problem(SHAPES, STEPS, seed=1)
    kwargs = {
        "learning_rate": f32(0.05),
        "beta_2_decay": f32(-0.5),
        "epsilon_1": f32(1e-6),
        "epsilon_2": f32(0.5),
        "clip_threshold": f32(0.3),
    }
    run_step_by_step(
        keras.optimizers.Adafactor(**kwargs), adafactor(**kwargs), params, grads, jit=True, rtol=1e-6
    )


def test_learning_rate_schedule_matches_keras():
    params, grads = problem(SHAPES, STEPS, seed=2)
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=7, decay_rate=0.5)
    ours = lambda step: 0.5 * 0.5 ** (step / 7)  # noqa: E731
    run_step_by_step(
        keras.optimizers.Adafactor(learning_rate=keras_schedule, **KERAS_DEFAULTS),
        adafactor(learning_rate=ours, **KERAS_DEFAULTS),
        params,
        grads,
        jit=True,
        rtol=1e-6,
    )


def test_factored_leaves_keep_row_and_column_means_only():
    params = {"w": jnp.ones((2, 3, 4, 5)), "m": jnp.ones((6, 4)), "b": jnp.ones(7)}
    state = adafactor().init(params).inner[0]
    assert {k: v.shape for k, v in state.row_mean.items()} == {"w": (2, 3, 4), "m": (6,), "b": ()}
    assert {k: v.shape for k, v in state.column_mean.items()} == {"w": (2, 3, 5), "m": (4,), "b": ()}
    assert {k: v.shape for k, v in state.second_moment.items()} == {"w": (), "m": (), "b": (7,)}


def test_factored_second_moment_is_rank_one_reconstruction():
    """One step from zero (``b(1) = 0``): ``v = r c^T / mean(r)`` with the row and column means of
    ``g^2``, against a float64 NumPy re-derivation (float32 rounding: rtol 1e-6)."""
    rng = np.random.default_rng(7)
    g = rng.normal(size=(3, 6, 4)).astype(np.float32)
    tx = chain(scale_by_factored_rms(epsilon_1=0.0))
    u, _ = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros((3, 6, 4))}))
    g2 = g.astype(np.float64) ** 2
    r, c = g2.mean(-1), g2.mean(-2)
    v = (r / r.mean(-1, keepdims=True))[..., :, None] * c[..., None, :]
    np.testing.assert_allclose(np.asarray(u["w"]), g / np.sqrt(v), rtol=1e-6)


def test_clipping_bounds_the_rms_of_the_step():
    tx = clip_by_block_rms(0.5)
    u, _ = tx.update({"big": jnp.full(4, 3.0), "small": jnp.full(4, 0.1)}, tx.init(None))
    np.testing.assert_allclose(u["big"], 0.5)  # RMS 3 -> 0.5
    np.testing.assert_array_equal(u["small"], np.float32(0.1))  # below the threshold: unchanged


def test_relative_step_false_warns_and_changes_nothing():
    with pytest.warns(UserWarning, match="relative_step=False changes nothing"):
        off = adafactor(0.3, relative_step=False)
    params, grads = problem(SHAPES, 20, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on = adafactor(0.3)
    a, _ = run(off, params, grads)
    b, _ = run(on, params, grads)
    for path in params:
        np.testing.assert_array_equal(a[path], b[path])


def test_mismatched_update_shape_is_named():
    tx = adafactor()
    state = tx.init({"w": jnp.ones((4, 3))})
    with pytest.raises(
        ValueError, match="scale_by_factored_rms: the update at \\['w'\\] has shape \\(3, 4\\)"
    ):
        tx.update({"w": jnp.ones((3, 4))}, state, {"w": jnp.ones((3, 4))})


def test_arguments_and_defaults_are_keras():
    assert_same_arguments(adafactor, keras.optimizers.Adafactor)


def test_vmap_over_learning_rate_equals_separate_runs():
    assert_vmap_matches_separate_runs(adafactor, [1e-3, 1e-2, 1e-1], SHAPES)


def test_bfloat16_params_keep_float32_state():
    assert_bfloat16_params_keep_float32_state(
        adafactor(0.01), shapes=(("w", (4, 3)), ("b", (3,)), ("k", (2, 3, 4)))
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta_2_decay": 0.5}, "scale_by_factored_rms: beta_2_decay must be <= 0, got 0.5"),
        ({"epsilon_1": -1.0}, "scale_by_factored_rms: epsilon_1 must be >= 0, got -1.0"),
        ({"epsilon_2": -1.0}, "scale_by_param_block_rms: epsilon_2 must be >= 0, got -1.0"),
        ({"clip_threshold": 0.0}, "clip_by_block_rms: clip_threshold must be > 0, got 0.0"),
        ({"learning_rate": -1.0}, "scale_by_relative_step: learning_rate must be >= 0, got -1.0"),
        ({"relative_step": 1}, "adafactor: relative_step must be a bool, got 1"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adafactor(**kwargs)
