"""Loss scaling against Keras 3's LossScaleOptimizer (jitted stateless_apply, what model.fit runs) on
scripted gradients with inf and NaN steps; apply_if_finite's counters against the behaviour optax
documents (without its counter bug, google-deepmind/optax#1746)."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from option_steps import ADAM, counting, f32, follow_keras, problem

import gradtx

K = keras.optimizers
NON_FINITE = {3: np.nan, 4: np.inf, 9: -np.inf, 15: np.nan}  # step -> a value planted in one gradient


def _scripted(steps, scale):
    """problem()'s gradients times ``scale`` (as a scaled loss makes them), with non-finite steps."""
    params, grads = problem(steps, seed=5)
    grads = [[g * np.float32(scale) for g in step] for step in grads]
    for step, value in NON_FINITE.items():
        if step >= steps:
            continue
        grads[step][1] = grads[step][1].copy()
        grads[step][1][2] = value
    return params, grads


def _adam(clip_and_ema: bool):
    if not clip_and_ema:
        return K.Adam(f32(0.01), **ADAM), gradtx.adam(f32(0.01), **ADAM)
    keras_opt = K.Adam(f32(0.01), **ADAM, global_clipnorm=50.0, use_ema=True)
    tx = gradtx.chain(
        gradtx.clip_by_global_norm(50.0), gradtx.adam(f32(0.01), **ADAM), gradtx.ema_of_params()
    )
    return keras_opt, tx


@pytest.mark.parametrize("clip_and_ema", [False, True], ids=["adam", "clip_adam_ema"])
def test_matches_keras_loss_scale_optimizer(clip_and_ema):
    params, grads = _scripted(24, 2.0**6)
    keras_inner, inner = _adam(clip_and_ema)
    keras_opt = K.LossScaleOptimizer(keras_inner, initial_scale=2.0**6, dynamic_growth_steps=3)
    tx = gradtx.loss_scale_optimizer(inner, initial_scale=2.0**6, dynamic_growth_steps=3)
    scales = []

    def same_scale(step, state, keras_opt):
        assert float(gradtx.current_loss_scale(state)) == float(keras_opt.dynamic_scale)
        assert int(state.growth_count) == int(keras_opt.step_counter)
        assert int(gradtx.step_count(state.inner)) == int(keras_opt.iterations)  # skipped steps not counted
        scales.append(float(keras_opt.dynamic_scale))

    follow_keras(keras_opt, tx, params, grads, jit=True, on_step=same_scale, moving_steps=16)
    # The script exercised both directions: halvings at the non-finite steps, doublings after 3 finite.
    assert min(np.diff(np.log2(scales))) == -1 and max(np.diff(np.log2(scales))) == 1


def test_matches_keras_eagerly():
    params, grads = _scripted(6, 2.0**3)
    keras_opt = K.LossScaleOptimizer(
        K.SGD(f32(0.01), momentum=f32(0.5)), initial_scale=8.0, dynamic_growth_steps=2
    )
    tx = gradtx.loss_scale_optimizer(gradtx.sgd(f32(0.01), momentum=f32(0.5)), 8.0, dynamic_growth_steps=2)
    follow_keras(keras_opt, tx, params, grads, jit=False, moving_steps=3)


def test_float16_gradients_are_unscaled_in_float32():
    """2**-20 is below float16's smallest subnormal (2**-24) only after unscaling in float16."""
    tx = gradtx.loss_scale_optimizer(gradtx.sgd(1.0), initial_scale=2.0**15)
    params = {"w": jnp.zeros(2, jnp.float16)}
    u, _ = tx.update({"w": jnp.full(2, 2.0**-20 * 2**15, jnp.float16)}, tx.init(params), params)
    assert u["w"].dtype == jnp.float32
    np.testing.assert_array_equal(u["w"], np.float32([-(2.0**-20)] * 2))


def test_current_loss_scale_reads_a_fixed_loss_scale_factor():
    state = gradtx.chain(gradtx.unscale_gradients(128.0), gradtx.adam(0.1)).init({"w": jnp.ones(2)})
    assert float(gradtx.current_loss_scale(state)) == 128.0
    with pytest.raises(ValueError, match="current_loss_scale: the state has no loss scale"):
        gradtx.current_loss_scale(gradtx.adam(0.1).init({"w": jnp.ones(2)}))


