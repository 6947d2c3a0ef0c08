"""Penalties against Keras 3's regularizers, decoupled decay against Keras's AdamW and SGD(weight_decay),
and dropout against the statistics of Bernoulli masks."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import gradtx

RNG = np.random.default_rng(0)
# Dense- and Conv-shaped weights, bounded away from 0 (where |w| has no derivative).
KERNELS = {
    "dense": (RNG.choice([-1, 1], (5, 3)) * RNG.uniform(0.1, 2.0, (5, 3))).astype(np.float32),
    "conv": (RNG.choice([-1, 1], (3, 3, 2, 4)) * RNG.uniform(0.1, 2.0, (3, 3, 2, 4))).astype(np.float32),
}
GRAD = {name: RNG.normal(size=w.shape).astype(np.float32) for name, w in KERNELS.items()}

PENALTIES = {
    "l1": (gradtx.l1(0.03), keras.regularizers.L1(0.03)),
    "l2": (gradtx.l2(0.03), keras.regularizers.L2(0.03)),
    "l1_l2": (gradtx.l1_l2(0.02, 0.05), keras.regularizers.L1L2(0.02, 0.05)),
}


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("shape", KERNELS)
def test_penalty_adds_the_gradient_of_the_keras_regularizer(name, shape):
    tx, regularizer = PENALTIES[name]
    w, g = jnp.asarray(KERNELS[shape]), jnp.asarray(GRAD[shape])
    u, _ = jax.jit(tx.update)(g, tx.init(w), w)
    np.testing.assert_allclose(u, g + jax.grad(regularizer)(w), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", PENALTIES)
def test_penalty_function_equals_the_keras_regularizer(name):
    _, regularizer = PENALTIES[name]
    rates = {"l1": (0.03, 0.0), "l2": (0.0, 0.03), "l1_l2": (0.02, 0.05)}[name]
    params = {k: jnp.asarray(v) for k, v in KERNELS.items()}
    expected = sum(float(regularizer(w)) for w in params.values())
    np.testing.assert_allclose(gradtx.l1_l2_penalty(params, *rates), expected, rtol=1e-6)


def test_penalty_function_with_mask_skips_biases_and_integers():
    params = {"kernel": jnp.asarray(KERNELS["dense"]), "bias": jnp.ones(3), "step": jnp.int32(4)}
    expected = 0.5 * np.sum(np.square(KERNELS["dense"].astype(np.float64)))
    np.testing.assert_allclose(gradtx.l2_penalty(params, 0.5, mask=gradtx.weights_only), expected, rtol=1e-6)
    np.testing.assert_allclose(gradtx.l1_penalty(params, 1.0), np.abs(KERNELS["dense"]).sum() + 3, rtol=1e-6)


def test_l2_rate_has_the_keras_meaning():
    w = jnp.array([1.0, -2.0, 4.0])
    u, _ = gradtx.l2(0.01).update(jnp.zeros(3), gradtx.l2(0.01).init(w), w)
    np.testing.assert_allclose(u, [0.02, -0.04, 0.08], rtol=1e-6)


def test_l1_adds_nothing_at_exactly_zero():
    w = jnp.array([0.0, 2.0, -3.0])
    u, _ = gradtx.l1(0.5).update(jnp.ones(3), gradtx.l1(0.5).init(w), w)
    np.testing.assert_array_equal(u, [1.0, 1.5, 0.5])


def test_l2_vmaps_over_the_rate():
    rates = jnp.array([0.0, 0.25, 1.0, 3.0])
    w, g = jnp.asarray(KERNELS["dense"]), jnp.asarray(GRAD["dense"])
    tx = gradtx.chain(gradtx.l2(0.0), gradtx.sgd(0.125))
    states = jax.vmap(lambda r: gradtx.chain(gradtx.l2(r), gradtx.sgd(0.125)).init(w))(rates)
    u, _ = jax.vmap(tx.update, in_axes=(None, 0, None))(g, states, w)
    w64, g64 = KERNELS["dense"].astype(np.float64), GRAD["dense"].astype(np.float64)
    expected = np.stack([-0.125 * (g64 + 2 * float(r) * w64) for r in rates])
    np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-7)


def test_masked_l2_penalizes_kernels_only():
    params = {"kernel": jnp.asarray(KERNELS["dense"]), "bias": jnp.full(3, 5.0)}
    tx = gradtx.masked(gradtx.l2(0.5), gradtx.weights_only)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(u["kernel"], KERNELS["dense"], rtol=1e-6)
    np.testing.assert_array_equal(u["bias"], 0.0)


@pytest.mark.parametrize(
    "make, bad", [(gradtx.l1, "l1"), (gradtx.l2, "l2"), (lambda r: gradtx.l1_l2(0.1, r), "l2")]
)
def test_penalties_reject_a_negative_rate(make, bad):
    with pytest.raises(ValueError, match=f"{bad} must be >= 0, got -0.1"):
        make(-0.1)


def test_penalty_needs_the_params():
    with pytest.raises(ValueError, match="l2 needs the params"):
        gradtx.l2().update(jnp.ones(2), gradtx.l2().init(jnp.ones(2)))


# Dyadic hyperparameters (exact in float32), so gradtx and Keras do the same float32 arithmetic.
LR, WD = 2.0**-5, 2.0**-3
DECOUPLED = {
    "adamw": (
        keras.optimizers.AdamW(LR, weight_decay=WD, beta_1=0.875, beta_2=1 - 2.0**-10, epsilon=2.0**-20),
        gradtx.adam(LR, beta_1=0.875, beta_2=1 - 2.0**-10, epsilon=2.0**-20),
    ),
    "sgdw": (
        keras.optimizers.SGD(LR, momentum=0.875, weight_decay=WD),
        gradtx.sgd(LR, momentum=0.875),
    ),
}


@pytest.mark.parametrize("name", DECOUPLED)
def test_decoupled_weight_decay_after_an_optimizer_matches_keras_weight_decay(name):
    keras_opt, optimizer = DECOUPLED[name]
    tx = gradtx.chain(optimizer, gradtx.decoupled_weight_decay(WD, LR))
    w0 = KERNELS["dense"]
    variable = keras.Variable(w0)
    params = jnp.asarray(w0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(1)
    for t in range(40):
        g = rng.normal(size=w0.shape).astype(np.float32)
        keras_opt.apply([jnp.asarray(g)], [variable])
        u, state = update(jnp.asarray(g), state, params)
        params = gradtx.apply_updates(params, u)
        # A few float32 roundings per step, in a different order than Keras's: bounded by 1e-6 of |w|.
        np.testing.assert_allclose(params, np.asarray(variable.value), rtol=1e-6, atol=1e-6, err_msg=f"{t}")


@pytest.mark.parametrize("name", DECOUPLED)
def test_with_weight_decay_matches_keras_weight_decay_with_a_schedule(name):
    schedule = keras.optimizers.schedules.ExponentialDecay(LR, decay_steps=7, decay_rate=0.5)
    keras_opt = {
        "adamw": lambda: keras.optimizers.AdamW(
            schedule, weight_decay=WD, beta_1=0.875, beta_2=1 - 2.0**-10, epsilon=2.0**-20
        ),
        "sgdw": lambda: keras.optimizers.SGD(schedule, momentum=0.875, weight_decay=WD),
    }[name]()
    rebuilt = {"adamw": gradtx.adam, "sgdw": gradtx.sgd}[name]
    kwargs = {
        "adamw": dict(beta_1=0.875, beta_2=1 - 2.0**-10, epsilon=2.0**-20),
        "sgdw": dict(momentum=0.875),
    }
    tx = gradtx.with_weight_decay(rebuilt(gradtx.exponential_schedule(LR, 7, 0.5), **kwargs[name]), WD)
    w0 = KERNELS["dense"]
    variable, params = keras.Variable(w0), jnp.asarray(w0)
    state, update = tx.init(params), jax.jit(tx.update)
    rng = np.random.default_rng(2)
    for t in range(30):
        g = rng.normal(size=w0.shape).astype(np.float32)
        keras_opt.apply([jnp.asarray(g)], [variable])
        u, state = update(jnp.asarray(g), state, params)
        params = gradtx.apply_updates(params, u)
        np.testing.assert_allclose(params, np.asarray(variable.value), rtol=1e-6, atol=1e-6, err_msg=f"{t}")


def test_with_weight_decay_keeps_one_learning_rate_that_set_hyperparams_changes():
    tx = gradtx.with_weight_decay(gradtx.adam(0.1), 0.5)
    state = tx.init(jnp.ones(2))
    assert set(gradtx.hyperparams(state)) == {"learning_rate", "weight_decay", "beta_1", "beta_2", "epsilon"}
    state = gradtx.set_hyperparams(state, learning_rate=0.0)
    u, _ = tx.update(jnp.ones(2), state, jnp.ones(2))
    np.testing.assert_array_equal(u, 0.0)  # neither the step nor the decay moved


def test_with_weight_decay_mask_decays_only_the_selected_leaves():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    tx = gradtx.with_weight_decay(gradtx.sgd(0.1), 0.5, mask=gradtx.weights_only)
    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u["kernel"], -0.05)
    np.testing.assert_array_equal(u["bias"], 0.0)


def test_with_weight_decay_needs_an_inner_learning_rate():
    with pytest.raises(ValueError, match="with_weight_decay: the state has no 'learning_rate'"):
        gradtx.with_weight_decay(gradtx.scale_by_adam(), 0.1).init(jnp.ones(2))


def test_decoupled_weight_decay_has_no_default_learning_rate():
    # It used to default to 1.0, a decay 1/eta times too strong with no warning.
    with pytest.raises(TypeError, match="learning_rate"):
        gradtx.decoupled_weight_decay(0.1)


# Dropout. Bounds: with n units and rate r the dropped count is Binomial(n, r), of standard deviation
# sqrt(n r (1 - r)); the mean of y = x * b / (1 - r) over n units of x = 1 has standard deviation
# sqrt(r / ((1 - r) n)). Six standard deviations: a false failure has probability < 2e-9.
N_KEYS, N_UNITS = 100, 2000


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_drops_the_rate_and_preserves_the_mean(rate):
    keys = jax.random.split(jax.random.key(0), N_KEYS)
    y = jax.vmap(lambda k: gradtx.dropout(k, jnp.ones(N_UNITS), rate))(keys)
    n = N_KEYS * N_UNITS
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - rate) < 6 * np.sqrt(rate * (1 - rate) / n)
    assert abs(float(jnp.mean(y)) - 1) < 6 * np.sqrt(rate / ((1 - rate) * n))
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, np.float32(1) / np.float32(1 - rate)])


def test_dropout_vmaps_over_the_rate():
    rates = jnp.array([0.0, 0.25, 0.5, 0.75])
    y = jax.vmap(lambda r: gradtx.dropout(jax.random.key(3), jnp.ones(N_UNITS * 50), r))(rates)
    n = N_UNITS * 50
    for r, row in zip(np.asarray(rates), np.asarray(y), strict=True):
        assert abs(np.mean(row == 0) - r) <= 6 * np.sqrt(r * (1 - r) / n)
        assert abs(row.mean() - 1) <= 6 * np.sqrt(r / ((1 - r) * n))


def test_dropout_deterministic_is_the_identity():
    x = jnp.asarray(KERNELS["conv"])
    assert gradtx.dropout(jax.random.key(0), x, 0.5, deterministic=True) is x


def test_dropout_same_key_same_mask_other_key_other_mask():
    x = jnp.ones((64, 64))
    a = gradtx.dropout(jax.random.key(1), x, 0.5)
    np.testing.assert_array_equal(a, gradtx.dropout(jax.random.key(1), x, 0.5))
    assert np.any(np.asarray(a) != np.asarray(gradtx.dropout(jax.random.key(2), x, 0.5)))


def test_dropout_noise_shape_drops_whole_feature_maps():
    x = jnp.ones((8, 5, 5, 16))
    y = np.asarray(gradtx.dropout(jax.random.key(0), x, 0.5, noise_shape=(None, 1, 1, 16)))
    per_map = y.reshape(8, 25, 16)
    assert np.all(per_map == per_map[:, :1, :])  # one decision per (example, channel)
    assert 0 < np.mean(per_map[:, 0, :] == 0) < 1


def test_dropout_rate_one_gives_zeros_and_finite_gradients():
    x = jnp.arange(1.0, 5.0)
    np.testing.assert_array_equal(gradtx.dropout(jax.random.key(0), x, 1.0), 0.0)
    grad = jax.grad(lambda x: gradtx.dropout(jax.random.key(0), x, jnp.float32(1.0)).sum())(x)
    np.testing.assert_array_equal(grad, 0.0)


def test_dropout_gradient_is_the_scaled_mask():
    x = jnp.ones(1000)
    kept = np.asarray(gradtx.dropout(jax.random.key(0), x, 0.75)) != 0
    grad = jax.grad(lambda x: gradtx.dropout(jax.random.key(0), x, 0.75).sum())(x)
    np.testing.assert_array_equal(grad, np.where(kept, 4.0, 0.0))


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_dropout_rejects_a_rate_outside_zero_one(rate):
    with pytest.raises(ValueError, match=f"dropout: rate must be in \\[0, 1\\], got {rate}"):
        gradtx.dropout(jax.random.key(0), jnp.ones(3), rate)


def test_dropout_rejects_a_noise_shape_that_does_not_broadcast():
    with pytest.raises(ValueError, match="noise_shape"):
        gradtx.dropout(jax.random.key(0), jnp.ones((4, 6)), 0.5, noise_shape=(4, 3))
