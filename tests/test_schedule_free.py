"""Schedule-Free AdamW against Keras 3 ``ScheduleFreeAdamW`` (JAX backend), step by step (see
keras_steps.py), and its averaged sequence against a float64 NumPy re-derivation.

Tolerance (Keras): with float32-exact hyperparameters gradtx evaluates Keras's expressions for ``x``
and ``y`` in Keras's order; the step into ``z`` is ``-(lr * (warmup * (g / d)))`` against Keras's
``(lr * warmup * g) / d``, and gradtx adds ``y' - y`` to ``y`` where Keras assigns ``y'``: a few ulp
of ``|y|`` and ``|z|``, and ``x`` is recovered from them dividing by ``beta_1``. The bound is 1e-6 of
``|theta_old| + |theta_new|``; measured over 40 steps (each side eager, or each side jitted): at most
3.8e-7 of it (with beta_1 = 0.5), 1.4e-7 with Keras's defaults.
"""

import jax
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

import gradtx
from gradtx.schedule_free import schedule_free_adamw, schedule_free_eval_params

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (7,), "conv/kernel": (2, 2, 3), "scale": ()}
STEPS = 40
KERAS_DEFAULTS = {"beta_1": f32(0.9), "beta_2": f32(0.999), "epsilon": f32(1e-8)}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_keras_step_by_step(jit):
    params, grads = problem(SHAPES, STEPS)
    kwargs = {"learning_rate": f32(0.01), **KERAS_DEFAULTS}
    run_step_by_step(
        keras.optimizers.ScheduleFreeAdamW(**kwargs),
        schedule_free_adamw(**kwargs),
        params,
        grads,
        jit=jit,
        rtol=1e-6,
    )


def test_matches_keras_with_warmup_and_other_hyperparameters():
    params, grads = problem(SHAPES, STEPS, seed=1)
    kwargs = {
        "learning_rate": f32(0.05),
        "beta_1": f32(0.5),
        "beta_2": f32(0.9),
        "epsilon": f32(1e-3),
        "warmup_steps": 10,
    }
    run_step_by_step(
        keras.optimizers.ScheduleFreeAdamW(**kwargs),
        schedule_free_adamw(**kwargs),
        params,
        grads,
        jit=True,
        rtol=1e-6,
    )


def test_learning_rate_schedule_matches_keras():
    params, grads = problem(SHAPES, STEPS, seed=2)
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=7, decay_rate=0.5)
    ours = lambda step: 0.02 * 0.5 ** (step / 7)  # noqa: E731
    run_step_by_step(
        keras.optimizers.ScheduleFreeAdamW(learning_rate=keras_schedule, warmup_steps=5, **KERAS_DEFAULTS),
        schedule_free_adamw(learning_rate=ours, warmup_steps=5, **KERAS_DEFAULTS),
        params,
        grads,
        jit=True,
        rtol=1e-6,
    )


def _float64_schedule_free(params, grads, lr, b1, b2, eps, warmup):
    """The three sequences of Defazio et al. (2024), eq. (1)-(3), in float64, with Keras's Adam
    denominator and warmup; ``x`` is carried as its own sequence (not recovered from ``y``)."""
    z = {p: x.astype(np.float64) for p, x in params.items()}
    x = {p: v.copy() for p, v in z.items()}
    v = {p: np.zeros_like(val) for p, val in z.items()}
    ys, xs = [], []
    for t, g in enumerate(grads, start=1):
        rate = lr * (min(t / warmup, 1.0) if warmup else 1.0)
        for p in params:
            g64 = g[p].astype(np.float64)
            v[p] = b2 * v[p] + (1 - b2) * g64**2
            z[p] = z[p] - rate * g64 / (np.sqrt(v[p] / (1 - b2**t)) + eps)
            x[p] = (1 - 1 / t) * x[p] + z[p] / t
        ys.append({p: (1 - b1) * z[p] + b1 * x[p] for p in params})
        xs.append({p: x[p].copy() for p in params})
    return ys, xs


