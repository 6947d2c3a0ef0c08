"""SOAP against a float64 NumPy re-derivation of the authors' reference implementation's step order
(github.com/nikhilvyas/SOAP): the first call only builds the statistics and their ``eigh`` basis and moves
nothing; then each step projects the gradient (a chain of tensordots over the leading axis), runs Adam
there, projects back; carries the first moment back to the parameter space, updates the statistics,
refreshes the basis at multiples of the frequency by sorting the columns by their Rayleigh quotients,
permuting the second moment alike and taking one power-iteration step and a QR; and brings the first
moment into the new basis.

Where the basis is not unique (a rank-deficient statistic: a ``(6, 4)`` weight's ``6 x 6`` factor after one
gradient, any 1-D statistic), eigensolvers pick different vectors, so exact comparisons either use
full-rank factors (square blocks, tensors whose every axis is at most the product of the others, a
zero first gradient) or hand our first basis to the reference; other runs are checked for finiteness
and descent.

Tolerance. Float32 rotations and decompositions against float64: Adam's division by ``sqrt(v)``
normalizes each rotated coordinate, so a coordinate that is small relative to the gradient carries a
relative error of about 1e-7 divided by its relative size. Largest difference measured over 30 steps:
5e-6 of a leaf's update norm (or of the learning rate). The check is 5e-5 (10x).
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.preconditioning import eigenbasis, refresh_eigenbasis
from gradtx.soap import SoapState, soap

RTOL = 5e-5

# --- the float64 reference ------------------------------------------------------------------------------


def merged(shape, max_dim):
    out, run = [], 1
    for d in shape:
        if run * d > max_dim:
            out.append(run if run > 1 else d)
            run = d if run > 1 else 1
        else:
            run *= d
    return (*out, run) if run > 1 or not out else tuple(out)


def gram(x, i):
    other = [j for j in range(x.ndim) if j != i]
    return np.tensordot(x, x, axes=(other, other))


def project(x, qs, back=False):
    for q in qs:  # contract the leading axis, append the result's axis at the end
        x = np.moveaxis(x, 0, -1) if q is None else np.tensordot(x, q, axes=([0], [1 if back else 0]))
    return x


def reference_soap(grads, lr, b1=0.95, b2=0.95, sb=None, eps=1e-8, freq=10, max_dim=10000, merge=False,
                   p1d=False, normalize=False, correct_bias=True, first_bases=None):  # fmt: skip
    """Updates of SOAP (no weight decay) for a list of gradient dicts, in float64."""
    sb = b2 if sb is None else sb
    state, out = {}, []
    for s, g in enumerate(grads):
        step = {}
        for n, x in g.items():
            x = np.asarray(x, np.float64)
            shape = merged(x.shape, max_dim) if merge and x.ndim >= 2 else x.shape
            x = x.reshape(shape)
            if s == 0:
                on = [x.ndim >= 2 or (p1d and x.ndim == 1)] * x.ndim
                gg = [(1 - sb) * gram(x, i) if on[i] and d <= max_dim else None for i, d in enumerate(shape)]
                qs = [None if a is None else np.linalg.eigh(a)[1][:, ::-1] for a in gg]
                if first_bases is not None:
                    qs = [
                        None if q is None else np.asarray(b, np.float64)
                        for q, b in zip(qs, first_bases[n], strict=True)
                    ]
                state[n] = {"gg": gg, "q": qs, "m": np.zeros(shape), "v": np.zeros(shape)}
                step[n] = np.zeros(np.shape(g[n]))
                continue
            st = state[n]
            gp = project(x, st["q"])
            st["m"] = b1 * st["m"] + (1 - b1) * gp
            st["v"] = b2 * st["v"] + (1 - b2) * gp * gp
            c = np.sqrt(1 - b2**s) / (1 - b1**s) if correct_bias else 1.0
            d = project(st["m"] / (np.sqrt(st["v"]) + eps), st["q"], back=True)
            if normalize:
                d = d / (1e-30 + np.sqrt(np.mean(d * d)))
            step[n] = (-lr * c * d).reshape(np.shape(g[n]))
            m = project(st["m"], st["q"], back=True)
            st["gg"] = [None if a is None else sb * a + (1 - sb) * gram(x, i) for i, a in enumerate(st["gg"])]
            if s % freq == 0:
                for i, (a, q) in enumerate(zip(st["gg"], st["q"], strict=True)):
                    if a is None:
                        continue
                    order = np.argsort(-np.diag(q.T @ a @ q), kind="stable")
                    st["v"] = np.take(st["v"], order, axis=i)
                    st["q"][i] = np.linalg.qr(a @ q[:, order])[0]
            st["m"] = project(m, st["q"])
        out.append(step)
    return out


# --- compiled trajectories, shared by the tests -----------------------------------------------------------


@functools.cache
def trajectory(make):
    """``(hyper, grads, params) -> (updates per step, states per step)``, the updates applied to the params
    (they matter for weight decay only), compiled once per ``make`` with the hyperparameters traced."""

    def run(hyper, grads, params):
        tx = make(**hyper)

        def step(carry, g):
            params, state = carry
            u, state = tx.update(g, state, params)
            return (jax.tree.map(jnp.add, params, u), state), (u, state)

        return jax.lax.scan(step, (params, tx.init(params)), grads)[1]

    return jax.jit(run)


def stacked(grads):
    return {n: jnp.stack([jnp.asarray(g[n]) for g in grads]) for n in grads[0]}


def ours(make, hyper, grads, params=None):
    params = params or {n: jnp.zeros(np.shape(x), jnp.float32) for n, x in grads[0].items()}
    us, states = trajectory(make)(hyper, stacked(grads), params)
    return [{n: np.asarray(us[n][t]) for n in us} for t in range(len(grads))], states


def soap_state(state):
    (found,) = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SoapState))
        if isinstance(x, SoapState)
    ]
    return found


def gaussian_grads(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()} for _ in range(steps)]


def assert_close(mine, reference, lr, rtol=RTOL):
    for t, (a, b) in enumerate(zip(mine, reference, strict=True)):
        for n in b:
            err = np.linalg.norm(np.asarray(a[n], np.float64) - b[n]) / max(np.linalg.norm(b[n]), lr)
            assert err <= rtol, f"step {t}, {n}: relative error {err:.3g}"


def full_rank(learning_rate, beta_1, beta_2, epsilon):
    # refreshes at s = 5, 10, ..., 25; the second axis of "wide" (12 > 8) keeps the identity basis
    return soap(learning_rate, beta_1, beta_2, epsilon=epsilon, weight_decay=None, precondition_frequency=5,
                max_precond_dim=8)  # fmt: skip


def options(learning_rate):
    # merged (2, 2, 4) -> (4, 4); rank (6, 4) -> (6, 4), a rank-deficient left factor; vector: 3 x 3
    return soap(learning_rate, shampoo_beta=0.8, weight_decay=None, precondition_frequency=4,
                max_precond_dim=8, merge_dims=True, precondition_1d=True, normalize_grads=True,
                correct_bias=False)  # fmt: skip


def small(learning_rate, weight_decay):
    return soap(learning_rate, weight_decay=weight_decay, precondition_frequency=3)


FULL_RANK = {"square": (4, 4), "tensor": (2, 3, 4), "wide": (3, 12), "vector": (5,), "scalar": ()}
OPTIONS = {"merged": (2, 2, 4), "rank": (6, 4), "vector": (3,)}
SMALL = {"square": (3, 3), "vector": (4,)}
STEPS = 30
HYPER = {"learning_rate": 0.01, "beta_1": 0.95, "beta_2": 0.95, "epsilon": 1e-8}


@functools.cache
def full_rank_run():
    grads = gaussian_grads(FULL_RANK, STEPS)
    return grads, *ours(full_rank, HYPER, grads)


# --- the algorithm --------------------------------------------------------------------------------------


def test_matches_reference_on_full_rank_matrices_tensors_and_an_identity_axis_over_five_refreshes():
    grads, updates, _ = full_rank_run()
    assert_close(updates, reference_soap(grads, 0.01, freq=5, max_dim=8), 0.01)


def test_first_step_moves_nothing_and_builds_the_basis():
    _, updates, states = full_rank_run()
    assert all(np.array_equal(u, np.zeros_like(u)) for u in updates[0].values())
    basis = soap_state(states).bases["square"][0]
    assert not np.array_equal(basis[0], np.eye(4))
    np.testing.assert_array_equal(basis[0], basis[4])  # kept until the refresh at s = 5
    assert not np.array_equal(basis[4], basis[5])


def test_matches_reference_with_other_betas_and_epsilon():
    grads = gaussian_grads(FULL_RANK, STEPS, seed=1)
    hyper = {"learning_rate": 0.003, "beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-6}
    updates, _ = ours(full_rank, hyper, grads)
    assert_close(updates, reference_soap(grads, 0.003, b1=0.9, b2=0.99, eps=1e-6, freq=5, max_dim=8), 0.003)


def test_zero_first_gradient_matches_reference():
    # A zero statistic at s = 0: its eigh is the identity (reversed), unique on both sides.
    grads = gaussian_grads(FULL_RANK, STEPS, seed=2)
    grads[0] = {n: np.zeros_like(x) for n, x in grads[0].items()}
    updates, _ = ours(full_rank, HYPER, grads)
    assert all(np.isfinite(u).all() for step in updates for u in step.values())
    assert_close(updates, reference_soap(grads, 0.01, freq=5, max_dim=8), 0.01)


def test_merged_1d_normalized_uncorrected_and_rank_deficient_match_reference_from_the_same_basis():
    grads = gaussian_grads(OPTIONS, STEPS, seed=3)
    updates, states = ours(options, {"learning_rate": 0.01}, grads)
    first = {
        n: tuple(None if q is None else np.asarray(q[0]) for q in qs)
        for n, qs in soap_state(states).bases.items()
    }
    reference = reference_soap(grads, 0.01, sb=0.8, freq=4, max_dim=8, merge=True, p1d=True, normalize=True,
                               correct_bias=False, first_bases=first)  # fmt: skip
    assert_close(updates, reference, 0.01)


def test_rank_deficient_trajectories_stay_finite_and_descend():
    # One sample per step: every statistic of the (6, 4) weight is singular at s = 0, its null-space
    # basis arbitrary. The run must stay finite and fit (Adam at its best rate of 0.05 and 0.2: 6% and
    # 2% of the initial loss).
    rng = np.random.default_rng(6)
    target = rng.normal(size=(6, 4)).astype(np.float32)
    xs = rng.normal(size=(60, 4)).astype(np.float32)

    def loss(params, x):
        return 0.5 * jnp.sum(((params["w"] - target) @ x) ** 2)

    def total(w):
        return 0.5 * np.sum(((np.asarray(w) - target) @ xs.T) ** 2)

    tx = soap(0.1, weight_decay=None, precondition_frequency=3)
    result = gradtx.fit(loss, {"w": jnp.zeros((6, 4))}, tx, xs, 60)
    assert np.isfinite(np.asarray(result.history.loss)).all()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(result.opt_state))
    assert total(result.params["w"]) < 0.05 * total(np.zeros((6, 4)))


def test_vmap_over_learning_rates_equals_separate_runs():
    grads = gaussian_grads(SMALL, 12, seed=4)
    rates = jnp.asarray([1e-3, 1e-2, 1e-1])
    run = jax.jit(
        jax.vmap(trajectory(small), in_axes=({"learning_rate": 0, "weight_decay": None}, None, None))
    )
    params = {n: jnp.zeros(s) for n, s in SMALL.items()}
    lanes, _ = run({"learning_rate": rates, "weight_decay": 0.0}, stacked(grads), params)
    for i, lr in enumerate(rates):
        alone, _ = ours(small, {"learning_rate": lr, "weight_decay": 0.0}, grads)
        for n in SMALL:
            np.testing.assert_allclose(lanes[n][i], np.stack([u[n] for u in alone]), rtol=1e-5, atol=1e-9)


def test_weight_decay_is_decoupled_at_the_learning_rate_in_keras_order():
    # theta <- theta - lr*wd*theta + u: Keras's order. The reference decays theta + u instead; the two
    # differ by lr*wd*u per step (here at most 0.05 * 0.1 * 0.05 = 2.5e-4 of a step's size).
    grads = gaussian_grads(SMALL, 12, seed=5)
    lr, wd = 0.05, 0.1
    params = {n: jnp.ones(s) for n, s in SMALL.items()}
    with_decay, _ = ours(small, {"learning_rate": lr, "weight_decay": wd}, grads, params)
    bare, _ = ours(small, {"learning_rate": lr, "weight_decay": 0.0}, grads, params)
    theta = {n: np.ones(s) for n, s in SMALL.items()}
    for u, b in zip(with_decay, bare, strict=True):
        for n in SMALL:
            np.testing.assert_allclose(u[n], b[n] - lr * wd * theta[n], rtol=1e-5, atol=1e-8)
            theta[n] = theta[n] + u[n]


# --- numerics, the parts, the options ---------------------------------------------------------------------


def test_bfloat16_params_keep_float32_statistics_bases_and_moments():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
    tx = soap(0.01, precondition_frequency=2)
    state, update = tx.init(params), jax.jit(tx.update)
    g = {
        "w": jnp.asarray(np.random.default_rng(9).normal(size=(4, 3)), jnp.bfloat16),
        "b": jnp.ones(3, jnp.bfloat16),
    }
    for _ in range(3):
        u, state = update(g, state, params)
    inner = soap_state(state)
    kept = (inner.statistics, inner.bases, inner.mu, inner.nu)
    assert {x.dtype for x in jax.tree.leaves(kept)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(u)} == {np.dtype("bfloat16")}
    assert np.abs(np.asarray(u["w"], np.float32)).max() > 0


@jax.jit
def _decompositions_of_a_failed_statistic(previous):
    bad = jnp.full((3, 3), jnp.nan)
    return eigenbasis(bad, previous), refresh_eigenbasis(bad, previous)


def test_failed_decompositions_keep_the_previous_basis():
    previous = jnp.eye(3)[::-1]
    first, (refreshed, order) = _decompositions_of_a_failed_statistic(previous)
    np.testing.assert_array_equal(first, previous)
    np.testing.assert_array_equal(refreshed, previous)
    np.testing.assert_array_equal(order, [0, 1, 2])


def test_keras_options_reach_soap_in_keras_order():
    # Accumulation of 2 and a global clip of 0.5: the bare SOAP on the clipped mean of each pair.
    grads = gaussian_grads(SMALL, 24, seed=8)
    tx = soap(
        0.01, weight_decay=None, precondition_frequency=3, gradient_accumulation_steps=2, global_clipnorm=0.5
    )
    params = {n: jnp.zeros(s) for n, s in SMALL.items()}
    state, update, total = tx.init(params), jax.jit(tx.update), {n: 0.0 for n in SMALL}
    for g in grads:
        u, state = update({n: jnp.asarray(x) for n, x in g.items()}, state, params)
        total = {n: total[n] + np.asarray(u[n]) for n in SMALL}
    means = []
    for g1, g2 in zip(grads[::2], grads[1::2], strict=True):
        mean = {n: (g1[n] + g2[n]) / 2 for n in g1}
        scale = min(1.0, 0.5 / np.sqrt(sum(np.sum(x * x) for x in mean.values())))
        means.append({n: (x * scale).astype(np.float32) for n, x in mean.items()})
    bare, _ = ours(small, {"learning_rate": 0.01, "weight_decay": 0.0}, means)
    for n in SMALL:
        np.testing.assert_allclose(total[n], sum(u[n] for u in bare), rtol=1e-5, atol=1e-8)


def test_defaults_are_the_reference_implementations():
    defaults = {n: p.default for n, p in inspect.signature(soap).parameters.items() if n != "options"}
    assert defaults == {
        "learning_rate": 0.003, "beta_1": 0.95, "beta_2": 0.95, "shampoo_beta": None, "epsilon": 1e-8,
        "weight_decay": 0.01, "precondition_frequency": 10, "max_precond_dim": 10000, "merge_dims": False,
        "precondition_1d": False, "normalize_grads": False, "correct_bias": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"precondition_frequency": 0},
            "scale_by_soap: precondition_frequency must be an integer >= 1, got 0",
        ),
        ({"max_precond_dim": 2.0}, "scale_by_soap: max_precond_dim must be an integer >= 1, got 2.0"),
        ({"beta_1": 1.0}, "scale_by_soap: beta_1 must be in \\[0, 1\\), got 1.0"),
        ({"shampoo_beta": -0.5}, "scale_by_soap: shampoo_beta must be in \\[0, 1\\), got -0.5"),
        ({"epsilon": 0.0}, "scale_by_soap: epsilon must be > 0, got 0.0"),
        ({"merge_dims": 1}, "scale_by_soap: merge_dims must be True or False, got 1"),
        ({"weight_decay": -1.0}, "soap: weight_decay must be >= 0, got -1.0"),
    ],
)
def test_rejects_bad_arguments_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        soap(**kwargs)


def test_sweeps_of_soap_and_shampoo_do_not_hang():
    # In a subprocess with a timeout, because a hang would stall the test run instead of failing it:
    # batched eigh/qr under vmap hung intermittently with jaxlib 0.10.2 on 2 CPU cores (see
    # gradtx.preconditioning). Two vmapped families in one program, 8 refreshes each.
    script = textwrap.dedent(
        """
        import jax.numpy as jnp, numpy as np, gradtx
        from gradtx.shampoo import shampoo
        from gradtx.soap import soap
        x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 6)), jnp.float32)
        loss = lambda p, b: jnp.mean((jnp.tanh(b @ p["w1"]) @ p["w2"]) ** 2)
        params = {"w1": jnp.full((6, 5), 0.1), "w2": jnp.full((5, 3), 0.1)}
        rates = {"learning_rate": [1e-3, 1e-2, 1e-1]}
        families = {
            "soap": (lambda learning_rate: soap(learning_rate, precondition_frequency=2), rates),
            "shampoo": (lambda learning_rate: shampoo(learning_rate, precondition_frequency=2), rates),
        }
        for _ in range(3):
            out = gradtx.compare(loss, params, families, x, 16)
            assert all(np.isfinite(np.asarray(r.history.loss)).all() for r in out.values())
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
