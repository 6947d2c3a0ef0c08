"""fit: the on-device training loop equals the Python loop it replaces, with evaluation, performance
scheduling, early stopping and chunked progress."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gradtx

STEPS = 60
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(STEPS, 16, 5)), jnp.float32)  # pre-batched: (steps, batch, features)
W_TRUE = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)
Y = X @ W_TRUE + 0.1 * jnp.asarray(RNG.normal(size=(STEPS, 16, 3)), jnp.float32)
X_VALID = jnp.asarray(RNG.normal(size=(64, 5)), jnp.float32)
Y_VALID = X_VALID @ W_TRUE
PARAMS = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def valid(p):
    return {"valid_loss": loss_fn(p, (X_VALID, Y_VALID))}


def python_loop(tx, steps=STEPS, values=None):
    """The reference: the loop users write by hand, one jitted step per Python iteration."""
    params, state = PARAMS, tx.init(PARAMS)
    losses = []
    for i in range(steps):
        loss, grads = jax.value_and_grad(loss_fn)(params, (X[i % STEPS], Y[i % STEPS]))
        extra = {} if values is None or i not in values else {"value": values[i]}
        updates, state = tx.update(grads, state, params, **extra)
        params = gradtx.apply_updates(params, updates)
        losses.append(float(loss))
    return params, state, np.array(losses)


@pytest.mark.parametrize("tx", [gradtx.sgd(0.05, momentum=0.9), gradtx.adam(0.01), gradtx.adamw(0.01)])
def test_fit_equals_the_python_loop(tx):
    result = gradtx.fit(loss_fn, PARAMS, tx, (X, Y), STEPS)
    params, _, losses = python_loop(tx)
    np.testing.assert_allclose(result.history.loss, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), result.params, params)
    assert int(gradtx.step_count(result.opt_state)) == STEPS == int(result.history.steps_trained)


def test_fit_cycles_over_pre_batched_data():
    result = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.05), (X, Y), 2 * STEPS)
    _, _, losses = python_loop(gradtx.sgd(0.05), steps=2 * STEPS)
    np.testing.assert_allclose(result.history.loss, losses, rtol=1e-5)


def test_chunks_give_the_same_result_and_report_progress(capsys):
    tx = gradtx.adam(0.01)
    one = gradtx.fit(loss_fn, PARAMS, tx, (X, Y), STEPS, eval_fn=valid, eval_every=10)
    chunked = gradtx.fit(
        loss_fn, PARAMS, tx, (X, Y), STEPS, eval_fn=valid, eval_every=10, chunks=3, progress=True
    )
    jax.tree.map(np.testing.assert_array_equal, one, chunked)
    captured = capsys.readouterr()
    assert "60/60" in captured.err + captured.out  # a tqdm bar, or printed lines without tqdm
    chunked = gradtx.fit(loss_fn, PARAMS, tx, (X, Y), STEPS, chunks=4)  # without evaluation
    np.testing.assert_array_equal(chunked.history.loss, one.history.loss)


def test_the_callers_params_stay_valid():
    params = {"w": jnp.ones((5, 3)), "b": jnp.ones(3)}
    gradtx.fit(loss_fn, params, gradtx.sgd(0.01), (X, Y), 5)
    assert float(params["w"].sum()) == 15.0  # not donated away


def test_eval_fn_runs_every_eval_every_steps():
    tx = gradtx.sgd(0.05)
    result = gradtx.fit(loss_fn, PARAMS, tx, (X, Y), STEPS, eval_fn=valid, eval_every=20)
    np.testing.assert_array_equal(result.history.eval_step, [20, 40, 60])
    for k, steps in enumerate([20, 40, 60]):
        params, _, _ = python_loop(tx, steps=steps)
        np.testing.assert_allclose(
            result.history.metrics["valid_loss"][k], valid(params)["valid_loss"], rtol=1e-5
        )


def test_a_scalar_eval_fn_is_named_eval():
    result = gradtx.fit(
        loss_fn, PARAMS, gradtx.sgd(0.05), (X, Y), 20, eval_fn=lambda p: p["b"].sum(), eval_every=10
    )
    assert set(result.history.metrics) == {"eval"}


def test_plateau_metric_feeds_reduce_on_plateau_after_each_evaluation():
    tx = gradtx.chain(gradtx.sgd(0.3), gradtx.reduce_on_plateau(factor=0.5, patience=1, min_delta=1.0))
    result = gradtx.fit(
        loss_fn, PARAMS, tx, (X, Y), STEPS, eval_fn=valid, eval_every=10, plateau_metric="valid_loss"
    )
    # Reference: the loop passes the validation loss after steps 10, 20, ... at the next step's update.
    values = {}
    params, state = PARAMS, tx.init(PARAMS)
    for i in range(STEPS):
        grads = jax.grad(loss_fn)(params, (X[i], Y[i]))
        # Every step passes a value; only those measured after an evaluation count.
        updates, state = tx.update(grads, state, params, value=values.get(i, 0.0), measured=i in values)
        params = gradtx.apply_updates(params, updates)
        if (i + 1) % 10 == 0:
            values[i + 1] = valid(params)["valid_loss"]
    assert float(gradtx.plateau_scale(state)) < 1  # min_delta=1 makes it reduce: the test has teeth
    np.testing.assert_allclose(gradtx.plateau_scale(result.opt_state), gradtx.plateau_scale(state))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), result.params, params)


def test_early_stopping_freezes_the_run():
    rule = gradtx.EarlyStopping("valid_loss", patience=2, min_delta=10.0)  # nothing improves by 10
    tx = gradtx.sgd(0.05)
    result = gradtx.fit(loss_fn, PARAMS, tx, (X, Y), STEPS, eval_fn=valid, eval_every=10, early_stopping=rule)
    # The first evaluation sets the best value, the next two do not improve: stopped after 30 steps.
    assert int(result.history.steps_trained) == 30
    params, _, _ = python_loop(tx, steps=30)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), result.params, params)
    assert int(gradtx.step_count(result.opt_state)) == 30
    np.testing.assert_allclose(
        result.history.metrics["valid_loss"][2:], valid(params)["valid_loss"], rtol=1e-6
    )


def _overshoot(learning_rate, steps, every):
    """A run whose metric is best in the middle: SGD pulls w from 0 towards 10 while the metric is
    (w - 3)^2. Float64 re-derivation: w_t = 10 (1 - (1 - 2 lr)^t); returns the metric at each
    evaluation and w at each evaluation."""
    t = every * np.arange(1, steps // every + 1)
    w = 10.0 * (1.0 - (1.0 - 2.0 * learning_rate) ** t)
    return (w - 3.0) ** 2, w


def _overshoot_fit(tx_or_sweep, rule, steps=60, every=5, **kwargs):
    loss = lambda p, batch: jnp.sum((p["w"] - 10.0) ** 2)  # noqa: E731
    metric = lambda p: {"miss": jnp.sum((p["w"] - 3.0) ** 2)}  # noqa: E731
    data = jnp.zeros((steps, 1))
    common = dict(eval_fn=metric, eval_every=every, early_stopping=rule)
    if callable(tx_or_sweep):
        return gradtx.sweep(
            loss,
            {"w": jnp.zeros(())},
            tx_or_sweep,
            kwargs["configs"],
            data,
            steps,
            group_size=kwargs["group_size"],
            **common,
        )
    return gradtx.fit(loss, {"w": jnp.zeros(())}, tx_or_sweep, data, steps, **common)


@pytest.mark.parametrize("patience", [2, 100])  # stops after the best / never stops
def test_restore_best_weights_returns_the_params_of_the_best_evaluation(patience):
    lr = 0.02
    metric, w = _overshoot(lr, 60, 5)
    best = int(np.argmin(metric))
    assert 0 < best < len(metric) - 3  # the best is in the middle: the test has teeth
    rule = gradtx.EarlyStopping("miss", patience=patience, restore_best_weights=True)
    result = _overshoot_fit(gradtx.sgd(lr), rule)
    np.testing.assert_allclose(float(result.params["w"]), w[best], rtol=1e-5)
    stopped_at = 5 * (best + 1 + patience) if patience == 2 else 60
    assert int(result.history.steps_trained) == stopped_at
    # The optimizer state is the last one (Keras restores the weights only).
    assert int(gradtx.step_count(result.opt_state)) == stopped_at
    # Without the option, the params are where the run stopped.
    plain = _overshoot_fit(gradtx.sgd(lr), rule._replace(restore_best_weights=False))
    np.testing.assert_allclose(
        float(plain.params["w"]), 10.0 * (1.0 - (1.0 - 2 * lr) ** stopped_at), rtol=1e-5
    )


@pytest.mark.parametrize("group_size", [None, 2])  # 2: groups in sequence, the third one padded
def test_restore_best_weights_per_configuration_of_a_sweep(group_size):
    rates = [0.01, 0.02, 0.04]
    rule = gradtx.EarlyStopping("miss", patience=3, restore_best_weights=True)
    result = _overshoot_fit(
        lambda learning_rate: gradtx.sgd(learning_rate),
        rule,
        configs={"learning_rate": rates},
        group_size=group_size,
    )
    expected = [w[np.argmin(metric)] for metric, w in (_overshoot(lr, 60, 5) for lr in rates)]
    assert len(set(np.round(expected, 6))) == 3  # each configuration has its own best evaluation
    np.testing.assert_allclose(np.asarray(result.params["w"]), expected, rtol=1e-5)


def test_data_arrays_reach_the_batches_through_the_argument():
    # The compiled chunk takes the data as an argument (a closed-over array would be compiled in as a
    # constant): the batches must come from the arrays passed, not from the ones first given.
    from gradtx.data import source

    key = jax.random.PRNGKey(1)
    for data in [(X, Y), gradtx.shuffled_batches((X[:, 0], Y[:, 0]), 4)]:
        spec, arrays = source(data)
        assert (
            jax.tree.leaves(arrays)[0] is jax.tree.leaves(data if isinstance(data, tuple) else data.data)[0]
        )
        shifted = jax.tree.map(lambda a: a + 1, arrays)
        step = jnp.int32(3)

        def batch(arrays, spec=spec, step=step):
            return spec.batch(spec.tables(jnp.int32(0), 8, key, arrays), arrays, step)[0]

        np.testing.assert_array_equal(batch(shifted), batch(arrays) + 1)


def test_a_second_fit_with_the_same_functions_reuses_the_compiled_program():
    traces = []

    def counted_loss(p, batch):
        traces.append(1)  # runs when jax traces the program, not when it runs
        return loss_fn(p, batch)

    tx = gradtx.adam(0.01)
    first = gradtx.fit(counted_loss, PARAMS, tx, (X, Y), STEPS)
    traced = len(traces)
    # Other params and other data of the same shapes: no new trace, and the results are those of
    # the new inputs (nothing of the first call is baked into the cached program).
    start = jax.tree.map(lambda x: x + 0.5, PARAMS)
    second = gradtx.fit(counted_loss, start, tx, (X, -Y), STEPS)
    assert len(traces) == traced
    fresh = gradtx.fit(loss_fn, start, gradtx.adam(0.01), (X, -Y), STEPS)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), second.params, fresh.params
    )
    assert not np.allclose(first.params["w"], second.params["w"])
    # Another number of steps is another program.
    gradtx.fit(counted_loss, PARAMS, tx, (X, Y), STEPS // 2)
    assert len(traces) > traced


def test_the_compiled_programs_can_be_cleared():
    traces = []

    def counted_loss(p, batch):
        traces.append(1)
        return loss_fn(p, batch)

    tx = gradtx.sgd(0.1)
    gradtx.fit(counted_loss, PARAMS, tx, (X, Y), 5)
    traced = len(traces)
    gradtx.fit(counted_loss, PARAMS, tx, (X, Y), 5)
    assert len(traces) == traced  # kept by jax.jit's cache
    jax.clear_caches()
    gradtx.fit(counted_loss, PARAMS, tx, (X, Y), 5)
    assert len(traces) > traced


def test_fits_in_threads_share_the_compiled_program_safely():
    # The hand-made cache it replaced raised KeyError under concurrent eviction.
    from concurrent.futures import ThreadPoolExecutor

    tx = gradtx.sgd(0.05)

    def train(k):
        return gradtx.fit(loss_fn, PARAMS, tx, (X, Y), 4 + k % 3).params["w"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(train, range(12)))
    for k, w in enumerate(results):
        np.testing.assert_array_equal(w, gradtx.fit(loss_fn, PARAMS, tx, (X, Y), 4 + k % 3).params["w"])


@pytest.mark.parametrize(
    "data, message",
    [
        (
            (X[:0], Y[:0]),
            "shuffled_batches: the arrays hold no examples",
        ),  # was "batch_size must be in [1, 0]"
        ((X, np.float32(1.0)), "data holds a scalar"),  # was "different numbers of examples: [0, 60]"
        ({}, "data must hold arrays of examples"),  # was "different numbers of examples: []"
    ],
)
def test_shuffled_batches_name_what_is_wrong_with_the_data(data, message):
    with pytest.raises(ValueError, match=message):
        gradtx.shuffled_batches(data, 1)


def test_shuffled_batches_visit_every_example_once_per_epoch():
    data = (jnp.arange(10.0), jnp.arange(10))
    source = gradtx.shuffled_batches(data, 3)  # 3 batches per epoch, one example left out
    batch_at = jax.jit(lambda s: source.prepare(jnp.int32(0), 12, jax.random.PRNGKey(1))(s))
    epochs = [np.concatenate([np.asarray(batch_at(3 * e + i)[1]) for i in range(3)]) for e in range(4)]
    for e in epochs:
        assert len(set(e)) == 9 and set(e) <= set(range(10))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch


def test_fit_trains_a_flax_nnx_model_state():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.linear(x)

    graphdef, state = nnx.split(Model(nnx.Rngs(0)))

    def nnx_loss(state, batch):
        x, y = batch
        return jnp.mean((nnx.merge(graphdef, state)(x) - y) ** 2)

    tx = gradtx.adam(0.05)
    result = gradtx.fit(nnx_loss, state, tx, (X, Y), STEPS)
    optimizer = nnx.Optimizer(model := nnx.merge(graphdef, state), tx, wrt=nnx.Param)
    for i in range(STEPS):
        grads = nnx.grad(lambda m, x, y: jnp.mean((m(x) - y) ** 2))(model, X[i], Y[i])
        optimizer.update(model, grads)
    np.testing.assert_allclose(
        result.params["linear"]["kernel"][...], model.linear.kernel[...], rtol=1e-5, atol=1e-6
    )
    assert result.history.loss[-1] < 0.1 * result.history.loss[0]


def test_a_numpy_min_delta_is_a_number():
    # np.float32(0.01) was refused as "not a finite number"; it must act as 0.01 does.
    stop = dict(eval_fn=valid, eval_every=10)
    a = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.1), (X, Y), STEPS, early_stopping=gradtx.EarlyStopping(
        "valid_loss", patience=1, min_delta=np.float32(0.01)), **stop)  # fmt: skip
    b = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.1), (X, Y), STEPS, early_stopping=gradtx.EarlyStopping(
        "valid_loss", patience=1, min_delta=float(np.float32(0.01))), **stop)  # fmt: skip
    np.testing.assert_array_equal(a.history.loss, b.history.loss)


def test_optax_transformations_run_in_fit():
    result = gradtx.fit(
        loss_fn, PARAMS, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.01)), (X, Y), 20
    )
    assert result.history.loss[-1] < result.history.loss[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(data=(X, Y[:10])), "same number of batches along axis 0"),
        (dict(steps=0), "steps must be >= 1, got 0"),
        (dict(eval_fn=valid, eval_every=7), "eval_every must divide steps=60, got eval_every=7"),
        (dict(plateau_metric="valid_loss"), "need an eval_fn"),
        (dict(eval_fn=valid, eval_every=10, plateau_metric="loss"), "has no metric 'loss'"),
        (dict(eval_fn=lambda p: p["w"], eval_every=10), "metric 'eval' must be a scalar"),
        (
            dict(eval_fn=valid, eval_every=10, early_stopping=gradtx.EarlyStopping("valid_loss", mode="up")),
            "mode must be 'min' or 'max'",
        ),
        (
            dict(
                eval_fn=valid, eval_every=10, early_stopping=gradtx.EarlyStopping("valid_loss", patience=-1)
            ),
            "early_stopping: patience must be >= 0, got -1",
        ),
        (dict(chunks=0), "fit: chunks must be >= 1, got 0"),
        (dict(chunks=-3), "fit: chunks must be >= 1, got -3"),
        (dict(chunks=2.0), "fit: chunks must be an int >= 1, got 2.0"),
        (dict(steps=2.5), "fit: steps must be an int >= 1, got 2.5"),
        (dict(eval_fn=valid, eval_every=0), "fit: eval_every must be >= 1, got 0"),
        (dict(eval_every=10), "fit: eval_every=10 has no effect without an eval_fn"),
        (
            dict(eval_fn=valid, eval_every=10, plateau_metric="valid_loss"),
            "plateau_metric='valid_loss' is given but no optimizer has a gradtx.reduce_on_plateau",
        ),
        # chunks end at evaluations: with one evaluation, chunks=4 gave one chunk (no checkpoint, no report)
        (dict(eval_fn=valid, chunks=4), "chunks=4 needs at least 4 evaluations, got 1 .*eval_every <= 15"),
        (dict(eval_fn=valid, eval_every=20, chunks=4), "chunks=4 needs at least 4 evaluations, got 3"),
        (
            dict(eval_fn=valid, early_stopping=gradtx.EarlyStopping("valid_loss", restore_best_weights="no")),
            "restore_best_weights must be True or False, got 'no'",
        ),
        (
            dict(eval_fn=valid, early_stopping=gradtx.EarlyStopping(None)),
            "early_stopping: metric must name a metric of eval_fn, got None",
        ),
        (dict(tx=gradtx.adam), "fit: tx must be an optimizer \\(init, update\\), got <function adam"),
        (dict(initial_step=2.5), "fit: initial_step must be an int >= 0, got 2.5"),
        (dict(initial_step="3"), "fit: initial_step must be an int >= 0, got '3'"),
        (
            dict(initial_step=2**31 - 5),
            "fit: initial_step \\+ steps must be < 2\\*\\*31, got 2147483643 \\+ 60",
        ),
        (dict(progress="no"), "fit: progress must be True, False or a function"),  # showed the bar
        (dict(progress=lambda done: None), "fit: progress must be .* a function \\(steps_done, steps\\)"),
        (dict(data=lambda step: (X[0], Y[0])), "data: a function of data must take \\(step, key\\)"),
        # raw errors from inside the engine before, or (complex) a silently dropped imaginary part
        (dict(eval_fn=lambda p: {"v": "high"}), "fit: eval_fn\\(params\\) must return a dict"),
        (dict(eval_fn=lambda p: {0: p["b"].sum()}), "string names"),
        (dict(eval_fn=lambda p: {"v": {"inner": p["b"].sum()}}), "string names and one array each"),
        (
            dict(eval_fn=lambda p: {"v": p["b"].sum() + 1j}),
            "fit: eval_fn's metric 'v' must be real, got complex64",
        ),
        # JAX's "Gradient only defined for scalar-output functions" named neither fit nor loss_fn
        (
            dict(loss_fn=lambda p, b: (b[0] @ p["w"] - b[1]) ** 2),
            "fit: loss_fn.*must return one float.*got float32\\[16, 3\\]",
        ),
        (dict(loss_fn=lambda p, b: (loss_fn(p, b), 0.0)), "fit: loss_fn.*got a tuple of 2 arrays"),
        (dict(loss_fn=lambda p, b: jnp.int32(1)), "fit: loss_fn.*got int32\\[\\]"),
        (
            dict(tx=gradtx.sgd(0.1), opt_state=gradtx.adam(0.1).init(PARAMS)),
            "fit: opt_state is not a state of this optimizer .*got ChainState",
        ),
    ],
)
def test_bad_input_fails_before_compiling(kwargs, message):
    args = dict(loss_fn=loss_fn, params=PARAMS, tx=gradtx.sgd(0.1), data=(X, Y), steps=STEPS) | kwargs
    with pytest.raises(ValueError, match=message):
        gradtx.fit(**args)


def test_steps_may_be_a_jax_integer():
    # It used to fail with "unhashable type".
    result = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.05), (X, Y), jnp.int32(10))
    assert result.history.loss.shape == (10,)


def test_a_reduce_on_plateau_without_plateau_metric_fails_before_compiling():
    tx = gradtx.chain(gradtx.sgd(0.05), gradtx.reduce_on_plateau())
    with pytest.raises(ValueError, match="has a gradtx.reduce_on_plateau, which needs a value at every step"):
        gradtx.fit(loss_fn, PARAMS, tx, (X, Y), 10, eval_fn=valid, eval_every=10)


def _keras_stop_epoch(values, **settings):
    """The 0-based epoch at which Keras's EarlyStopping callback stops on ``values``, or None."""
    import keras

    class Model:
        stop_training = False

    callback = keras.callbacks.EarlyStopping(monitor="m", **{"mode": "min", **settings})
    callback.set_model(Model())
    callback.on_train_begin()
    for epoch, v in enumerate(values):
        callback.on_epoch_end(epoch, {"m": v})
        if callback.model.stop_training:
            return epoch
    return None