def test_unscale_gradients_divides_as_keras_loss_scale_factor():
    params, grads = problem(12)
    follow_keras(
        K.Adam(f32(0.01), **ADAM, loss_scale_factor=1000.0),
        gradtx.chain(gradtx.unscale_gradients(1000.0), gradtx.adam(f32(0.01), **ADAM)),
        params,
        grads,
        jit=True,
    )


# finite?, then what apply_if_finite(max_consecutive_errors=2) must do: apply?, the counters after.
SCRIPT = [  # (finite, applied, notfinite_count, total_notfinite)
    (True, True, 0, 0),
    (False, False, 1, 1),
    (False, False, 2, 2),
    (False, True, 0, 3),  # the third in a row: gives up, applies it, and starts counting again
    (False, False, 1, 4),  # optax would apply this one too (its count is still above the limit)
    (False, False, 2, 5),
    (True, True, 0, 5),
    (False, False, 1, 6),
    (True, True, 0, 6),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_apply_if_finite_counters(jit):
    inner, calls = counting(gradtx.sgd(1.0))
    tx = gradtx.apply_if_finite(inner, max_consecutive_errors=2)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for i, (finite, applied, count, total) in enumerate(SCRIPT):
        g = {"w": jnp.array([1.0, 1.0 if finite else np.nan])}
        before = state.inner
        u, state = update(g, state, params)
        jax.effects_barrier()
        assert bool(state.last_finite) == finite, i
        assert int(state.notfinite_count) == count, i
        assert int(state.total_notfinite) == total, i
        if applied:
            assert float(u["w"][0]) == -1.0, i
            assert int(gradtx.step_count(state.inner)) == int(gradtx.step_count(before)) + 1, i
        else:
            np.testing.assert_array_equal(u["w"], np.zeros(2))
            assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.inner, before))
    assert len(calls) == sum(applied for _, applied, _, _ in SCRIPT)  # skipped steps never ran inner


def test_apply_if_finite_skipped_steps_do_not_advance_bias_corrections():
    """Adam wrapped in apply_if_finite over gradients with NaN steps equals Adam over the finite ones."""
    params, grads = problem(12, seed=6)
    bad = {2, 3, 7}
    noisy = [[np.full_like(g, np.nan) for g in step] if i in bad else step for i, step in enumerate(grads)]
    tx = gradtx.apply_if_finite(gradtx.adam(0.01), max_consecutive_errors=5)
    p_ours = [jnp.asarray(p) for p in params]
    state = tx.init(p_ours)
    for g in noisy:
        u, state = jax.jit(tx.update)([jnp.asarray(x) for x in g], state, p_ours)
        p_ours = gradtx.apply_updates(p_ours, u)
    reference = gradtx.adam(0.01)
    p_ref = [jnp.asarray(p) for p in params]
    s = reference.init(p_ref)
    for i, g in enumerate(grads):
        if i not in bad:
            u, s = jax.jit(reference.update)([jnp.asarray(x) for x in g], s, p_ref)
            p_ref = gradtx.apply_updates(p_ref, u)
    for a, b in zip(p_ours, p_ref, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: gradtx.apply_if_finite(gradtx.sgd(0.1), 0),
            "max_consecutive_errors must be an integer >= 1, got 0",
        ),
        (lambda: gradtx.loss_scale_optimizer(gradtx.sgd(0.1), 0.0), "initial_scale must be > 0, got 0.0"),
        (
            lambda: gradtx.loss_scale_optimizer(gradtx.sgd(0.1), dynamic_growth_steps=0.5),
            "dynamic_growth_steps must be a whole number >= 1, got 0.5",
        ),
        (
            lambda: gradtx.unscale_gradients(-2.0),
            "unscale_gradients: loss_scale_factor must be > 0, got -2.0",
        ),
    ],
)
def test_rejects_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "inner, message",
    [
        (gradtx.sgd(0.1, loss_scale_factor=8.0), "loss_scale_factor=8.0 too"),
        (gradtx.chain(gradtx.unscale_gradients(4.0), gradtx.adam(1e-3)), "loss_scale_factor=4.0 too"),
        (gradtx.loss_scale_optimizer(gradtx.adam(1e-3)), "is a loss_scale_optimizer already"),
    ],
)
def test_an_inner_optimizer_that_unscales_too_is_refused(inner, message):
    # The loss is multiplied by current_loss_scale once; an inner unscaling would divide the gradients
    # a second time (sgd with loss_scale_factor=8 inside: every step 8x too small, silently).
    with pytest.raises(ValueError, match=message):
        gradtx.loss_scale_optimizer(inner).init({"w": jnp.ones(3)})
