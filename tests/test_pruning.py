"""Pruning: TF-MOT's schedules re-derived in float64 NumPy, magnitude pruning's counts and the exactness
of its zeros, one-shot pruning against a NumPy sort, the sparsity report, vmap over the target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx


def reference_schedule(step, initial, final, begin, end, power, frequency):
    """TF-MOT's PruningSchedule in float64, from its documentation: ``(should_prune, sparsity)``."""
    in_range = step >= begin and (end < 0 or step <= end)
    should = in_range and (step - begin) % frequency == 0
    if power is None:  # ConstantSparsity
        return should, final
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return should, final + (initial - final) * (1 - p) ** power


def reference_zeros(n, sparsity):
    """TF-MOT's count: ``max(round(n * (1 - s)), 1)`` weights kept, half to even."""
    return n - max(int(np.round(n * (1 - sparsity))), 1)


SCHEDULES = {
    "constant_forever": (dict(target_sparsity=0.6, begin_step=3, frequency=4), (0.6, 0.6, 3, -1, None, 4)),
    "constant_window": (
        dict(target_sparsity=0.25, begin_step=0, end_step=9, frequency=3),
        (0.25, 0.25, 0, 9, None, 3),
    ),
    "polynomial": (
        dict(initial_sparsity=0.1, final_sparsity=0.9, begin_step=2, end_step=22, frequency=4),
        (0.1, 0.9, 2, 22, 3.0, 4),
    ),
    "polynomial_power_1": (
        dict(initial_sparsity=0.0, final_sparsity=0.8, begin_step=0, end_step=10, power=1, frequency=1),
        (0.0, 0.8, 0, 10, 1.0, 1),
    ),
}


def _schedule(name):
    kwargs, _ = SCHEDULES[name]
    make = gradtx.constant_sparsity if "target_sparsity" in kwargs else gradtx.polynomial_decay_sparsity
    return make(**kwargs)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_the_tfmot_formula(name):
    schedule, args = _schedule(name), SCHEDULES[name][1]
    steps = jnp.arange(40)
    should, sparsity = jax.jit(jax.vmap(schedule))(steps)
    for step in range(40):
        expected_should, expected_sparsity = reference_schedule(step, *args)
        assert bool(should[step]) == expected_should, step
        np.testing.assert_allclose(float(sparsity[step]), expected_sparsity, rtol=1e-6, atol=1e-7)


def _random_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32),
        "conv": jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=7), jnp.float32),
    }
    grads = [
        jax.tree.map(lambda p, r=rng: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)
        for _ in range(40)
    ]
    return params, grads


def _train(tx, params, grads):
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for g in grads:
        u, state = update(g, state, params)
        params = gradtx.apply_updates(params, u)
        history.append(params)
    return history, state


@pytest.mark.parametrize("name", SCHEDULES)
def test_sparsity_after_each_update_follows_the_schedule(name):
    params, grads = _random_problem()
    args = SCHEDULES[name][1]
    # Momentum keeps pushing pruned weights, so they stay at zero only if the mask holds them there.
    tx = gradtx.chain(gradtx.sgd(0.05, momentum=0.9), gradtx.magnitude_pruning(_schedule(name)))
    history, _ = _train(tx, params, grads)
    target = 0.0
    for step, after in enumerate(history):
        should, sparsity = reference_schedule(step, *args)
        if should:
            target = sparsity
        for leaf in jax.tree.leaves(after):
            n = leaf.size
            # Away from a rounding tie, so float32 and float64 give the same count.
            assert abs(n * (1 - target) % 1 - 0.5) > 1e-3
            assert int(jnp.sum(leaf == 0)) == reference_zeros(n, target), (step, leaf.shape)


def test_pruned_weights_stay_exactly_zero_through_further_training():
    params, grads = _random_problem(1)
    schedule = gradtx.polynomial_decay_sparsity(0.2, 0.8, 0, 10, frequency=5)
    tx = gradtx.chain(gradtx.adam(0.05), gradtx.magnitude_pruning(schedule))
    history, state = _train(tx, params, grads)
    zeros_at_end_of_pruning = jax.tree.map(lambda p: np.asarray(p) == 0, history[10])
    for after in history[11:]:
        for zero, leaf in zip(jax.tree.leaves(zeros_at_end_of_pruning), jax.tree.leaves(after), strict=True):
            np.testing.assert_array_equal(np.asarray(leaf) == 0, zero)
            assert np.all(np.asarray(leaf)[zero] == 0.0)
    for mask, zero in zip(
        jax.tree.leaves(state.inner[1].mask), jax.tree.leaves(zeros_at_end_of_pruning), strict=True
    ):
        np.testing.assert_array_equal(~np.asarray(mask), zero)


