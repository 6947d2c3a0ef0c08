"""The EMA of the params against Keras 3's use_ema / ema_momentum / ema_overwrite_frequency: the params
step by step (see option_steps.py), the averages themselves after every step, and Keras's
finalize_variable_values at the end."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from option_steps import ADAM, f32, follow_keras, problem

import gradtx

K = keras.optimizers
MOMENTUM = f32(0.875)  # a short memory, so that the average differs measurably from the params


def _check_averages(step, state, keras_opt):
    """The averages after this step equal Keras's, to a few ulp of the average (the same operations on
    params that agree to 8 ulp)."""
    ours = gradtx.ema_params(state)
    for i, (a, average) in enumerate(zip(ours, keras_opt._model_variables_moving_average, strict=True)):
        b = np.asarray(average, np.float64)
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7, err_msg=f"step {step}, leaf {i}")


def _finalized_equals_ema_params(keras_opt, variables, state):
    keras_opt.finalize_variable_values(variables)
    for a, v in zip(gradtx.ema_params(state), variables, strict=True):
        np.testing.assert_allclose(a, np.asarray(v), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("frequency", [None, 3], ids=["no_overwrite", "overwrite_every_3"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adam_with_ema_matches_keras(jit, frequency):
    params, grads = problem(24 if jit else 8)
    keras_opt = K.Adam(
        f32(0.01), **ADAM, use_ema=True, ema_momentum=MOMENTUM, ema_overwrite_frequency=frequency
    )
    tx = gradtx.chain(gradtx.adam(f32(0.01), **ADAM), gradtx.ema_of_params(MOMENTUM, frequency))
    state, variables = follow_keras(keras_opt, tx, params, grads, jit=jit, on_step=_check_averages)
    _finalized_equals_ema_params(keras_opt, variables, state)


def test_ema_with_accumulation_counts_real_updates_as_keras():
    """Keras moves the average on every micro-step, copies the params while no update has been made
    (the first 2 micro-steps here) and overwrites on the micro-steps of the real updates r with
    (r + 1) % 2 == 0."""
    options = {
        "use_ema": True,
        "ema_momentum": MOMENTUM,
        "ema_overwrite_frequency": 2,
        "gradient_accumulation_steps": 2,
    }
    params, grads = problem(24)
    keras_opt = K.SGD(f32(0.01), momentum=f32(0.5), **options)
    tx = gradtx.chain(
        gradtx.accumulate_gradients(gradtx.sgd(f32(0.01), momentum=f32(0.5)), 2),
        gradtx.ema_of_params(MOMENTUM, ema_overwrite_frequency=2, steps_per_update=2),
    )
    state, variables = follow_keras(
        keras_opt, tx, params, grads, jit=True, on_step=_check_averages, moving_steps=8
    )
    _finalized_equals_ema_params(keras_opt, variables, state)


def test_first_step_copies_the_params_and_later_steps_average():
    """A float64 re-derivation: a_1 = theta_1, a_t = m a_{t-1} + (1 - m) theta_t."""
    tx = gradtx.chain(gradtx.sgd(0.5), gradtx.ema_of_params(0.75))
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    expected = None
    for g in ([1.0, 1.0], [-2.0, 0.5], [0.25, 4.0]):
        u, state = tx.update({"w": jnp.array(g)}, state, params)
        params = gradtx.apply_updates(params, u)
        theta = np.asarray(params["w"], np.float64)
        expected = theta if expected is None else 0.75 * expected + 0.25 * theta
        np.testing.assert_allclose(gradtx.ema_params(state)["w"], expected, rtol=1e-6)


def test_overwrite_sets_the_params_to_the_average_on_the_real_updates_r_with_r_plus_1_divisible():
    tx = gradtx.chain(gradtx.sgd(1.0), gradtx.ema_of_params(0.5, ema_overwrite_frequency=2))
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    overwritten = []
    for _ in range(6):
        u, state = tx.update({"w": -jnp.ones(1)}, state, params)
        params = gradtx.apply_updates(params, u)
        overwritten.append(bool(params["w"][0] == gradtx.ema_params(state)["w"][0]))
    # r = 0 is the copy (params == average anyway); r = 1, 3, 5 overwrite; r = 2, 4 do not.
    assert overwritten == [True, True, False, True, False, True]


def test_ema_params_keep_the_params_structure_and_dtypes():
    params = {
        "dense": {"kernel": jnp.ones((3, 2), jnp.bfloat16), "bias": jnp.zeros(2)},
        "count": jnp.int32(5),
    }
    tx = gradtx.chain(gradtx.adam(0.01), gradtx.ema_of_params())
    state = tx.init(params)
    grads = {
        "dense": {"kernel": jnp.ones((3, 2), jnp.bfloat16), "bias": jnp.ones(2)},
        "count": np.zeros((), jax.dtypes.float0),
    }
    _, state = jax.jit(tx.update)(grads, state, params)
    ema = gradtx.ema_params(state)
    assert jax.tree.structure(ema) == jax.tree.structure(params)
    assert jax.tree.map(lambda x: x.dtype, ema) == jax.tree.map(lambda x: x.dtype, params)
    assert int(ema["count"]) == 5
    # The average itself is kept in float32 (a bfloat16 average would lose 0.99 * a + 0.01 * theta).
    (node,) = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, gradtx.EmaState))
               if isinstance(x, gradtx.EmaState)]  # fmt: skip
    assert node.average.tree["dense"]["kernel"].dtype == jnp.float32


def test_ema_momentum_is_a_hyperparameter():
    params = {"w": jnp.ones(2)}
    tx = gradtx.chain(gradtx.sgd(0.1), gradtx.ema_of_params(0.9))
    state = tx.init(params)
    assert float(gradtx.hyperparams(state)["ema_momentum"]) == f32(0.9)
    state = gradtx.set_hyperparams(state, ema_momentum=0.5)
    assert float(gradtx.hyperparams(state)["ema_momentum"]) == 0.5
    with pytest.raises(ValueError, match="ema_momentum must be in \\[0, 1\\], got 1.5"):
        gradtx.set_hyperparams(state, ema_momentum=1.5)


def test_ema_params_needs_an_ema_in_the_state():
    with pytest.raises(
        ValueError, match="ema_params: the state holds no moving average; build the optimizer"
    ):
        gradtx.ema_params(gradtx.adam(0.1).init({"w": jnp.ones(2)}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ema_momentum": 1.5}, "ema_of_params: ema_momentum must be in \\[0, 1\\], got 1.5"),
        ({"ema_overwrite_frequency": 0}, "ema_overwrite_frequency must be an integer >= 1 or None, got 0"),
        ({"steps_per_update": 0}, "ema_of_params: steps_per_update must be an integer >= 1, got 0"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradtx.ema_of_params(**kwargs)
