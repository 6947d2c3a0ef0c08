"""Each course formula re-derived in float64 NumPy, written from the equations (not from our code).

Hyperparameters are dyadic (exact in float32), so the only difference between gradtx (float32) and the
reference (float64) is float32 rounding: a few roundings of ~6e-8 per step for 50 steps bound the drift by
~1e-5 relative (measured: at most 30% of the bound); ``atol`` covers entries that cross zero, where
``theta + u`` rounds relative to ``|u|``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx

LR, BETA_1, BETA_2, RHO, MOMENTUM, EPS = 2.0**-6, 0.875, 1 - 2.0**-10, 0.875, 0.875, 2.0**-20
STEPS = 50
RTOL, ATOL = 1e-5, 1e-6


def _gradients(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 3)) * 10 ** rng.uniform(-2, 1, size=(4, 3)) for _ in range(STEPS)]


def _compare(tx, reference_steps, grads):
    """Runs ``tx`` (float32) and the reference (float64) on the same gradients, comparing every step."""
    theta0 = np.random.default_rng(2).normal(size=(4, 3))
    params = jnp.asarray(theta0, jnp.float32)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t, (g, expected) in enumerate(
        zip(grads, reference_steps(theta0.copy(), grads), strict=True), start=1
    ):
        u, state = update(jnp.asarray(g, jnp.float32), state, params)
        params = gradtx.apply_updates(params, u)
        np.testing.assert_allclose(np.asarray(params), expected, rtol=RTOL, atol=ATOL, err_msg=f"step {t}")


def momentum_reference(theta, grads, nesterov=False):
    m = np.zeros_like(theta)
    for g in grads:
        m = MOMENTUM * m - LR * g
        theta = theta + (MOMENTUM * m - LR * g if nesterov else m)
        yield theta


def adagrad_reference(theta, grads, s0=0.1):
    s = np.full_like(theta, s0)
    for g in grads:
        s = s + g * g
        theta = theta - LR * g / np.sqrt(s + EPS)
        yield theta


def rmsprop_reference(theta, grads):
    s = np.zeros_like(theta)
    for g in grads:
        s = RHO * s + (1 - RHO) * g * g
        theta = theta - LR * g / np.sqrt(s + EPS)
        yield theta


def adam_reference(theta, grads, weight_decay=0.0):
    # Kingma & Ba with bias-corrected moments; Keras adds epsilon to the uncorrected sqrt(v), which is
    # epsilon / sqrt(1 - b2^t) next to the corrected sqrt(vhat).
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = BETA_1 * m + (1 - BETA_1) * g
        v = BETA_2 * v + (1 - BETA_2) * g * g
        m_hat, v_hat = m / (1 - BETA_1**t), v / (1 - BETA_2**t)
        theta = theta - LR * (m_hat / (np.sqrt(v_hat) + EPS / np.sqrt(1 - BETA_2**t)) + weight_decay * theta)
        yield theta


def adamax_reference(theta, grads):
    m, u = np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = BETA_1 * m + (1 - BETA_1) * g
        u = np.maximum(BETA_2 * u, np.abs(g))
        theta = theta - LR * (m / (1 - BETA_1**t)) / (u + EPS)
        yield theta


def nadam_reference(theta, grads):
    # Dozat (2016), Algorithm 2, with the schedule mu_t = b1 (1 - 0.5 * 0.96^t).
    mu = lambda t: BETA_1 * (1 - 0.5 * 0.96**t)  # noqa: E731
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        prod_t = np.prod([mu(i) for i in range(1, t + 1)])
        m = BETA_1 * m + (1 - BETA_1) * g
        v = BETA_2 * v + (1 - BETA_2) * g * g
        m_hat = mu(t + 1) * m / (1 - prod_t * mu(t + 1)) + (1 - mu(t)) * g / (1 - prod_t)
        theta = theta - LR * m_hat / (np.sqrt(v / (1 - BETA_2**t)) + EPS)
        yield theta


CASES = {
    "momentum": (lambda: gradtx.sgd(LR, MOMENTUM), momentum_reference),
    "nesterov": (
        lambda: gradtx.sgd(LR, MOMENTUM, nesterov=True),
        lambda th, gs: momentum_reference(th, gs, True),
    ),
    "adagrad": (lambda: gradtx.adagrad(LR, 0.1, EPS), adagrad_reference),
    "rmsprop": (lambda: gradtx.rmsprop(LR, RHO, epsilon=EPS), rmsprop_reference),
    "adam": (lambda: gradtx.adam(LR, BETA_1, BETA_2, EPS), adam_reference),
    "adamax": (lambda: gradtx.adamax(LR, BETA_1, BETA_2, EPS), adamax_reference),
    "nadam": (lambda: gradtx.nadam(LR, BETA_1, BETA_2, EPS), nadam_reference),
    "adamw": (
        lambda: gradtx.adamw(LR, 0.25, BETA_1, BETA_2, EPS),
        lambda th, gs: adam_reference(th, gs, 0.25),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_formula(name):
    make, reference = CASES[name]
    _compare(make(), reference, _gradients())


@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "adam", "adamax", "nadam", "adamw"])
def test_epsilon_sits_where_keras_puts_it(name, monkeypatch):
    """With the default tiny epsilon its placement is invisible; a large one next to small gradients
    makes inside-vs-outside the square root differ by far more than the tolerance."""
    monkeypatch.setattr(__import__(__name__), "EPS", 0.25)
    make, reference = CASES[name]
    _compare(make(), reference, [g * 1e-2 for g in _gradients()])


def test_nesterov_is_the_course_look_ahead_gradient():
    """Course NAG: ``m <- beta*m - eta*grad(theta + beta*m); theta <- theta + m``. Keras (and gradtx)
    track the look-ahead point ``theta + beta*m`` instead, so a gradient at their own params suffices."""
    a = np.diag([1.0, 10.0, 30.0])
    b = np.array([1.0, -2.0, 0.5])
    grad = lambda x: a @ x - b  # noqa: E731  the quadratic bowl 0.5 x'Ax - b'x
    theta, m = np.array([3.0, 1.0, -1.0]), np.zeros(3)
    tx = gradtx.sgd(LR, MOMENTUM, nesterov=True)
    look_ahead = jnp.asarray(theta, jnp.float32)
    state = tx.init(look_ahead)
    for step in range(STEPS):
        m = MOMENTUM * m - LR * grad(theta + MOMENTUM * m)
        theta = theta + m
        u, state = tx.update(jnp.asarray(grad(np.asarray(look_ahead, np.float64)), jnp.float32), state)
        look_ahead = gradtx.apply_updates(look_ahead, u)
        np.testing.assert_allclose(
            look_ahead, theta + MOMENTUM * m, rtol=RTOL, atol=ATOL, err_msg=f"step {step}"
        )


def test_centered_rmsprop_divides_by_the_variance():
    grads = _gradients()
    tx = gradtx.scale_by_rms(RHO, EPS, centered=True)
    state = tx.init(jnp.zeros((4, 3)))
    s, gbar = np.zeros((4, 3)), np.zeros((4, 3))
    for g in grads:
        s = RHO * s + (1 - RHO) * g * g
        gbar = RHO * gbar + (1 - RHO) * g
        u, state = tx.update(jnp.asarray(g, jnp.float32), state)
        np.testing.assert_allclose(u, g / np.sqrt(s - gbar**2 + EPS), rtol=1e-4)


def test_amsgrad_uses_the_running_maximum_of_v():
    grads = [np.full(3, 10.0)] + [np.full(3, 0.01)] * 20  # v decays after a large first gradient
    tx = gradtx.chain(gradtx.scale_by_adam(BETA_1, BETA_2, 0.0, amsgrad=True))
    state = tx.init(jnp.zeros(3))
    m, v, vmax = 0.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = BETA_1 * m + (1 - BETA_1) * g[0]
        v = BETA_2 * v + (1 - BETA_2) * g[0] ** 2
        vmax = max(vmax, v)
        u, state = tx.update(jnp.asarray(g, jnp.float32), state)
        np.testing.assert_allclose(u, m * np.sqrt(1 - BETA_2**t) / (1 - BETA_1**t) / np.sqrt(vmax), rtol=1e-5)


@pytest.mark.parametrize(
    "primitive",
    [gradtx.scale_by_adam, gradtx.scale_by_adamax, gradtx.scale_by_nadam],
    ids=lambda f: f.__name__,
)
def test_bias_corrected_primitive_outside_a_chain_asks_for_the_step(primitive):
    tx = primitive()
    with pytest.raises(ValueError, match="needs the step count.*gradtx.chain"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_add_decayed_weights_needs_params():
    tx = gradtx.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="add_decayed_weights needs the params"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def adam_bf16_mu_reference(theta, grads):
    """Adam in float64 except that m is rounded to bfloat16 whenever it is stored."""
    bf16 = lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float64)  # noqa: E731
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = BETA_1 * m + (1 - BETA_1) * g  # the step uses this m ...
        v = BETA_2 * v + (1 - BETA_2) * g * g
        c = np.sqrt(1 - BETA_2**t) / (1 - BETA_1**t)
        theta = theta - LR * c * m / (np.sqrt(v) + EPS)
        m = bf16(m)  # ... and stores it rounded
        yield theta, m


def test_adam_with_bfloat16_first_moment_rounds_only_when_storing():
    grads = _gradients()
    theta0 = np.random.default_rng(2).normal(size=(4, 3))
    tx = gradtx.adam(LR, BETA_1, BETA_2, EPS, mu_dtype=jnp.bfloat16)
    params = jnp.asarray(theta0, jnp.float32)
    state = tx.init(params)
    assert state.inner[0].mu.dtype == jnp.bfloat16 and state.inner[0].nu.dtype == jnp.float32
    update = jax.jit(tx.update)
    for t, (g, (theta, m)) in enumerate(zip(grads, adam_bf16_mu_reference(theta0, grads), strict=True), 1):
        u, state = update(jnp.asarray(g, jnp.float32), state, params)
        params = gradtx.apply_updates(params, u)
        # float32 and float64 may round m to neighbouring bfloat16 values (one in 2^8 relative); such
        # a flip moves theta by at most LR * 2^-8 = 6e-5. None happens here (the largest difference
        # seen is 7e-7), and 2e-5 is still five times below the bfloat16-vs-float32 gap checked below.
        np.testing.assert_allclose(np.asarray(state.inner[0].mu, np.float64), m, rtol=2**-7, atol=1e-30)
        np.testing.assert_allclose(np.asarray(params), theta, rtol=0, atol=2e-5, err_msg=f"step {t}")
    # The test can tell the bfloat16 run from the float32 one.
    full = list(adam_reference(theta0.copy(), grads))[-1]
    assert np.abs(full - theta).max() > 1e-4


def test_mu_dtype_must_be_floating():
    with pytest.raises(ValueError, match="mu_dtype.*int32"):
        gradtx.adam(mu_dtype=jnp.int32)