def test_magnitude_pruning_keeps_the_largest_magnitudes_of_the_stepped_params():
    params, grads = _random_problem(2)
    tx = gradtx.chain(gradtx.sgd(0.1), gradtx.magnitude_pruning(gradtx.constant_sparsity(0.5)))
    (after,), _ = _train(tx, params, grads[:1])
    for p, g, a in zip(
        jax.tree.leaves(params), jax.tree.leaves(grads[0]), jax.tree.leaves(after), strict=True
    ):
        stepped = np.asarray(p, np.float64) - 0.1 * np.asarray(g, np.float64)
        kept = np.asarray(a) != 0
        assert np.abs(stepped[kept]).min() > np.abs(stepped[~kept]).max()
        np.testing.assert_allclose(np.asarray(a)[kept], stepped[kept], rtol=1e-6)


def test_prune_by_magnitude_zeroes_the_smallest_per_leaf():
    params, _ = _random_problem(3)
    pruned = gradtx.prune_by_magnitude(params, 0.7)
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(pruned), strict=True):
        flat = np.asarray(p).ravel()
        drop = np.argsort(np.abs(flat))[: reference_zeros(flat.size, 0.7)]
        expected = flat.copy()
        expected[drop] = 0
        np.testing.assert_array_equal(np.asarray(q).ravel(), expected)


def test_global_pruning_ranks_all_leaves_together():
    params, _ = _random_problem(4)
    params = {**params, "kernel": params["kernel"] * 100}  # a layer of large weights keeps most
    pruned = gradtx.prune_by_magnitude(params, 0.5, scope="global")
    flat = np.concatenate([np.asarray(p).ravel() for p in jax.tree.leaves(params)])
    threshold = np.sort(np.abs(flat))[reference_zeros(flat.size, 0.5)]
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(pruned), strict=True):
        np.testing.assert_array_equal(np.asarray(q), np.where(np.abs(np.asarray(p)) >= threshold, p, 0))
    report = gradtx.sparsity(pruned)
    assert float(report.per_leaf["kernel"]) < 0.1 < 0.5 < float(report.per_leaf["conv"])


def test_global_magnitude_pruning_reaches_the_total_count():
    params, grads = _random_problem(5)
    tx = gradtx.chain(
        gradtx.sgd(0.01), gradtx.magnitude_pruning(gradtx.constant_sparsity(0.4), scope="global")
    )
    history, _ = _train(tx, params, grads[:2])
    report = gradtx.sparsity(history[-1])
    assert int(report.zeros) == reference_zeros(report.size, 0.4)


def test_sparsity_report_counts_exact_zeros_per_leaf_and_in_total():
    params = {"w": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "b": jnp.array([0.0, 2.0]), "n": jnp.int32(0)}
    report = gradtx.sparsity(params)
    assert float(report.per_leaf["w"]) == 0.75 and float(report.per_leaf["b"]) == 0.5
    assert report.per_leaf["n"] is None
    assert int(report.zeros) == 4 and report.size == 6 and float(report.total) == np.float32(4 / 6)
    assert float(gradtx.sparsity(params, mask=gradtx.weights_only).total) == 0.75


def test_masked_pruning_leaves_biases_and_integers_alone():
    params, grads = _random_problem(6)
    params = {**params, "count": jnp.int32(3)}
    grads = [{**g, "count": jnp.int32(1)} for g in grads]
    tx = gradtx.chain(
        gradtx.sgd(0.01),
        gradtx.masked(gradtx.magnitude_pruning(gradtx.constant_sparsity(0.5)), gradtx.weights_only),
    )
    history, _ = _train(tx, params, grads[:3])
    report = gradtx.sparsity(history[-1])
    assert float(report.per_leaf["bias"]) == 0 and int(history[-1]["count"]) == 3
    assert int(jnp.sum(history[-1]["kernel"] == 0)) == 60


