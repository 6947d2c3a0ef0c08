"""The grouped layout: the same numbers as the per-leaf mode, and the same state interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx

OPTIMIZERS = {
    "sgd": lambda: gradtx.sgd(0.1),
    "momentum": lambda: gradtx.sgd(0.1, momentum=0.9),
    "nesterov": lambda: gradtx.sgd(0.1, momentum=0.9, nesterov=True),
    "adagrad": lambda: gradtx.adagrad(0.1),
    "rmsprop": lambda: gradtx.rmsprop(0.01),
    "rmsprop_centered_momentum": lambda: gradtx.rmsprop(0.01, momentum=0.5, centered=True),
    "adam": lambda: gradtx.adam(0.01),
    "adam_amsgrad": lambda: gradtx.adam(0.01, amsgrad=True),
    "adamax": lambda: gradtx.adamax(0.01),
    "nadam": lambda: gradtx.nadam(0.01),
    "adamw": lambda: gradtx.adamw(0.01, weight_decay=0.1),
}


def _params():
    """Mixed dtypes and shapes: groups of several leaves, groups of one, a leaf above the size limit
    (12 elements here), scalars, an integer leaf and a None."""
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    return {
        "a": x,
        "b": -2.0 * x,
        "c": x.astype(jnp.bfloat16),
        "layers": [{"w": (x + i).astype(jnp.float16)[0], "s": jnp.float32(0.5 * i)} for i in range(3)],
        "big": jnp.linspace(0.0, 3.0, 16),
        "count": jnp.arange(2, dtype=jnp.int32),
        "none": None,
    }


def _grads(k, params):
    return jax.tree.map(
        lambda p: (
            (jnp.sin(3.0 * p.astype(jnp.float32) + k) + 0.1 * k).astype(p.dtype)
            if jnp.issubdtype(p.dtype, jnp.floating)
            else p
        ),
        params,
    )


def _train(tx, steps=3, state=None):
    params = _params()
    state = tx.init(params) if state is None else state

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state

    for k in range(steps):
        params, state = step(params, state, _grads(k, params))
    return params, state


def _assert_trees_equal(a, b, ulp=0):
    """Equal leaf by leaf, to ``ulp`` units in the last place of each leaf's dtype."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        rtol = ulp * float(jnp.finfo(x.dtype).eps) if jnp.issubdtype(x.dtype, jnp.floating) else 0
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol)


@pytest.mark.parametrize("max_group_leaves", [64, 2])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grouped_gives_the_per_leaf_results(name, max_group_leaves):
    # The same float32 operations element by element; XLA may still compile a scalar leaf's kernel
    # differently from the stacked one (seen: Nadam, 1 ulp), hence "to rounding", not to the bit.
    # max_group_leaves=2 cuts the three float16 and the three scalar leaves into groups of 2 and 1.
    make = OPTIMIZERS[name]
    per_leaf, _ = _train(make())
    grouped, _ = _train(gradtx.grouped(make(), max_group_size=12, max_group_leaves=max_group_leaves))
    _assert_trees_equal(grouped, per_leaf, ulp=2)


def test_a_constraint_chained_after_the_grouped_optimizer_sees_each_leaf():
    # The documented way to combine grouped with per-leaf rules: max_norm outside grouped.
    def kernels_only(tx):
        return gradtx.masked(tx, lambda path, leaf: jnp.ndim(leaf) == 2)

    per_leaf, _ = _train(gradtx.chain(gradtx.adam(0.5), kernels_only(gradtx.max_norm(1.0))))
    grouped, _ = _train(gradtx.chain(gradtx.grouped(gradtx.adam(0.5)), kernels_only(gradtx.max_norm(1.0))))
    _assert_trees_equal(grouped, per_leaf, ulp=2)
    # The constraint binds: the columns of "a" and "b" end on the unit ball, not below it.
    assert np.max(np.linalg.norm(np.asarray(grouped["b"]), axis=0)) > 0.99


def test_grouped_without_jit_matches_too():
    tx, gx = gradtx.adam(0.01), gradtx.grouped(gradtx.adam(0.01))
    params, grads = _params(), _grads(1, _params())
    u, _ = tx.update(grads, tx.init(params), params)
    ug, _ = gx.update(grads, gx.init(params), params)
    _assert_trees_equal(ug, u)


