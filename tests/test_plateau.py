"""reduce_on_plateau against Keras 3's ReduceLROnPlateau callback, driven by the same monitored values."""

import types

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import gradtx

LR = 0.1
RNG = np.random.default_rng(0)
SEQUENCES = {
    "improving": list(np.linspace(1.0, 0.1, 30)),
    "flat": [1.0] * 40,
    "improving_then_flat": list(np.linspace(1.0, 0.5, 10)) + [0.5] * 30,
    "noisy": list(1.0 / np.arange(1, 61) + 0.05 * RNG.standard_normal(60)),
    "tiny_improvements": list(1.0 - 1e-5 * np.arange(30)),  # below min_delta: not improvements
    "nan_then_values": [float("nan")] + [1.0] * 20,
}
SETTINGS = [
    dict(factor=0.5, patience=3),
    dict(factor=0.5, patience=2, cooldown=2),
    dict(factor=0.5, patience=0, cooldown=1),  # factor 0.1 would underflow float32 in 40 steps
    dict(factor=0.2, patience=4, min_delta=0.01, cooldown=3, min_scale=0.05),
    dict(factor=0.5, patience=1, min_scale=0.3),
]


def keras_learning_rates(values, factor, patience, min_delta=1e-4, cooldown=0, min_scale=0.0, mode="min"):
    """The learning rate Keras's callback leaves after each epoch's monitored value."""
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss",
        factor=factor,
        patience=patience,
        min_delta=min_delta,
        cooldown=cooldown,
        min_lr=min_scale * LR,
        mode=mode,
    )
    optimizer = keras.optimizers.SGD(learning_rate=LR)
    callback.set_model(types.SimpleNamespace(optimizer=optimizer))
    callback.on_train_begin()
    rates = []
    for epoch, v in enumerate(values):
        callback.on_epoch_end(epoch, {"val_loss": v})
        rates.append(float(optimizer.learning_rate))
    return np.array(rates)


def gradtx_learning_rates(values, mode="min", **settings):
    tx = gradtx.chain(gradtx.sgd(LR), gradtx.reduce_on_plateau(mode=mode, **settings))
    state = tx.init(jnp.zeros(2))
    update = jax.jit(lambda s, v: tx.update(jnp.ones(2), s, value=v))
    rates, steps = [], []
    for v in values:
        u, state = update(state, jnp.float32(v))
        rates.append(float(gradtx.current_learning_rate(state)))
        steps.append(-float(u[0]))  # the update of that very step uses the new rate
    np.testing.assert_allclose(steps, rates, rtol=1e-6)
    return np.array(rates)


def _reductions(rates):
    return np.flatnonzero(np.diff(np.concatenate([[LR], rates])) < 0)


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_reductions_match_keras(sequence, settings):
    values = SEQUENCES[sequence]
    ours, theirs = gradtx_learning_rates(values, **settings), keras_learning_rates(values, **settings)
    np.testing.assert_array_equal(_reductions(ours), _reductions(theirs))
    # Keras multiplies its float32 variable each time, gradtx the float32 scale: a few roundings apart.
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_mode_max_matches_keras_on_an_accuracy():
    accuracy = [0.5, 0.6, 0.6, 0.61, 0.6, 0.59, 0.7, 0.7, 0.7, 0.7, 0.7, 0.71, 0.69] * 2
    settings = dict(factor=0.5, patience=2, min_delta=0.005, cooldown=1)
    ours = gradtx_learning_rates(accuracy, mode="max", **settings)
    theirs = keras_learning_rates(accuracy, mode="max", **settings)
    assert len(_reductions(theirs)) >= 2
    np.testing.assert_array_equal(_reductions(ours), _reductions(theirs))


def test_steps_not_measured_leave_the_plateau_logic_untouched():
    tx = gradtx.chain(gradtx.sgd(LR), gradtx.reduce_on_plateau(factor=0.5, patience=1))
    state = tx.init(jnp.zeros(2))
    for v in [1.0, 1.0]:  # a reduction at the second measurement
        _, state = tx.update(jnp.ones(2), state, value=v)
    plateau = state.inner[-1]
    for _ in range(5):
        u, state = tx.update(jnp.ones(2), state, value=7.0, measured=False)
    jax.tree.map(np.testing.assert_array_equal, state.inner[-1], plateau)
    np.testing.assert_allclose(u, -LR * 0.5 * np.ones(2), rtol=1e-7)


def test_a_missing_value_is_an_error_that_names_optax_chain():
    # Inside optax.chain the value never arrives (optax drops extra arguments of foreign
    # transformations): the rate used to stay put silently.
    import optax

    tx = optax.chain(gradtx.sgd(LR), gradtx.reduce_on_plateau(factor=0.5, patience=1))
    with pytest.raises(ValueError, match="reduce_on_plateau: update needs value=.*optax.chain"):
        tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), value=1.0)


