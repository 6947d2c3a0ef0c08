"""Schedules against float64 NumPy evaluations of their formulas and against Keras 3's schedules.

Schedules are evaluated in float32, as Keras does, so the tolerances are float32 error bounds:

* a few roundings of ``2^-24`` each: ``rtol = 1e-6`` (about 16 of them);
* ``b^p`` with a large exponent ``p`` amplifies the rounding of ``p`` by ``|p ln b|``: ``rtol`` grows with it;
* a difference of nearly equal terms (``1 + cos`` near ``pi``, the last phase of 1cycle) is exact only
  to an ulp of the terms: ``atol`` of a few ulps of the largest value of the schedule.
"""

import math

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtx

RTOL = 1e-6
ULP = 2.0**-23


def _close(actual, expected, rtol=RTOL, atol=0.0):
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise; ``rtol`` may be an array."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    bad = np.abs(actual - expected) > atol + rtol * np.abs(expected)
    assert not bad.any(), f"at {np.flatnonzero(bad)}: {actual[bad]} vs {expected[bad]}"


STEPS = np.array([0, 1, 2, 3, 7, 10, 99, 100, 101, 250, 999, 1000, 1001, 5000, 123456])


def _both(schedule, steps=STEPS, rtol=RTOL, atol=0.0):
    """The schedule at ``steps``, evaluated eagerly step by step and as one jitted, vmapped call (XLA
    may fuse differently, so the two agree to the schedule's tolerance rather than bit for bit)."""
    eager = np.array([float(schedule(int(s))) for s in steps])
    traced = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)))
    _close(traced, eager, rtol, atol)
    return eager


def _exponent_rtol(exponent, base):
    return RTOL + 4 * ULP * np.abs(exponent * np.log(base))


def _keras(schedule, steps=STEPS):
    return np.array([float(schedule(s)) for s in steps])


# --- float64 formulas, written from the course's equations ---------------------------------------------


def test_power_schedule_formula():
    t = STEPS.astype(np.float64)
    rtol = _exponent_rtol(2.0, 1 + t / 100)
    _close(_both(gradtx.power_schedule(0.01, 100, 2.0), rtol=rtol), 0.01 / (1 + t / 100) ** 2, rtol)


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_schedule_formula(staircase):
    t = STEPS.astype(np.float64)
    exponent = np.floor(t / 300) if staircase else t / 300
    rtol = _exponent_rtol(exponent, 0.1)
    _close(
        _both(gradtx.exponential_schedule(0.01, 300, 0.1, staircase), rtol=rtol), 0.01 * 0.1**exponent, rtol
    )


def test_piecewise_constant_schedule_is_closed_on_the_right():
    schedule = gradtx.piecewise_constant_schedule([100, 1000], [1.0, 0.5, 0.25])
    expected = [1.0 if s <= 100 else 0.5 if s <= 1000 else 0.25 for s in STEPS]
    np.testing.assert_array_equal(_both(schedule), expected)


def test_cosine_decay_formula_and_floor():
    t = np.minimum(STEPS.astype(np.float64), 1000)
    expected = 0.1 * ((1 - 0.05) * 0.5 * (1 + np.cos(np.pi * t / 1000)) + 0.05)
    atol = 4 * ULP * 0.1
    _close(_both(gradtx.cosine_decay_schedule(0.1, 1000, alpha=0.05), atol=atol), expected, atol=atol)


def test_linear_warmup_then_constant():
    t = STEPS.astype(np.float64)
    expected = 0.001 + (0.1 - 0.001) * np.minimum(t, 250) / 250
    np.testing.assert_allclose(_both(gradtx.linear_warmup(0.1, 250, init_value=0.001)), expected, RTOL)


def test_linear_warmup_of_zero_steps_is_the_peak():
    np.testing.assert_array_equal(_both(gradtx.linear_warmup(0.1, 0)), np.float32(0.1))


def test_join_schedules_restarts_the_step_at_each_boundary():
    schedule = gradtx.join_schedules(
        [gradtx.constant_schedule(0.5), gradtx.exponential_schedule(0.1, 100, 0.5), lambda t: 0.001 * t],
        [100, 1000],
    )
    t = STEPS.astype(np.float64)
    exponent = (t - 100) / 100
    expected = np.where(t < 100, 0.5, np.where(t < 1000, 0.1 * 0.5**exponent, 0.001 * (t - 1000)))
    rtol = _exponent_rtol(np.where((t >= 100) & (t < 1000), exponent, 0), 0.5)
    _close(_both(schedule, rtol=rtol), expected, rtol)