def test_eval_params_are_the_averaged_sequence():
    """``schedule_free_eval_params`` is ``x_t`` at every step, against float64 (and the params ``y_t``).

    Tolerance: the gradients do not depend on the params, so float32 and float64 see the same inputs;
    the float32 run accumulates one rounding per step in ``z`` (40 steps: at most ~40 ulp, 2.4e-6, of
    ``|z|``) and recovering ``x = (y - (1 - b1) z) / b1`` adds a few ulp of ``|y| + |z|``. Bound: 3e-6
    of ``|x| + |z|`` (of ``|y| + |x| + |z|`` for ``y``); measured: at most 5.4e-7 (4.1e-7 for ``y``)."""
    params, grads = problem(SHAPES, STEPS, seed=5)
    lr, b1, b2, eps, warmup = 0.05, f32(0.8), f32(0.99), f32(1e-8), 4
    tx = schedule_free_adamw(lr, b1, b2, eps, warmup)
    ys, xs = _float64_schedule_free(params, grads, lr, float(b1), float(b2), float(eps), warmup)
    y = {p: jnp.asarray(v) for p, v in params.items()}
    state = tx.init(y)
    # Before any step x = y = z: (y - (1 - b1) y) / b1, which is y up to an ulp or two.
    np.testing.assert_allclose(
        schedule_free_eval_params(state, y)["dense/kernel"], y["dense/kernel"], rtol=3e-7
    )
    update = jax.jit(tx.update)
    for t, g in enumerate(grads):
        u, state = update({p: jnp.asarray(v) for p, v in g.items()}, state, y)
        y = gradtx.apply_updates(y, u)
        x = schedule_free_eval_params(state, y)
        z = state.inner[3].z
        for p in params:
            scale = np.abs(xs[t][p]) + np.abs(np.asarray(z[p], np.float64))
            x_err = np.abs(np.asarray(x[p], np.float64) - xs[t][p])
            y_err = np.abs(np.asarray(y[p], np.float64) - ys[t][p])
            assert np.all(x_err <= 3e-6 * scale), (t, p, np.max(x_err / scale))
            assert np.all(y_err <= 3e-6 * (scale + np.abs(ys[t][p]))), (t, p)
    assert not np.allclose(x["dense/kernel"], y["dense/kernel"], rtol=1e-3)  # x is not y (from t = 2)


def test_eval_params_need_one_schedule_free_state():
    state = gradtx.adam().init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="schedule_free_eval_params: the state must hold exactly one"):
        schedule_free_eval_params(state, {"w": jnp.ones(2)})


def test_arguments_and_defaults_are_keras():
    assert_same_arguments(schedule_free_adamw, keras.optimizers.ScheduleFreeAdamW)


def test_vmap_over_learning_rate_equals_separate_runs():
    assert_vmap_matches_separate_runs(schedule_free_adamw, [1e-3, 1e-2, 1e-1], SHAPES)


def test_bfloat16_params_keep_float32_state():
    assert_bfloat16_params_keep_float32_state(schedule_free_adamw(0.01))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta_1": 0.0}, "schedule_free: beta_1 must be in \\(0, 1\\], got 0.0"),
        ({"beta_1": 1.5}, "schedule_free: beta_1 must be in \\(0, 1\\], got 1.5"),
        ({"beta_2": 1.0}, "scale_by_corrected_rms: beta_2 must be in \\[0, 1\\), got 1.0"),
        ({"epsilon": -1.0}, "scale_by_corrected_rms: epsilon must be >= 0, got -1.0"),
        ({"warmup_steps": -1}, "scale_by_linear_warmup: warmup_steps must be a whole number >= 0, got -1"),
        ({"warmup_steps": 2.5}, "scale_by_linear_warmup: warmup_steps must be a whole number >= 0, got 2.5"),
        ({"learning_rate": -1.0}, "scale_by_learning_rate: learning_rate must be >= 0, got -1.0"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedule_free_adamw(**kwargs)
