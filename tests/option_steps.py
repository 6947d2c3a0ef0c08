"""Shared by the tests of Keras's base-optimizer options (clipping, accumulation, EMA, loss scaling, the
factories' options): the step-by-step comparison with Keras 3 (JAX backend), and a sweep helper.

Method (as in test_optimizers.py): every gradtx state here is a function of the gradients and of the
params it was shown, so at each step gradtx starts from Keras's current params and must land on
Keras's next params: a difference cannot accumulate and hide.

Tolerance. With float32-exact hyperparameters both libraries do the same float32 operations up to
their order (XLA fuses and reorders under jit; ``theta + (u - eta*lambda*theta)`` here against Keras's
``(theta - theta*lambda*eta) + u``; an EMA overwrite is ``theta + (a - theta)`` against Keras's ``a``),
a few ulp of the operands: ``1e-6 * (|theta_old| + |theta_new|)`` (8 ulp) per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np

import gradtx

SHAPES = [(5, 3), (7,), (2, 2, 3), ()]
RTOL = 1e-6


def f32(x: float) -> float:
    """``x`` rounded to float32 (what gradtx stores), so that both libraries use the same value."""
    return float(np.float32(x))


# Adam's defaults rounded to float32: Keras computes 1 - beta in float64 from a decimal default, which
# alone moves its steps by ~1e-5 of the update; rounded, both sides use the same float32 numbers.
ADAM = {"beta_1": f32(0.9), "beta_2": f32(0.999), "epsilon": f32(1e-7)}


# Every option at once (one clip: Keras allows one), in Keras's order: unscale, accumulate, clip, decay,
# update, EMA, overwrite. The gradients given with it are scaled by the loss scale factor.
COMBINED = {
    "loss_scale_factor": 64.0,
    "gradient_accumulation_steps": 2,
    "global_clipnorm": 60.0,
    "weight_decay": 0.125,
    "use_ema": True,
    "ema_momentum": f32(0.875),
    "ema_overwrite_frequency": 2,
}


def problem(steps: int, seed: int = 0, shapes=SHAPES, decades=(-3, 2)):
    """Params ``N(0, 1)`` and ``steps`` gradients whose entries' magnitudes are drawn log-uniformly over
    ``10**decades`` (five decades by default)."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [
        [(rng.normal(size=s) * 10 ** rng.uniform(*decades, size=s)).astype(np.float32) for s in shapes]
        for _ in range(steps)
    ]
    return params, grads


def follow_keras(
    keras_opt,
    tx,
    params,
    grads,
    *,
    jit: bool,
    rtol: float = RTOL,
    atol: float = 0.0,
    on_step=None,
    moving_steps=None,
):
    """Applies ``grads`` with both optimizers; after every step, each leaf must satisfy
    ``|ours - keras| <= rtol * (|theta_old| + |theta_new|) + atol``. Returns ``(state, keras variables)``, the
    Keras optimizer's own variables (moments, EMA averages, loss scale) holding their final values.

    Keras runs its jitted ``stateless_apply`` (what ``model.fit`` runs on the JAX backend; its eager
    ``apply`` is slow, and fails for a LossScaleOptimizer); gradtx runs ``update`` jitted with ``jit``,
    op by op without.
    ``on_step(step, state, keras_opt)`` may check more after each step (Keras's optimizer variables
    are current then). At least ``moving_steps`` steps (default: half) must move
    the params by more than 100x the bound, so that the comparison can fail."""
    variables = [keras.Variable(p) for p in params]
    keras_opt.build(variables)
    keras_step = jax.jit(keras_opt.stateless_apply)
    state = tx.init([jnp.asarray(p) for p in params])
    update = jax.jit(tx.update) if jit else tx.update
    resolved = 0
    for step, g in enumerate(grads):
        current = [np.asarray(v) for v in variables]
        g = [jnp.asarray(x) for x in g]
        new, opt_values = keras_step([v.value for v in keras_opt.variables], g, [v.value for v in variables])
        for var, value in zip([*variables, *keras_opt.variables], [*new, *opt_values], strict=True):
            var.assign(value)
        updates, state = update(g, state, [jnp.asarray(p) for p in current])
        ours = gradtx.apply_updates([jnp.asarray(p) for p in current], updates)
        moved = False
        for i, (a, b, before) in enumerate(zip(ours, variables, current, strict=True)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            bound = rtol * (np.abs(before) + np.abs(b)) + atol
            assert np.all(np.abs(a - b) <= bound), (
                f"step {step}, leaf {i}: max excess {np.max(np.abs(a - b) - bound):.3g}\nours {a}\nkeras {b}"
            )
            moved |= bool(np.any(np.abs(b - before) > 100 * bound))
        resolved += moved
        if on_step is not None:
            on_step(step, state, keras_opt)
    needed = len(grads) // 2 if moving_steps is None else moving_steps
    assert resolved >= needed, f"only {resolved} of {len(grads)} steps moved the params measurably"
    return state, variables


def counting(inner):
    """``inner`` that records (a host callback) each time its update really runs: ``(tx, calls)``."""
    calls = []

    def update(updates, state, params=None, **extra):
        jax.debug.callback(lambda: calls.append(1))
        return inner.update(updates, state, params, **extra)

    return gradtx.Transformation(inner.init, update), calls


def run(tx, params, grads, *, jit: bool = True):
    """gradtx alone over ``grads`` from ``params``: the final params and state."""
    params = [jnp.asarray(p) for p in params]
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads:
        updates, state = update([jnp.asarray(x) for x in g], state, params)
        params = gradtx.apply_updates(params, updates)
    return params, state


def regression_task(n: int = 64, dim: int = 6, seed: int = 0):
    """A small least-squares problem for `gradtx.sweep` / `gradtx.fit`: loss, params, data (8 batches)."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(dim, 1)).astype(np.float32)
    x = rng.normal(size=(8, n // 8, dim)).astype(np.float32) * np.float32(3.0)
    y = x @ w_true + 0.1 * rng.normal(size=(8, n // 8, 1)).astype(np.float32)

    def loss_fn(params, batch):
        xb, yb = batch
        return jnp.mean(jnp.square(xb @ params["w"] + params["b"] - yb))

    params = {"w": jnp.zeros((dim, 1), jnp.float32), "b": jnp.zeros((1,), jnp.float32)}
    return loss_fn, params, (jnp.asarray(x), jnp.asarray(y))


def assert_sweep_equals_separate_runs(make_tx, field: str, values, steps: int = 24, rtol: float = 2e-6):
    """``gradtx.sweep`` over ``field`` (one vmapped program) ends where `gradtx.fit` of each value
    ends. Not bit for bit: a vmapped reduction (the loss's mean, a norm) may sum in another order."""
    loss_fn, params, data = regression_task()
    configs = gradtx.grid(**{field: values})
    result = gradtx.sweep(
        loss_fn=loss_fn, params=params, make_tx=make_tx, configs=configs, data=data, steps=steps
    )
    for i, value in enumerate(values):
        alone = gradtx.fit(loss_fn, params, make_tx(**{field: value}), data, steps)
        for name in params:
            np.testing.assert_allclose(
                result.params[name][i], alone.params[name], rtol=rtol, atol=1e-6, err_msg=f"{field}={value}"
            )
    return result