def test_measured_false_ignores_the_value_inside_a_compiled_loop():
    values = jnp.array([1.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0])
    measured = jnp.array([True, False, False, False, True, True, True])
    tx = gradtx.chain(gradtx.sgd(LR), gradtx.reduce_on_plateau(factor=0.5, patience=2))

    def body(state, x):
        v, m = x
        _, state = tx.update(jnp.ones(2), state, value=v, measured=m)
        return state, gradtx.current_learning_rate(state)

    _, rates = jax.lax.scan(body, tx.init(jnp.zeros(2)), (values, measured))
    # Only the measured values 1, 1, 1, 1 count: the third of them is the second without improvement.
    expected = keras_learning_rates([1.0, 1.0, 1.0, 1.0], factor=0.5, patience=2)
    np.testing.assert_allclose(np.asarray(rates)[np.asarray(measured)], expected, rtol=1e-6)
    np.testing.assert_allclose(rates[1:4], LR, rtol=1e-7)


def test_each_configuration_of_a_vmapped_sweep_plateaus_on_its_own():
    sequences = [SEQUENCES["flat"][:30], SEQUENCES["improving"], SEQUENCES["noisy"][:30]]
    patiences = [1.0, 3.0, 2.0]
    tx = lambda patience: gradtx.chain(  # noqa: E731
        gradtx.sgd(LR), gradtx.reduce_on_plateau(factor=0.5, patience=patience)
    )

    def run(patience, values):
        opt = tx(patience)

        def body(state, v):
            _, state = opt.update(jnp.ones(2), state, value=v)
            return state, gradtx.current_learning_rate(state)

        return jax.lax.scan(body, opt.init(jnp.zeros(2)), values)[1]

    rates = jax.jit(jax.vmap(run))(jnp.array(patiences), jnp.array(sequences, jnp.float32))
    for i, (patience, values) in enumerate(zip(patiences, sequences, strict=True)):
        expected = keras_learning_rates(values, factor=0.5, patience=int(patience))
        np.testing.assert_array_equal(_reductions(np.asarray(rates[i])), _reductions(expected))
    assert len({tuple(_reductions(np.asarray(r))) for r in rates}) == 3  # they really differ


def test_scale_is_readable_and_scales_every_leaf():
    tx = gradtx.chain(gradtx.adam(0.01), gradtx.reduce_on_plateau(factor=0.25, patience=0))
    plain = gradtx.adam(0.01)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "n": jnp.array(3)}
    state, plain_state = tx.init(params), plain.init(params)
    for k, v in enumerate([1.0, 0.5, 2.0]):  # the third is no improvement; patience 0: reduce there
        grads = {"w": jnp.full((2, 2), k + 1.0), "b": jnp.full(2, -k - 1.0), "n": jnp.array(0)}
        u, state = tx.update(grads, state, params, value=v)
        u_plain, plain_state = plain.update(grads, plain_state, params)
    assert float(gradtx.plateau_scale(state)) == 0.25
    np.testing.assert_allclose(float(gradtx.current_learning_rate(state)), 0.0025, rtol=1e-7)
    for name in ("w", "b"):
        np.testing.assert_allclose(u[name], 0.25 * u_plain[name], rtol=1e-7)
    assert u["n"] == 0  # integer leaves pass through
    assert gradtx.hyperparams(state)["patience"] == 0


def test_plateau_hyperparameters_can_be_set_without_rebuilding():
    tx = gradtx.chain(gradtx.sgd(LR), gradtx.reduce_on_plateau(factor=0.5, patience=100))
    state = gradtx.set_hyperparams(tx.init(jnp.zeros(2)), patience=1)
    for v in [1.0, 1.0]:
        _, state = tx.update(jnp.ones(2), state, value=v)
    assert float(gradtx.plateau_scale(state)) == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(factor=1.0), "reduce_on_plateau: factor must be in \\(0, 1\\), got 1.0"),
        (dict(factor=0.0), "factor must be in \\(0, 1\\), got 0.0"),
        (dict(patience=-1), "patience must be a whole number >= 0, got -1"),
        (dict(patience=2.5), "patience must be a whole number >= 0, got 2.5"),
        (dict(cooldown=-2), "cooldown must be a whole number >= 0, got -2"),
        (dict(min_delta=-0.1), "min_delta must be >= 0, got -0.1"),
        (dict(min_scale=1.5), "min_scale must be in \\[0, 1\\], got 1.5"),
        (dict(mode="auto"), "mode must be 'min' or 'max', got 'auto'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradtx.reduce_on_plateau(**kwargs)


def test_value_must_be_a_scalar():
    tx = gradtx.reduce_on_plateau()
    with pytest.raises(ValueError, match="value must be a scalar, got shape \\(3,\\)"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=jnp.ones(3))


def test_current_learning_rate_needs_a_learning_rate():
    with pytest.raises(ValueError, match="current_learning_rate: the state has no 'learning_rate'"):
        gradtx.current_learning_rate(gradtx.scale_by_adam().init(jnp.ones(2)))
