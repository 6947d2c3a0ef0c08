"""Keras 3's base-optimizer options on every gradtx factory: the same names, defaults, checks and numbers
(step by step against Keras, see option_steps.py), alone and combined, and each option swept with
``gradtx.sweep`` against separate runs."""

import inspect

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from option_steps import (
    ADAM,
    COMBINED,
    assert_sweep_equals_separate_runs,
    f32,
    follow_keras,
    problem,
    regression_task,
)

import gradtx
from gradtx.keras_options import DEFAULTS

K = keras.optimizers
RMS = {"rho": f32(0.9), "epsilon": f32(1e-7)}

# name -> (Keras class, gradtx factory, shared arguments: float32-exact, see option_steps.py)
FACTORIES = {
    "sgd": (K.SGD, gradtx.sgd, {}),
    "sgd_nesterov": (K.SGD, gradtx.sgd, {"momentum": f32(0.9), "nesterov": True}),
    "adagrad": (K.Adagrad, gradtx.adagrad, {"initial_accumulator_value": f32(0.1), "epsilon": f32(1e-7)}),
    "rmsprop": (K.RMSprop, gradtx.rmsprop, {**RMS, "momentum": f32(0.5), "centered": True}),
    "adam": (K.Adam, gradtx.adam, ADAM),
    "adam_amsgrad": (K.Adam, gradtx.adam, {**ADAM, "amsgrad": True}),
    "adamax": (K.Adamax, gradtx.adamax, ADAM),
    "nadam": (K.Nadam, gradtx.nadam, ADAM),
    "adamw": (K.AdamW, gradtx.adamw, {**ADAM, "weight_decay": f32(0.05)}),
}

# The two clips that COMBINED cannot hold (one clip at a time); each option alone is also compared
# with Keras in the tests of its primitive (test_clipping.py, test_accumulation.py, test_ema.py, ...).
SINGLE = {"clipnorm": {"clipnorm": 3.0}, "clipvalue": {"clipvalue": 0.5}}


def _scaled(grads, factor):
    return [[g * np.float32(factor) for g in step] for step in grads]


def _ema_checked(keras_opt, variables, state):
    """After the run: Keras's finalize_variable_values writes the average into the model; ema_params is
    the same average (to a few ulp: the same float32 operations on params that agree to 8 ulp)."""
    keras_opt.finalize_variable_values(variables)
    for a, v in zip(gradtx.ema_params(state), variables, strict=True):
        np.testing.assert_allclose(a, np.asarray(v), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("option", list(SINGLE))
def test_each_option_on_adam_matches_keras(option):
    options = SINGLE[option]
    params, grads = problem(24)
    follow_keras(
        K.Adam(f32(0.01), **ADAM, **options),
        gradtx.adam(f32(0.01), **ADAM, **options),
        params,
        grads,
        jit=True,
    )


@pytest.mark.parametrize("name", [n for n in FACTORIES if n not in ("sgd_nesterov", "adam_amsgrad")])
def test_every_factory_with_every_option_and_a_schedule_matches_keras(name):
    """The seven factories (the variants of sgd and adam take the same wiring)."""
    keras_class, factory, kwargs = FACTORIES[name]
    params, grads = problem(24)
    grads = _scaled(grads, COMBINED["loss_scale_factor"])
    options = dict(COMBINED)
    if name == "adamw":
        del options["weight_decay"]  # AdamW's weight_decay is its own argument (in kwargs)
    keras_schedule = K.schedules.ExponentialDecay(f32(0.02), decay_steps=5, decay_rate=0.5)
    keras_opt = keras_class(learning_rate=keras_schedule, **kwargs, **options)
    tx = factory(learning_rate=lambda step: f32(0.02) * 0.5 ** (step / 5), **kwargs, **options)
    state, variables = follow_keras(keras_opt, tx, params, grads, jit=True, moving_steps=6)
    _ema_checked(keras_opt, variables, state)


def test_combination_matches_keras_eagerly():
    params, grads = problem(6)  # eager lax.conds (accumulation) compile at every call: few steps
    grads = _scaled(grads, COMBINED["loss_scale_factor"])
    keras_opt = K.Adam(f32(0.01), **ADAM, **COMBINED)
    tx = gradtx.adam(f32(0.01), **ADAM, **COMBINED)
    state, variables = follow_keras(keras_opt, tx, params, grads, jit=False, moving_steps=2)
    _ema_checked(keras_opt, variables, state)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_no_options_is_the_bare_optimizer(name):
    _, factory, kwargs = FACTORIES[name]
    core = factory(**kwargs)
    assert gradtx.with_keras_options(core) is core
    state = core.init({"w": jnp.ones(3)})
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, gradtx.Hyperparams))
    owners = {node.owner for node in nodes if isinstance(node, gradtx.Hyperparams)}
    assert owners.isdisjoint({"clip_by_norm", "with_weight_decay", "ema_of_params", "unscale_gradients"})
    assert isinstance(state, gradtx.ChainState) and not isinstance(state.inner[0], gradtx.ChainState)


