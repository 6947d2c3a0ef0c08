"""Shampoo against a float64 NumPy re-derivation of the published algorithm (Gupta et al. 2018: one
statistic per axis, roots ``-1/(2k)``; Shi et al. 2023: EMA statistics with bias correction, ``eps`` with
the smallest-eigenvalue guard, roots at ``t = start`` then every ``precondition_frequency`` steps,
per-block grafting from Adam; Anil et al. 2020: momentum on the preconditioned gradient, blocking).

The reference below is written from those formulas, block by block with explicit index ranges (not with
gradtx's layout helpers), Adam as Keras computes it, all in float64.

Tolerance. The statistics are well conditioned here (Gaussian gradients, more gradients than rows by the
first refresh), so the float32 eigendecompositions agree with float64 to ~1e-6 of the roots; the grafted
step has Adam's length. Largest difference measured over 30 steps: 3.5e-6 of a leaf's update norm (or of
the learning rate, for a scalar whose momentum cancels). The check is 3e-5 of that (9x).

Speed: each configuration is compiled once (a jitted ``lax.scan`` over the steps, hyperparameters
traced), and the tests share them.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.preconditioning import inverse_root, join_blocks, merged_shape, split_blocks
from gradtx.shampoo import graft, precondition_by_shampoo, shampoo

RTOL = 3e-5

# --- the float64 reference ------------------------------------------------------------------------------


def blocks_of(shape, size):
    """Index ranges of every block: tuples of slices, one per axis."""
    return list(itertools.product(*([slice(a, min(a + size, d)) for a in range(0, d, size)] for d in shape)))


def unfold(x, axis):
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def root64(s, eps, p):
    w, v = np.linalg.eigh(s + eps * np.eye(len(s)))
    if w.min() < eps:
        w = w + (eps - w.min())
    # float32 resolves no eigenvalue below n * ulp(1) * lambda_max: below it, the statistic is singular
    w = np.maximum(w, len(s) * 2.0**-23 * w.max())
    return (v * w ** (-1.0 / p)) @ v.T


def reference_shampoo(grads, lr, b1=0.9, b2=0.999, eps=1e-12, freq=10, start=None, block=1024,
                      gb2=0.999, geps=1e-7, p1d=False):  # fmt: skip
    """Updates of Shampoo with Adam grafting for a list of gradient dicts, in float64."""
    start = freq if start is None else start
    names = list(grads[0])
    st = {n: {} for n in names}  # per leaf, per block: statistics, roots, momentum of the direction
    adam = {n: [np.zeros(np.shape(grads[0][n])), np.zeros(np.shape(grads[0][n]))] for n in names}
    out = []
    for t, g in enumerate(grads, 1):
        step = {}
        for n in names:
            x = np.asarray(g[n], np.float64)
            m, v = adam[n]
            m += (1 - b1) * (x - m)
            v += (1 - gb2) * (x * x - v)
            a = m * np.sqrt(1 - gb2**t) / (1 - b1**t) / (np.sqrt(v) + geps)
            if x.ndim < 2 and not (p1d and x.ndim == 1):
                step[n] = -lr * a
                continue
            u = np.zeros_like(x)
            for idx in blocks_of(x.shape, block):
                gb, k = x[idx], x.ndim
                s = st[n].setdefault(
                    str(idx), {"S": [np.zeros((d, d)) for d in gb.shape], "P": None, "mom": 0}
                )
                w = 1 - b2 if b2 < 1 else 1.0
                s["S"] = [b2 * S + w * unfold(gb, i) @ unfold(gb, i).T for i, S in enumerate(s["S"])]
                if t == start or (t > start and t % freq == 0):
                    corr = 1 - b2**t if b2 < 1 else 1.0
                    s["P"] = [root64(S / corr, eps, 2 * k) for S in s["S"]]
                d = np.zeros_like(gb)
                if s["P"] is not None:
                    d = gb
                    for i, P in enumerate(s["P"]):
                        d = np.moveaxis(np.tensordot(P, d, axes=([1], [i])), 0, i)
                s["mom"] = b1 * s["mom"] + d
                dn = np.linalg.norm(s["mom"])
                u[idx] = s["mom"] * np.linalg.norm(a[idx]) / dn if dn > 0 else a[idx]
            step[n] = -lr * u
        out.append(step)
    return out


# --- compiled trajectories, shared by the tests -----------------------------------------------------------


@functools.cache
def trajectory(make):
    """``(hyper, grads, params) -> (updates per step, states per step)`` of ``make(**hyper)``, compiled once
    per ``make``: the hyperparameters are traced, so other values reuse the program."""

    def run(hyper, grads, params):
        tx = make(**hyper)

        def step(state, g):
            u, state = tx.update(g, state, params)
            return state, (u, state)

        return jax.lax.scan(step, tx.init(params), grads)[1]

    return jax.jit(run)


def stacked(grads):
    return {n: jnp.stack([jnp.asarray(g[n]) for g in grads]) for n in grads[0]}


def zeros_like_grads(grads):
    return {n: jnp.zeros(np.shape(x), jnp.float32) for n, x in grads[0].items()}


def ours(make, hyper, grads):
    us, states = trajectory(make)(hyper, stacked(grads), zeros_like_grads(grads))
    return [{n: np.asarray(us[n][t]) for n in us} for t in range(len(grads))], states


def gaussian_grads(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()} for _ in range(steps)]


def assert_close(mine, reference, lr, rtol=RTOL):
    for t, (a, b) in enumerate(zip(mine, reference, strict=True)):
        for n in b:
            err = np.linalg.norm(np.asarray(a[n], np.float64) - b[n]) / max(np.linalg.norm(b[n]), lr)
            assert err <= rtol, f"step {t + 1}, {n}: relative error {err:.3g}"


def blocked(learning_rate, beta_1, beta_2, epsilon):
    # roots first at t = 7, then at 10, 15, 20, 25, 30; blocks of 4; 1-D leaves preconditioned too
    return shampoo(learning_rate, beta_1, beta_2, epsilon, precondition_frequency=5,
                   start_preconditioning_step=7, block_size=4, precondition_1d=True)  # fmt: skip


def plain(learning_rate):
    return shampoo(learning_rate, precondition_frequency=8)


def adam(learning_rate):
    return gradtx.adam(learning_rate)


# blocked (7, 6): blocks (4, 4), (4, 2), (3, 4), (3, 2); tensor: order 3, roots -1/6; vector (9,) with
# precondition_1d: blocks 4, 4, 1, roots -1/2; scalar: Adam.
SHAPES = {"blocked": (7, 6), "tensor": (2, 3, 4), "vector": (9,), "scalar": ()}
STEPS = 30
HYPER = {"learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.9, "epsilon": 1e-12}


@functools.cache
def blocked_run():
    grads = gaussian_grads(SHAPES, STEPS)
    return grads, *ours(blocked, HYPER, grads)


# --- the algorithm --------------------------------------------------------------------------------------


def test_matches_float64_reference_on_blocked_matrices_tensors_and_vectors_over_six_refreshes():
    grads, updates, _ = blocked_run()
    reference = reference_shampoo(grads, 0.01, b2=0.9, freq=5, start=7, block=4, p1d=True)
    assert_close(updates, reference, 0.01)


def test_matches_reference_with_adagrad_statistics_other_betas_and_epsilon():
    grads = gaussian_grads(SHAPES, STEPS, seed=1)
    hyper = {"learning_rate": 0.02, "beta_1": 0.5, "beta_2": 1.0, "epsilon": 1e-6}
    updates, _ = ours(blocked, hyper, grads)
    reference = reference_shampoo(grads, 0.02, b1=0.5, b2=1.0, eps=1e-6, freq=5, start=7, block=4, p1d=True)
    assert_close(updates, reference, 0.02)


def test_roots_are_computed_at_the_start_step_then_every_precondition_frequency_steps():
    _, _, states = blocked_run()
    roots = jax.tree.leaves(states.inner[0].direction.inner[0].roots)
    changed = [
        t + 1
        for t in range(STEPS)
        if any(not np.array_equal(r[t], r[t - 1] if t else 0 * r[t]) for r in roots)
    ]
    assert changed == [7, 10, 15, 20, 25, 30]


def test_every_block_has_the_length_of_adams_step():
    grads, updates, _ = blocked_run()
    adams, _ = ours(adam, {"learning_rate": 0.01}, grads)
    for u, a in zip(updates[7:], adams[7:], strict=True):
        for idx in blocks_of(SHAPES["blocked"], 4):
            np.testing.assert_allclose(
                np.linalg.norm(u["blocked"][idx]), np.linalg.norm(a["blocked"][idx]), rtol=1e-5
            )
    u, a = updates[-1]["blocked"], adams[-1]["blocked"]
    assert np.abs(u / np.linalg.norm(u) - a / np.linalg.norm(a)).max() > 0.05  # yet another direction


SMALL = {"matrix": (4, 3), "vector": (5,)}


def test_before_the_first_roots_and_on_vectors_it_is_adam():
    grads = gaussian_grads(SMALL, 20, seed=3)
    mine, _ = ours(plain, {"learning_rate": 0.01}, grads)
    adams, _ = ours(adam, {"learning_rate": 0.01}, grads)
    for t in range(7):  # t = 1..7, before the first roots at t = 8
        np.testing.assert_allclose(mine[t]["matrix"], adams[t]["matrix"], rtol=1e-6)
    for t in range(20):
        np.testing.assert_allclose(mine[t]["vector"], adams[t]["vector"], rtol=1e-6)
    assert not np.allclose(mine[9]["matrix"], adams[9]["matrix"], rtol=1e-2)


def test_vmap_over_learning_rates_equals_separate_runs():
    grads = gaussian_grads(SMALL, 20, seed=4)  # roots at t = 8 and 16
    rates = jnp.asarray([1e-3, 1e-2, 1e-1])
    run = jax.jit(jax.vmap(trajectory(plain), in_axes=({"learning_rate": 0}, None, None)))
    lanes, _ = run({"learning_rate": rates}, stacked(grads), zeros_like_grads(grads))
    for i, lr in enumerate(rates):
        alone, _ = ours(plain, {"learning_rate": lr}, grads)
        for n in SMALL:
            np.testing.assert_allclose(lanes[n][i], np.stack([u[n] for u in alone]), rtol=1e-5, atol=1e-9)


# --- numerics -------------------------------------------------------------------------------------------


def test_zero_gradients_give_zero_steps_without_nan():
    zeros = [{n: np.zeros(s, np.float32) for n, s in SHAPES.items()}] * STEPS
    updates, states = ours(blocked, HYPER, zeros)
    assert all(np.array_equal(u[n], np.zeros(SHAPES[n])) for u in updates for n in SHAPES)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(states))


def test_rank_deficient_and_zero_statistics_stay_finite_and_descend():
    # A (6, 4) weight fed one sample per step: L and R are singular at every refresh; the first six
    # gradients are zero (as behind a zero-initialized layer), so the first refresh sees a zero statistic.
    # Refreshed every step, each gradient lies in its statistics' range and Shampoo descends. (Refreshed
    # rarely with epsilon=1e-12 it stays finite but may drift: see precondition_by_shampoo's note.)
    rng = np.random.default_rng(6)
    target = rng.normal(size=(6, 4)).astype(np.float32)
    xs = rng.normal(size=(60, 4)).astype(np.float32)
    gates = (np.arange(60) >= 6).astype(np.float32)

    def loss(params, batch):
        x, gate = batch
        return 0.5 * jnp.sum(((gate * params["w"] - target) @ x) ** 2)

    result = gradtx.fit(
        loss, {"w": jnp.zeros((6, 4))}, shampoo(0.1, precondition_frequency=1), (xs, gates), 60
    )
    assert np.isfinite(np.asarray(result.history.loss)).all()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(result.opt_state))
    final = 0.5 * np.sum(((np.asarray(result.params["w"]) - target) @ xs.T) ** 2)
    assert final < 0.02 * 0.5 * np.sum((target @ xs.T) ** 2)


def rank_deficient(learning_rate):
    return shampoo(learning_rate, precondition_frequency=3)


def test_rank_deficient_statistics_give_the_same_steps_jitted_eager_and_swept():
    # A (20, 3) weight refreshed every 3 steps: at each refresh L (20 x 20) has rank <= 9, and the new
    # gradients reach into its null space. float32's eigh returns that null space's eigenvalues as
    # rounding noise (~1e-7 * lambda_max, far above eps = 1e-12) that differs between jit, eager and
    # vmap; amplified by eps^(-1/4), it chose the direction (jit vs eager: cosine 0.24). With the noise
    # floored the steps agree with each other and with the float64 reference (same tolerance as above).
    grads = gaussian_grads({"w": (20, 3)}, 12, seed=9)
    reference = reference_shampoo(grads, 0.01, freq=3)
    swept, _ = jax.jit(jax.vmap(trajectory(rank_deficient), in_axes=({"learning_rate": 0}, None, None)))(
        {"learning_rate": jnp.asarray([0.01, 0.02])}, stacked(grads), zeros_like_grads(grads)
    )
    assert_close([{"w": np.asarray(swept["w"][0, t])} for t in range(12)], reference, 0.01)
    assert_close(ours(rank_deficient, {"learning_rate": 0.01}, grads)[0], reference, 0.01)
    tx, params = rank_deficient(0.01), {"w": jnp.zeros((20, 3))}
    state, eager = tx.init(params), []
    for g in grads:
        u, state = tx.update({"w": jnp.asarray(g["w"])}, state, params)
        eager.append({"w": np.asarray(u["w"])})
    assert_close(eager, reference, 0.01)


@jax.jit
def _roots_of_a_failed_and_a_good_statistic(previous):
    bad = jnp.full((3, 3), jnp.nan)
    alone = inverse_root(bad, previous, 4.0, 1e-12)
    both = jax.vmap(inverse_root, in_axes=(0, 0, None, None))(
        jnp.stack([bad, 16 * jnp.eye(3)]), jnp.stack([previous] * 2), 4.0, 1e-12
    )
    return alone, both


def test_failed_eigendecomposition_keeps_previous_root():
    previous = jnp.eye(3) * 2.0
    alone, both = _roots_of_a_failed_and_a_good_statistic(previous)
    np.testing.assert_array_equal(alone, previous)
    np.testing.assert_array_equal(both[0], previous)
    np.testing.assert_allclose(both[1], 0.5 * np.eye(3), rtol=1e-6)


def test_bfloat16_params_keep_float32_statistics():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
    tx = shampoo(0.01, precondition_frequency=2)
    state, update = tx.init(params), jax.jit(tx.update)
    g = {
        "w": jnp.asarray(np.random.default_rng(9).normal(size=(4, 3)), jnp.bfloat16),
        "b": jnp.ones(3, jnp.bfloat16),
    }
    for _ in range(3):
        u, state = update(g, state, params)
    inner = state.inner[0].direction.inner[0]
    assert {x.dtype for x in jax.tree.leaves((inner.statistics, inner.roots))} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(u)} == {np.dtype("bfloat16")}
    assert np.abs(np.asarray(inner.roots["w"][0][0])).max() > 0


def test_layout_helpers_round_trip_and_merge_as_soap():
    x = jnp.arange(7 * 10 * 3, dtype=jnp.float32).reshape(7, 10, 3)
    stacks = jax.jit(split_blocks, static_argnums=1)(x, 4)
    assert [s.shape for s in stacks] == [(2, 4, 4, 3), (1, 4, 2, 3), (2, 3, 4, 3), (1, 3, 2, 3)]
    np.testing.assert_array_equal(stacks[0][1], x[0:4, 4:8, :])
    np.testing.assert_array_equal(jax.jit(join_blocks, static_argnums=(1, 2))(stacks, x.shape, 4), x)
    assert merged_shape((3, 3, 16, 32), 10000) == (4608,)
    assert merged_shape((2, 3, 5000), 10000) == (6, 5000)
    assert merged_shape((20000, 2, 3), 10000) == (20000, 6)


# --- the parts and the options ----------------------------------------------------------------------------


def test_graft_takes_the_magnitude_where_the_direction_is_zero():
    tx = gradtx.chain(graft(gradtx.identity(), precondition_by_shampoo(precondition_frequency=100)))
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    g = {"w": jnp.ones((3, 2)), "b": jnp.full(2, 3.0)}
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    np.testing.assert_array_equal(u["w"], g["w"])
    np.testing.assert_array_equal(u["b"], g["b"])


def test_keras_options_reach_shampoo_in_keras_order():
    # Loss scale 8, accumulation of 2, global clip 0.5, decay 0.25 at the learning rate. By hand: the bare
    # optimizer (which does not read the params) on the clipped mean of each pair, the params decayed
    # before its step, theta <- theta - lr*wd*theta + u.
    grads = gaussian_grads({"matrix": (4, 3), "vector": (5,)}, 24, seed=8)
    lr, wd = 0.01, 0.25
    opts = {
        "loss_scale_factor": 8.0,
        "gradient_accumulation_steps": 2,
        "global_clipnorm": 0.5,
        "weight_decay": wd,
    }
    tx = shampoo(lr, precondition_frequency=8, **opts)
    params = {n: jnp.ones(np.shape(x)) for n, x in grads[0].items()}
    state = tx.init(params)
    for g in grads:
        u, state = tx.update({n: jnp.asarray(8 * x) for n, x in g.items()}, state, params)
        params = gradtx.apply_updates(params, u)
    means = []
    for g1, g2 in zip(grads[::2], grads[1::2], strict=True):
        mean = {n: (g1[n] + g2[n]) / 2 for n in g1}
        scale = min(1.0, 0.5 / np.sqrt(sum(np.sum(x * x) for x in mean.values())))
        means.append({n: (x * scale).astype(np.float32) for n, x in mean.items()})
    bare, _ = ours(plain, {"learning_rate": lr}, means)
    expected = {n: np.ones(np.shape(x)) for n, x in grads[0].items()}
    for u in bare:
        expected = {n: p - lr * wd * p + u[n] for n, p in expected.items()}
    for n in params:
        np.testing.assert_allclose(params[n], expected[n], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"precondition_frequency": 0},
            "precondition_by_shampoo: precondition_frequency must be an integer >= 1, got 0",
        ),
        ({"block_size": 2.5}, "precondition_by_shampoo: block_size must be an integer >= 1, got 2.5"),
        ({"epsilon": 0.0}, "precondition_by_shampoo: epsilon must be > 0, got 0.0"),
        ({"beta_2": 1.5}, "precondition_by_shampoo: beta_2 must be in \\[0, 1\\], got 1.5"),
        ({"exponent_override": -1}, "precondition_by_shampoo: exponent_override must be a number > 0"),
        ({"grafting": "adam"}, "shampoo: grafting must be a gradtx Transformation or None, got 'adam'"),
        ({"clipnorm": -1.0}, "shampoo: clipnorm must be > 0, got -1.0"),
    ],
)
def test_rejects_bad_arguments_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shampoo(**kwargs)