def course_one_cycle(iterations, max_rate, start_rate=None, last_iterations=None, last_rate=None):
    """The course's ``OneCycleScheduler`` (Hands-On ML 3, notebook 11): the rate it sets before each
    batch, re-derived in float64 from its description (rise, fall, final drop; defaults as stated)."""
    start_rate = start_rate or max_rate / 10
    last_iterations = last_iterations or iterations // 10 + 1
    half = (iterations - last_iterations) // 2
    last_rate = last_rate or start_rate / 1000
    rates = []
    for i in range(iterations):
        if i < half:
            rates.append(start_rate + (max_rate - start_rate) * i / half)
        elif i < 2 * half:
            rates.append(max_rate + (start_rate - max_rate) * (i - half) / half)
        else:
            rates.append(start_rate + (last_rate - start_rate) * (i - 2 * half) / (iterations - 2 * half))
    return np.array(rates)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_steps=1000, max_value=0.1),
        dict(total_steps=1001, max_value=0.05, start_value=0.001, last_steps=51, last_value=1e-6),
        dict(total_steps=17, max_value=1.0),
    ],
)
def test_one_cycle_is_the_course_scheduler(kwargs):
    expected = course_one_cycle(
        kwargs["total_steps"],
        kwargs["max_value"],
        kwargs.get("start_value"),
        kwargs.get("last_steps"),
        kwargs.get("last_value"),
    )
    steps = np.arange(kwargs["total_steps"])
    atol = 4 * ULP * kwargs["max_value"]
    _close(_both(gradtx.one_cycle_schedule(**kwargs), steps, atol=atol), expected, atol=atol)


