"""gradtx transformations where Flax users put optax ones: nnx.Optimizer and the Linen TrainState."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from sklearn.datasets import load_digits

import gradtx


def _digits():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_optimizer_trains_on_digits():
    x, y = _digits()
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gradtx.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(_loss)(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    first = float(_loss(model, x, y))
    for i in range(150):
        batch = slice((32 * i) % 1760, (32 * i) % 1760 + 32)
        step(model, optimizer, x[batch], y[batch])
    last = float(_loss(model, x, y))
    assert last < 0.3 * first, (first, last)
    assert float((model(x).argmax(-1) == y).mean()) > 0.85


def test_nnx_optimizer_update_equals_plain_gradtx_loop():
    x, y = _digits()
    model = MLP(nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = gradtx.nadam(1e-2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    state = tx.init(params)

    def pure_loss(p, xb, yb):
        return _loss(nnx.merge(graphdef, p), xb, yb)

    for i in range(5):
        xb, yb = x[32 * i : 32 * i + 32], y[32 * i : 32 * i + 32]
        grads = jax.grad(pure_loss)(params, xb, yb)
        u, state = tx.update(grads, state, params)
        params = gradtx.apply_updates(params, u)
        optimizer.update(model, nnx.grad(_loss)(model, xb, yb))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        nnx.to_pure_dict(params),
    )


def test_linen_train_state_accepts_gradtx():
    x, y = _digits()
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

    def apply_fn(p, xb):
        return xb @ p["w"] + p["b"]

    state = train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=gradtx.sgd(0.5, momentum=0.9))

    @jax.jit
    def step(state, xb, yb):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(state.apply_fn(p, xb), yb).mean()  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = [float(step(state, x, y)[1])]
    for _ in range(30):
        state, loss = step(state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0]
    assert int(gradtx.step_count(state.opt_state)) == 30


def test_nnx_optimizer_hyperparameters_read_and_set():
    model = MLP(nnx.Rngs(2))
    optimizer = nnx.Optimizer(model, gradtx.adam(1e-2), wrt=nnx.Param)
    x, y = _digits()
    optimizer.update(model, nnx.grad(_loss)(model, x[:32], y[:32]))
    pure = nnx.as_pure(optimizer.opt_state)
    assert float(gradtx.hyperparams(pure)["learning_rate"]) == np.float32(1e-2)
    assert int(gradtx.step_count(pure)) == 1
    nnx.update(optimizer.opt_state, nnx.state(gradtx.set_hyperparams(pure, learning_rate=0.0)))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer.update(model, nnx.grad(_loss)(model, x[:32], y[:32]))  # learning rate 0: nothing moves
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)), before)
    assert int(gradtx.step_count(nnx.as_pure(optimizer.opt_state))) == 2
