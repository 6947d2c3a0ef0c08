"""Gradient accumulation against Keras 3's gradient_accumulation_steps (step by step, see
option_steps.py), its clocks, and the promise that a micro-step that does not update does not run the
inner optimizer, also under vmap."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from option_steps import ADAM, counting, f32, follow_keras, problem, run

import gradtx

K = keras.optimizers


def _schedules():
    keras_schedule = K.schedules.ExponentialDecay(f32(0.02), decay_steps=7, decay_rate=0.5)
    return keras_schedule, lambda step: f32(0.02) * 0.5 ** (step / 7)


CASES = {  # name -> (Keras class, gradtx factory, shared arguments)
    "adam": (K.Adam, gradtx.adam, ADAM),
    "sgd_nesterov": (K.SGD, gradtx.sgd, {"momentum": f32(0.9), "nesterov": True}),
    "rmsprop_centered": (
        K.RMSprop,
        gradtx.rmsprop,
        {"rho": f32(0.9), "centered": True, "epsilon": f32(1e-7)},
    ),
    "nadam": (K.Nadam, gradtx.nadam, ADAM),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_keras_with_a_schedule(name):
    """Bias corrections count real updates, the schedule counts micro-steps (Keras's two clocks)."""
    keras_class, factory, kwargs = CASES[name]
    keras_schedule, ours = _schedules()
    params, grads = problem(30)
    follow_keras(
        keras_class(learning_rate=keras_schedule, gradient_accumulation_steps=3, **kwargs),
        gradtx.accumulate_gradients(factory(learning_rate=ours, **kwargs), 3),
        params,
        grads,
        jit=True,
        moving_steps=5,  # 10 real updates in 30 micro-steps
    )


def test_matches_keras_eagerly():
    params, grads = problem(4)  # eager lax.conds compile at every call: few steps
    follow_keras(
        K.Adam(f32(0.01), gradient_accumulation_steps=2, **ADAM),
        gradtx.accumulate_gradients(gradtx.adam(f32(0.01), **ADAM), 2),
        params,
        grads,
        jit=False,
        moving_steps=1,  # 2 real updates in 4 micro-steps
    )


def test_primitive_equals_the_mean_gradient_given_to_the_optimizer_every_k_steps():
    """accumulate_gradients(adam, 4) over 4k micro-batches == adam over the k means (a float64-free
    identity: the same float32 operations on the same means)."""
    params, grads = problem(16, seed=2)
    ours, state = run(gradtx.accumulate_gradients(gradtx.adam(0.01), 4), params, grads)
    means = [
        [((((a + b) + c) + d) / 4) for a, b, c, d in zip(*grads[i : i + 4], strict=True)]
        for i in range(0, 16, 4)
    ]
    reference, _ = run(gradtx.adam(0.01), params, means)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(gradtx.step_count(state.inner)) == 4


def test_updates_are_zero_between_updates():
    tx = gradtx.accumulate_gradients(gradtx.sgd(0.1), 3)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for micro in range(7):
        u, state = tx.update({"w": jnp.full(2, float(micro))}, state, params)
        if (micro + 1) % 3:
            np.testing.assert_array_equal(u["w"], np.zeros(2))
        else:
            np.testing.assert_allclose(u["w"], -0.1 * np.full(2, micro - 1.0), rtol=1e-6)  # mean of 3


def test_a_micro_step_that_does_not_update_does_not_run_the_optimizer():
    inner, calls = counting(gradtx.adam(0.01))
    tx = gradtx.accumulate_gradients(inner, 4)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(12):
        _, state = step({"w": jnp.ones(3)}, state, params)
    jax.effects_barrier()
    assert len(calls) == 3


def _vmapped(tx, states, params, grads, steps):
    step = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, None)))
    for _ in range(steps):
        _, states = step(grads, states, params)
    jax.effects_barrier()
    return states


def test_under_vmap_a_shared_micro_step_still_skips_the_optimizer():
    """A sweep's configurations share the micro-step: one unbatched cond decides for all of them."""
    inner, calls = counting(gradtx.adam(0.01))
    tx = gradtx.accumulate_gradients(inner, 4)
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
    states = jax.vmap(lambda lr: gradtx.accumulate_gradients(gradtx.adam(lr), 4).init(params))(
        jnp.array([1e-3, 1e-2, 1e-1])
    )
    _vmapped(tx, states, params, grads, 12)
    assert len(calls) == 3  # a select would run it on all 12 micro-steps (an unbatched callback: once)


