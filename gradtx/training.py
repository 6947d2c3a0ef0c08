"""Training on the device: the logic of one run, written once, and the one place that vectorizes it.

One run is a small carry of arrays (`Run`: params, optimizer state, early-stopping state, the last
evaluation) and three pure functions over it:

* `step` makes one update from one batch;
* `end_period` evaluates after every ``period`` steps (``eval_every``), feeds early stopping and, at the
  next step, `reduce_on_plateau`;
* a *population step* (``Loop.population``, optional) runs after `end_period` and sees all the
  configurations of a family at once: see `PopulationStep` for its contract.

What the program does is a frozen, hashable `Loop` (functions, period, options); which optimizers it
trains is a tuple of `Family` (an optimizer or a factory of one, and whether it has a configuration
axis). `_across` is the only place that vectorizes a function of one run over a family's
configurations (one vmap, or groups of vmaps in sequence). A compiled *chunk* is a `lax.scan` over
periods of a `lax.scan` over steps; `jax.jit` with the loop and the families as static arguments is the
cache of compiled chunks (a later call with the same functions and shapes does not compile;
``jax.clear_caches()`` empties it). Between chunks the driver reports progress and, with
``checkpoint_dir``, saves the carry (`gradtx.checkpoints`).

Adding a per-step quantity to `History`: add a field to `StepOutputs` and compute it in `step`.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.base import Params, State, Transformation, apply_updates, step_count
from gradtx.checkpoints import Checkpoints, digest
from gradtx.data import Data, source
from gradtx.plateau import PlateauState

LossFn = Callable[[Params, Any], jax.Array]  # (params, batch) -> scalar loss
EvalFn = Callable[[Params], Any]  # params -> scalar or dict of scalars


class EarlyStopping(NamedTuple):
    """Stop a run (freeze its params and optimizer state) when ``metric`` has not improved by more
    than ``min_delta`` for ``patience`` evaluations, as Keras's ``EarlyStopping`` callback: after each
    evaluation ``wait`` counts the evaluations since the last improvement, and the run stops at an
    evaluation that does not improve once ``wait >= patience`` (``patience=0``: at the first one that
    does not improve; never at the first evaluation). Under a sweep each configuration stops on its own.
    A NaN metric is never an improvement (where Keras would keep a NaN first value as its best and stop
    at the next evaluation, here the run goes on).

    ``restore_best_weights`` (Keras's option of the same name): the result's params are those of the
    evaluation with the best metric, whether or not the run stopped; the optimizer state is the last
    one, as in Keras. It costs one more copy of the params (per configuration) on the device."""

    metric: str
    patience: int = 5
    min_delta: float = 0.0
    mode: str = "min"
    restore_best_weights: bool = False

    def check(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"early_stopping: mode must be 'min' or 'max', got {self.mode!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int | np.integer):
            raise ValueError(f"early_stopping: patience must be an int >= 0, got {self.patience!r}")
        if self.patience < 0:
            raise ValueError(f"early_stopping: patience must be >= 0, got {self.patience}")
        if (
            not (isinstance(self.min_delta, int | float) and math.isfinite(self.min_delta))
            or self.min_delta < 0
        ):
            raise ValueError(
                f"early_stopping: min_delta must be a finite number >= 0, got {self.min_delta!r}"
            )


class StepOutputs(NamedTuple):
    """What each step records in the `History` (one entry per step)."""

    loss: jax.Array  # the training loss of the step's batch, before its update


History = NamedTuple(
    "History",
    [
        *[(name, jax.Array) for name in StepOutputs._fields],  # (steps,), or (configurations, steps)
        ("metrics", dict),  # name -> (evaluations,): eval_fn after every eval_every steps
        ("eval_step", jax.Array),  # (evaluations,): steps done at each evaluation
        ("steps_trained", jax.Array),  # int32: updates applied (fewer than steps if stopped early)
    ],
)
History.__doc__ = (
    "A run's record: each field of `StepOutputs` per step (configuration axis first in a sweep), "
    "``metrics`` per evaluation, ``eval_step`` and ``steps_trained``."
)


class TrainResult(NamedTuple):
    """The result of `fit`: the final params, optimizer state and `History`."""

    params: Params
    opt_state: State
    history: History


class StopState(NamedTuple):
    best: jax.Array  # float32: the best metric so far, negated for mode="max"
    wait: jax.Array  # int32: evaluations since the last improvement
    stopped: jax.Array  # bool
    best_params: Params  # the params at the best evaluation, or () without restore_best_weights


class Run(NamedTuple):
    """The carry of one run: arrays only."""

    params: Params
    opt_state: State
    stop: StopState
    metrics: dict[str, jax.Array]  # the last evaluation (zeros before the first)
    fresh: jax.Array  # bool: an evaluation the next step has not fed to reduce_on_plateau yet
    evaluations: jax.Array  # int32
    steps_trained: jax.Array  # int32


# A population step: (runs of one family with the configuration axis first, that period's metrics
# (name -> (k,)), a key, the period's index) -> runs of the same shapes and dtypes.
PopulationStep = Callable[[Run, dict[str, jax.Array], jax.Array, jax.Array], Run]


class Loop(NamedTuple):
    """What the program does (static and hashable: the key of its compiled chunks)."""

    loss_fn: LossFn
    eval_fn: EvalFn | None
    period: int
    plateau_metric: str | None
    early_stopping: EarlyStopping | None
    source: Any  # a spec of gradtx.data
    # Called between periods on every family with configurations; must keep shapes and dtypes. It sees
    # the runs after `end_period` (params, optimizer states with their hyperparameters, early-stopping
    # state) and may compare them, copy one run into another (a gather) or change hyperparameters.
    population: PopulationStep | None = None


class Family(NamedTuple):
    """One optimizer family of a program (static and hashable): ``make_tx`` is a `Transformation`
    (``batched=False``: one plain run) or a factory ``make_tx(**config)`` vmapped over configurations,
    ``group_size`` of them at a time when given."""

    make_tx: Any
    batched: bool = False
    group_size: int | None = None

    def build(self, config: dict | None) -> Transformation:
        return self.make_tx(**config) if self.batched else self.make_tx


# --- one run -------------------------------------------------------------------------------------------


def _conj_complex(grads: Any) -> Any:
    # For a real loss of complex params, jax.grad returns the conjugate of the descent direction;
    # optax's convention (which gradtx follows) is that optimizers receive its conjugate.
    return jax.tree.map(lambda g: jnp.conj(g) if jnp.iscomplexobj(g) else g, grads)


def _select(flag: jax.Array, old: Any, new: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), old, new)


def step(loop: Loop, tx: Transformation, run: Run, batch: Any) -> tuple[Run, StepOutputs]:
    """One update of one run. A run stopped early stays as it is."""
    # allow_int: integer leaves (step counters, RNG keys in a model's state) get float0 gradients,
    # which every gradtx transformation passes through untouched.
    loss, grads = jax.value_and_grad(loop.loss_fn, allow_int=True)(run.params, batch)
    extra = {}
    if loop.plateau_metric is not None:
        extra = {"value": run.metrics[loop.plateau_metric], "measured": run.fresh}
    updates, opt_state = tx.update(_conj_complex(grads), run.opt_state, run.params, **extra)
    new = run._replace(
        params=apply_updates(run.params, updates),
        opt_state=opt_state,
        fresh=jnp.zeros_like(run.fresh),
        steps_trained=run.steps_trained + 1,
    )
    if loop.early_stopping is not None:  # nothing can stop without it: spare the selects
        new = _select(run.stop.stopped, run, new)
    return new, StepOutputs(loss=loss)


def _metrics(loop: Loop, params: Params) -> dict[str, jax.Array]:
    value = loop.eval_fn(params)
    value = dict(value) if isinstance(value, Mapping) else {"eval": value}
    return {k: jnp.asarray(v, jnp.float32) for k, v in value.items()}


def end_period(loop: Loop, run: Run) -> tuple[Run, dict[str, jax.Array]]:
    """Evaluation after a period, and early stopping's bookkeeping (Keras's rule, see `EarlyStopping`)."""
    metrics = _metrics(loop, run.params)
    stop, rule = run.stop, loop.early_stopping
    if rule is not None:
        v = metrics[rule.metric] * (1.0 if rule.mode == "min" else -1.0)
        improved = v < stop.best - rule.min_delta
        wait = jnp.where(improved, 0, stop.wait + 1)
        stop_now = ~improved & (wait >= rule.patience) & (run.evaluations > 0)
        best_params = stop.best_params
        if rule.restore_best_weights:
            best_params = _select(improved, run.params, stop.best_params)
        stop = StopState(jnp.where(improved, v, stop.best), wait, stop.stopped | stop_now, best_params)
    run = run._replace(
        metrics=metrics, fresh=jnp.ones_like(run.fresh), evaluations=run.evaluations + 1, stop=stop
    )
    return run, metrics


def new_run(loop: Loop, params: Params, opt_state: State, metric_shapes: dict) -> Run:
    """The carry of a run that has not started (params and state copied: the carry is donated)."""
    restore = loop.early_stopping is not None and loop.early_stopping.restore_best_weights
    stop = StopState(
        jnp.asarray(jnp.inf, jnp.float32),
        jnp.zeros([], jnp.int32),
        jnp.zeros([], bool),
        params if restore else (),
    )
    metrics = {name: jnp.zeros([], jnp.float32) for name in metric_shapes}
    zero = jnp.zeros([], jnp.int32)
    return Run(params, opt_state, stop, metrics, jnp.zeros([], bool), zero, zero)


# --- the one place that vectorizes ------------------------------------------------------------------------


def _across(family: Family, fn: Callable, in_axes: tuple) -> Callable:
    """``fn`` of one run, made a function of the family's runs: itself for a plain run, a vmap over the
    configuration axis (axis 0 of the arguments whose ``in_axes`` is 0), or, with a ``group_size``,
    a `lax.map` over groups of that many vmapped configurations (on a CPU, small groups beat one wide
    vmap). Outputs have the configuration axis first."""
    if not family.batched:
        return fn
    vmapped = jax.vmap(fn, in_axes=in_axes)
    if family.group_size is None:
        return vmapped

    def grouped(*args):
        # The leaves with a configuration axis, in groups; the others are shared by every group.
        mapped = [_leaves_with_axis(axis, arg) for axis, arg in zip(in_axes, args, strict=True)]
        leaves = [
            leaf
            for flags, arg in zip(mapped, args, strict=True)
            for leaf, f in zip(jax.tree.leaves(arg), flags, strict=True)
            if f
        ]
        n, k = leaves[0].shape[0], family.group_size

        def one_group(group):
            group, rebuilt = list(group), []
            for flags, arg in zip(mapped, args, strict=True):
                flat, treedef = jax.tree.flatten(arg)
                chosen = [group.pop(0) if f else x for x, f in zip(flat, flags, strict=True)]
                rebuilt.append(treedef.unflatten(chosen))
            return vmapped(*rebuilt)

        out = jax.lax.map(one_group, [x.reshape(n // k, k, *x.shape[1:]) for x in leaves])
        return jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), out)

    return grouped


def _leaves_with_axis(axis: Any, arg: Any) -> list[bool]:
    """For each leaf of ``arg``: whether ``axis`` (0, None, or a tuple of them matching a tuple ``arg``)
    gives it a configuration axis."""
    if isinstance(axis, tuple):
        return [f for a, x in zip(axis, arg, strict=True) for f in _leaves_with_axis(a, x)]
    return [axis == 0] * len(jax.tree.leaves(arg))


def _seeds(loop: Loop, family: Family, config: Any) -> jax.Array | None:
    """A family's seeds when its batches are shuffled per seed (then each configuration has its own)."""
    if loop.source.per_seed and family.batched and "seed" in config:
        return config["seed"]
    return None