def test_masks_under_vmap_differ_per_target_sparsity():
    params, grads = _random_problem(7)
    targets = jnp.array([0.25, 0.5, 0.75])
    tx = gradtx.chain(gradtx.sgd(0.01), gradtx.magnitude_pruning(gradtx.constant_sparsity(0.0)))
    states = jax.vmap(
        lambda s: gradtx.chain(gradtx.sgd(0.01), gradtx.magnitude_pruning(gradtx.constant_sparsity(s))).init(
            params
        )
    )(targets)
    u, states = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, None)))(grads[0], states, params)
    kernels = jax.vmap(gradtx.apply_updates, in_axes=(None, 0))(params, u)["kernel"]
    masks = np.asarray(states.inner[1].mask["kernel"])
    for target, kernel, mask in zip(np.asarray(targets), np.asarray(kernels), masks, strict=True):
        assert np.sum(kernel == 0) == np.sum(~mask) == reference_zeros(kernel.size, float(target))
    assert np.all(masks[2] <= masks[1]) and np.all(masks[1] <= masks[0]) and np.any(masks[0] != masks[1])


def test_prune_by_magnitude_vmaps_over_the_sparsity():
    params, _ = _random_problem(8)
    levels = jnp.array([0.0, 0.3, 0.9])
    pruned = jax.vmap(lambda s: gradtx.prune_by_magnitude(params["conv"], s))(levels)
    counts = [int(jnp.sum(p == 0)) for p in pruned]
    assert counts == [reference_zeros(180, float(s)) for s in np.asarray(levels)]


def test_set_hyperparams_changes_the_target_sparsity():
    params, grads = _random_problem(9)
    tx = gradtx.chain(gradtx.sgd(0.01), gradtx.magnitude_pruning(gradtx.constant_sparsity(0.1, frequency=1)))
    state = gradtx.set_hyperparams(tx.init(params), target_sparsity=0.8)
    u, _ = tx.update(grads[0], state, params)
    assert int(jnp.sum(gradtx.apply_updates(params, u)["kernel"] == 0)) == reference_zeros(120, 0.8)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: gradtx.constant_sparsity(1.0), "target_sparsity must be in \\[0, 1\\), got 1.0"),
        (lambda: gradtx.constant_sparsity(-0.1), "target_sparsity must be in \\[0, 1\\), got -0.1"),
        (
            lambda: gradtx.constant_sparsity(0.5, begin_step=10, end_step=5),
            "end_step must be -1 or >= begin_step",
        ),
        (lambda: gradtx.constant_sparsity(0.5, frequency=0), "frequency must be > 0, got 0"),
        (lambda: gradtx.constant_sparsity(0.5, begin_step=-1), "begin_step must be >= 0, got -1"),
        (lambda: gradtx.polynomial_decay_sparsity(0.0, 1.5, 0, 10), "final_sparsity must be in \\[0, 1\\)"),
        (
            lambda: gradtx.polynomial_decay_sparsity(0.0, 0.5, 10, 5),
            "end_step must be > begin_step \\(10\\), got 5",
        ),
        (lambda: gradtx.polynomial_decay_sparsity(0.0, 0.5, 0, -1), "end_step must be > begin_step"),
        (lambda: gradtx.polynomial_decay_sparsity(0.0, 0.5, 0, 10, power=0), "power must be"),
        (lambda: gradtx.prune_by_magnitude(jnp.ones(3), 1.0), "sparsity must be in \\[0, 1\\), got 1.0"),
        (lambda: gradtx.prune_by_magnitude(jnp.ones(3), 0.5, scope="layer"), "scope must be one of"),
        (lambda: gradtx.magnitude_pruning(0.5), "schedule must come from"),
    ],
)
def test_rejects_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_magnitude_pruning_needs_the_step_of_a_chain():
    tx = gradtx.magnitude_pruning(gradtx.constant_sparsity(0.5))
    with pytest.raises(ValueError, match="needs the step count"):
        tx.update(jnp.ones(4), tx.init(jnp.ones(4)), jnp.ones(4))
