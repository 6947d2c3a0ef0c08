"""The protocol: chain, identity, apply_updates, the step counter, tree checks and odd leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtx
from gradtx.base import MAX_STEP


def test_identity_returns_updates_unchanged():
    tx = gradtx.identity()
    g = {"w": jnp.arange(3.0)}
    u, _ = tx.update(g, tx.init(g))
    assert u is g


def test_chain_applies_members_in_order():
    tx = gradtx.chain(gradtx.scale_by_learning_rate(0.5), gradtx.add_decayed_weights(2.0))
    p = jnp.array([1.0, 2.0])
    u, _ = tx.update(jnp.array([4.0, 4.0]), tx.init(p), p)
    np.testing.assert_allclose(u, -0.5 * 4.0 + 2.0 * np.array([1.0, 2.0]))


def test_chain_counts_steps_from_zero():
    tx = gradtx.adam()
    p = jnp.ones(2)
    state = tx.init(p)
    assert state.step.dtype == jnp.int32 and int(gradtx.step_count(state)) == 0
    for _ in range(3):
        _, state = tx.update(p, state, p)
    assert int(gradtx.step_count(state)) == 3


def test_step_counter_saturates_instead_of_overflowing():
    tx = gradtx.adam()
    p = jnp.ones(2)
    state = tx.init(p)._replace(step=jnp.int32(MAX_STEP - 1))
    _, state = tx.update(p, state, p)
    u2, state = tx.update(p, state, p)
    assert int(gradtx.step_count(state)) == MAX_STEP
    assert np.all(np.isfinite(u2)) and np.all(np.asarray(u2) < 0)


def test_nested_chain_uses_the_outer_step():
    inner = gradtx.adam(0.1)
    outer = gradtx.chain(inner, gradtx.identity())
    p = jnp.ones(2)
    state = outer.init(p)
    for _ in range(4):
        u_nested, state = outer.update(p, state, p)
    lone = inner.init(p)
    for _ in range(4):
        u_alone, lone = inner.update(p, lone, p)
    np.testing.assert_array_equal(u_nested, u_alone)
    assert int(gradtx.step_count(state)) == 4 == int(state.inner[0].step)


def test_step_count_without_a_chain_raises():
    with pytest.raises(ValueError, match="no gradtx chain"):
        gradtx.step_count(gradtx.scale_by_learning_rate(0.1).init(jnp.ones(2)))


def test_apply_updates_keeps_each_leaf_dtype():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float32), "n": jnp.arange(3)}
    updates = {"a": jnp.full(3, 0.5, jnp.float32), "b": jnp.full(2, 0.25, jnp.float32), "n": jnp.ones(3)}
    new = gradtx.apply_updates(params, updates)
    assert new["a"].dtype == jnp.bfloat16 and new["b"].dtype == jnp.float32
    np.testing.assert_array_equal(new["a"].astype(jnp.float32), 1.5)
    np.testing.assert_array_equal(new["n"], params["n"])  # integer leaves are untouched


def test_integer_and_none_leaves_pass_through():
    params = {"w": jnp.ones((2, 2)), "count": jnp.array(7), "skip": None}
    grads = {"w": jnp.ones((2, 2)), "count": np.zeros((), jax.dtypes.float0), "skip": None}
    for tx in (gradtx.adam(0.1), gradtx.sgd(0.1, 0.9), gradtx.rmsprop(centered=True), gradtx.adamw()):
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        assert updates["count"].dtype == jax.dtypes.float0 and updates["skip"] is None
        new = gradtx.apply_updates(params, updates)
        assert int(new["count"]) == 7 and new["skip"] is None
        assert np.all(np.asarray(new["w"]) < 1)


def test_empty_tree():
    for tx in (gradtx.adam(), gradtx.sgd(momentum=0.9), gradtx.adagrad()):
        state = tx.init({})
        updates, state = jax.jit(tx.update)({}, state, {})
        assert updates == {} and gradtx.apply_updates({}, updates) == {}


def test_mismatched_gradient_tree_names_the_path():
    tx = gradtx.adam()
    state = tx.init({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}})
    grads = {"dense": {"kernel": jnp.ones((2, 2)), "b": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"scale_by_adam.*only in the updates: \[\"\['dense'\]\['b'\]\"\]"):
        tx.update(grads, state)


def test_mismatched_leaf_shape_names_the_path():
    tx = gradtx.sgd(momentum=0.9)
    state = tx.init({"w": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match=r"momentum: the update at \['w'\] has shape \(3, 2\)"):
        tx.update({"w": jnp.ones((3, 2))}, state)


def test_optax_transformation_inside_gradtx_chain():
    """optax.clip_by_global_norm takes no extra arguments: the chain must not pass it `step`."""
    g = {"w": jnp.array([3.0, 4.0])}
    ours = gradtx.chain(optax.clip_by_global_norm(1.0), gradtx.sgd(0.1))
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    u, _ = ours.update(g, ours.init(g), g)
    expected, _ = reference.update(g, reference.init(g), g)
    np.testing.assert_allclose(u["w"], expected["w"], rtol=1e-7)


def test_gradtx_inside_optax_chain_matches_optax_adam():
    """With epsilon 0 the two Adams are the same formula. Betas are exact in float32 because optax, like
    Keras, computes ``1 - beta`` from the Python float while gradtx stores beta as float32."""
    g0 = {"w": jnp.array([0.3, -2.0, 1e-3])}
    ours = optax.chain(optax.clip(1.0), gradtx.adam(0.01, 0.875, 1 - 2**-10, epsilon=0.0))
    reference = optax.chain(optax.clip(1.0), optax.adam(0.01, b1=0.875, b2=1 - 2**-10, eps=0.0))
    s1, s2 = ours.init(g0), reference.init(g0)
    for k in range(20):
        g = jax.tree.map(lambda x, k=k: x * (1 + 0.1 * k) * (-1) ** k, g0)
        u1, s1 = ours.update(g, s1, g0)
        u2, s2 = reference.update(g, s2, g0)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=2e-6)


def test_an_integer_gradient_of_a_float_param_is_scaled_not_added():
    # It used to pass through the optimizer untouched: w=[5, 5], g=[3, -3] became [8, 2].
    params = jnp.array([5.0, 5.0])
    tx = gradtx.sgd(1.0)
    u, _ = tx.update(jnp.array([3, -3]), tx.init(params), params)
    np.testing.assert_array_equal(gradtx.apply_updates(params, u), [2.0, 8.0])


@pytest.mark.parametrize(
    "make, reference",
    [
        (lambda: gradtx.sgd(0.1, momentum=0.9), lambda: optax.sgd(0.1, momentum=0.9)),
        (lambda: gradtx.adam(0.05, epsilon=1e-8), lambda: optax.adam(0.05, eps=1e-8)),
        (lambda: gradtx.rmsprop(0.01, epsilon=0.0), lambda: optax.rmsprop(0.01, decay=0.9, eps=0.0)),
    ],
    ids=["momentum", "adam", "rmsprop"],
)
def test_complex_params_train_as_optax_trains_them(make, reference):
    # optax's convention: optimizers receive the conjugate of jax.grad's output; second moments use
    # |g|^2. Complex params used to be skipped ("not floating") and their raw gradient added: ascent.
    target = jnp.array([1.0 + 2.0j, -0.5 + 0.3j, 0.2 - 1.0j], jnp.complex64)

    def loss(z):
        return jnp.sum(jnp.abs(z - target) ** 2)

    def train(tx):
        z, state = jnp.zeros(3, jnp.complex64), tx.init(jnp.zeros(3, jnp.complex64))
        for _ in range(60):
            u, state = tx.update(jnp.conj(jax.grad(loss)(z)), state, z)
            z = optax.apply_updates(z, u)
        return z

    ours, theirs = train(make()), train(reference())
    assert ours.dtype == jnp.complex64
    # Adam's epsilon placement differs from optax's by ~eps/sqrt(v): far below float32 resolution here.
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)
    assert float(loss(ours)) < 0.5 * float(loss(jnp.zeros(3, jnp.complex64)))


def test_fit_trains_complex_params_downhill():
    target = jnp.array([1.0 + 2.0j, -0.5 + 0.3j], jnp.complex64)
    result = gradtx.fit(
        lambda z, batch: jnp.sum(jnp.abs(z - target) ** 2), jnp.zeros(2, jnp.complex64),
        gradtx.adam(0.1), jnp.zeros((1, 1)), 200,
    )  # fmt: skip
    np.testing.assert_allclose(result.params, target, atol=1e-2)


def test_a_jitted_step_compiles_once_for_an_optimizer_with_moments():
    # init used to commit the moments to a device while the params were uncommitted: jax.jit saw two
    # different signatures and compiled twice (optax: once).
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = gradtx.adam(1e-3)

    @jax.jit
    def step(params, state):
        u, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        return gradtx.apply_updates(params, u), state

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert step._cache_size() == 1