def test_non_float_and_none_leaves_pass_through():
    params, _ = _train(gradtx.grouped(gradtx.adam(0.01)))
    assert params["none"] is None
    np.testing.assert_array_equal(params["count"], np.arange(2))


def test_state_keeps_same_shape_leaves_stacked():
    state = gradtx.grouped(gradtx.adam(), max_group_size=12).init(_params())
    mu = state.inner.inner[0].mu
    assert mu["float32[3,4]"].shape == (2, 3, 4)  # "a" and "b"
    assert mu["float16[4]"].shape == (3, 4) and mu["float16[4]"].dtype == jnp.float32
    assert mu["float32[]"].shape == (3,)
    assert mu["float32[16]#2"].shape == (16,)  # above max_group_size: a group of its own


def test_groups_are_cut_at_max_group_leaves():
    state = gradtx.grouped(gradtx.adam(), max_group_size=12, max_group_leaves=2).init(_params())
    mu = state.inner.inner[0].mu
    assert mu["float16[4]"].shape == (2, 4) and mu["float16[4]@2"].shape == (4,)
    assert mu["float32[]"].shape == (2,) and mu["float32[]@2"].shape == ()
    # One tuple of row numbers serves every group: as long as the largest group.
    np.testing.assert_array_equal(state.rows, [0, 1])


def test_hyperparams_read_and_set_through_the_grouped_state():
    tx = gradtx.grouped(gradtx.adam(0.1))
    _, state = _train(tx, steps=2)
    assert float(gradtx.hyperparams(state)["learning_rate"]) == np.float32(0.1)
    assert int(gradtx.step_count(state)) == 2
    lowered = gradtx.set_hyperparams(state, learning_rate=0.01)
    assert float(gradtx.hyperparams(lowered)["learning_rate"]) == np.float32(0.01)
    per_leaf_tx = gradtx.adam(0.1)
    _, per_leaf_state = _train(per_leaf_tx, steps=2)
    per_leaf_lowered = gradtx.set_hyperparams(per_leaf_state, learning_rate=0.01)
    params, grads = _params(), _grads(5, _params())
    u, _ = tx.update(grads, lowered, params)
    u_ref, _ = per_leaf_tx.update(grads, per_leaf_lowered, params)
    _assert_trees_equal(u, u_ref)


def test_grouped_vmaps_over_the_learning_rate():
    params, grads = _params(), _grads(1, _params())
    rates = jnp.array([0.1, 0.01, 0.001])

    def one(make, lr):
        tx = make(lr)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates

    swept = jax.vmap(lambda lr: one(lambda r: gradtx.grouped(gradtx.adam(r)), lr))(rates)
    reference = jax.vmap(lambda lr: one(gradtx.adam, lr))(rates)
    _assert_trees_equal(swept, reference)


def test_grouped_state_survives_a_donated_step():
    tx = gradtx.grouped(gradtx.adam(0.01))
    params = _params()
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (gradtx.apply_updates(p, u), s))(*tx.update(g, s, p)),
        donate_argnums=(0, 1),
    )
    params, state = step(params, tx.init(params), _grads(0, params))
    params, state = step(params, state, _grads(1, params))
    assert int(gradtx.step_count(state)) == 2
    tx.init(_params())  # a second init after donation gets live buffers


def test_updates_for_another_tree_are_rejected():
    tx = gradtx.grouped(gradtx.adam())
    state = tx.init({"a": jnp.ones(3), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match="float32\\[3\\] of shape \\(3, 3\\)"):
        tx.update({"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(3)}, state)
    with pytest.raises(ValueError, match="float32\\[3\\] of shape \\(3,\\)"):
        tx.update({"a": jnp.ones(3)}, state)


def test_a_larger_group_than_the_rows_is_rejected_for_a_stateless_inner():
    # sgd keeps no per-leaf state to compare with; the rows tuple still bounds the groups.
    tx = gradtx.grouped(gradtx.sgd(0.1))
    state = tx.init({"a": jnp.ones(3), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match="group of 3 leaves"):
        tx.update({"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(3)}, state)


def test_rejects_negative_max_group_size():
    with pytest.raises(ValueError, match="max_group_size"):
        gradtx.grouped(gradtx.adam(), max_group_size=-1)


def test_rejects_max_group_leaves_below_one():
    with pytest.raises(ValueError, match="max_group_leaves must be >= 1, got 0"):
        gradtx.grouped(gradtx.adam(), max_group_leaves=0)