def test_under_vmap_an_unbatched_step_drives_every_configuration():
    """The micro-step passed unbatched (``step=``): the lanes equal their separate runs."""
    params, grads = problem(8, seed=7)
    rates = [1e-3, 1e-2]
    make = lambda lr: gradtx.accumulate_gradients(gradtx.adam(lr), 2)  # noqa: E731
    p0 = [jnp.asarray(p) for p in params]
    states = jax.vmap(lambda lr: make(lr).init(p0))(jnp.asarray(rates))
    lanes = jax.tree.map(lambda x: jnp.stack([x, x]), p0)
    tx = make(rates[0])
    step = jax.jit(jax.vmap(lambda g, s, p, n: tx.update(g, s, p, step=n), in_axes=(None, 0, 0, None)))
    for n, g in enumerate(grads):
        u, states = step([jnp.asarray(x) for x in g], states, lanes, n)
        lanes = gradtx.apply_updates(lanes, u)
    for i, lr in enumerate(rates):
        alone, _ = run(make(lr), params, grads)
        for a, b in zip(alone, lanes, strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-6, atol=1e-7)


def test_under_vmap_states_at_different_micro_steps_each_follow_their_own_clock():
    """The fallback (a select that runs the optimizer every micro-step) is correct: each lane equals its
    own run."""
    params, grads = problem(10, seed=4)
    tx = gradtx.accumulate_gradients(gradtx.adam(0.01), 3)
    p0 = [jnp.asarray(p) for p in params]
    # Lane i starts after i micro-steps of the same gradients.
    starts = []
    for lag in range(3):
        state = tx.init(p0)
        for g in grads[:lag]:
            _, state = jax.jit(tx.update)([jnp.asarray(x) for x in g], state, p0)
        starts.append(state)
    states = jax.tree.map(lambda *xs: jnp.stack(xs), *starts)
    assert len(set(np.asarray(states.micro_step).tolist())) == 3
    step = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, 0)))
    alone = jax.jit(tx.update)
    lanes = jax.tree.map(lambda x: jnp.stack([x] * 3), p0)
    separate = [(list(p0), s) for s in starts]
    for g in grads:
        g = [jnp.asarray(x) for x in g]
        u, states = step(g, states, lanes)
        lanes = gradtx.apply_updates(lanes, u)
        for i, (p, s) in enumerate(separate):
            u_i, s = alone(g, s, p)
            separate[i] = (gradtx.apply_updates(p, u_i), s)
    for i, (p, _) in enumerate(separate):
        for a, b in zip(p, lanes, strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-6, atol=1e-7)


def test_inner_counts_real_updates_and_schedules_follow_micro_steps():
    tx = gradtx.accumulate_gradients(gradtx.sgd(lambda step: 1.0 + step), 4)
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    for _ in range(8):
        _, state = tx.update({"w": jnp.ones(1)}, state, params)
    assert int(state.micro_step) == 8
    assert int(gradtx.step_count(state.inner)) == 2
    # The learning rate in effect at the last update (micro-step 7) is the schedule's value at 7.
    assert float(gradtx.hyperparams(state)["learning_rate"]) == 8.0


def test_integer_leaves_pass_through():
    tx = gradtx.accumulate_gradients(gradtx.adam(0.1), 2)
    params = {"w": jnp.ones(2), "count": jnp.int32(3)}
    state = tx.init(params)
    zero = np.zeros((), jax.dtypes.float0)
    for _ in range(4):
        u, state = jax.jit(tx.update)({"w": jnp.ones(2), "count": zero}, state, params)
        assert u["count"].dtype == jax.dtypes.float0


def test_bfloat16_gradients_accumulate_in_float32():
    tx = gradtx.accumulate_gradients(gradtx.sgd(1.0), 4)
    params = {"w": jnp.zeros(1, jnp.bfloat16)}
    state = tx.init(params)
    for g in [256.0, 1.0, 1.0]:
        u, state = tx.update({"w": jnp.full(1, g, jnp.bfloat16)}, state, params)
    # 258 is not a bfloat16 (its neighbours are 256 and 260); in bfloat16 each + 1 would be lost.
    assert state.accumulated["w"].dtype == jnp.float32 and float(state.accumulated["w"][0]) == 258.0
    u, state = tx.update({"w": jnp.full(1, 1.0, jnp.bfloat16)}, state, params)
    assert u["w"].dtype == jnp.bfloat16
    assert float(u["w"][0]) == -float(jnp.bfloat16(259.0 / 4))


@pytest.mark.parametrize("steps", [1, 0, -2, 2.5, True, None])
def test_rejects_fewer_than_two_steps(steps):
    with pytest.raises(
        ValueError, match=f"accumulate_gradients: steps must be an integer >= 2, got {steps!r}"
    ):
        gradtx.accumulate_gradients(gradtx.sgd(0.1), steps)