def test_one_cycle_shape_endpoints_peak_and_final_value():
    total, peak = 1000, 0.1
    half = (total - (total // 10 + 1)) // 2  # 449
    values = _both(gradtx.one_cycle_schedule(total, peak), np.arange(total + 50), atol=4 * ULP * peak)
    np.testing.assert_allclose(values[0], peak / 10, RTOL)
    assert int(np.argmax(values)) == half and np.isclose(values[half], peak, rtol=RTOL)
    np.testing.assert_allclose(values[2 * half], peak / 10, RTOL)
    np.testing.assert_allclose(values[total:], peak / 10 / 1000, RTOL)  # reached at T and kept after
    assert np.all(np.diff(values[: half + 1]) > 0) and np.all(np.diff(values[half:total]) < 0)


@pytest.mark.parametrize("anneal", ["linear", "cos"])
def test_one_cycle_momentum_mirrors_the_rate(anneal):
    total = 500
    half = (total - (total // 10 + 1)) // 2
    steps = np.arange(total)
    lr = _both(gradtx.one_cycle_schedule(total, 0.1, anneal=anneal), steps, atol=4 * ULP * 0.1)
    mom = _both(gradtx.one_cycle_momentum(total, 0.95, 0.85, anneal=anneal), steps, atol=4 * ULP)
    cycle = steps < 2 * half
    # Over the cycle the rate's position between start and max is the momentum's between max and min.
    np.testing.assert_allclose(
        (lr[cycle] - 0.01) / (0.1 - 0.01), (0.95 - mom[cycle]) / (0.95 - 0.85), atol=2e-6
    )
    np.testing.assert_array_equal(mom[~cycle], np.float32(0.95))
    assert np.isclose(mom.min(), 0.85, rtol=RTOL) and int(np.argmin(mom)) == half


def test_cosine_annealed_one_cycle_follows_half_cosines():
    total = 1000
    half = (total - 101) // 2
    t = np.arange(half)
    values = _both(gradtx.one_cycle_schedule(total, 0.1, anneal="cos"), t, atol=4 * ULP * 0.1)
    _close(values, 0.01 + 0.09 * (1 - np.cos(np.pi * t / half)) / 2, atol=4 * ULP * 0.1)


# --- Keras 3 schedules where they coincide --------------------------------------------------------------


def test_power_1_is_keras_inverse_time_decay():
    ours = _both(gradtx.power_schedule(0.01, 100))
    theirs = _keras(keras.optimizers.schedules.InverseTimeDecay(0.01, 100, 1.0))
    np.testing.assert_allclose(ours, theirs, RTOL)


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_is_keras_exponential_decay(staircase):
    exponent = np.floor(STEPS / 300) if staircase else STEPS / 300
    rtol = _exponent_rtol(exponent, 0.25)
    ours = _both(gradtx.exponential_schedule(0.02, 300, 0.25, staircase), rtol=rtol)
    theirs = _keras(keras.optimizers.schedules.ExponentialDecay(0.02, 300, 0.25, staircase))
    _close(ours, theirs, rtol)


def test_piecewise_is_keras_piecewise_constant_decay():
    boundaries, values = [10, 100, 1000], [0.1, 0.05, 0.01, 0.001]
    ours = _both(gradtx.piecewise_constant_schedule(boundaries, values))
    theirs = _keras(keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values))
    np.testing.assert_array_equal(ours, theirs)


def test_cosine_is_keras_cosine_decay():
    ours = _both(gradtx.cosine_decay_schedule(0.1, 1000, alpha=0.1), atol=4 * ULP * 0.1)
    theirs = _keras(keras.optimizers.schedules.CosineDecay(0.1, 1000, alpha=0.1))
    _close(ours, theirs, atol=4 * ULP * 0.1)


def test_warmup_joined_with_cosine_is_keras_cosine_decay_with_warmup():
    ours = _both(
        gradtx.join_schedules(
            [gradtx.linear_warmup(0.1, 100, init_value=0.001), gradtx.cosine_decay_schedule(0.1, 1000)],
            [100],
        ),
        atol=4 * ULP * 0.1,
    )
    theirs = _keras(keras.optimizers.schedules.CosineDecay(0.001, 1000, warmup_target=0.1, warmup_steps=100))
    _close(ours, theirs, atol=4 * ULP * 0.1)


# --- properties ---------------------------------------------------------------------------------------

positive = st.floats(1e-6, 10.0)
step_counts = st.integers(1, 100_000)


def _values(schedule, n=200, stride=97):
    return np.asarray(jax.vmap(schedule)(jnp.arange(n) * stride))


@settings(max_examples=25, deadline=None)
@given(positive, step_counts, st.floats(0.0, 4.0))
def test_power_schedule_is_positive_finite_and_non_increasing(eta0, s, c):
    v = _values(gradtx.power_schedule(eta0, s, c))
    assert np.all(np.isfinite(v)) and np.all(v > 0) and np.all(np.diff(v) <= 0)


@settings(max_examples=25, deadline=None)
@given(positive, step_counts, st.floats(0.01, 0.99), st.booleans())
def test_exponential_decay_is_finite_non_negative_and_non_increasing(eta0, s, r, staircase):
    v = _values(gradtx.exponential_schedule(eta0, s, r, staircase))
    assert np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(np.diff(v) <= 0)


@settings(max_examples=25, deadline=None)
@given(positive, step_counts, st.floats(0.0, 1.0))
def test_cosine_decay_stays_between_alpha_eta0_and_eta0_and_never_rises(eta0, s, alpha):
    v = _values(gradtx.cosine_decay_schedule(eta0, s, alpha))
    lower = np.float32(eta0) * np.float32(alpha) * (1 - 1e-6)
    # XLA's CPU backend flushes float32 subnormals to zero (found: eta0=1, alpha=1.4e-45 gave 0).
    lower = lower if lower >= np.finfo(np.float32).tiny else 0.0
    assert np.all(np.diff(v) <= 0) and np.all(v >= lower) and np.all(v <= np.float32(eta0) * (1 + 1e-6))


@settings(max_examples=25, deadline=None)
@given(st.integers(12, 20_000), positive)
def test_one_cycle_is_positive_finite_and_peaks_at_max(total, peak):
    half = (total - (total // 10 + 1)) // 2
    steps = np.append(np.linspace(0, total + 10, 255).astype(np.int32), half)  # one shape: one compile
    v = np.asarray(jax.vmap(gradtx.one_cycle_schedule(total, peak))(steps))
    assert np.all(np.isfinite(v)) and np.all(v > 0)
    np.testing.assert_allclose(v.max(), peak, rtol=1e-6)


# --- vmap, jit and optimizers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda x: gradtx.power_schedule(x, 50.0, 1.5),
        lambda x: gradtx.exponential_schedule(0.1, 100.0, x),
        lambda x: gradtx.cosine_decay_schedule(0.1, 1000, alpha=x),
        lambda x: gradtx.one_cycle_schedule(1000, x),
        lambda x: gradtx.one_cycle_momentum(1000, 0.95, x),
        lambda x: gradtx.piecewise_constant_schedule([10, 100], [x, x / 2, x / 4]),
    ],
)
def test_vmap_over_a_schedule_hyperparameter_equals_separate_evaluations(make):
    xs = jnp.array([0.05, 0.1, 0.5, 0.8])
    steps = jnp.asarray(STEPS[:10], jnp.int32)
    swept = jax.jit(jax.vmap(lambda x: jax.vmap(make(x))(steps)))(xs)
    for i, x in enumerate(np.asarray(xs)):
        np.testing.assert_allclose(swept[i], [float(make(float(x))(int(s))) for s in steps], rtol=RTOL)


def test_schedules_drive_sgd_momentum_under_jit():
    """1cycle on both the rate and the momentum of SGD, against a float64 loop of the course's rule
    ``m <- beta(t)*m - eta(t)*g;  theta <- theta + m`` on a quadratic."""
    total = 200
    lr, mom = gradtx.one_cycle_schedule(total, 0.5), gradtx.one_cycle_momentum(total)
    tx = gradtx.sgd(lr, momentum=mom)
    a = np.array([1.0, 4.0, 0.25])
    params = jnp.ones(3)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jnp.asarray(a, jnp.float32) * p, s, p))
    theta, m = np.ones(3), np.zeros(3)
    for t in range(total):
        m = float(mom(t)) * m - float(lr(t)) * (a * theta)
        theta = theta + m
        u, state = step(params, state)
        params = gradtx.apply_updates(params, u)
        np.testing.assert_allclose(params, theta, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
    np.testing.assert_allclose(gradtx.hyperparams(state)["momentum"], mom(total - 1), RTOL)


def test_scheduled_beta_1_drives_adam():
    """A scheduled ``beta_1`` is read at every step; the bias correction uses the current value,
    ``1 - beta_1(t)^t`` (what Keras would do if its ``beta_1`` variable were changed between steps)."""
    beta_1 = gradtx.piecewise_constant_schedule([2], [0.5, 0.75])
    tx = gradtx.adam(0.125, beta_1=beta_1, beta_2=0.875, epsilon=0.0)
    state = tx.init(jnp.zeros(2))
    m = v = np.zeros(2)
    for t in range(1, 7):
        g = np.array([1.0, -2.0]) * t
        b1 = 0.5 if t - 1 <= 2 else 0.75  # the schedule at step t - 1
        m = b1 * m + (1 - b1) * g
        v = 0.875 * v + 0.125 * g * g
        expected = -0.125 * math.sqrt(1 - 0.875**t) / (1 - b1**t) * m / np.sqrt(v)
        u, state = tx.update(jnp.asarray(g, jnp.float32), state)
        np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=f"step {t}")


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: gradtx.power_schedule(-0.1, 10), "power_schedule: initial_value must be >= 0, got -0.1"),
        (lambda: gradtx.power_schedule(0.1, 0), "power_schedule: decay_steps must be > 0, got 0"),
        (lambda: gradtx.exponential_schedule(0.1, 10, -0.5), "decay_rate must be > 0, got -0.5"),
        (lambda: gradtx.cosine_decay_schedule(0.1, 10, alpha=2.0), "alpha must be in \\[0, 1\\], got 2.0"),
        (
            lambda: gradtx.piecewise_constant_schedule([10, 5], [1, 2, 3]),
            "boundaries must be >= 0 and strictly",
        ),
        (
            lambda: gradtx.piecewise_constant_schedule([10], [1, 2, 3]),
            "len\\(values\\) == len\\(boundaries\\) \\+ 1",
        ),
        (lambda: gradtx.piecewise_constant_schedule([10], [1, -2]), "values\\[1\\] must be >= 0, got -2"),
        (
            lambda: gradtx.join_schedules([lambda t: t], [10]),
            "len\\(schedules\\) == len\\(boundaries\\) \\+ 1",
        ),
        (lambda: gradtx.join_schedules([0.1, 0.2], [10]), "schedules\\[0\\] must be a function"),
        (lambda: gradtx.one_cycle_schedule(2, 0.1), "leaves no room"),
        (lambda: gradtx.one_cycle_schedule(100, 0.1, anneal="exp"), "anneal must be 'linear' or 'cos'"),
        (lambda: gradtx.one_cycle_momentum(100, 1.5), "max_momentum must be in \\[0, 1\\), got 1.5"),
        (lambda: gradtx.linear_warmup(0.1, -5), "warmup_steps must be >= 0, got -5"),
        (lambda: gradtx.exponential_schedule(0.1, 10)(-1), "step must be >= 0, got -1"),
        (lambda: gradtx.sgd(gradtx.constant_schedule(0.1), momentum=lambda t: 1.2).init(0.0), "momentum"),
    ],
)
def test_bad_input_names_the_argument(build, message):
    with pytest.raises(ValueError, match=message):
        build()
