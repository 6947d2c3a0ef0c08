"""Hyperparameter search: random search, successive halving, Hyperband and population-based training
against independent references (sweeps and fits of the same configurations, NumPy re-derivations of the
rung decisions and of one PBT generation), compute, compilation counts, divergence, resumption."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sharding import run_on_8_devices
from test_training import PARAMS, X, Y, loss_fn, valid

import gradtx
from gradtx import halving
from gradtx.engine import Run, StopState
from gradtx.population import Exploit
from gradtx.search import SearchResult
from gradtx.spaces import sample

SPACE = {"learning_rate": gradtx.log_uniform(0.003, 0.1), "momentum": gradtx.uniform(0.0, 0.9)}
KEY = jax.random.PRNGKey(3)
CONFIG_KEY, DATA_KEY = jax.random.fold_in(KEY, 0), jax.random.fold_in(KEY, 1)  # documented split
DATA = (X, Y)
# Rates up to 0.1 with momentum up to 0.9 on this least-squares problem (Hessian eigenvalues about 2)
# stay far from chaos, so runs that differ only in vmap width agree to float32 rounding: over 90 steps
# the measured relative differences are below 1e-6; 1e-5 leaves room for other CPUs' summation orders.
RTOL = 1e-5


def make(learning_rate, momentum):
    return gradtx.sgd(learning_rate, momentum=momentum)


def halve(**kwargs):
    args = dict(num_configs=9, eta=3, key=KEY, eval_fn=valid)  # rungs: 9, 3, 1 trials to 10, 30, 90 steps
    return gradtx.successive_halving(
        loss_fn, PARAMS, make, kwargs.pop("space", SPACE), DATA, 90, **args | kwargs
    )


@pytest.fixture(scope="module")
def halved():
    return halve()


def config_of(result, trial):
    return {k: v[trial] for k, v in result.configs.items()}


# --- random search -----------------------------------------------------------------------------------------


def test_random_search_is_a_sweep_of_the_drawn_configurations_and_picks_the_best_final_metric():
    result = gradtx.random_search(
        loss_fn, PARAMS, make, SPACE, DATA, 60, num_configs=6, key=KEY, eval_fn=valid
    )
    configs = {k: np.asarray(v) for k, v in sample(SPACE, CONFIG_KEY, 6).items()}
    swept = gradtx.sweep(loss_fn, PARAMS, make, configs, DATA, 60, key=DATA_KEY, eval_fn=valid)
    final = np.asarray(swept.history.metrics["valid_loss"])[:, -1]
    np.testing.assert_allclose(result.metric_history[:, -1], final, rtol=RTOL)
    assert result.best_trial == int(np.argmin(final)) and result.best_metric == pytest.approx(
        final.min(), rel=RTOL
    )
    np.testing.assert_allclose(result.best_params["w"], swept.params["w"][result.best_trial], rtol=RTOL)
    assert result.compute == 6 * 60 and result.best_config == pytest.approx(
        config_of(result, result.best_trial)
    )


def test_random_search_with_mode_max_picks_the_highest_metric_and_never_a_diverged_one():
    def score(p):  # diverged runs give NaN
        return {"score": -valid(p)["valid_loss"]}

    space = {"learning_rate": gradtx.log_uniform(0.01, 30.0), "momentum": 0.0}
    result = gradtx.random_search(
        loss_fn, PARAMS, make, space, DATA, 60, num_configs=8, key=KEY, eval_fn=score, mode="max"
    )
    final = result.metric_history[:, -1]
    assert not np.isfinite(final).all(), (
        "the space must make some runs diverge for this test to mean anything"
    )
    assert result.best_metric == np.nanmax(np.where(np.isfinite(final), final, np.nan))


# --- successive halving ---------------------------------------------------------------------------------


def statistic(values, rung_metric, smoothing=0.5):
    """NumPy re-derivation of a rung statistic over each row of evaluations (float64)."""
    if rung_metric == "current":
        return values[:, -1]
    if rung_metric == "best":
        return np.array([np.min(v[np.isfinite(v)]) if np.isfinite(v).any() else np.nan for v in values])
    ema = values[:, 0].copy()
    for t in range(1, values.shape[1]):
        ema = smoothing * ema + (1 - smoothing) * values[:, t]
    return ema


def assert_survivors_are_the_top_third(result, rung_metric, widths=(9, 3, 1), ends=(1, 3, 9)):
    history = np.asarray(result.metric_history, np.float64)
    for i in range(len(widths) - 1):
        reached = np.flatnonzero(result.rung >= i)
        assert len(reached) == widths[i]
        values = history[reached, : ends[i]]
        value = statistic(values, rung_metric)
        value = np.where(np.isfinite(values[:, -1]) & np.isfinite(value), value, np.inf)
        expected = reached[np.argsort(value, kind="stable")[: widths[i + 1]]]
        assert set(expected) == set(np.flatnonzero(result.rung >= i + 1)), (i, value)


def test_survivors_of_each_rung_are_exactly_the_best_third_by_the_current_value(halved):
    assert_survivors_are_the_top_third(halved, "current")


@pytest.mark.parametrize("rung_metric", ["best", "ema"])
def test_survivors_follow_the_chosen_rung_statistic(rung_metric):
    # Noisy rates (up to 0.5 with momentum): the best so far and the average differ from the last value.
    space = {"learning_rate": gradtx.log_uniform(0.01, 0.5), "momentum": gradtx.uniform(0.5, 0.95)}
    assert_survivors_are_the_top_third(halve(space=space, rung_metric=rung_metric), rung_metric)


def test_a_survivor_continues_where_it_stopped_as_one_fit_straight_through(halved):
    # The last rung's trial was gathered twice between rungs (params, momentum, hyperparameters) and
    # trained in groups of other widths; straight through it is one fit of its configuration.
    best = halved.best_trial
    assert halved.rung[best] == 2 and halved.steps_trained[best] == 90
    fit = gradtx.fit(
        loss_fn, PARAMS, make(**config_of(halved, best)), DATA, 90, key=DATA_KEY, eval_fn=valid, eval_every=10
    )
    np.testing.assert_allclose(halved.metric_history[best], fit.history.metrics["valid_loss"], rtol=RTOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7), halved.best_params, fit.params
    )
    # A trial stopped at the second rung: its first three evaluations, then nothing.
    stopped = int(np.flatnonzero(halved.rung == 1)[0])
    fit = gradtx.fit(
        loss_fn,
        PARAMS,
        make(**config_of(halved, stopped)),
        DATA,
        30,
        key=DATA_KEY,
        eval_fn=valid,
        eval_every=10,
    )
    np.testing.assert_allclose(
        halved.metric_history[stopped, :3], fit.history.metrics["valid_loss"], rtol=RTOL
    )
    assert np.isnan(halved.metric_history[stopped, 3:]).all() and halved.steps_trained[stopped] == 30


def test_total_compute_is_the_sum_of_the_rungs(halved):
    # rung i trains n_i trials from r_{i-1} to r_i steps
    widths, ends = [9, 3, 1], [10, 30, 90]
    expected = sum(n * (r - q) for n, r, q in zip(widths, ends, [0, *ends[:-1]], strict=True))
    assert halved.compute == expected == int(halved.steps_trained.sum()) == 210


def test_the_same_key_gives_the_same_search(halved):
    again = halve()
    np.testing.assert_array_equal(again.metric_history, halved.metric_history)
    assert again.best_trial == halved.best_trial


def test_a_diverged_trial_is_never_promoted_nor_chosen():
    space = {"learning_rate": gradtx.log_uniform(0.01, 1e4), "momentum": gradtx.uniform(0.0, 0.9)}
    result = halve(space=space)
    history = result.metric_history
    assert not np.isfinite(history[:, 0]).all(), "the space must make some runs diverge"
    for i, end in [(0, 1), (1, 3)]:
        reached = np.flatnonzero(result.rung >= i)
        finite = reached[np.isfinite(history[reached, end - 1])]
        promoted = np.flatnonzero(result.rung >= i + 1)
        assert set(promoted) <= set(finite) or len(finite) < len(promoted)
    assert np.isfinite(result.best_metric) and np.isfinite(history[result.best_trial]).all()


def test_the_search_compiles_once_whatever_its_rungs():
    traces = []

    def counted(p, batch):
        traces.append(1)
        return loss_fn(p, batch)

    size = halving._program._cache_size()
    halve_counted = lambda **kw: gradtx.successive_halving(  # noqa: E731
        counted, PARAMS, make, SPACE, DATA, 90, num_configs=9, eval_fn=valid, **kw
    )
    halve_counted(key=KEY)
    once = len(traces)
    assert once >= 1 and halving._program._cache_size() == size + 1
    # Another key, rung by rung (as with progress or checkpoints): the same compiled program.
    halve_counted(key=jax.random.PRNGKey(4), progress=lambda done, total: None)
    assert len(traces) == once and halving._program._cache_size() == size + 1
    # Hyperband (6 rungs in 3 brackets) is another program, but its rungs are data: it reuses the one
    # traced group step of the same width and does not trace the loss again.
    gradtx.hyperband(counted, PARAMS, make, SPACE, DATA, 90, min_steps=10, key=KEY, eval_fn=valid)
    assert len(traces) == once and halving._program._cache_size() == size + 2


def test_a_search_interrupted_between_rungs_resumes_bit_identical(tmp_path, halved):
    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        halve(checkpoint_dir=tmp_path, progress=stop_after_two)
    resumed = halve(checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.metric_history, halved.metric_history)
    np.testing.assert_array_equal(resumed.steps_trained, halved.steps_trained)
    jax.tree.map(np.testing.assert_array_equal, resumed.best_params, halved.best_params)


# --- Hyperband -----------------------------------------------------------------------------------------


def test_hyperband_runs_its_brackets_and_chooses_among_their_last_rungs():
    result = gradtx.hyperband(loss_fn, PARAMS, make, SPACE, DATA, 90, min_steps=10, key=KEY, eval_fn=valid)
    # Li et al. (2018), R = 9 periods, eta = 3: s_max = 2, bracket s starts n = ceil(3 * 3^s / (s + 1))
    # trials at 9 / 3^s periods and keeps a third per rung.
    sizes = [int(np.ceil(3 * 3**s / (s + 1))) for s in (2, 1, 0)]
    np.testing.assert_array_equal(np.bincount(result.bracket), sizes)  # 9, 5, 3
    compute = [9 * 10 + 3 * 20 + 1 * 60, 5 * 30 + 1 * 60, 3 * 90]
    assert result.compute == sum(compute) and result.steps_trained.sum() == sum(compute)
    finalists = np.flatnonzero(result.steps_trained == 90)
    assert len(finalists) == 1 + 1 + 3
    final = result.metric_history[finalists, -1]
    assert result.best_trial == finalists[np.argmin(final)] and result.best_metric == pytest.approx(
        final.min()
    )


# --- population-based training -------------------------------------------------------------------------


def population_state(n=8):
    """A population mid-training: sgd with momentum, params and velocities from 10 steps of a sweep."""
    configs = {k: np.asarray(v) for k, v in sample(SPACE, CONFIG_KEY, n).items()}
    swept = gradtx.sweep(loss_fn, PARAMS, make, configs, DATA, 10, key=DATA_KEY)
    zero = jnp.zeros(n, jnp.int32)
    stop = StopState(jnp.full(n, jnp.inf), zero, jnp.zeros(n, bool), ())
    return Run(swept.params, swept.opt_state, stop, {}, jnp.ones(n, bool), zero + 1, zero + 10)


def test_the_exploit_step_copies_params_state_and_hyperparameters_exactly():
    runs = population_state()
    metric = np.asarray([0.5, 0.1, np.nan, 0.3, 0.9, 0.2, 0.7, 0.4], np.float32)
    step = Exploit("m", 1.0, 2, tuple(sorted(SPACE.items())), (0.8, 1.25), 0.0, 5)
    new, record = jax.jit(step.__call__)(
        runs, {"m": jnp.asarray(metric)}, jax.random.PRNGKey(0), jnp.int32(0)
    )
    # NumPy: rank with NaN last; the worst two (NaN, 0.9) copy from the best two (0.1, 0.2).
    order = np.argsort(np.where(np.isnan(metric), np.inf, metric), kind="stable")
    top, bottom = set(order[:2]), set(order[-2:])
    parent = np.asarray(record["parent"])
    assert all(parent[i] in top for i in bottom) and all(parent[i] == i for i in range(8) if i not in bottom)
    old = gradtx.hyperparams(runs.opt_state)
    for name, dim in SPACE.items():
        for i in range(8):
            value, before = float(record[name][i]), float(old[name][parent[i]])
            if i in bottom:  # perturbed from the parent's value by 0.8 or 1.25, inside the space
                assert any(
                    value == pytest.approx(np.clip(before * f, dim.low, dim.high), rel=1e-6)
                    for f in (0.8, 1.25)
                )
            else:
                assert value == float(old[name][i])
    # Every array of the state (params, velocity, counters) is the parent's, bit for bit; the
    # hyperparameters are those recorded.
    expected = jax.tree.map(lambda x: np.asarray(x)[parent], (runs.params, runs.opt_state))
    expected = (expected[0], gradtx.set_hyperparams(expected[1], **{k: record[k] for k in SPACE}))
    jax.tree.map(np.testing.assert_array_equal, (new.params, new.opt_state), expected)


def test_population_based_training_without_exploitation_is_a_sweep():
    pbt = gradtx.population_based_training(
        loss_fn,
        PARAMS,
        make,
        SPACE,
        DATA,
        40,
        population=8,
        ready_every=10,
        fraction=0.0,
        key=KEY,
        eval_fn=valid,
    )
    configs = {k: np.asarray(v) for k, v in sample(SPACE, CONFIG_KEY, 8).items()}
    swept = gradtx.sweep(loss_fn, PARAMS, make, configs, DATA, 40, key=DATA_KEY, eval_fn=valid, eval_every=10)
    np.testing.assert_allclose(pbt.metric_history, swept.history.metrics["valid_loss"], rtol=1e-6)
    np.testing.assert_array_equal(pbt.lineage["parent"], np.tile(np.arange(8), (4, 1)))


def test_population_based_training_replaces_the_worst_and_continues_the_copies():
    space = {"learning_rate": gradtx.log_uniform(0.003, 1e4), "momentum": gradtx.uniform(0.0, 0.9)}
    pbt = gradtx.population_based_training(
        loss_fn, PARAMS, make, space, DATA, 30, population=8, ready_every=10, key=KEY, eval_fn=valid,
        resample_probability=0.0,
    )  # fmt: skip
    history, parent = pbt.metric_history, pbt.lineage["parent"]
    assert not np.isfinite(history[:, 0]).all(), "some members must diverge in the first period"
    for t in range(2):
        copied = np.flatnonzero(parent[t] != np.arange(8))
        assert len(copied) == 2 and np.isfinite(history[parent[t][copied], t]).all()  # no NaN parent
        ranked = np.argsort(np.where(np.isfinite(history[:, t]), history[:, t], np.inf), kind="stable")
        assert set(copied) == set(ranked[-2:]) and set(parent[t][copied]) <= set(ranked[:2])
    np.testing.assert_array_equal(parent[-1], np.arange(8))  # nothing copied after the last evaluation
    assert np.isfinite(history[:, -1]).all()  # every diverged member was replaced
    # A member copied at the first evaluation then trains on, from the copy, as one fit would.
    member = int(np.flatnonzero(parent[0] != np.arange(8))[0])
    source = int(parent[0][member])
    tx, kwargs = make(**config_of(pbt, source)), dict(key=DATA_KEY, eval_fn=valid)  # one compiled fit
    first = gradtx.fit(loss_fn, PARAMS, tx, DATA, 10, **kwargs)
    state = gradtx.set_hyperparams(first.opt_state, **{k: pbt.lineage[k][0, member] for k in space})
    second = gradtx.fit(loss_fn, first.params, tx, DATA, 10, opt_state=state, **kwargs)  # steps 10-19
    assert history[member, 1] == pytest.approx(float(second.history.metrics["valid_loss"][0]), rel=RTOL)


# The resumed sweep compiles its chunk again (the restored carry is committed to a device, the fresh one
# is not, and jit keys on that): two compilations of the PBT program.
@pytest.mark.slow
def test_population_based_training_interrupted_between_chunks_resumes_with_its_lineage(tmp_path):
    def pbt(**kwargs):
        return gradtx.population_based_training(
            loss_fn, PARAMS, make, SPACE, DATA, 40, population=8, ready_every=10, key=KEY, eval_fn=valid,
            chunks=2, **kwargs,
        )  # fmt: skip

    def stop_halfway(done, total):
        if done == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pbt(checkpoint_dir=tmp_path, progress=stop_halfway)
    resumed, straight = pbt(checkpoint_dir=tmp_path), pbt()
    np.testing.assert_array_equal(resumed.metric_history, straight.metric_history)
    for name in ("parent", *SPACE):
        np.testing.assert_array_equal(resumed.lineage[name], straight.lineage[name])
    jax.tree.map(np.testing.assert_array_equal, resumed.best_params, straight.best_params)
    with pytest.raises(ValueError, match="holds a run with other arguments"):  # other PBT settings
        gradtx.population_based_training(
            loss_fn, PARAMS, make, SPACE, DATA, 40, population=8, ready_every=10, key=KEY, eval_fn=valid,
            chunks=2, fraction=0.5, checkpoint_dir=tmp_path,
        )  # fmt: skip


def test_the_schedule_follows_the_ancestry_of_the_best_member():
    # Two members, three periods: member 1 copies member 0 after period 0 (rate 0.2 -> 0.25), then
    # member 0 copies member 1 after period 1 (0.25 -> 0.3125).
    parent = np.asarray([[0, 0], [1, 1], [0, 1]])
    rates = np.asarray([[0.2, 0.25], [0.3125, 0.25], [0.3125, 0.25]])
    result = SearchResult(
        "population_based_training", "m", "min", {}, None, 0.0, 0, {"learning_rate": np.asarray([0.2, 0.1])},
        np.zeros((2, 3)), np.asarray([10, 20, 30]), np.full(2, 30), np.zeros(2, int), np.zeros(2, int), 60,
        0.0, 0.0, {"parent": parent, "learning_rate": rates},
    )  # fmt: skip
    steps, values = result.schedule("learning_rate", trial=0)
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_allclose(values, [0.2, 0.25, 0.3125])  # member 0 <- 1 <- 0
    np.testing.assert_allclose(result.schedule("learning_rate", trial=1)[1], [0.2, 0.25, 0.25])


@pytest.mark.parametrize(
    "make_tx, space, message",
    [
        (
            lambda lr: gradtx.sgd(lr),
            {"lr": gradtx.log_uniform(0.01, 0.1)},
            "space field 'lr' is not a hyperparameter",
        ),
        (
            lambda learning_rate: gradtx.sgd(gradtx.exponential_schedule(learning_rate, 100, 0.5)),
            {"learning_rate": gradtx.log_uniform(0.01, 0.1)},
            "'learning_rate': set_hyperparams: learning_rate follows a schedule",
        ),
        (make, {"learning_rate": 0.1, "momentum": gradtx.uniform(0.5, 1.0)}, "reaches \\[1.0\\], outside"),
    ],
)
def test_pbt_names_a_space_field_it_cannot_write_into_the_state(make_tx, space, message):
    with pytest.raises(ValueError, match=message):
        gradtx.population_based_training(
            loss_fn, PARAMS, make_tx, space, DATA, 20, population=4, ready_every=10, eval_fn=valid
        )


def pbt(steps=20, **kw):
    return gradtx.population_based_training(
        loss_fn, PARAMS, make, SPACE, DATA, steps, population=4, ready_every=10, eval_fn=valid, **kw
    )


# --- errors and devices --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: gradtx.random_search(loss_fn, PARAMS, make, SPACE, DATA, 20, num_configs=2),
            "needs eval_fn",
        ),
        (lambda: halve(metric="accuracy"), "metric must name one of eval_fn's metrics \\['valid_loss'\\]"),
        (lambda: halve(mode="lowest"), "mode must be 'min' or 'max'"),
        (lambda: halve(eta=1), "eta must be >= 2"),
        (lambda: halve(min_steps=20), "max_steps / min_steps must be eta\\^s"),
        (lambda: halve(rung_metric="median"), "rung_metric must be 'current', 'best' or 'ema'"),
        (lambda: halve(num_configs=2), "num_configs must be >= eta=3"),
        (lambda: halve(key=3), "successive_halving: key must be a JAX random key"),
        (
            lambda: gradtx.successive_halving(  # a fixed structural number is still traced: named
                loss_fn,
                PARAMS,
                gradtx.sgd,
                {**SPACE, "gradient_accumulation_steps": 2},
                DATA,
                90,
                num_configs=9,
                eval_fn=valid,
            ),
            "successive_halving: .*\\['gradient_accumulation_steps'\\] as Python values",
        ),
        (
            lambda: gradtx.random_search(
                loss_fn, PARAMS, make, SPACE, DATA, 20, num_configs=2, eval_fn=valid, eval_every=3
            ),
            "random_search: eval_every must divide steps=20",
        ),
        (
            lambda: gradtx.random_search(
                loss_fn, PARAMS, make, SPACE, DATA, 20, num_configs=2, eval_fn=valid, key=3
            ),
            "random_search: key must be a JAX random key",
        ),
        (lambda: pbt(steps=22), "ready_every must divide steps=22 into at least two periods.*ready_every=10"),
        (lambda: pbt(steps=10), "ready_every must divide steps=10 into at least two periods"),
        (lambda: pbt(perturb=0.8), "perturb must be a non-empty list of factors > 0, got 0.8"),
        (lambda: pbt(perturb="ab"), "perturb must be a non-empty list of factors > 0, got 'ab'"),
        (lambda: pbt(perturb=(0.8, -1.0)), "perturb must be a non-empty list of factors > 0"),
    ],
)
def test_bad_searches_fail_before_compiling(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.slow  # a fresh process on 8 simulated devices compiles four searches: about 10 s on 2 cores
def test_searches_on_8_devices_equal_the_single_device_searches():
    run_on_8_devices(
        """
        import numpy as np
        import gradtx
        from test_search import DATA, KEY, PARAMS, SPACE, loss_fn, make, valid

        for devices in (jax.devices()[:1], jax.devices()):
            # 9 trials in groups of 8 lanes: the first rung needs two groups, the last one idle lanes.
            sh = gradtx.successive_halving(loss_fn, PARAMS, make, SPACE, DATA, 90, num_configs=9, key=KEY,
                                           eval_fn=valid, mesh=devices, group_size=8)
            pbt = gradtx.population_based_training(loss_fn, PARAMS, make, SPACE, DATA, 30, population=8,
                                                   ready_every=10, key=KEY, eval_fn=valid, mesh=devices)
            if len(devices) == 1:
                one = (sh, pbt)
        np.testing.assert_allclose(sh.metric_history, one[0].metric_history, rtol=2e-5)
        np.testing.assert_array_equal(sh.rung, one[0].rung)
        np.testing.assert_allclose(pbt.metric_history, one[1].metric_history, rtol=2e-5)
        np.testing.assert_array_equal(pbt.lineage["parent"], one[1].lineage["parent"])
        """
    )