def test_options_have_keras_names_and_defaults():
    keras_base = inspect.signature(keras.optimizers.Optimizer.__init__).parameters
    expected = {
        n: p.default for n, p in keras_base.items() if n not in ("self", "learning_rate", "name", "kwargs")
    }
    assert DEFAULTS == expected
    for name in ("sgd", "adagrad", "rmsprop", "adam", "adamax", "nadam", "adamw"):
        kinds = [p.kind for p in inspect.signature(getattr(gradtx, name)).parameters.values()]
        assert kinds[-1] is inspect.Parameter.VAR_KEYWORD, name
    assert inspect.signature(gradtx.adamw).parameters["weight_decay"].default == 0.004


def test_hyperparameters_of_the_options_are_readable_and_settable():
    params = {"w": jnp.ones(3)}
    tx = gradtx.adam(0.01, clipnorm=1.0, weight_decay=0.1, use_ema=True, loss_scale_factor=8.0)
    state = tx.init(params)
    values = gradtx.hyperparams(state)
    assert {"learning_rate", "clipnorm", "weight_decay", "ema_momentum", "loss_scale_factor"} <= set(values)
    state = gradtx.set_hyperparams(state, learning_rate=0.5, clipnorm=2.0, weight_decay=0.0)  # one of each
    assert float(gradtx.hyperparams(state)["learning_rate"]) == 0.5
    assert float(gradtx.hyperparams(state)["clipnorm"]) == 2.0


def test_sweep_over_the_options_equals_separate_runs():
    """global_clipnorm, weight_decay, ema_momentum and loss_scale_factor vary across three configurations
    of one vmapped program (with accumulation and EMA overwrites, so that each one moves the params).
    The clipnorm and clipvalue sweeps are in test_clipping.py."""

    def make_tx(global_clipnorm, weight_decay, ema_momentum, loss_scale_factor):
        return gradtx.sgd(
            0.02,
            momentum=0.5,
            global_clipnorm=global_clipnorm,
            weight_decay=weight_decay,
            use_ema=True,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=3,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=2,
        )

    configs = {
        "global_clipnorm": [0.5, 5.0, 50.0],
        "weight_decay": [0.0, 0.1, 0.5],
        "ema_momentum": [0.5, 0.9, 0.0],
        "loss_scale_factor": [1.0, 4.0, 0.5],
    }
    loss_fn, params, data = regression_task()
    result = gradtx.sweep(
        loss_fn=loss_fn, params=params, make_tx=make_tx, configs=configs, data=data, steps=24
    )
    for i in range(3):
        alone = gradtx.fit(loss_fn, params, make_tx(**{k: v[i] for k, v in configs.items()}), data, 24)
        ema_sweep, ema_alone = gradtx.ema_params(result.opt_state), gradtx.ema_params(alone.opt_state)
        for name in params:
            # Not bit for bit: the vmapped loss's mean may sum in another order.
            np.testing.assert_allclose(result.params[name][i], alone.params[name], rtol=2e-6, atol=1e-6)
            np.testing.assert_allclose(ema_sweep[name][i], ema_alone[name], rtol=2e-6, atol=1e-6)
    finals = np.asarray(result.params["w"])
    assert not np.allclose(finals[0], finals[1]) and not np.allclose(finals[1], finals[2])


def test_sweep_over_the_clipnorm_option_equals_separate_runs():
    make_tx = lambda clipnorm: gradtx.adam(0.05, clipnorm=clipnorm)  # noqa: E731
    result = assert_sweep_equals_separate_runs(make_tx, "clipnorm", [0.5, 50.0])
    np.testing.assert_array_equal(gradtx.hyperparams(result.opt_state)["clipnorm"], np.float32([0.5, 50.0]))


@pytest.mark.parametrize(
    "kwargs, message, keras_rejects",
    [
        (
            {"clipnorm": 1.0, "clipvalue": 0.5},
            "adam: only one of clipnorm, clipvalue and global_clipnorm may be set, got clipnorm=1.0, "
            "clipvalue=0.5, global_clipnorm=None",
            True,
        ),
        (
            {"gradient_accumulation_steps": 1},
            "gradient_accumulation_steps must be an integer >= 2 or None, got 1",
            True,
        ),
        (
            {"gradient_accumulation_steps": 0},
            "gradient_accumulation_steps must be an integer >= 2 or None, got 0",
            False,
        ),
        ({"gradient_accumulation_steps": 2.5}, "must be an integer >= 2 or None, got 2.5", False),
        ({"use_ema": True, "ema_momentum": 1.5}, "adam: ema_momentum must be in \\[0, 1\\], got 1.5", True),
        (
            {"use_ema": True, "ema_overwrite_frequency": 0},
            "ema_overwrite_frequency must be an integer >= 1",
            False,
        ),
        (
            {"use_ema": True, "ema_overwrite_frequency": -2},
            "ema_overwrite_frequency must be an integer >= 1",
            True,
        ),
        ({"ema_momentum": 0.9}, "adam: ema_momentum=0.9 has no effect without use_ema=True", False),
        ({"loss_scale_factor": 0.0}, "adam: loss_scale_factor must be > 0, got 0.0", False),
        ({"weight_decay": -0.1}, "adam: weight_decay must be >= 0, got -0.1", False),
        ({"clipnorm": -1.0}, "adam: clipnorm must be > 0, got -1.0", False),
        ({"global_clipnorm": float("inf")}, "adam: global_clipnorm must be finite, got inf", False),
        ({"use_ema": 1}, "adam: use_ema must be True or False, got 1", False),
    ],
)
def test_rejects_bad_options_naming_the_argument(kwargs, message, keras_rejects):
    with pytest.raises(ValueError, match=message):
        gradtx.adam(0.01, **kwargs)
    if keras_rejects:  # the cases Keras itself checks; the others it ignores silently
        with pytest.raises(ValueError):
            K.Adam(0.01, **kwargs)


