"""The training engine: the logic of one run, written once, and the one place that vectorizes it.

One run is a small carry of arrays (`Run`: params, optimizer state, early-stopping state, the last
evaluation) and three pure functions over it:

* `step` makes one update from one batch;
* `end_period` evaluates after every ``period`` steps (``eval_every``), feeds early stopping and, at the
  next step, `reduce_on_plateau`;
* a *population step* (``Loop.population``, optional) runs after `end_period` and sees all the
  configurations of a family at once: see `PopulationStep` for its contract.

What the program does is a frozen, hashable `Loop` (functions, period, options); which optimizers it
trains is a tuple of `Family` (an optimizer or a factory of one, and whether it has a configuration
axis). `across` is the only place that vectorizes a function of one run over a family's
configurations (one vmap, or groups of vmaps in sequence). A compiled *chunk* is a `lax.scan` over
periods of a `lax.scan` over steps; `jax.jit` with the loop and the families as static arguments is the
cache of compiled chunks (a later call with the same functions and shapes does not compile;
``jax.clear_caches()`` empties it). `gradtx.training` drives the chunks (progress, checkpoints) and
turns the outputs into histories.

Adding a per-step quantity to `History`: add a field to `StepOutputs` and compute it in `step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.base import Params, State, Transformation, apply_updates

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
        if not isinstance(self.metric, str):
            raise ValueError(f"early_stopping: metric must name a metric of eval_fn, got {self.metric!r}")
        if not isinstance(self.restore_best_weights, bool):
            value = self.restore_best_weights
            raise ValueError(f"early_stopping: restore_best_weights must be True or False, got {value!r}")
        number = isinstance(self.min_delta, int | float | np.integer | np.floating)
        if not (number and not isinstance(self.min_delta, bool) and math.isfinite(self.min_delta)) or (
            self.min_delta < 0
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
        ("records", dict),  # name -> (evaluations, ...): what a population step recorded, or {}
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
# (name -> (k,)), a key, the period's index) -> (runs of the same shapes and dtypes, a record: a dict of
# arrays kept in the History's ``records``, one entry per period, e.g. who copied whom).
PopulationStep = Callable[[Run, dict[str, jax.Array], jax.Array, jax.Array], tuple[Run, dict]]


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


def evaluate(loop: Loop, params: Params) -> dict[str, jax.Array]:
    value = loop.eval_fn(params)
    value = dict(value) if isinstance(value, Mapping) else {"eval": value}
    return {k: jnp.asarray(v, jnp.float32) for k, v in value.items()}


def end_period(loop: Loop, run: Run) -> tuple[Run, dict[str, jax.Array]]:
    """Evaluation after a period, and early stopping's bookkeeping (Keras's rule, see `EarlyStopping`)."""
    metrics = evaluate(loop, run.params)
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


def across(family: Family, fn: Callable, in_axes: tuple) -> Callable:
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
def run_chunk(loop: Loop, families: tuple, num_periods: int, carry, configs, key, first_step, arrays):
    """``num_periods`` periods of every family from ``first_step``: ``(carry, outputs)`` with, per
    family, the step outputs stacked ``(periods, period[, configurations])``, the metrics ``(periods[,
    configurations])`` and the population step's records ``(periods, ...)``.

    The families without groups step together, in one scan over the period's steps whose body steps
    each of them (one loop for the nine optimizers of `gradtx.compare`, not nine); a family in groups
    runs its groups one after another, each a scan over the period."""
    num_steps = num_periods * loop.period
    tables = [
        loop.source.tables(first_step, num_steps, key, arrays, _seeds(loop, f, c))
        for f, c in zip(families, configs, strict=True)
    ]
    # A per-seed shuffle has a table per configuration: (orders, first_epoch).
    table_axes = [
        (0, None) if _seeds(loop, f, c) is not None else None for f, c in zip(families, configs, strict=True)
    ]
    together = [i for i, f in enumerate(families) if f.group_size is None]
    grouped = [i for i, f in enumerate(families) if f.group_size is not None]

    def stepper(i: int, s: jax.Array) -> Callable:
        family = families[i]
        return across(
            family,
            lambda config, run, table: step(
                loop, family.build(config), run, loop.source.batch(table, arrays, s)
            ),
            (0, 0, table_axes[i]),
        )

    def one_period(carry, index):
        start = first_step + index * loop.period
        steps = start + jnp.arange(loop.period)
        carry, outs = list(carry), [None] * len(families)

        def one_step(runs, s):
            stepped = [
                stepper(i, s)(configs[i], run, tables[i]) for i, run in zip(together, runs, strict=True)
            ]
            return tuple(run for run, _ in stepped), tuple(out for _, out in stepped)

        runs, step_outs = jax.lax.scan(one_step, tuple(carry[i] for i in together), steps)
        for i, run, out in zip(together, runs, step_outs, strict=True):
            carry[i], outs[i] = run, out
        for i in grouped:
            family = families[i]

            def period_of_one(config, run, table, family=family):
                tx = family.build(config)
                return jax.lax.scan(
                    lambda r, s: step(loop, tx, r, loop.source.batch(table, arrays, s)), run, steps
                )

            carry[i], out = across(family, period_of_one, (0, 0, table_axes[i]))(
                configs[i], carry[i], tables[i]
            )
            outs[i] = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), out)  # (period, k), as stepped together

        outputs = []
        for i, family in enumerate(families):
            metrics, record = {}, {}
            if loop.eval_fn is not None:
                carry[i], metrics = across(family, lambda run: end_period(loop, run), (0,))(carry[i])
            if loop.population is not None and family.batched:
                period_key = jax.random.fold_in(jax.random.fold_in(key, 1), start // loop.period)
                carry[i], record = loop.population(carry[i], metrics, period_key, start // loop.period)
                if not isinstance(record, dict) or not all(hasattr(v, "shape") for v in record.values()):
                    raise ValueError(f"a population step must return (runs, dict of arrays), got {record!r}")
            outputs.append((outs[i], metrics, record))
        return tuple(carry), tuple(outputs)

    return jax.lax.scan(one_period, tuple(carry), jnp.arange(num_periods))
