"""Sweeps and optimizer families in one program: every run equals its own separate `fit`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training import PARAMS, STEPS, X, Y, loss_fn, valid

import gradtx

# vmapped matmuls may be computed in another order than single ones: float32 rounding over 60 steps.
RTOL, ATOL = 2e-5, 1e-6


def init(key):
    return {"w": 0.1 * jax.random.normal(key, (5, 3)), "b": jnp.zeros(3)}


def assert_same_run(batched, i, single):
    """Configuration ``i`` of a sweep result against a separate `fit` result."""
    np.testing.assert_allclose(batched.history.loss[i], single.history.loss, rtol=RTOL, atol=ATOL)
    for a, b in zip(jax.tree.leaves(batched.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(a[i], b, rtol=RTOL, atol=ATOL)


def test_grid_is_every_combination():
    g = gradtx.grid(learning_rate=[0.1, 0.01], momentum=[0.0, 0.5, 0.9])
    assert list(zip(g["learning_rate"], g["momentum"], strict=True)) == [
        (lr, m) for lr in [0.1, 0.01] for m in [0.0, 0.5, 0.9]
    ]


def test_each_configuration_equals_its_own_run():
    configs = gradtx.grid(learning_rate=[0.01, 0.05, 0.1], momentum=[0.0, 0.9])
    make = lambda learning_rate, momentum: gradtx.sgd(learning_rate, momentum=momentum)  # noqa: E731
    result = gradtx.sweep(loss_fn, PARAMS, make, configs, (X, Y), STEPS)
    assert len(result) == 6 and result.history.loss.shape == (6, STEPS)
    for i in range(6):
        single = gradtx.fit(
            loss_fn,
            PARAMS,
            make(configs["learning_rate"][i].item(), configs["momentum"][i].item()),
            (X, Y),
            STEPS,
        )
        assert_same_run(result, i, single)


def test_seeds_initialize_each_run():
    configs = gradtx.grid(learning_rate=[0.01, 0.05], seed=[0, 1, 2])
    result = gradtx.sweep(
        loss_fn, init, lambda learning_rate: gradtx.adam(learning_rate), configs, (X, Y), STEPS
    )
    for i in range(6):
        lr, seed = configs["learning_rate"][i].item(), int(configs["seed"][i])
        single = gradtx.fit(loss_fn, init(jax.random.PRNGKey(seed)), gradtx.adam(lr), (X, Y), STEPS)
        assert_same_run(result, i, single)


def test_a_list_of_configurations_is_accepted():
    configs = [{"learning_rate": 0.01, "beta_1": 0.8}, {"learning_rate": 0.02, "beta_1": 0.9}]
    result = gradtx.sweep(loss_fn, PARAMS, gradtx.adam, configs, (X, Y), 20)
    np.testing.assert_allclose(result.configs["beta_1"], [0.8, 0.9])
    single = gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.02, beta_1=0.9), (X, Y), 20)
    assert_same_run(result, 1, single)


NINE = {
    "sgd": gradtx.sgd(0.05),
    "momentum": gradtx.sgd(0.05, momentum=0.9),
    "nag": gradtx.sgd(0.05, momentum=0.9, nesterov=True),
    "adagrad": gradtx.adagrad(0.1),
    "rmsprop": gradtx.rmsprop(0.01),
    "adam": gradtx.adam(0.01),
    "adamax": gradtx.adamax(0.01),
    "nadam": gradtx.nadam(0.01),
    "adamw": gradtx.adamw(0.01),
}


def test_the_nine_optimizers_in_one_program_equal_their_separate_runs():
    results = gradtx.compare(loss_fn, PARAMS, NINE, (X, Y), STEPS, eval_fn=valid, eval_every=20)
    for name, tx in NINE.items():
        single = gradtx.fit(loss_fn, PARAMS, tx, (X, Y), STEPS, eval_fn=valid, eval_every=20)
        np.testing.assert_allclose(results[name].history.loss, single.history.loss, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(
            results[name].history.metrics["valid_loss"], single.history.metrics["valid_loss"], rtol=RTOL
        )


def test_compare_mixes_single_runs_and_sweeps():
    results = gradtx.compare(
        loss_fn,
        init,
        {
            "sgd": gradtx.sgd(0.05),
            "adam": (gradtx.adam, gradtx.grid(learning_rate=[0.01, 0.03], seed=[0, 1])),
        },
        (X, Y),
        STEPS,
    )
    assert isinstance(results["sgd"], gradtx.TrainResult) and isinstance(results["adam"], gradtx.SweepResult)
    single = gradtx.fit(loss_fn, init(jax.random.PRNGKey(1)), gradtx.adam(0.03), (X, Y), STEPS)
    assert_same_run(results["adam"], 3, single)


def test_each_configuration_stops_early_on_its_own():
    rule = gradtx.EarlyStopping("valid_loss", patience=1, min_delta=0.05)
    configs = {"learning_rate": [0.0005, 0.05]}  # the slow run stops improving by 0.05 first
    result = gradtx.sweep(
        loss_fn,
        PARAMS,
        lambda learning_rate: gradtx.sgd(learning_rate),
        configs,
        (X, Y),
        STEPS,
        eval_fn=valid,
        eval_every=10,
        early_stopping=rule,
    )
    trained = np.asarray(result.history.steps_trained)
    assert trained[0] < trained[1]
    single = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.0005), (X, Y), int(trained[0]))
    np.testing.assert_allclose(
        result.history.loss[0, : trained[0]], single.history.loss, rtol=RTOL, atol=ATOL
    )
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=RTOL, atol=ATOL)  # frozen where it stopped


def test_each_configuration_reduces_its_own_learning_rate():
    make = lambda patience: gradtx.chain(  # noqa: E731
        gradtx.sgd(0.05), gradtx.reduce_on_plateau(factor=0.5, patience=patience, min_delta=0.5)
    )
    result = gradtx.sweep(
        loss_fn,
        PARAMS,
        make,
        {"patience": [0, 2, 100]},
        (X, Y),
        STEPS,
        eval_fn=valid,
        eval_every=10,
        plateau_metric="valid_loss",
    )
    scales = np.asarray(gradtx.plateau_scale(result.opt_state))  # one scale per configuration
    assert scales[0] < scales[1] < scales[2] == 1.0
    for i, patience in enumerate([0, 2, 100]):
        single = gradtx.fit(
            loss_fn,
            PARAMS,
            make(patience),
            (X, Y),
            STEPS,
            eval_fn=valid,
            eval_every=10,
            plateau_metric="valid_loss",
        )
        assert_same_run(result, i, single)


def test_rows_report_each_configuration():
    result = gradtx.sweep(
        loss_fn,
        PARAMS,
        lambda learning_rate: gradtx.sgd(learning_rate),
        {"learning_rate": [0.01, 0.1]},
        (X, Y),
        STEPS,
        eval_fn=valid,
        eval_every=20,
    )
    rows = result.rows()
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.01, 0.1])
    assert rows[1]["final_valid_loss"] == pytest.approx(float(result.history.metrics["valid_loss"][1, -1]))
    assert result.best("final_valid_loss")["learning_rate"] == pytest.approx(0.1)
    assert result.to_markdown().count("\n") == 3


# --- learning-rate range tests on a quadratic whose answers are known ----------------------------------
# f(x) = a/2 |x|^2 + 1 with plain gradient descent: x <- (1 - lr a) x, so the loss diverges for lr > 2/a
# and falls fastest at lr = 1/a; the constant 1 is a loss floor, as real losses have.
A = 4.0


def quadratic(p, batch):
    return 0.5 * A * jnp.sum(p["x"] ** 2) + 1.0 + 0.0 * batch.sum()


QUAD_PARAMS = {"x": jnp.ones(3)}
NO_DATA = jnp.zeros((1, 1))


def test_range_test_rates_grow_exponentially_and_the_suggestion_is_below_divergence():
    result = gradtx.lr_range_test(
        quadratic, QUAD_PARAMS, gradtx.sgd, NO_DATA, steps=200, min_lr=1e-4, max_lr=10.0
    )
    np.testing.assert_allclose(result.rates[[0, -1]], [1e-4, 10.0], rtol=1e-5)
    np.testing.assert_allclose(np.diff(np.log(result.rates)), np.log(1e5) / 199, rtol=1e-3)
    cut = np.flatnonzero(np.isnan(result.losses))
    # Cut off once the loss shoots up, which can only happen after the rate passed 2/a (the lag is the
    # time the diverging iterates take to grow back from ~0).
    assert cut.size and np.isnan(result.losses[cut[0] :]).all() and result.rates[cut[0]] > 2 / A
    assert result.suggestion == pytest.approx(result.rates[np.nanargmin(result.smoothed)] / 10)
    assert 1e-3 < result.suggestion < 2 / A


def test_range_test_keeps_a_negative_loss_until_it_shoots_up():
    # The same quadratic shifted by -100 (a loss that is negative, as a log-likelihood bound can be):
    # "4 times the minimum" would mark every step after the minimum as diverged; the cut must come where
    # the loss rises by more than its own size, and only after the rate passed 2/a as above.
    def shifted(params, batch):
        return quadratic(params, batch) - 100.0

    result = gradtx.lr_range_test(
        shifted, QUAD_PARAMS, gradtx.sgd, NO_DATA, steps=200, min_lr=1e-4, max_lr=10.0
    )
    lowest = int(np.nanargmin(result.smoothed))
    cut = np.flatnonzero(np.isnan(result.losses))
    assert cut.size and result.rates[cut[0]] > 2 / A
    assert cut[0] > lowest + 1 and np.isfinite(result.smoothed[: cut[0]]).all()
    m = result.smoothed[lowest]
    assert (result.smoothed[lowest : cut[0]] - m <= 3 * abs(m)).all()


def test_parallel_range_test_finds_the_fastest_constant_rate():
    rates = np.array([0.01, 0.05, 0.1, 0.15, 0.24, 0.3, 0.45, 0.6])  # 1/a = 0.25: 0.24 contracts most
    result = gradtx.lr_range_sweep(quadratic, QUAD_PARAMS, gradtx.sgd, NO_DATA, steps=10, rates=rates)
    assert result.suggestion == pytest.approx(0.24)
    assert result.losses[-1] > 7.0  # 0.6 > 2/a: worse than the initial loss of 7
    # The final loss is the loss of the last step (10% of 10 steps), after 9 updates.
    np.testing.assert_allclose(result.losses[0], 0.5 * A * 3 * (1 - 0.01 * A) ** 18 + 1.0, rtol=1e-5)


def _nan_after_divergence(p):
    # sin(inf) is NaN: the metric turns NaN once the iterates overflow.
    return {"m": quadratic(p, NO_DATA) + 0.0 * jnp.sin(p["x"].sum())}


def test_a_diverged_run_keeps_its_best_finite_metric():
    # rows() used to report min_m = NaN for a run that diverged after a good start.
    rates = [0.1, 1.0]  # 1.0 > 2/a: x <- -3x, inf after ~80 steps, then the metric is NaN
    result = gradtx.sweep(
        quadratic, QUAD_PARAMS, gradtx.sgd, {"learning_rate": rates}, NO_DATA, 120,
        eval_fn=_nan_after_divergence, eval_every=10,
    )  # fmt: skip
    row = result.rows()[1]
    assert np.isnan(row["final_m"])
    # Its best evaluation is the first: x = (-3)^10 after 10 steps (float64 re-derivation).
    assert row["min_m"] == pytest.approx(0.5 * A * 3 * 3.0**20 + 1.0, rel=1e-6)
    assert result.best("min_m")["learning_rate"] == pytest.approx(0.1)
    assert result.best("final_m")["learning_rate"] == pytest.approx(0.1)  # a NaN is never the best


def test_best_says_when_every_run_diverged():
    # It used to raise numpy's "All-NaN slice encountered".
    result = gradtx.sweep(
        quadratic, QUAD_PARAMS, gradtx.sgd, {"learning_rate": [1.0, 1.5]}, NO_DATA, 120,
        eval_fn=_nan_after_divergence, eval_every=60,
    )  # fmt: skip
    with pytest.raises(ValueError, match="every run has a non-finite final_m \\(all 2 diverged\\)"):
        result.best("final_m")


def test_range_tests_refuse_to_suggest_when_every_loss_is_nan():
    # Both used to return a suggestion.
    def broken(p, batch):
        return quadratic(p, batch) * jnp.nan

    with pytest.raises(ValueError, match="lr_range_test: the loss is not finite from the first step"):
        gradtx.lr_range_test(broken, QUAD_PARAMS, gradtx.sgd, NO_DATA, steps=20)
    with pytest.raises(ValueError, match="lr_range_sweep: every run diverged"):
        gradtx.lr_range_sweep(quadratic, QUAD_PARAMS, gradtx.sgd, NO_DATA, steps=100, rates=[1.0, 2.0])


def test_a_population_step_sees_every_configuration_between_periods():
    # The engine's hook for search: after each evaluation, copy the best run (params, optimizer state
    # and hyperparameters) over the worst. Reference: the same schedule of copies done by hand between
    # separate fits, in float64-free exact arithmetic of the quadratic (plain SGD).
    from gradtx.sweeps import _member, train_members

    def exploit(runs, metrics, key, period):
        best, worst = jnp.argmin(metrics["m"]), jnp.argmax(metrics["m"])
        return jax.tree.map(lambda x: x.at[worst].set(x[best]), runs), {"copied": jnp.stack([best, worst])}

    rates = [0.05, 0.2, 0.01]
    member = _member("test", gradtx.sgd, {"learning_rate": rates}, QUAD_PARAMS)
    (result,) = train_members(
        "test", [member], quadratic, NO_DATA, 30, key=None, eval_fn=_nan_after_divergence, eval_every=10,
        plateau_metric=None, early_stopping=None, chunks=1, progress=False, checkpoint_dir=None,
        population=exploit,
    )  # fmt: skip
    # By hand: 10 steps each; the worst (0.01) takes the best's (0.2) params and rate; repeat.
    runs, copies = [(r, QUAD_PARAMS) for r in rates], []
    for _ in range(3):
        runs = [(r, gradtx.fit(quadratic, p, gradtx.sgd(r), NO_DATA, 10).params) for r, p in runs]
        losses = [float(_nan_after_divergence(p)["m"]) for _, p in runs]
        copies.append([int(np.argmin(losses)), int(np.argmax(losses))])
        runs[int(np.argmax(losses))] = runs[int(np.argmin(losses))]
    np.testing.assert_array_equal(result.history.records["copied"], copies)  # one record per period
    np.testing.assert_allclose(result.params["x"], np.stack([p["x"] for _, p in runs]), rtol=1e-6)
    np.testing.assert_allclose(gradtx.hyperparams(result.opt_state)["learning_rate"], [r for r, _ in runs])


# --- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "configs, message",
    [
        (
            {"learning_rate": [0.1], "beta": [0.9]},
            "does not accept the configuration field\\(s\\) \\['beta'\\]",
        ),
        ({"learning_rate": []}, "the sweep is empty"),
        ([], "the sweep is empty"),
        ({"learning_rate": [0.1, 0.2], "momentum": [0.9]}, "one value per configuration"),
        ([{"learning_rate": 0.1}, {"momentum": 0.5}], "the same fields"),
        ({"learning_rate": [0.1, -0.2]}, "learning_rate must be >= 0, got -0.2"),
        # params given as a pytree and data not shuffled per seed: the seeds' runs were identical
        ({"learning_rate": [0.1, 0.1], "seed": [0, 1]}, "sweep: the configurations' seed field would change"),
        (
            {"learning_rate": [0.1, 0.1], "seed": [0, 0.5]},
            "the seed field must hold whole numbers, got \\[0.0, 0.5\\]",
        ),
        (
            {"learning_rate": [[0.1, 0.2], [0.3, 0.4]]},
            "field 'learning_rate' must hold one number per configuration",
        ),
    ],
)
def test_bad_sweeps_fail_before_compiling(configs, message):
    make = lambda learning_rate, momentum=0.0: gradtx.sgd(learning_rate, momentum=momentum)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        gradtx.sweep(loss_fn, PARAMS, make, configs, (X, Y), STEPS)


@pytest.mark.parametrize(
    "make, configs, message",
    [
        (
            gradtx.adam,
            {"learning_rate": [0.1, 0.2], "amsgrad": [False, True]},
            "field\\(s\\) \\['amsgrad'\\] as Python",
        ),
        (
            gradtx.sgd,
            {"momentum": [0.5, 0.9], "nesterov": [False, True]},
            "field\\(s\\) \\['nesterov'\\] as Python",
        ),
        (gradtx.adam, {"mu_dtype": [jnp.bfloat16, jnp.float32]}, "field 'mu_dtype' must hold numbers"),
        (  # refused by the factory's own validation when traced (not a tracer error)
            gradtx.adam,
            {"learning_rate": [0.1, 0.2], "gradient_accumulation_steps": [2, 2]},
            "field\\(s\\) \\['gradient_accumulation_steps'\\] as Python values.*functools.partial",
        ),
    ],
)
def test_structural_options_are_named_before_compiling(make, configs, message):
    # A bool flag changes the program, so one vmapped program cannot vary it: the error names the
    # field (not a tracer error from deep inside the compilation) and points to compare.
    with pytest.raises(ValueError, match=message) as raised:
        gradtx.sweep(loss_fn, PARAMS, make, configs, (X, Y), STEPS)
    assert "gradtx.compare" in str(raised.value)


def test_a_cached_sweep_program_takes_the_new_configurations():
    # The same factory and loss twice: the second call reuses the compiled program, and its values
    # (learning rates, seeds) come in as arguments, so each run still equals its own fit.
    make = lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9)  # noqa: E731
    gradtx.sweep(loss_fn, PARAMS, make, {"learning_rate": [0.01, 0.02]}, (X, Y), STEPS)
    result = gradtx.sweep(loss_fn, PARAMS, make, {"learning_rate": [0.05, 0.002]}, (X, Y), STEPS)
    for i, lr in enumerate([0.05, 0.002]):
        single = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(lr, momentum=0.9), (X, Y), STEPS)
        assert_same_run(result, i, single)


@pytest.mark.parametrize("group_size", [None, 2])  # 2: three seeds padded to two groups of two
def test_per_seed_shuffling_gives_each_seed_its_own_data_order(group_size):
    examples = (X.reshape(-1, 5), Y.reshape(-1, 3))  # 960 examples, 60 batches of 16 per epoch
    source = gradtx.shuffled_batches(examples, 16, per_seed=True)
    make = lambda learning_rate: gradtx.sgd(learning_rate)  # noqa: E731
    configs = {"learning_rate": [0.05] * 3, "seed": [0, 1, 2]}
    result = gradtx.sweep(loss_fn, PARAMS, make, configs, source, 2 * STEPS, group_size=group_size)
    for i, seed in enumerate([0, 1, 2]):
        key = jax.random.fold_in(jax.random.PRNGKey(0), seed)
        single = gradtx.fit(
            loss_fn, PARAMS, gradtx.sgd(0.05), gradtx.shuffled_batches(examples, 16), 2 * STEPS, key=key
        )
        assert_same_run(result, i, single)
    # Same params, same rate: only the data order tells the seeds apart.
    assert not np.allclose(result.history.loss[0], result.history.loss[1])


def test_without_per_seed_every_seed_sees_the_same_batches():
    # The seed then only initializes the params: each run is its own init trained on the shared order.
    examples = (X.reshape(-1, 5), Y.reshape(-1, 3))
    source = gradtx.shuffled_batches(examples, 16)
    configs = {"learning_rate": [0.05] * 2, "seed": [0, 1]}
    result = gradtx.sweep(
        loss_fn, init, lambda learning_rate: gradtx.sgd(learning_rate), configs, source, STEPS
    )
    for seed in (0, 1):
        alone = gradtx.fit(loss_fn, init(jax.random.PRNGKey(seed)), gradtx.sgd(0.05), source, STEPS)
        np.testing.assert_allclose(result.history.loss[seed], alone.history.loss, rtol=1e-5)


def test_compare_needs_a_family():
    with pytest.raises(ValueError, match="families must be a non-empty dict"):
        gradtx.compare(loss_fn, PARAMS, {}, (X, Y), STEPS)


def test_compare_names_a_group_size_that_would_group_nothing():
    with pytest.raises(ValueError, match="compare: group_size=2 groups the configurations of swept families"):
        gradtx.compare(loss_fn, PARAMS, {"adam": gradtx.adam(0.01)}, (X, Y), STEPS, group_size=2)


def test_range_test_names_a_step_count_that_is_not_an_int():
    with pytest.raises(ValueError, match="lr_range_test: steps must be an int >= 2, got None"):
        gradtx.lr_range_test(quadratic, QUAD_PARAMS, gradtx.sgd, NO_DATA, steps=None)


@pytest.mark.parametrize("family", [gradtx.adam, (gradtx.adam,)], ids=["factory", "one-tuple"])
def test_compare_names_a_family_that_is_neither_an_optimizer_nor_a_pair(family):
    # A factory where an optimizer belongs raised "cannot unpack non-iterable function object".
    with pytest.raises(ValueError, match="compare: family 'adam' must be an optimizer .* or a pair"):
        gradtx.compare(loss_fn, PARAMS, {"adam": family}, (X, Y), STEPS)


@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_groups_of_configurations_give_the_same_runs(group_size):
    # 5 configurations in groups of 2: padded to 6, the padding dropped. Early stopping, the plateau
    # feed and the evaluations all run inside the groups; each run equals its own fit.
    rule = gradtx.EarlyStopping("valid_loss", patience=2, min_delta=0.02)
    make = lambda learning_rate, patience: gradtx.chain(  # noqa: E731
        gradtx.sgd(learning_rate, momentum=0.5),
        gradtx.reduce_on_plateau(factor=0.5, patience=patience, min_delta=0.2),
    )
    configs = {"learning_rate": [0.0005, 0.01, 0.05, 0.1, 0.02], "patience": [0, 1, 2, 100, 0]}
    kwargs = dict(eval_fn=valid, eval_every=10, plateau_metric="valid_loss", early_stopping=rule)
    result = gradtx.sweep(loss_fn, PARAMS, make, configs, (X, Y), STEPS, group_size=group_size, **kwargs)
    assert result.history.loss.shape == (5, STEPS)
    assert result.history.metrics["valid_loss"].shape == (5, STEPS // 10)
    trained = np.asarray(result.history.steps_trained)
    assert trained.min() < STEPS  # some run stopped early: the freezing is exercised
    for i in range(5):
        lr, patience = configs["learning_rate"][i], configs["patience"][i]
        single = gradtx.fit(loss_fn, PARAMS, make(lr, patience), (X, Y), STEPS, **kwargs)
        assert int(single.history.steps_trained) == trained[i]
        assert_same_run(result, i, single)
        np.testing.assert_allclose(
            result.history.metrics["valid_loss"][i],
            single.history.metrics["valid_loss"],
            rtol=RTOL,
            atol=ATOL,
        )
        np.testing.assert_allclose(
            gradtx.plateau_scale(result.opt_state)[i], gradtx.plateau_scale(single.opt_state), rtol=RTOL
        )


def test_compare_groups_a_family_and_steps_the_others_together():
    results = gradtx.compare(
        loss_fn,
        PARAMS,
        {
            "sgd": gradtx.sgd(0.05),
            "adam": (lambda learning_rate: gradtx.adam(learning_rate), {"learning_rate": [0.01, 0.03, 0.1]}),
        },
        (X, Y),
        STEPS,
        group_size=2,
    )
    assert_same_run(results["adam"], 2, gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.1), (X, Y), STEPS))
    single = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.05), (X, Y), STEPS)
    np.testing.assert_allclose(results["sgd"].history.loss, single.history.loss, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("group_size", [0, -1, 1.5, True])
def test_group_size_must_be_a_positive_int(group_size):
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        gradtx.sweep(
            loss_fn, PARAMS, gradtx.sgd, {"learning_rate": [0.1]}, (X, Y), STEPS, group_size=group_size
        )


def test_group_size_and_mesh_do_not_combine():
    with pytest.raises(ValueError, match="group_size or mesh"):
        gradtx.sweep(
            loss_fn,
            PARAMS,
            gradtx.sgd,
            {"learning_rate": [0.1]},
            (X, Y),
            STEPS,
            group_size=1,
            mesh=jax.devices(),
        )


def test_one_member_of_a_partition_is_swept_by_gradtx_sweep():
    def make(head_rate):
        labels = {"w": "body", "b": "head"}
        return gradtx.partition({"body": gradtx.adam(0.01), "head": gradtx.sgd(head_rate)}, labels)

    rates = [0.0, 0.05, 0.2]
    result = gradtx.sweep(loss_fn, PARAMS, make, {"head_rate": rates}, (X, Y), 20)
    h = gradtx.hyperparams(result.opt_state)
    np.testing.assert_allclose(h["head/learning_rate"], rates)
    np.testing.assert_allclose(h["body/learning_rate"], [0.01] * 3)
    np.testing.assert_array_equal(result.params["b"][0], PARAMS["b"])  # rate 0: the head never moved
    single = gradtx.fit(loss_fn, PARAMS, make(0.05), (X, Y), 20)
    assert_same_run(result, 1, single)


def test_the_training_functions_share_one_argument_order():
    # fit(loss_fn, params, tx, ...) and sweep(make_tx, configs, loss_fn, params, ...) used to differ.
    import inspect

    def first(fn, n):
        return list(inspect.signature(fn).parameters)[:n]

    assert first(gradtx.fit, 3) == ["loss_fn", "params", "tx"]
    assert first(gradtx.sweep, 4) == ["loss_fn", "params", "make_tx", "configs"]
    assert first(gradtx.compare, 3) == ["loss_fn", "params", "families"]
    assert first(gradtx.lr_range_test, 3) == ["loss_fn", "params", "make_tx"]
    assert first(gradtx.lr_range_sweep, 3) == ["loss_fn", "params", "make_tx"]
    with pytest.raises(ValueError, match=r"the order is \(loss_fn, params, make_tx, configs, data, steps\)"):
        gradtx.sweep(gradtx.adam, {"learning_rate": [0.1]}, loss_fn, PARAMS, (X, Y), STEPS)  # the old order


def test_without_a_table_of_permutations_the_batches_are_the_same(monkeypatch):
    # Few batches per epoch over a long chunk made the table of permutations huge (full-batch training:
    # one permutation of the data per step, 7.6 GB for 20,000 examples and steps). Past a size the
    # permutation is drawn at each step instead: the same batches, per seed too, in a sweep and in fit.
    examples = (X.reshape(-1, 5), Y.reshape(-1, 3))
    source = gradtx.shuffled_batches(examples, 320, per_seed=True)  # 3 batches per epoch
    configs = {"learning_rate": [0.05] * 2, "seed": [0, 1]}
    make = lambda learning_rate: gradtx.sgd(learning_rate)  # noqa: E731

    def both():
        swept = gradtx.sweep(loss_fn, PARAMS, make, configs, source, STEPS, chunks=2)
        alone = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.05), gradtx.shuffled_batches(examples, 320), STEPS)
        return swept.history.loss, alone.history.loss

    with_table = both()
    monkeypatch.setattr(gradtx.data, "_MAX_TABLE", 0)
    jax.clear_caches()  # the chunks compiled with a table would be reused
    without = both()
    np.testing.assert_array_equal(without[0], with_table[0])
    np.testing.assert_array_equal(without[1], with_table[1])
    assert not np.array_equal(with_table[0][0], with_table[0][1])  # the seeds' orders differ