def test_a_numpy_bool_turns_ema_on():
    # np.True_ (from a config file or an array of flags) is a bool to the user; Keras accepts it too.
    params = {"w": jnp.ones(3)}
    with_numpy, with_python = gradtx.adam(0.01, use_ema=np.True_), gradtx.adam(0.01, use_ema=True)
    g = {"w": jnp.asarray([0.5, -1.0, 2.0])}
    a, _ = with_numpy.update(g, with_numpy.init(params), params)
    b, _ = with_python.update(g, with_python.init(params), params)
    np.testing.assert_array_equal(a["w"], b["w"])
    np.testing.assert_array_equal(
        gradtx.ema_params(with_numpy.init(params))["w"], gradtx.ema_params(with_python.init(params))["w"]
    )


def test_rejects_an_unknown_option():
    with pytest.raises(TypeError, match="adam: unknown argument\\(s\\) \\['clip_norm'\\]"):
        gradtx.adam(0.01, clip_norm=1.0)


@pytest.mark.parametrize("other", [jnp.int32(3), jnp.array([True, False]), None], ids=["int", "bool", "none"])
@pytest.mark.parametrize("make", [lambda: gradtx.adam(1e-2, weight_decay=0.1), lambda: gradtx.soap(1e-2)])
def test_weight_decay_passes_non_float_leaves_through(make, other):
    # The float leaf must move exactly as it does in a tree of float leaves only (the case tested
    # against Keras above); the int, bool or None leaf passes through untouched. soap decays by default.
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    grads = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(5)]
    tx_mixed, tx_plain = make(), make()
    mixed, plain = {"w": w, "other": other}, {"w": w}
    s_mixed, s_plain = tx_mixed.init(mixed), tx_plain.init(plain)
    for g in grads:
        u_mixed, s_mixed = tx_mixed.update({"w": g, "other": other}, s_mixed, mixed)
        u_plain, s_plain = tx_plain.update({"w": g}, s_plain, plain)
        np.testing.assert_array_equal(u_mixed["w"], u_plain["w"])
        assert u_mixed["other"] is other
        mixed, plain = gradtx.apply_updates(mixed, u_mixed), gradtx.apply_updates(plain, u_plain)


EVERY_FACTORY = {
    **{name: lambda f=f, kw=kw: f(**kw) for name, (_, f, kw) in FACTORIES.items()},
    "adadelta": lambda: gradtx.adadelta(1.0),
    "adafactor": gradtx.adafactor,
    "ftrl": gradtx.ftrl,
    "lion": gradtx.lion,
    "lamb": gradtx.lamb,
    "muon": gradtx.muon,
    "schedule_free_adamw": gradtx.schedule_free_adamw,
    "shampoo": lambda: gradtx.shampoo(1e-2, precondition_frequency=2),
    "soap": lambda: gradtx.soap(1e-2, precondition_frequency=2),
}


@pytest.mark.parametrize("name", list(EVERY_FACTORY))
def test_an_empty_leaf_leaves_the_other_leaves_as_they_were(name):
    # A leaf with a zero-length axis (an empty embedding table, a layer of width 0) has nothing to
    # update: its update is empty, and the other leaves move exactly as in a tree without it (shampoo,
    # soap and adafactor divided by its size or indexed its empty axes).
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    grads = [jnp.asarray(rng.normal(size=(5, 3)), jnp.float32) for _ in range(5)]
    empty = jnp.ones((0, 3), jnp.float32)
    tx_with, tx_without = EVERY_FACTORY[name](), EVERY_FACTORY[name]()
    with_, without = {"w": w, "empty": empty}, {"w": w}
    s_with, s_without = tx_with.init(with_), tx_without.init(without)
    for g in grads:
        u_with, s_with = tx_with.update({"w": g, "empty": jnp.zeros((0, 3))}, s_with, with_)
        u_without, s_without = tx_without.update({"w": g}, s_without, without)
        np.testing.assert_array_equal(u_with["w"], u_without["w"])
        assert u_with["empty"].shape == (0, 3)
        with_, without = gradtx.apply_updates(with_, u_with), gradtx.apply_updates(without, u_without)
