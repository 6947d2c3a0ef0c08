"""Constraints against keras.constraints on Dense (in, out) and Conv (h, w, in, out) kernels, and SGD with a
max-norm constraint against Keras's SGD with ``kernel_constraint`` over a whole training run."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import gradtx

KC = keras.constraints
SHAPES = {"dense": ((5, 3), 0), "conv": ((3, 3, 2, 4), (0, 1, 2))}
CASES = {
    "max_norm": (lambda axis: gradtx.max_norm(1.5, axis), lambda axis: KC.MaxNorm(1.5, axis)),
    "unit_norm": (gradtx.unit_norm, lambda axis: KC.UnitNorm(axis)),
    "min_max_norm": (
        lambda axis: gradtx.min_max_norm(0.75, 1.5, 1.0, axis),
        lambda axis: KC.MinMaxNorm(0.75, 1.5, 1.0, axis),
    ),
    "min_max_norm_rate": (
        lambda axis: gradtx.min_max_norm(0.75, 1.5, 0.25, axis),
        lambda axis: KC.MinMaxNorm(0.75, 1.5, 0.25, axis),
    ),
    "non_neg": (lambda axis: gradtx.non_neg(), lambda axis: KC.NonNeg()),
}


def _kernel_and_step(shape, seed=0):
    rng = np.random.default_rng(seed)
    # Norms per unit from about 0.2 to 6, so that some units are inside the bounds and some outside.
    w = rng.normal(size=shape) * rng.uniform(0.1, 2.0, size=shape[-1])
    return w.astype(np.float32), (0.1 * rng.normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("name", CASES)
def test_constraint_lands_where_the_keras_constraint_puts_the_weights(name, kind):
    shape, axis = SHAPES[kind]
    make, make_keras = CASES[name]
    w, u = _kernel_and_step(shape)
    tx = make(axis)
    new_u, _ = jax.jit(tx.update)(jnp.asarray(u), tx.init(jnp.asarray(w)), jnp.asarray(w))
    expected = np.asarray(make_keras(axis)(jnp.asarray(w + u)))
    # theta + (c(theta + u) - theta) is c(theta + u) up to the rounding of the two float32 additions.
    np.testing.assert_allclose(gradtx.apply_updates(jnp.asarray(w), new_u), expected, rtol=1e-6, atol=1e-6)


def test_max_norm_bounds_each_output_unit_of_flax_dense_and_conv_kernels():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.dense = nnx.Linear(5, 3, rngs=rngs)

    model = Model(nnx.Rngs(0))
    dense, conv = keras.layers.Dense(3), keras.layers.Conv2D(4, 3)
    dense.build((None, 5))
    conv.build((None, 8, 8, 2))
    # Flax kernels have Keras's layout, output units last, so Keras's axis arguments carry over.
    assert model.dense.kernel.shape == dense.kernel.shape and model.conv.kernel.shape == conv.kernel.shape
    tx = gradtx.partition(
        {
            "dense": gradtx.max_norm(0.25, axis=0),
            "conv": gradtx.max_norm(0.25, axis=(0, 1, 2)),
            "other": gradtx.identity(),
        },
        gradtx.label_by_path({"dense/kernel": "dense", "conv/kernel": "conv"}, default="other"),
    )
    optimizer = nnx.Optimizer(model, gradtx.chain(gradtx.sgd(0.1), tx), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    dense_norms = np.linalg.norm(np.asarray(model.dense.kernel[...]), axis=0)
    conv_norms = np.sqrt(np.sum(np.square(np.asarray(model.conv.kernel[...])), axis=(0, 1, 2)))
    assert dense_norms.shape == (3,) and conv_norms.shape == (4,)
    np.testing.assert_allclose(dense_norms, 0.25, rtol=1e-5)
    np.testing.assert_allclose(conv_norms, 0.25, rtol=1e-5)


def test_non_neg_puts_clipped_weights_on_exact_zero():
    w = jnp.array([0.3, 0.1, -0.2])
    u, _ = gradtx.non_neg().update(jnp.array([-0.5, -0.1, 0.1]), gradtx.non_neg().init(w), w)
    new = np.asarray(gradtx.apply_updates(w, u))
    assert new[0] == 0.0 and new[1] == 0.0 and new[2] == 0.0


def test_max_norm_vmaps_over_max_value():
    w, u = _kernel_and_step((5, 3))
    values = jnp.array([0.5, 1.0, 4.0])
    tx = gradtx.max_norm()
    states = jax.vmap(lambda v: gradtx.max_norm(v).init(w))(values)
    out, _ = jax.vmap(tx.update, in_axes=(None, 0, None))(jnp.asarray(u), states, jnp.asarray(w))
    for v, row in zip(np.asarray(values), np.asarray(out), strict=True):
        np.testing.assert_allclose(w + row, KC.MaxNorm(float(v))(jnp.asarray(w + u)), rtol=1e-6, atol=1e-6)


def test_keras_sgd_with_kernel_constraint_equals_chained_sgd_and_max_norm():
    x, y = load_digits(return_X_y=True)
    x, y = (x[:640] / 16.0).astype(np.float32), y[:640]
    lr, limit, batch, epochs = 0.5, 0.75, 64, 6  # 60 steps; the limit binds from the first epoch
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(10, kernel_constraint=KC.MaxNorm(limit))]
    )
    # Copies, because fit donates the buffers of the layer's variables.
    params = {"kernel": jnp.array(np.array(model.layers[0].kernel.value)), "bias": jnp.zeros(10)}
    model.compile(keras.optimizers.SGD(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)

    tx = gradtx.chain(gradtx.sgd(lr), gradtx.masked(gradtx.max_norm(limit), "kernel"))
    state = tx.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(xb @ p["kernel"] + p["bias"], yb).mean()

        u, state = tx.update(jax.grad(loss)(params), state, params)
        return gradtx.apply_updates(params, u), state

    for _ in range(epochs):
        for i in range(0, len(x), batch):
            params, state = step(params, state, x[i : i + batch], y[i : i + batch])
    kernel = np.asarray(model.layers[0].kernel.value)
    assert np.isclose(np.linalg.norm(kernel, axis=0), limit, rtol=1e-5).sum() >= 5  # the constraint acts
    # The two losses' softmaxes round differently in float32; over 60 steps that stays below a few
    # ulp of the weights (|w| <= 0.31 here). A 0.1% looser limit moves the kernel by 3e-4.
    np.testing.assert_allclose(params["kernel"], kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(params["bias"], np.asarray(model.layers[0].bias.value), rtol=1e-6, atol=1e-6)


def test_constraint_needs_the_params():
    with pytest.raises(ValueError, match="max_norm needs the params"):
        gradtx.max_norm().update(jnp.ones((2, 2)), gradtx.max_norm().init(jnp.ones((2, 2))))


def test_constraint_rejects_an_axis_the_parameter_lacks():
    w = jnp.ones(3)
    with pytest.raises(ValueError, match=r"axis \(1,\) does not exist in a parameter of shape \(3,\)"):
        gradtx.max_norm(axis=1).update(w, gradtx.max_norm(axis=1).init(w), w)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: gradtx.max_norm(-1.0), "max_norm: max_value must be >= 0, got -1.0"),
        (lambda: gradtx.min_max_norm(2.0, 1.0), "min_value must be <= max_value"),
        (lambda: gradtx.min_max_norm(rate=1.5), "min_max_norm: rate must be in \\[0, 1\\], got 1.5"),
        (lambda: gradtx.unit_norm(axis="0"), "axis must be an int"),
    ],
)
def test_constraints_reject_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
