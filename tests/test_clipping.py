"""Clipping against Keras 3's clipvalue / clipnorm / global_clipnorm (step by step, see option_steps.py)
and against float64 NumPy re-derivations of the formulas."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from option_steps import f32, follow_keras, problem, regression_task

import gradtx

# Thresholds chosen (for problem()'s gradients, five decades) so that some steps clip and some do not.
CLIPS = {
    "clipvalue": (gradtx.clip_by_value, 0.5),
    "clipnorm": (gradtx.clip_by_norm, 3.0),
    "global_clipnorm": (gradtx.clip_by_global_norm, 100.0),
}


def _norms64(grads):
    return [np.sqrt(np.sum(np.square(g.astype(np.float64)))) for g in grads]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(CLIPS))
def test_clip_before_sgd_matches_keras(name, jit):
    primitive, c = CLIPS[name]
    params, grads = problem(30 if jit else 10)  # eager Keras is slow; the jitted run takes 30 steps
    # The check can fail: some steps clip, others leave the gradient as it is.
    if name == "clipvalue":
        clipped = [np.any(np.abs(g) > c) for step in grads for g in step]
    elif name == "clipnorm":
        clipped = [n > c for step in grads for n in _norms64(step)]
    else:
        clipped = [np.sqrt(sum(n**2 for n in _norms64(step))) > c for step in grads]
    assert any(clipped) and not all(clipped)
    tx = gradtx.chain(primitive(c), gradtx.sgd(f32(0.01), momentum=f32(0.5)))
    follow_keras(keras.optimizers.SGD(f32(0.01), momentum=f32(0.5), **{name: c}), tx, params, grads, jit=jit)


def test_clip_by_norm_rescales_each_leaf_to_its_own_norm():
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4]), "zero": jnp.zeros(3)}
    u, _ = gradtx.clip_by_norm(1.0).update(g, gradtx.clip_by_norm(1.0).init(g))
    np.testing.assert_allclose(u["a"], [0.6, 0.8], rtol=1e-7)  # norm 5 -> 1
    np.testing.assert_array_equal(u["b"], g["b"])  # norm 0.5 <= 1: (g * 1) / 1
    np.testing.assert_array_equal(u["zero"], np.zeros(3))


def test_clip_by_global_norm_scales_all_leaves_by_one_factor():
    rng = np.random.default_rng(1)
    g = {k: rng.normal(size=s).astype(np.float32) * 10 for k, s in [("w", (4, 5)), ("b", (5,)), ("s", ())]}
    norm = np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in g.values()))
    c = 2.0
    tx = gradtx.clip_by_global_norm(c)
    u, _ = jax.jit(tx.update)(g, tx.init(g))
    for k in g:
        # float32 against float64: the norm and the product each round once (a few ulp).
        np.testing.assert_allclose(u[k], g[k] * (c / norm), rtol=2e-6, err_msg=k)
    total = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in u.values()))
    np.testing.assert_allclose(total, c, rtol=2e-6)


def test_clip_by_global_norm_below_the_threshold_keeps_the_gradient():
    g = {"w": jnp.array([0.3, -0.4]), "b": jnp.array([1e-3])}
    tx = gradtx.clip_by_global_norm(1.0)
    u, _ = tx.update(g, tx.init(g))
    for k in g:
        np.testing.assert_array_equal(u[k], g[k])  # the scale is exactly 1 * min(1/N, 1/1) = 1


def test_clip_by_global_norm_of_an_infinite_gradient_is_nan_as_in_keras():
    g = [jnp.array([jnp.inf, 1.0]), jnp.array([2.0])]
    tx = gradtx.clip_by_global_norm(1.0)
    u, _ = tx.update(g, tx.init(g))
    keras_out = keras.src.optimizers.base_optimizer.clip_by_global_norm(g, 1.0)
    for ours, theirs in zip(u, keras_out, strict=True):
        assert np.all(np.isnan(ours)) and np.all(np.isnan(np.asarray(theirs)))


def test_clips_keep_low_precision_dtypes_and_norm_in_float32():
    # 300 entries of 100 in float16: the sum of squares (3e6) overflows float16 (max 65504).
    g = {"w": jnp.full((300,), 100.0, jnp.float16), "b": jnp.full((3,), -2.0, jnp.bfloat16)}
    for primitive, c in CLIPS.values():
        tx = primitive(c)
        u, _ = tx.update(g, tx.init(g))
        assert {k: v.dtype for k, v in u.items()} == {k: v.dtype for k, v in g.items()}
        assert all(np.all(np.isfinite(np.asarray(v, np.float32))) for v in u.values())
    u, _ = gradtx.clip_by_norm(1.0).update(g, gradtx.clip_by_norm(1.0).init(g))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(u["w"], np.float64)), 1.0, rtol=2e-3)  # fp16 ulp


def test_integer_and_none_leaves_pass_through():
    g = {"w": jnp.array([30.0, 40.0]), "count": jnp.int32(7), "skip": None}
    for primitive, c in CLIPS.values():
        u, _ = primitive(c).update(g, primitive(c).init(g))
        assert u["count"] == 7 and u["skip"] is None


@pytest.mark.parametrize("name", list(CLIPS))
def test_threshold_is_a_hyperparameter_set_without_recompiling(name):
    primitive, c = CLIPS[name]
    g = {"w": jnp.array([30.0, -40.0, 5.0])}
    tx = primitive(c)
    state = tx.init(g)
    assert float(gradtx.hyperparams(state)[name]) == c
    step = jax.jit(tx.update)
    step(g, state)
    changed = gradtx.set_hyperparams(state, **{name: 0.25})
    u, _ = step(g, changed)
    assert step._cache_size() == 1  # the new threshold is data, not a new program
    expected, _ = primitive(0.25).update(g, primitive(0.25).init(g))
    np.testing.assert_array_equal(u["w"], expected["w"])


@pytest.mark.parametrize("name", list(CLIPS))
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_rejects_a_threshold_that_does_not_clip(name, value):
    primitive, _ = CLIPS[name]
    with pytest.raises(ValueError, match=f"{primitive.__name__}: {name} must be > 0, got {value}"):
        primitive(value)


def test_sweep_over_the_three_thresholds_equals_separate_runs():
    """clipvalue, clipnorm and global_clipnorm (chained, as primitives may be) vary across the
    configurations of one vmapped `gradtx.sweep`; each configuration ends where its own `fit` ends."""
    loss_fn, params, data = regression_task()
    configs = {"clipvalue": [0.2, 1.0, 5.0], "clipnorm": [5.0, 0.5, 2.0], "global_clipnorm": [1.0, 3.0, 0.3]}

    def make_tx(clipvalue, clipnorm, global_clipnorm):
        clips = [gradtx.clip_by_value(clipvalue), gradtx.clip_by_norm(clipnorm)]
        return gradtx.chain(*clips, gradtx.clip_by_global_norm(global_clipnorm), gradtx.adam(0.05))

    result = gradtx.sweep(
        loss_fn=loss_fn, params=params, make_tx=make_tx, configs=configs, data=data, steps=24
    )
    for name, values in configs.items():
        np.testing.assert_array_equal(gradtx.hyperparams(result.opt_state)[name], np.float32(values))
    for i in range(3):
        alone = gradtx.fit(loss_fn, params, make_tx(**{k: v[i] for k, v in configs.items()}), data, 24)
        for name in params:
            # Not bit for bit: the vmapped loss's mean and the norms may sum in another order.
            np.testing.assert_allclose(result.params[name][i], alone.params[name], rtol=2e-6, atol=1e-6)