def _scripted_stop(values, **settings):
    """Steps trained by fit when its metric follows ``values``, one per evaluation of 10 steps: the
    param ``t`` counts steps (SGD at rate 1 on the loss -t) and eval_fn looks its value up."""
    table = jnp.asarray(values, jnp.float32)

    def eval_fn(p):
        return {"m": table[jnp.round(p["t"]).astype(jnp.int32) // 10 - 1]}

    rule = gradtx.EarlyStopping("m", **settings)
    steps = 10 * len(values)
    result = gradtx.fit(
        lambda p, b: -p["t"], {"t": jnp.zeros([])}, gradtx.sgd(1.0), jnp.zeros((1,)), steps,
        eval_fn=eval_fn, eval_every=10, early_stopping=rule,
    )  # fmt: skip
    return int(result.history.steps_trained)


@pytest.mark.parametrize(
    "values, settings",
    [
        ([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dict(patience=0)),  # always improving: never stops
        ([5.0, 4.0, 4.5, 3.0, 2.0, 1.0], dict(patience=0)),  # stops at the first miss
        ([5.0, 5.0, 4.0, 4.0, 4.0, 3.0, 3.0], dict(patience=1)),
        ([5.0, 4.0, 3.95, 3.9, 3.0, 2.0], dict(patience=1, min_delta=0.1)),
        ([1.0, 2.0, 3.0, 3.0, 2.0, 2.5, 2.5], dict(patience=2, mode="max")),
        ([5.0, float("nan"), 4.0, 4.0, 6.0], dict(patience=1)),  # a NaN evaluation is a miss
    ],
)
def test_early_stopping_stops_where_keras_stops(values, settings):
    # patience=0 (Keras's default) used to stop at the first evaluation, however much it improved.
    stop = _keras_stop_epoch(values, **settings)
    expected = 10 * len(values) if stop is None else 10 * (stop + 1)
    assert _scripted_stop(values, **settings) == expected


def test_a_nan_first_evaluation_does_not_become_the_best():
    # Keras takes a NaN first value as its best, after which nothing improves on it and the run stops
    # at the next evaluation; here a NaN is never an improvement, so training goes on.
    values = [float("nan"), 5.0, 4.0, 3.0]
    assert _keras_stop_epoch(values, patience=0) == 1
    assert _scripted_stop(values, patience=0) == 40
