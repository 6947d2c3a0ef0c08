"""Muon against Keras 3 ``Muon`` (JAX backend), step by step (see keras_steps.py), with tall, wide and
square matrices (the Muon step), an embedding and an excluded layer (routed to AdamW, as are the
vector, scalar and rank-3 leaves).

Tolerance: 2e-6 of ``|theta_old| + |theta_new|``; measured over 40 steps (30 eagerly), 3 seeds: at
most 8.5e-7 of it (on the tall matrix), 2.2e-7 on the AdamW leaves (each side eager, or each side
jitted). The
Newton-Schulz iteration itself is Keras's, operation for operation (compared directly below:
bit-identical on this CPU, eagerly and jitted, up to 64x32). The excess comes from the
momentum: gradtx's `momentum` computes ``mu*m + g`` where Keras Muon computes ``m + (g + m*(mu - 1))``,
one rounding apart, and the quintic iteration amplifies such a difference (its slope at 0 is
``a = 3.4445`` per step, for the small singular values). With Keras's operation order in the momentum
(tried, not kept: one momentum rule in the library) every leaf agrees to 9e-8.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from keras_steps import (
    assert_bfloat16_params_keep_float32_state,
    assert_same_arguments,
    assert_vmap_matches_separate_runs,
    f32,
    problem,
    run_step_by_step,
)

import gradtx
from gradtx.base import chain
from gradtx.muon import muon, orthogonalize_by_newton_schulz

SHAPES = {
    "tall/kernel": (8, 3),
    "wide/kernel": (3, 8),
    "square/kernel": (5, 5),
    "embedding/embeddings": (10, 4),
    "head/kernel": (6, 2),
    "dense/bias": (7,),
    "conv/kernel": (2, 2, 3),
    "scale": (),
}
STEPS = 40
# Eagerly every operation is compiled for every shape it meets: fewer steps and leaves keep it fast.
EAGER_STEPS = 30
EAGER_SHAPES = {p: SHAPES[p] for p in ("tall/kernel", "wide/kernel", "embedding/embeddings", "dense/bias")}
RTOL = 2e-6
# Keras's defaults rounded to float32, so that both sides use the same numbers.
DEFAULTS = {
    "adam_beta_1": f32(0.9),
    "adam_beta_2": f32(0.999),
    "epsilon": f32(1e-7),
    "weight_decay": f32(0.004),
    "adam_weight_decay": f32(0.004),
    "momentum": f32(0.95),
    "muon_a": f32(3.4445),
    "muon_b": f32(-4.7750),
    "muon_c": f32(2.0315),
    "rms_rate": f32(0.2),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_keras_step_by_step(jit):
    params, grads = problem(SHAPES, STEPS) if jit else problem(EAGER_SHAPES, EAGER_STEPS)
    kwargs = {"learning_rate": f32(0.01), "exclude_layers": ["head"], **DEFAULTS}
    run_step_by_step(keras.optimizers.Muon(**kwargs), muon(**kwargs), params, grads, jit=jit, rtol=RTOL)


def test_matches_keras_with_other_options():
    """No Nesterov, 3 iterations, other coefficients, no RMS matching, an AdamW ratio, no AdamW decay,
    embeddings not excluded (so the embedding takes the Muon step)."""
    params, grads = problem(SHAPES, STEPS, seed=1)
    kwargs = {
        **DEFAULTS,
        "learning_rate": f32(0.02),
        "momentum": f32(0.8),
        "nesterov": False,
        "ns_steps": 3,
        "muon_a": 2.0,
        "muon_b": -1.5,
        "muon_c": 0.5,
        "rms_rate": None,
        "adam_lr_ratio": 0.25,
        "weight_decay": f32(0.05),
        "adam_weight_decay": None,
        "exclude_embeddings": False,
        "exclude_layers": ["hea.", "nothing"],
    }
    run_step_by_step(keras.optimizers.Muon(**kwargs), muon(**kwargs), params, grads, jit=True, rtol=RTOL)


def test_learning_rate_schedule_matches_keras():
    params, grads = problem(SHAPES, STEPS, seed=2)
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=7, decay_rate=0.5)
    ours = lambda step: 0.02 * 0.5 ** (step / 7)  # noqa: E731
    run_step_by_step(
        keras.optimizers.Muon(learning_rate=keras_schedule, exclude_layers=["head"], **DEFAULTS),
        muon(learning_rate=ours, exclude_layers=["head"], **DEFAULTS),
        params,
        grads,
        jit=True,
        rtol=RTOL,
    )


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (4, 4), (2, 6, 3), (2, 3, 6)], ids=str)
def test_newton_schulz_is_keras_iteration(shape):
    """Tall matrices are transposed (and back); a leading axis is a batch of matrices."""
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    tx = chain(orthogonalize_by_newton_schulz(5, *(f32(v) for v in (3.4445, -4.7750, 2.0315))))
    ours, _ = tx.update({"w": jnp.asarray(x)}, tx.init({"w": jnp.asarray(x)}))
    keras_muon = keras.optimizers.Muon(muon_a=f32(3.4445), muon_b=f32(-4.7750), muon_c=f32(2.0315))
    expected = keras_muon.zeropower_via_newtonschulz5(jnp.asarray(x), 5)
    np.testing.assert_allclose(ours["w"], expected, rtol=1e-6, atol=1e-7)


def test_newton_schulz_approximately_orthogonalizes():
    """Against float64 SVD: the result is ``U S' V^T`` with the singular vectors of the input and
    ``S'`` in about [0.7, 1.2] (the quintic does not converge to 1; Jordan reports ~U(0.5, 1.5))."""
    x = np.random.default_rng(4).normal(size=(12, 5))
    tx = chain(orthogonalize_by_newton_schulz())
    out, _ = tx.update({"w": jnp.asarray(x, jnp.float32)}, tx.init({"w": jnp.zeros((12, 5))}))
    o = np.asarray(out["w"], np.float64)
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    s_prime = np.diag(u.T @ o @ vt.T)
    assert np.all((s_prime > 0.6) & (s_prime < 1.25)), s_prime
    np.testing.assert_allclose(u @ np.diag(s_prime) @ vt, o, atol=1e-5)


