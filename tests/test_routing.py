"""Routing: masked and partition select leaves by pytree, function or glob on Flax NNX and Linen paths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gradtx

PARAMS = {
    "dense": {"kernel": jnp.arange(6.0).reshape(3, 2) - 2.5, "bias": jnp.array([1.0, -1.0])},
    "norm": {"scale": jnp.array([2.0, 3.0])},
    "count": jnp.int32(7),
}
# What jax.grad(..., allow_int=True) gives: ones for the float leaves, float0 for the integer counter.
ONES = {**jax.tree.map(jnp.ones_like, PARAMS), "count": np.zeros((), jax.dtypes.float0)}


DOUBLE = gradtx.Transformation(
    lambda params: gradtx.EmptyState(),
    lambda updates, state, params=None, **extra: (jax.tree.map(lambda u: 2 * u, updates), state),
)


def _doubled(mask, params=PARAMS):
    """The paths of the leaves that a masked ``u <- 2u`` changes, sorted."""
    tx = gradtx.masked(DOUBLE, mask)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(u)[0]
    return sorted(gradtx.routing.path_string(p) for p, leaf in flat if float(leaf.ravel()[0]) == 2.0)


def test_weights_only_selects_leaves_with_two_or_more_dims():
    assert _doubled(gradtx.weights_only) == ["dense/kernel"]


def test_mask_as_pytree_prefix_covers_the_subtree():
    assert _doubled({"dense": True, "norm": False, "count": False}) == ["dense/bias", "dense/kernel"]


def test_mask_as_glob_patterns():
    assert _doubled("*/kernel") == ["dense/kernel"]
    assert _doubled(["*/bias", "norm/*"]) == ["dense/bias", "norm/scale"]


def test_mask_as_function_of_path_and_leaf():
    assert _doubled(lambda path, leaf: path.startswith("norm") or leaf.shape == (2,)) == [
        "dense/bias",
        "norm/scale",
    ]


def test_glob_matches_linen_paths():
    variables = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))
    assert _doubled("*/kernel", variables) == ["params/kernel"]


def test_glob_matches_nnx_paths_without_the_variable_value():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 3, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(3, 3, rngs=rngs), nnx.LayerNorm(3, rngs=rngs)])

    state = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    assert _doubled("*/kernel", state) == ["blocks/0/kernel", "hidden/kernel"]
    assert _doubled(gradtx.weights_only, state) == ["blocks/0/kernel", "hidden/kernel"]


def test_masked_leaves_integers_and_none_untouched():
    params = {**PARAMS, "empty": None}
    tx = gradtx.masked(gradtx.sgd(0.5), lambda path, leaf: True)
    grads = {**ONES, "empty": None}
    u, _ = tx.update(grads, tx.init(params), params)
    assert u["empty"] is None and u["count"].dtype == jax.dtypes.float0
    assert int(gradtx.apply_updates(params, u)["count"]) == 7
    np.testing.assert_array_equal(u["dense"]["kernel"], -0.5 * np.ones((3, 2)))


def test_masked_state_holds_only_the_selected_leaves():
    state = gradtx.masked(gradtx.sgd(0.1, momentum=0.9), gradtx.weights_only).init(PARAMS)
    velocities = jax.tree.leaves(state.inner.inner[1].velocity)
    assert [v.shape for v in velocities] == [(3, 2)]


def test_masked_inner_schedule_follows_the_outer_step():
    schedule = lambda step: 0.1 * (step + 1.0)  # noqa: E731
    tx = gradtx.chain(gradtx.masked(gradtx.scale_by_learning_rate(schedule), "*/kernel"))
    state = tx.init(PARAMS)
    for step in range(3):
        u, state = tx.update(ONES, state, PARAMS)
        np.testing.assert_allclose(u["dense"]["kernel"], -0.1 * (step + 1), rtol=1e-6)
        np.testing.assert_array_equal(u["dense"]["bias"], 1.0)


def test_partition_sends_each_leaf_to_its_label():
    labels = gradtx.label_by_path({"*/kernel": "fast", "norm/*": "frozen"}, default="slow")
    tx = gradtx.partition(
        {"fast": gradtx.sgd(1.0), "slow": gradtx.sgd(0.1), "frozen": gradtx.scale_by_learning_rate(0.0)},
        labels,
    )
    u, state = jax.jit(tx.update)(ONES, tx.init(PARAMS), PARAMS)
    np.testing.assert_array_equal(u["dense"]["kernel"], -1.0)
    np.testing.assert_allclose(u["dense"]["bias"], -0.1)
    np.testing.assert_array_equal(u["norm"]["scale"], 0.0)
    assert int(gradtx.apply_updates(PARAMS, u)["count"]) == 7
    assert set(state.inner) == {"fast", "slow", "frozen"}


def test_partition_accepts_a_pytree_of_labels():
    labels = {"dense": {"kernel": "a", "bias": "b"}, "norm": "b", "count": "b"}
    tx = gradtx.partition({"a": gradtx.sgd(1.0), "b": gradtx.identity()}, labels)
    u, _ = tx.update(ONES, tx.init(PARAMS), PARAMS)
    np.testing.assert_array_equal(u["dense"]["kernel"], -1.0)
    np.testing.assert_array_equal(u["norm"]["scale"], 1.0)


def test_partition_rejects_a_label_without_transformation():
    tx = gradtx.partition({"a": gradtx.identity()}, lambda path, leaf: "a" if "kernel" in path else "b")
    with pytest.raises(ValueError, match=r"'dense/bias' has label 'b'"):
        tx.init({"dense": PARAMS["dense"]})


def test_label_by_path_without_default_names_the_unmatched_path():
    labels = gradtx.label_by_path({"dense/*": "k"})
    with pytest.raises(ValueError, match="no pattern of.*matches the parameter 'norm/scale'"):
        gradtx.partition({"k": gradtx.identity()}, labels).init(
            {"dense": PARAMS["dense"], "norm": PARAMS["norm"]}
        )


def test_masked_rejects_a_mask_that_is_not_bool():
    with pytest.raises(ValueError, match="bool per leaf"):
        gradtx.masked(gradtx.identity(), lambda path, leaf: "yes").init(PARAMS)


def test_masked_rejects_a_tree_that_does_not_match():
    with pytest.raises(ValueError, match="prefix"):
        gradtx.masked(gradtx.identity(), {"other": True}).init(PARAMS)


def test_a_single_label_string_labels_every_leaf():
    # Label strings used to be read as glob patterns: every leaf got the label False.
    tx = gradtx.partition({"a": gradtx.sgd(0.5)}, "a")
    u, _ = tx.update(ONES, tx.init(PARAMS), PARAMS)
    np.testing.assert_array_equal(u["dense"]["kernel"], -0.5)


def test_a_tuple_of_labels_labels_a_tuple_of_params():
    params = (jnp.ones(2), jnp.ones(3))
    tx = gradtx.partition({"fast": gradtx.sgd(1.0), "slow": gradtx.sgd(0.1)}, ("fast", "slow"))
    u, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(u[0], -1.0)
    np.testing.assert_allclose(u[1], -0.1)


def test_optax_style_label_and_mask_functions_take_the_params_tree():
    def labels(params):  # optax's form: params -> tree of labels
        return jax.tree.map(lambda p: "decay" if jnp.ndim(p) == 2 else "plain", params)

    tx = gradtx.partition({"decay": gradtx.sgd(1.0), "plain": gradtx.sgd(0.1)}, labels)
    u, _ = tx.update(ONES, tx.init(PARAMS), PARAMS)
    np.testing.assert_array_equal(u["dense"]["kernel"], -1.0)
    np.testing.assert_allclose(u["dense"]["bias"], -0.1)
    assert _doubled(lambda params: jax.tree.map(lambda p: jnp.ndim(p) == 2, params)) == ["dense/kernel"]


def test_a_callable_pytree_of_bools_is_a_mask_tree_not_a_function():
    # An equinox-style module: a pytree that is also callable. It used to be called as (path, leaf).
    @jax.tree_util.register_pytree_node_class
    class Flags:
        def __init__(self, dense, norm, count):
            self.dense, self.norm, self.count = dense, norm, count

        def __call__(self, *args):
            raise AssertionError("a mask tree must not be called")

        def tree_flatten(self):
            return (self.dense, self.norm, self.count), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    params = Flags(PARAMS["dense"], PARAMS["norm"], PARAMS["count"])
    mask = Flags({"kernel": True, "bias": False}, {"scale": False}, False)
    tx = gradtx.masked(DOUBLE, mask)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_array_equal(u.dense["kernel"], 2.0)
    np.testing.assert_array_equal(u.dense["bias"], 1.0)


def test_a_mask_pattern_that_matches_nothing_is_an_error():
    # A typo ("kernal") used to route nothing, silently.
    with pytest.raises(ValueError, match=r"masked: the pattern\(s\) \['\*/kernal'\] match no parameter"):
        gradtx.masked(gradtx.l2(0.01), "*/kernal").init(PARAMS)
    with pytest.raises(ValueError, match=r"\['norm/\*x'\] match no parameter"):
        gradtx.masked(gradtx.l2(0.01), ["*/kernel", "norm/*x"]).init(PARAMS)