@partial(jax.jit, static_argnames=("loop", "families", "num_periods"), donate_argnames=("carry",))
def _chunk(loop: Loop, families: tuple, num_periods: int, carry, configs, key, first_step, arrays):
    """``num_periods`` periods of every family from ``first_step``: ``(carry, (step outputs, metrics))``
    with outputs stacked ``(periods, [configurations,] period)`` and ``(periods, [configurations])``."""
    num_steps = num_periods * loop.period
    tables = [
        loop.source.tables(first_step, num_steps, key, arrays, _seeds(loop, f, c))
        for f, c in zip(families, configs, strict=True)
    ]

    def one_period(carry, index):
        start = first_step + index * loop.period
        new_carry, outputs = [], []
        for family, config, run, table in zip(families, configs, carry, tables, strict=True):

            def period_of_one(config, run, table, family=family):
                tx = family.build(config)
                run, out = jax.lax.scan(
                    lambda r, s: step(loop, tx, r, loop.source.batch(table, arrays, s)),
                    run,
                    start + jnp.arange(loop.period),
                )
                metrics = {}
                if loop.eval_fn is not None:
                    run, metrics = end_period(loop, run)
                return run, (out, metrics)

            # A per-seed shuffle has a table per configuration: (orders, first_epoch).
            table_axes = (0, None) if _seeds(loop, family, config) is not None else None
            run, (out, metrics) = _across(family, period_of_one, (0, 0, table_axes))(config, run, table)
            if loop.population is not None and family.batched:
                period_key = jax.random.fold_in(jax.random.fold_in(key, 1), start // loop.period)
                run = loop.population(run, metrics, period_key, start // loop.period)
            new_carry.append(run)
            outputs.append((out, metrics))
        return tuple(new_carry), tuple(outputs)

    return jax.lax.scan(one_period, tuple(carry), jnp.arange(num_periods))


# --- the driver ------------------------------------------------------------------------------------------


def positive_int(owner: str, name: str, value: Any) -> int:
    """``value`` as a Python int >= 1 (a Python or NumPy/JAX integer scalar), else a ValueError."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {number}")
    return number


class Plan(NamedTuple):
    loop: Loop
    families: tuple[Family, ...]
    steps: int
    chunks: int


def plan(
    owner: str,
    loss_fn: LossFn,
    data: Data,
    steps: Any,
    eval_fn: EvalFn | None,
    eval_every: Any,
    plateau_metric: str | None,
    early_stopping: EarlyStopping | None,
    chunks: Any,
    families: tuple[Family, ...],
    population: PopulationStep | None = None,
) -> tuple[Plan, Any]:
    """The checked description of a training call and the data's arrays."""
    steps = positive_int(owner, "steps", steps)
    chunks = positive_int(owner, "chunks", chunks)
    if eval_fn is None and (plateau_metric or early_stopping):
        raise ValueError(
            f"{owner}: plateau_metric and early_stopping need an eval_fn that computes the metric"
        )
    if eval_fn is None and eval_every is not None:
        raise ValueError(f"{owner}: eval_every={eval_every!r} has no effect without an eval_fn")
    if eval_fn is not None:
        period = steps if eval_every is None else positive_int(owner, "eval_every", eval_every)
        if steps % period:
            raise ValueError(f"{owner}: eval_every must divide steps={steps}, got eval_every={period}")
    else:
        period = math.gcd(steps, max(1, -(-steps // chunks)))
    if early_stopping is not None:
        if not isinstance(early_stopping, EarlyStopping):
            raise ValueError(
                f"{owner}: early_stopping must be a gradtx.EarlyStopping, got {early_stopping!r}"
            )
        early_stopping.check()
    spec, arrays = source(data)
    loop = Loop(loss_fn, eval_fn, period, plateau_metric, early_stopping, spec, population)
    return Plan(loop, families, steps, chunks), arrays


def metric_shapes(owner: str, loop: Loop, single_params: Params) -> dict:
    if loop.eval_fn is None:
        return {}
    shapes = jax.eval_shape(lambda p: _metrics(loop, p), single_params)
    for name, s in shapes.items():
        if s.shape != ():
            raise ValueError(f"{owner}: eval_fn's metric {name!r} must be a scalar, got shape {s.shape}")
    needed = [loop.plateau_metric, loop.early_stopping and loop.early_stopping.metric]
    for name in filter(None, needed):
        if name not in shapes:
            raise ValueError(f"{owner}: eval_fn returns {sorted(shapes)}, which has no metric {name!r}")
    return shapes


def check_plateau(owner: str, loop: Loop, opt_states: tuple) -> None:
    """A plateau metric with no reduce_on_plateau to feed, or the reverse, would silently do nothing."""
    is_plateau = lambda x: isinstance(x, PlateauState)  # noqa: E731
    has = [any(map(is_plateau, jax.tree.leaves(s, is_leaf=is_plateau))) for s in opt_states]
    if loop.plateau_metric is not None and not any(has):
        raise ValueError(
            f"{owner}: plateau_metric={loop.plateau_metric!r} is given but no optimizer has a "
            "gradtx.reduce_on_plateau to feed it to; chain one after the optimizer, or drop plateau_metric"
        )
    if loop.plateau_metric is None and any(has):
        raise ValueError(
            f"{owner}: the optimizer has a gradtx.reduce_on_plateau, which needs a value at every step: "
            "pass plateau_metric='<a metric of eval_fn>' (and eval_fn, eval_every)"
        )


@partial(jax.jit, static_argnames=("loop", "family", "shapes"))
def _init_run(loop: Loop, family: Family, shapes: tuple, config, params, opt_state):
    def one(config, params, opt_state):
        if opt_state is None:
            opt_state = family.build(config).init(params)
        return new_run(loop, params, opt_state, dict(shapes))

    return _across(family, one, (0, 0, 0))(config, params, opt_state)


def initial_runs(
    owner: str, p: Plan, configs: tuple, params: tuple, opt_states: tuple, shardings: tuple
) -> tuple:
    """Each family's first carry: optimizer init (unless a state is given), zeros for the rest."""
    carry = []
    for family, config, prm, state, sharding in zip(
        p.families, configs, params, opt_states, shardings, strict=True
    ):
        single = (
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), prm)
            if family.batched
            else prm
        )
        shapes = metric_shapes(owner, p.loop, single)
        run = _init_run(p.loop, family, tuple(sorted((k, None) for k in shapes)), config, prm, state)
        if sharding is not None:
            # Everything in a sweep's carry has the configuration axis first; zeros made inside init are
            # not tied to the params' sharding by XLA, so place them explicitly.
            run = jax.device_put(run, sharding)
        carry.append(run)
    check_plateau(owner, p.loop, tuple(run.opt_state for run in carry))
    return tuple(carry)


def host_readable(x: Any) -> Any:
    """``x`` readable on this host: an array split over the devices of several processes (a sweep's
    outputs under ``jax.distributed``) is replicated first, a collective every process runs."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return x
    return jax.device_put(x, jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec()))


def _progress_bar(total: int, start: int = 0) -> Callable:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    shown_here = jax.process_index() == 0  # one bar, not one per process of a multi-host run
    bar = tqdm(total=total, initial=start, unit="step") if tqdm is not None and shown_here else None
    shown = [start]

    def report(done: int, seconds: float, outputs) -> None:
        last = [float(np.mean(np.asarray(out.loss)[-1])) for out, _ in outputs]
        if bar is not None:
            bar.update(done - shown[0])
            bar.set_postfix(loss=f"{np.mean(last):.4g}")
            if done >= total:
                bar.close()
        elif shown_here:
            print(f"step {done}/{total}  loss {np.mean(last):.4g}  {seconds:.1f} s", flush=True)
        shown[0] = done

    return report


def run_plan(
    p: Plan,
    carry: tuple,
    configs: tuple,
    key: jax.Array,
    arrays: Any,
    first_step: int,
    progress: bool | Callable[[int, int], None],
    checkpoints: Checkpoints | None = None,
) -> tuple[tuple, list]:
    """Runs the chunks, resuming from ``checkpoints`` when it holds a finished chunk. Returns the final
    carry and the outputs, a list with one entry per chunk (resumed: the saved history first)."""
    periods = p.steps // p.loop.period
    per_chunk = -(-periods // min(p.chunks, periods))
    done, outputs = 0, []
    template = None
    if checkpoints is not None:
        restored = checkpoints.restore(carry)
        if restored is not None:
            carry, leaves, done = restored
            template = jax.tree.structure(_output_template(p, carry))
            outputs = [jax.tree.unflatten(template, leaves)]
    if callable(progress):  # the user's own report, (steps done, steps in all)
        bar = lambda done, seconds, out: progress(done, p.steps)  # noqa: E731
    else:
        bar = _progress_bar(p.steps, done * p.loop.period) if progress else None
    started = time.perf_counter()
    while done < periods:
        n = min(per_chunk, periods - done)
        first = jnp.asarray(first_step + done * p.loop.period, jnp.int32)
        carry, out = _chunk(p.loop, p.families, n, carry, configs, key, first, arrays)
        out = jax.tree.map(host_readable, out)  # small: (periods, configurations, period) per family
        outputs.append(out)
        done += n
        if checkpoints is not None:
            history = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *outputs)
            outputs = [history]
            checkpoints.save(done, carry, jax.tree.leaves(history))
        if bar is not None:
            jax.block_until_ready(carry)
            bar(done * p.loop.period, time.perf_counter() - started, out)
    return carry, outputs


def _output_template(p: Plan, carry: tuple) -> tuple:
    """The structure of a chunk's outputs (the leaves are placeholders)."""
    fields = StepOutputs(*[0] * len(StepOutputs._fields))
    return tuple((fields, dict.fromkeys(run.metrics, 0) if p.loop.eval_fn else {}) for run in carry)


def histories(p: Plan, carry: tuple, outputs: list, first_step: int) -> list[History]:
    """Each family's `History`, with the configuration axis first: the one transpose of the outputs."""
    n_evals = p.steps // p.loop.period if p.loop.eval_fn is not None else 0
    eval_step = first_step + p.loop.period * jnp.arange(1, n_evals + 1)
    result = []
    for i, (family, run) in enumerate(zip(p.families, carry, strict=True)):
        per_step = [
            jnp.concatenate([jnp.asarray(o[i][0][j]) for o in outputs])
            for j in range(len(StepOutputs._fields))
        ]
        if family.batched:  # (periods, k, period) -> (k, steps)
            per_step = [jnp.moveaxis(x, 1, 0).reshape(x.shape[1], -1) for x in per_step]
        else:
            per_step = [x.reshape(-1) for x in per_step]
        metrics = {}
        if p.loop.eval_fn is not None:
            metrics = {k: jnp.concatenate([jnp.asarray(o[i][1][k]) for o in outputs]) for k in run.metrics}
            if family.batched:
                metrics = {k: v.T for k, v in metrics.items()}
        result.append(History(*per_step, metrics, eval_step, host_readable(run.steps_trained)))
    return result


def fingerprint(
    owner: str,
    p: Plan,
    configs: tuple,
    params: tuple,
    arrays: Any,
    key: jax.Array,
    first_step: int,
    opt_states: tuple,
) -> dict:
    """What identifies a training call across processes (functions by name, arrays by digest)."""
    name = lambda f: getattr(f, "__qualname__", type(f).__name__)  # noqa: E731
    loop = p.loop
    return {
        "owner": owner,
        "steps": p.steps,
        "chunks": p.chunks,
        "period": loop.period,
        "first_step": first_step,
        "loss_fn": name(loop.loss_fn),
        "eval_fn": None if loop.eval_fn is None else name(loop.eval_fn),
        "plateau_metric": loop.plateau_metric,
        "early_stopping": None if loop.early_stopping is None else list(loop.early_stopping),
        "data": repr(loop.source) if not callable(getattr(loop.source, "fn", None)) else name(loop.source.fn),
        "families": [[f.batched, f.group_size] for f in p.families],
        "configs": digest([c for c in configs if c is not None]),
        "params": digest(params),
        "opt_state": digest([s for s in opt_states if s is not None]),
        "data_arrays": digest(arrays),
        "key": digest(key),
    }


def fit(
    loss_fn: LossFn,
    params: Params,
    tx: Transformation,
    data: Data,
    steps: int,
    *,
    key: jax.Array | None = None,
    eval_fn: EvalFn | None = None,
    eval_every: int | None = None,
    plateau_metric: str | None = None,
    early_stopping: EarlyStopping | None = None,
    chunks: int = 1,
    progress: bool | Callable[[int, int], None] = False,
    opt_state: State | None = None,
    initial_step: int | None = None,
    checkpoint_dir: str | None = None,
) -> TrainResult:
    """Trains ``params`` with ``tx`` for ``steps`` steps of ``loss_fn(params, batch)``, in one compiled scan.

    ``data`` is a pytree of arrays indexed by step along axis 0 (step ``i`` uses entry ``i % n``) or a
    function ``(step, key) -> batch`` (see `shuffled_batches`); ``key`` (default ``PRNGKey(0)``) is folded
    with the step for it. Arrays and `shuffled_batches` enter the compiled program as arguments; arrays
    a function closes over become constants of the program, which slows compilation for large data.
    ``eval_fn(params)`` (a scalar or a dict of scalars, e.g. the validation loss)
    runs after every ``eval_every`` steps; ``plateau_metric`` names the metric passed as ``value=`` to a
    `reduce_on_plateau` in ``tx``; ``early_stopping`` freezes the run when its metric stops improving.
    ``chunks > 1`` with ``progress=True`` reports between chunks (a tqdm bar when tqdm is installed);
    ``progress`` may also be a function ``(steps_done, steps) -> None``, called after each chunk (and
    after its checkpoint is written).

    Continuing a run: ``opt_state`` (from a previous `TrainResult`) continues its moments, step count,
    schedules and plateau state instead of calling ``tx.init``; ``initial_step`` (default: the state's
    step count, else 0) is the step the data and ``History.eval_step`` start from. ``checkpoint_dir``
    (needs orbax: the ``checkpoint`` extra) saves everything after each chunk; calling again with the
    same arguments resumes from the last finished chunk, bit-identical to an uninterrupted run, and
    returns the saved result at once when the run had finished (see `gradtx.checkpoints`).

    Complex params follow optax's convention: the gradient handed to ``tx`` is the conjugate of
    ``jax.grad``'s (the descent direction), so complex leaves train like pairs of real ones.

    Params can be any pytree, e.g. the ``nnx.State`` of ``nnx.split(model)``. The caller's arrays are not
    donated; the program's own carry is. Returns the final params, optimizer state and the `History`.
    A later call with the same ``loss_fn``, ``tx``, ``eval_fn``, options and shapes does not compile
    again (``jax.jit``'s cache); as with `jax.jit`, what those functions read from Python globals is
    fixed when they are first traced.
    """
    family = Family(tx)
    p, arrays = plan(
        "fit", loss_fn, data, steps, eval_fn, eval_every, plateau_metric, early_stopping, chunks, (family,)
    )
    if initial_step is None:
        initial_step = int(_step_of(opt_state)) if opt_state is not None else 0
    elif isinstance(initial_step, bool) or operator.index(initial_step) < 0:
        raise ValueError(f"fit: initial_step must be an int >= 0, got {initial_step!r}")
    initial_step = int(initial_step)
    key = jax.random.PRNGKey(0) if key is None else key
    carry = initial_runs("fit", p, (None,), (params,), (opt_state,), (None,))
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = Checkpoints(
            checkpoint_dir, fingerprint("fit", p, (None,), params, arrays, key, initial_step, (opt_state,))
        )
    try:
        carry, outputs = run_plan(p, carry, (None,), key, arrays, initial_step, progress, checkpoints)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    (history,) = histories(p, carry, outputs, initial_step)
    (run,) = carry
    return TrainResult(_final_params(p.loop, run), run.opt_state, history)


def _step_of(opt_state: State) -> jax.Array:
    try:
        return step_count(opt_state)
    except ValueError:
        return jnp.zeros([], jnp.int32)


def _final_params(loop: Loop, run: Run) -> Params:
    if loop.early_stopping is not None and loop.early_stopping.restore_best_weights:
        return run.stop.best_params
    return run.params