def test_newton_schulz_rejects_vectors():
    tx = chain(orthogonalize_by_newton_schulz())
    with pytest.raises(ValueError, match="orthogonalize_by_newton_schulz: the update at \\['b'\\] has shape"):
        tx.update({"b": jnp.ones(3)}, tx.init({"b": jnp.ones(3)}))


def _routed(params, **kwargs):
    """The paths whose state sits in each branch of muon's partition."""
    state = muon(**kwargs).init(params)
    branches = state.inner[0].inner
    held = {}
    for label, branch in branches.items():
        tree = branch.inner[0]  # the branch's first member: momentum (muon) or scale_by_adam (adamw)
        first = tree.velocity if label == "muon" else tree.mu
        held[label] = sorted(k for k, v in first.items() if v is not None)
    return held


def test_routes_flax_paths_like_keras():
    params = {
        "params/Embed_0/embedding": jnp.ones((10, 4)),
        "params/Dense_0/kernel": jnp.ones((4, 8)),
        "params/Dense_0/bias": jnp.ones(8),
        "params/Conv_0/kernel": jnp.ones((3, 3, 1, 8)),
        "params/head/kernel": jnp.ones((8, 2)),
        "params/steps": jnp.ones((2, 2), jnp.int32),
    }
    held = _routed(params, exclude_layers=["head"])
    assert held["muon"] == ["params/Dense_0/kernel"]
    assert held["adamw"] == [
        "params/Conv_0/kernel",
        "params/Dense_0/bias",
        "params/Embed_0/embedding",
        "params/head/kernel",
        "params/steps",
    ]


