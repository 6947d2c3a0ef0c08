"""Hyperparameters as state: read, set without recompiling, swept with vmap, float32 under bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -0.5])}


def _grads(k):
    return jax.tree.map(lambda p: jnp.sin(3.0 * p + k) + 0.1 * k, PARAMS)


def _run(tx, steps=5, state=None):
    state = tx.init(PARAMS) if state is None else state
    params = PARAMS
    for k in range(steps):
        u, state = tx.update(_grads(k), state, params)
        params = gradtx.apply_updates(params, u)
    return params, state


def test_hyperparams_are_readable_float32():
    h = gradtx.hyperparams(gradtx.adam(0.01, beta_1=0.8).init(PARAMS))
    assert set(h) == {"learning_rate", "beta_1", "beta_2", "epsilon"}
    assert all(v.dtype == jnp.float32 and v.shape == () for v in h.values())
    assert float(h["learning_rate"]) == np.float32(0.01) and float(h["beta_1"]) == np.float32(0.8)


@pytest.mark.parametrize(
    "tx, names",
    [
        (gradtx.sgd(), {"learning_rate"}),
        (gradtx.sgd(momentum=0.9, nesterov=True), {"learning_rate", "momentum"}),
        (gradtx.rmsprop(momentum=0.5), {"learning_rate", "rho", "momentum", "epsilon"}),
        (gradtx.adagrad(), {"learning_rate", "epsilon"}),
        (gradtx.adamw(), {"learning_rate", "weight_decay", "beta_1", "beta_2", "epsilon"}),
    ],
)
def test_each_optimizer_exposes_its_keras_named_hyperparameters(tx, names):
    assert set(gradtx.hyperparams(tx.init(PARAMS))) == names


def test_scheduled_learning_rate_reads_the_value_of_the_last_step():
    tx = gradtx.sgd(lambda step: 0.1 / (1.0 + step))
    state = tx.init(PARAMS)
    np.testing.assert_allclose(gradtx.hyperparams(state)["learning_rate"], 0.1)  # the first step's value
    _, state = _run(tx, steps=4, state=state)
    np.testing.assert_allclose(gradtx.hyperparams(state)["learning_rate"], 0.1 / 4, rtol=1e-7)


def test_set_hyperparams_takes_effect():
    tx = gradtx.adam(0.1)
    _, state = _run(tx, steps=3)
    lowered = gradtx.set_hyperparams(state, learning_rate=0.01)
    u_high, _ = tx.update(_grads(3), state, PARAMS)
    u_low, _ = tx.update(_grads(3), lowered, PARAMS)
    # The learning rate is the last factor of Adam's update, so the update scales by 1/10 exactly.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / 10, rtol=1e-6), u_low, u_high)
    assert float(gradtx.hyperparams(lowered)["learning_rate"]) == np.float32(0.01)


def test_set_hyperparams_does_not_recompile():
    tx = gradtx.adam(0.1)
    traces = []

    @jax.jit
    def step(params, state, k):
        traces.append(1)  # runs once per trace, i.e. once per compilation
        u, state = tx.update(jax.tree.map(lambda p: jnp.sin(3.0 * p + k), params), state, params)
        return gradtx.apply_updates(params, u), state

    params, state = PARAMS, tx.init(PARAMS)
    params, state = step(params, state, 0.0)
    before = jax.tree.map(np.asarray, params)
    for lr in (0.05, 0.0, 1e-3):
        state = gradtx.set_hyperparams(state, learning_rate=lr, beta_1=0.5)
        params, state = step(params, state, 1.0)
        if lr == 0.0:
            jax.tree.map(np.testing.assert_array_equal, params, before)  # lr 0 took effect: no move
        before = jax.tree.map(np.asarray, params)
    assert len(traces) == 1


def test_set_hyperparams_on_a_schedule_raises():
    state = gradtx.sgd(lambda step: 0.1).init(PARAMS)
    with pytest.raises(ValueError, match="learning_rate follows a schedule"):
        gradtx.set_hyperparams(state, learning_rate=0.2)


def test_set_hyperparams_rejects_unknown_and_invalid_values():
    state = gradtx.adam().init(PARAMS)
    with pytest.raises(ValueError, match="no hyperparameter 'momentum'.*beta_1"):
        gradtx.set_hyperparams(state, momentum=0.9)
    with pytest.raises(ValueError, match="set_hyperparams: beta_2 must be in \\[0, 1\\), got 1.0"):
        gradtx.set_hyperparams(state, beta_2=1.0)
    with pytest.raises(ValueError, match="set_hyperparams: learning_rate must be >= 0, got -1.0"):
        gradtx.set_hyperparams(state, learning_rate=jnp.array([0.1, -1.0]))
    with pytest.raises(ValueError, match="set_hyperparams: no values given"):  # returned the state as it was
        gradtx.set_hyperparams(state, where="adam")


def test_an_ambiguous_unqualified_write_raises_and_lists_the_choices():
    tx = gradtx.chain(gradtx.adam(0.1), gradtx.sgd(0.2))
    with pytest.raises(ValueError, match=r"'learning_rate' is held by several.*#0.1/learning_rate.*#1.0/l"):
        gradtx.set_hyperparams(tx.init(PARAMS), learning_rate=0.3)


LEARNING_RATES = jnp.array([1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])


@pytest.mark.parametrize(
    "make", [gradtx.adam, gradtx.sgd, gradtx.rmsprop, gradtx.nadam], ids=lambda f: f.__name__
)
def test_vmap_over_learning_rate_equals_separate_runs(make):
    tx = make()  # its update reads the learning rate from the state, whatever the default here

    def train(state):
        params = PARAMS
        for k in range(5):
            u, state = tx.update(_grads(k), state, params)
            params = gradtx.apply_updates(params, u)
        return params

    states = jax.vmap(lambda lr: make(lr).init(PARAMS))(LEARNING_RATES)
    swept = jax.jit(jax.vmap(train))(states)
    for i, lr in enumerate(LEARNING_RATES):
        alone, _ = _run(make(float(lr)))
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7), swept, alone
        )


def test_vmap_over_beta_and_momentum_equals_separate_runs():
    betas = jnp.array([0.0, 0.5, 0.9, 0.99])

    def train(beta):
        params, _ = _run(gradtx.adam(0.05, beta_1=beta))
        params_sgd, _ = _run(gradtx.sgd(0.05, momentum=beta))  # a traced momentum keeps its buffer, even at 0
        return params, params_sgd

    swept = jax.jit(jax.vmap(train))(betas)
    for i, beta in enumerate(betas):
        alone = (
            _run(gradtx.adam(0.05, beta_1=float(beta)))[0],
            _run(gradtx.sgd(0.05, momentum=float(beta)))[0],
        )
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7), swept, alone
        )


def test_set_hyperparams_on_a_vmapped_state_takes_one_value_per_configuration():
    states = jax.vmap(lambda lr: gradtx.adam(lr).init(PARAMS))(LEARNING_RATES)
    states = gradtx.set_hyperparams(states, learning_rate=LEARNING_RATES[::-1], beta_1=0.5)
    h = gradtx.hyperparams(states)
    np.testing.assert_array_equal(h["learning_rate"], LEARNING_RATES[::-1])
    np.testing.assert_array_equal(h["beta_1"], np.full(8, 0.5, np.float32))


def test_schedule_as_learning_rate_under_jit():
    schedule = lambda step: 0.1 * 0.5 ** (step / 2)  # noqa: E731
    tx = gradtx.sgd(schedule)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    params = PARAMS
    g = jax.tree.map(jnp.ones_like, PARAMS)
    for k in range(4):
        u, state = update(g, state, params)
        np.testing.assert_allclose(u["b"], -schedule(k) * np.ones(2), rtol=1e-6)
        params = gradtx.apply_updates(params, u)


def test_bf16_params_keep_float32_hyperparameters_and_state():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    tx = gradtx.adam(0.01)
    state = tx.init(params)
    assert float(gradtx.hyperparams(state)["beta_2"]) == np.float32(0.999)  # bf16 would round it to 1.0
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.inner[0].nu))
    for k in range(3):
        u, state = jax.jit(tx.update)(
            jax.tree.map(lambda g: g.astype(jnp.bfloat16), _grads(k)), state, params
        )
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(u))
        params = gradtx.apply_updates(params, u)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    assert all(v.dtype == jnp.float32 for v in gradtx.hyperparams(state).values())
    # Adam's first steps move each entry by ~lr; bf16 params near 1 resolve steps of 2**-8 only, so compare
    # with the float32 run at bf16 resolution.
    ref, _ = _run(gradtx.adam(0.01), steps=3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.float32(a), b, atol=2e-2), params, ref)


def test_init_after_a_donated_step_hands_out_live_hyperparameters():
    tx = gradtx.adam(0.1)
    step = jax.jit(lambda s, g: tx.update(g, s, PARAMS)[1], donate_argnums=0)
    step(tx.init(PARAMS), _grads(0))  # donates (deletes) the state's arrays
    assert float(gradtx.hyperparams(tx.init(PARAMS))["learning_rate"]) == np.float32(0.1)


def test_hyperparams_qualify_the_members_of_a_partition_instead_of_hiding_one():
    tx = gradtx.partition({"a": gradtx.adam(1e-3), "b": gradtx.sgd(0.1)}, {"w": "a", "b": "b"})
    h = gradtx.hyperparams(tx.init(PARAMS))
    assert float(h["a/learning_rate"]) == np.float32(1e-3) and float(h["b/learning_rate"]) == np.float32(0.1)
    assert "learning_rate" not in h and float(h["beta_1"]) == np.float32(0.9)
    assert set(gradtx.hyperparams(tx.init(PARAMS), where="b")) == {"learning_rate"}


def test_set_hyperparams_addresses_one_member_of_a_partition():
    tx = gradtx.partition({"a": gradtx.adam(1e-3), "b": gradtx.sgd(0.1)}, {"w": "a", "b": "b"})
    state = tx.init(PARAMS)
    by_where = gradtx.hyperparams(gradtx.set_hyperparams(state, where="b", learning_rate=0.5))
    by_name = gradtx.hyperparams(gradtx.set_hyperparams(state, **{"b/learning_rate": 0.5}))
    for h in (by_where, by_name):
        assert float(h["b/learning_rate"]) == 0.5 and float(h["a/learning_rate"]) == np.float32(1e-3)
    with pytest.raises(ValueError, match=r"held by several transformations: \['a/learning_rate', 'b/le"):
        gradtx.set_hyperparams(state, learning_rate=0.5)
    with pytest.raises(ValueError, match="no transformation in the state matches where='c'"):
        gradtx.set_hyperparams(state, where="c", learning_rate=0.5)


def test_a_partition_member_is_swept_alone():
    def make(lr_b):
        return gradtx.partition({"a": gradtx.adam(1e-2), "b": gradtx.sgd(lr_b)}, {"w": "a", "b": "b"})

    rates = jnp.array([0.0, 0.1, 0.5])
    states = jax.vmap(lambda r: make(r).init(PARAMS))(rates)
    h = gradtx.hyperparams(states)
    np.testing.assert_array_equal(h["b/learning_rate"], rates)
    np.testing.assert_array_equal(h["a/learning_rate"], np.full(3, 1e-2, np.float32))


def test_a_users_own_hyperparameter_names_carry_their_own_ranges():
    # The core used to validate by name: a user's factor=2.0 or min_value=-1 was rejected.
    from gradtx.hyper import NONNEGATIVE, HyperSpec

    spec = HyperSpec("mine", factor=2.0, min_value=-1.0, rate=(0.5, NONNEGATIVE))
    state = spec.init()
    assert float(gradtx.hyperparams(state)["factor"]) == 2.0
    gradtx.set_hyperparams(state, min_value=-3.0)  # any finite value
    with pytest.raises(ValueError, match="set_hyperparams: rate must be >= 0, got -1.0"):
        gradtx.set_hyperparams(state, rate=-1.0)
    assert gradtx.hyperparam_ranges(state)["rate"] == NONNEGATIVE


@pytest.mark.parametrize(
    "value, message",
    [
        (1e40, "learning_rate must be finite in float32"),
        ("0.001", "learning_rate must be a number or a JAX array, got '0.001'"),
        (True, "learning_rate must be a real number"),
    ],
)
def test_construction_rejects_values_that_are_not_float32_numbers(value, message):
    with pytest.raises(ValueError, match=message):
        gradtx.adam(value)


def test_set_hyperparams_names_a_wrong_shaped_value():
    states = jax.vmap(lambda lr: gradtx.adam(lr).init(PARAMS))(LEARNING_RATES)
    with pytest.raises(ValueError, match=r"learning_rate must be a scalar or have the state's shape \(8,\)"):
        gradtx.set_hyperparams(states, learning_rate=jnp.ones(3))


def test_the_module_is_not_hidden_by_the_function():
    import gradtx.hyper

    assert callable(gradtx.hyperparams) and gradtx.hyper.hyperparams is gradtx.hyperparams