def test_embedding_patterns_are_case_insensitive_globs():
    params = {
        "wte/table": jnp.ones((10, 4)),
        "Token_EMBEDDING/w": jnp.ones((10, 4)),
        "mlp/w": jnp.ones((4, 4)),
    }
    assert _routed(params)["muon"] == ["mlp/w", "wte/table"]
    assert _routed(params, embedding_patterns=("wte/*", "*embedding*"))["muon"] == ["mlp/w"]
    assert _routed(params, exclude_embeddings=False)["muon"] == ["Token_EMBEDDING/w", "mlp/w", "wte/table"]


def test_one_learning_rate_and_named_branches_in_the_state():
    state = muon(0.01, adam_lr_ratio=0.1).init({"w": jnp.ones((3, 4)), "b": jnp.ones(4)})
    values = gradtx.hyperparams(state)
    assert float(values["learning_rate"]) == np.float32(0.01)
    assert float(values["adam_lr_ratio"]) == np.float32(0.1)
    assert {"muon/weight_decay", "adamw/weight_decay", "momentum", "beta_1", "rms_rate"} <= set(values)
    state = gradtx.set_hyperparams(state, learning_rate=0.5, **{"adamw/weight_decay": 0.0})
    assert float(gradtx.hyperparams(state)["adamw/weight_decay"]) == 0.0


def test_arguments_and_defaults_are_keras():
    assert_same_arguments(muon, keras.optimizers.Muon, own={"weight_decay"}, extra={"embedding_patterns"})


def test_vmap_over_learning_rate_equals_separate_runs():
    # rtol 1e-5: a batched matmul may sum in another order, and the quintic amplifies it (see above);
    # measured: 3e-6.
    shapes = {p: SHAPES[p] for p in ("tall/kernel", "wide/kernel", "dense/bias")}
    assert_vmap_matches_separate_runs(muon, [1e-3, 1e-2, 1e-1], shapes, rtol=1e-5, atol=1e-6)


def test_bfloat16_params_keep_float32_state():
    state = assert_bfloat16_params_keep_float32_state(muon(0.01))
    assert jax.tree.leaves(state.inner[0].inner["muon"].inner[0].velocity)[0].dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"exclude_layers": "head"}, "muon: exclude_layers must be a list of strings, got 'head'"),
        ({"exclude_layers": ["("]}, "muon: exclude_layers has an invalid regular expression '\\('"),
        ({"embedding_patterns": [3]}, "muon: embedding_patterns must be a list of strings"),
        ({"nesterov": 1}, "muon: nesterov must be a bool, got 1"),
        ({"exclude_embeddings": "yes"}, "muon: exclude_embeddings must be a bool"),
        ({"ns_steps": -1}, "orthogonalize_by_newton_schulz: ns_steps must be a whole number >= 0, got -1"),
        ({"ns_steps": 2.5}, "orthogonalize_by_newton_schulz: ns_steps must be an int, got 2.5"),
        ({"momentum": 1.0}, "momentum: momentum must be in \\[0, 1\\), got 1.0"),
        ({"adam_beta_1": 1.0}, "scale_by_adam: beta_1 must be in \\[0, 1\\), got 1.0"),
        ({"weight_decay": -0.1}, "add_decayed_weights: weight_decay must be >= 0, got -0.1"),
        ({"rms_rate": -0.1}, "scale_by_rms_match: rms_rate must be >= 0, got -0.1"),
        ({"adam_lr_ratio": -1.0}, "scale_by_adam_lr_ratio: adam_lr_ratio must be >= 0, got -1.0"),
        ({"muon_a": float("inf")}, "orthogonalize_by_newton_schulz: muon_a must be finite"),
        ({"learning_rate": -1.0}, "scale_by_learning_rate: learning_rate must be >= 0, got -1.0"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        muon(**kwargs)
