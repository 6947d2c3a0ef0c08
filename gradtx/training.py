"""Training on the device: many steps inside one compiled `lax.scan`, for one run or many side by side.

`fit` trains one run. `gradtx.sweeps` builds on the same engine to train many configurations (vmapped)
and several optimizer families (a tuple of states) in one compiled program.

The scan has two levels: the outer one runs *periods* of ``eval_every`` steps, the inner one the steps.
Evaluation (``eval_fn``), the value fed to `reduce_on_plateau` and early stopping happen between periods,
so no step pays for them and nothing branches on array values. Long runs are cut into chunks of periods,
one compiled call each, with the carried params and optimizer state donated; progress is reported
between chunks, never with a host round-trip per step.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.base import Params, State, Transformation, apply_updates

LossFn = Callable[[Params, Any], jax.Array]  # (params, batch) -> scalar loss
EvalFn = Callable[[Params], Any]  # params -> scalar or dict of scalars
Data = Any  # a pytree of arrays indexed by step along axis 0, or a function (step, key) -> batch


class EarlyStopping(NamedTuple):
    """Stop a run (freeze its params and optimizer state) when ``metric`` has not improved by more
    than ``min_delta`` for ``patience`` evaluations. Under a sweep each configuration stops on its own.

    ``restore_best_weights`` (Keras's option of the same name): the result's params are those of the
    evaluation with the best metric, whether or not the run stopped; the optimizer state is the last
    one, as in Keras. It costs one more copy of the params (per configuration) on the device."""

    metric: str
    patience: int = 5
    min_delta: float = 0.0
    mode: str = "min"
    restore_best_weights: bool = False


class History(NamedTuple):
    loss: jax.Array  # (steps,): the training loss of each step's batch, before its update
    metrics: dict[str, jax.Array]  # name -> (evaluations,): eval_fn after every eval_every steps
    eval_step: jax.Array  # (evaluations,): steps done at each evaluation
    steps_trained: jax.Array  # int32: updates applied (fewer than steps if stopped early)


class TrainResult(NamedTuple):
    params: Params
    opt_state: State
    history: History


class _Stop(NamedTuple):  # early-stopping state of one run
    best: jax.Array
    wait: jax.Array
    stopped: jax.Array
    steps_trained: jax.Array
    best_params: Params  # the params at the best evaluation, or () without restore_best_weights


@dataclass(frozen=True)
class Member:
    """One optimizer family in a program: ``make_tx(**config)`` per configuration (``configs`` is a dict
    of arrays with a leading configuration axis), or one plain run when ``configs`` is None."""

    make_tx: Callable[..., Transformation]
    configs: Mapping[str, jax.Array] | None
    params: Params  # stacked along axis 0 when configs is given
    sharding: jax.sharding.Sharding | None = None  # of the configuration axis, when split over devices
    group_size: int | None = None  # configurations vmapped together; groups run one after another
    # What make_tx stands for across calls (the user's transformation or factory): a key of the cache
    # of compiled programs. None: the program is compiled for this call only.
    identity: Any = None


def _as_metrics(value: Any) -> dict[str, jax.Array]:
    return dict(value) if isinstance(value, Mapping) else {"eval": value}


Prepare = Callable[[jax.Array, int, jax.Array, Any, Any], Callable[[jax.Array], Any]]


def _batch_source(data: Data) -> tuple[Prepare, Any, tuple]:
    """``(prepare, arrays, kind)``: ``prepare(first_step, num_steps, key, arrays, seeds) -> batch_at(step)``
    is called once per compiled chunk, outside the scan, so that per-epoch work (a shuffle) is not repeated
    at every step. ``arrays`` (the data's arrays) are an argument of the compiled chunk, not constants
    closed over: embedded in the program, a large data set made compilation slower with its size.
    ``kind`` says what ``prepare`` depends on besides the arrays (a key of the program cache)."""
    if isinstance(data, ShuffledBatches):
        kind = ("shuffled", data.batch_size, data.per_seed)
        return partial(_shuffled_prepare, data.batch_size), data.data, kind
    if callable(data):
        return partial(_function_prepare, data), (), ("function", data)
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data: the batch tree is empty")
    lengths = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(lengths) != 1 or None in lengths:
        shapes = jax.tree.map(np.shape, data)
        raise ValueError(
            f"data: every array must have the same number of batches along axis 0, got shapes {shapes}"
        )
    return _indexed_prepare, data, ("arrays",)


def _function_prepare(fn, first_step, num_steps, key, arrays, seeds=None):
    return lambda step: fn(step, jax.random.fold_in(key, step))


def _indexed_prepare(first_step, num_steps, key, arrays, seeds=None):
    # Step i uses batch i % n, so pre-batched data of one epoch can be trained on for several epochs.
    n = jax.tree.leaves(arrays)[0].shape[0]
    return lambda step: jax.tree.map(lambda x: x[step % n], arrays)


def _shuffled_prepare(batch_size: int, first_step, num_steps: int, key, data, seeds=None):
    """With ``seeds`` (a configuration's seeds, shape (k,), given for a ``per_seed`` source), each
    configuration shuffles with ``fold_in(key, seed)`` and ``batch_at`` returns batches with a leading
    (k,) axis.
    The permutations of the chunk's epochs are drawn here, once, not at every step."""
    n = jax.tree.leaves(data)[0].shape[0]
    per_epoch = n // batch_size
    first_epoch = first_step // per_epoch
    epochs = first_epoch + jnp.arange(num_steps // per_epoch + 2)  # covers the chunk's steps

    def orders(key):  # (epochs, n)
        return jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), n))(epochs)

    def batch(order, step):
        index = jax.lax.dynamic_slice_in_dim(order, (step % per_epoch) * batch_size, batch_size)
        return jax.tree.map(lambda x: x[index], data)

    if seeds is not None:
        table = jax.vmap(lambda seed: orders(jax.random.fold_in(key, seed)))(seeds)  # (k, epochs, n)
        return lambda step: jax.vmap(batch, (0, None))(table[:, step // per_epoch - first_epoch], step)
    table = orders(key)
    return lambda step: batch(table[step // per_epoch - first_epoch], step)


class ShuffledBatches:
    """Minibatches of ``data`` (a pytree of arrays with the examples along axis 0), reshuffled every
    epoch from the run's key: step ``i`` is batch ``i % (n // batch_size)`` of epoch ``i // (n //
    batch_size)``. The last ``n % batch_size`` examples of each shuffled epoch are left out.
    ``per_epoch`` (the number of batches per epoch) is the ``eval_every`` of once-per-epoch evaluation.

    Each compiled chunk draws the permutations of the epochs it spans once, before its steps, because
    a permutation per step would cost more than the step itself on small models.

    In a sweep every configuration sees the same batches (one gather serves them all), unless
    ``per_seed``: then a configuration with a ``seed`` field shuffles with ``fold_in(key, seed)``, as
    separate runs with their own seeds would (its run equals ``fit(..., key=fold_in(key, seed))``).
    """

    def __init__(self, data: Any, batch_size: int, per_seed: bool = False):
        sizes = {np.shape(x)[0] if np.ndim(x) else 0 for x in jax.tree.leaves(data)}
        if len(sizes) != 1:
            raise ValueError(
                f"shuffled_batches: the arrays hold different numbers of examples: {sorted(sizes)}"
            )
        (self.n,) = sizes
        if not 0 < batch_size <= self.n:
            raise ValueError(f"shuffled_batches: batch_size must be in [1, {self.n}], got {batch_size}")
        self.data, self.batch_size, self.per_epoch = data, batch_size, self.n // batch_size
        self.per_seed = bool(per_seed)

    def prepare(
        self, first_step: jax.Array, num_steps: int, key: jax.Array, data: Any = None
    ) -> Callable[[jax.Array], Any]:
        """``batch_at(step)`` for the steps ``first_step ..`` of one chunk; ``data`` (default: this
        source's arrays) lets a compiled caller pass the arrays in as an argument."""
        return _shuffled_prepare(
            self.batch_size, first_step, num_steps, key, self.data if data is None else data
        )


def shuffled_batches(data: Any, batch_size: int, per_seed: bool = False) -> ShuffledBatches:
    """A batch source for `fit` and the sweeps: see `ShuffledBatches`."""
    return ShuffledBatches(data, batch_size, per_seed)


def _maybe_vmap(fn: Callable, batched: bool, in_axes: tuple) -> Callable:
    return jax.vmap(fn, in_axes=in_axes) if batched else fn


def _where(flag: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(flag, b, a) if a is not None else a, new, old)


# Compiled training chunks and optimizer inits of recent calls, by `_Program._cache_key` (and the
# member's identity for inits): a loop of `fit` calls with the same functions (seeds, data) compiles
# once. Least recently used first.
_COMPILED: OrderedDict[tuple, Callable] = OrderedDict()
_CACHE_SIZE = 32


def _cached(key: tuple | None, make: Callable[[], Callable]) -> Callable:
    """``make()``, kept in `_COMPILED` under ``key`` (None, or a key with an unhashable part: not kept)."""
    try:
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    fn = make()
    if key is not None:
        _COMPILED[key] = fn
        if len(_COMPILED) > _CACHE_SIZE:
            _COMPILED.popitem(last=False)
    return fn


def _compiled_init(m: Member) -> Callable:
    """The jitted ``init`` of a member's optimizer (vmapped over its configurations), kept like the
    training chunks so that a repeated call compiles nothing."""
    batched, make_tx = m.configs is not None, m.make_tx

    def make():
        def init(config, params):
            return (make_tx(**config) if config is not None else make_tx()).init(params)

        return jax.jit(_maybe_vmap(init, batched, (0, 0)))

    key = (
        None if m.identity is None else ("init", m.identity, None if m.configs is None else tuple(m.configs))
    )
    return _cached(key, make)


class _Program:
    """The compiled training program for a list of members sharing data, steps and evaluation."""

    def __init__(
        self,
        loss_fn: LossFn,
        members: Sequence[Member],
        data: Data,
        steps: int,
        eval_fn: EvalFn | None,
        eval_every: int | None,
        plateau_metric: str | None,
        early_stopping: EarlyStopping | None,
    ):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if eval_fn is None and (plateau_metric or early_stopping):
            raise ValueError("plateau_metric and early_stopping need an eval_fn that computes the metric")
        if eval_fn is not None:
            eval_every = eval_every or steps
            if eval_every < 1 or steps % eval_every:
                raise ValueError(f"eval_every must divide steps={steps}, got eval_every={eval_every}")
        if early_stopping is not None and early_stopping.mode not in ("min", "max"):
            raise ValueError(f"early_stopping: mode must be 'min' or 'max', got {early_stopping.mode!r}")
        self.loss_fn, self.members, self.steps = loss_fn, list(members), steps
        self.prepare_batches, self.data_arrays, self.data_kind = _batch_source(data)
        self.per_seed = isinstance(data, ShuffledBatches) and data.per_seed
        self.eval_fn, self.plateau_metric, self.early_stopping = eval_fn, plateau_metric, early_stopping
        self.period = eval_every if eval_fn is not None else None

    # --- one run (vmapped over configurations where a member has them) ---------------------------------

    def _metric_names(self, params: Params) -> list[str]:
        shapes = jax.eval_shape(lambda p: _as_metrics(self.eval_fn(p)), params)
        for name, s in shapes.items():
            if s.shape != ():
                raise ValueError(f"eval_fn: metric {name!r} must be a scalar, got shape {s.shape}")
        for needed in filter(None, [self.plateau_metric, self.early_stopping and self.early_stopping.metric]):
            if needed not in shapes:
                raise ValueError(f"eval_fn returns {sorted(shapes)}, which has no metric {needed!r}")
        return sorted(shapes)

    def _step(self, member: Member, config, params, state, stop: _Stop, batch, extra):
        tx = member.make_tx(**config) if member.configs is not None else member.make_tx()
        # allow_int: integer leaves (step counters, RNG keys in a model's state) get float0 gradients,
        # which every gradtx transformation passes through untouched.
        loss, grads = jax.value_and_grad(self.loss_fn, allow_int=True)(params, batch)
        updates, new_state = tx.update(grads, state, params, **extra)
        new_params = apply_updates(params, updates)
        if self.early_stopping is None:  # nothing can stop: spare the selects
            return new_params, new_state, stop._replace(steps_trained=stop.steps_trained + 1), loss
        frozen = stop.stopped
        stop = stop._replace(steps_trained=stop.steps_trained + jnp.where(frozen, 0, 1))
        return _where(frozen, new_params, params), _where(frozen, new_state, state), stop, loss

    def _observe(self, stop: _Stop, metrics: dict[str, jax.Array], params: Params) -> _Stop:
        rule = self.early_stopping
        if rule is None:
            return stop
        v = metrics[rule.metric] * (1.0 if rule.mode == "min" else -1.0)
        improved = v < stop.best - rule.min_delta
        wait = jnp.where(improved, 0, stop.wait + 1)
        return _Stop(
            best=jnp.where(improved, v, stop.best),
            wait=wait,
            stopped=stop.stopped | (wait >= rule.patience),
            steps_trained=stop.steps_trained,
            best_params=jax.tree.map(lambda new, old: jnp.where(improved, new, old), params, stop.best_params)
            if rule.restore_best_weights
            else stop.best_params,
        )

    # --- the program ------------------------------------------------------------------------------------

    def initial_carry(self) -> tuple:
        carry = []
        for m in self.members:
            batched = m.configs is not None
            state = _compiled_init(m)(m.configs, m.params)
            k = len(next(iter(m.configs.values()))) if batched else None
            shape = (k,) if batched else ()
            restore = self.early_stopping is not None and self.early_stopping.restore_best_weights
            stop = _Stop(
                jnp.full(shape, jnp.inf, jnp.float32),
                jnp.zeros(shape, jnp.int32),
                jnp.zeros(shape, bool),
                jnp.zeros(shape, jnp.int32),
                m.params if restore else (),  # copied below with the rest of the carry
            )
            metrics = {}
            if self.eval_fn is not None:
                single = jax.tree.map(lambda x: x[0], m.params) if batched else m.params
                metrics = {name: jnp.zeros(shape, jnp.float32) for name in self._metric_names(single)}
            # A copy, because the carry is donated: the caller's params stay valid.
            member_carry = jax.tree.map(jnp.copy, (m.params, state, stop, metrics))
            if m.sharding is not None:
                # Everything in a sweep's carry has the configuration axis first; zeros made inside
                # init are not tied to the params' sharding by XLA, so place them explicitly.
                member_carry = jax.device_put(member_carry, m.sharding)
            carry.append(member_carry)
        return tuple(carry)

    def run_periods(
        self,
        num_steps: int,
        period: int,
        carry: tuple,
        key: jax.Array,
        first_step: jax.Array,
        arrays: Any,
        configs: tuple,
    ):
        """Runs ``num_steps`` steps from ``first_step`` in periods of ``period`` steps (traced).

        Members without a ``group_size`` step together in one scan over the steps. A member with one
        runs its configurations ``group_size`` at a time: a `lax.map` over the groups, each group a
        vmapped scan over all the steps (on a CPU, small groups beat one wide vmap)."""
        # The configurations come in as an argument, like the data: a cached program keeps neither.
        self = copy.copy(self)
        self.members = [replace(m, configs=c) for m, c in zip(self.members, configs, strict=True)]

        def batches_for(m: Member) -> tuple[Callable[[jax.Array], Any], bool]:
            """A member's ``batch_at`` and whether its batches have a configuration axis (a per-seed
            source and a member with seeds)."""
            seeds = m.configs.get("seed") if self.per_seed and m.configs is not None else None
            return self.prepare_batches(first_step, num_steps, key, arrays, seeds), seeds is not None

        together = [i for i, m in enumerate(self.members) if m.group_size is None]
        new_carry, losses, evaluated = list(carry), [None] * len(carry), [None] * len(carry)
        if together:
            members, member_carry = [self.members[i] for i in together], [carry[i] for i in together]
            c, (l, e) = self._scan_periods(members, member_carry, batches_for, first_step, num_steps, period)
            for j, i in enumerate(together):
                new_carry[i], losses[i], evaluated[i] = c[j], l[j], e[j] if e else None
        for i, m in enumerate(self.members):
            if m.group_size is not None:
                new_carry[i], losses[i], evaluated[i] = self._grouped_periods(
                    m, carry[i], batches_for, first_step, num_steps, period
                )
        out_metrics = tuple(evaluated) if self.eval_fn is not None else ()
        return tuple(new_carry), (tuple(losses), out_metrics)

    def _grouped_periods(self, m: Member, carry, batches_for, first_step, num_steps: int, period: int):
        n, k = len(next(iter(m.configs.values()))), m.group_size
        split = lambda x: x.reshape(n // k, k, *x.shape[1:])  # noqa: E731

        def one_group(group):
            configs, member_carry = group
            member = replace(m, configs=configs, group_size=None)
            c, (l, e) = self._scan_periods(
                [member], [member_carry], batches_for, first_step, num_steps, period
            )
            return c[0], (l[0], e[0] if e else {})

        carry, (loss, metrics) = jax.lax.map(one_group, jax.tree.map(split, (m.configs, carry)))
        # Back to the layout of the members stepped together: configurations last, in order.
        carry = jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), carry)
        loss = jnp.moveaxis(loss, 0, -2).reshape(*loss.shape[1:-1], n)
        metrics = {name: jnp.moveaxis(v, 0, -2).reshape(*v.shape[1:-1], n) for name, v in metrics.items()}
        return carry, loss, metrics

    def _scan_periods(self, members, carry, batches_for, first_step, num_steps: int, period: int):
        """``members`` stepped together on the same batches: a scan over periods of a scan over steps."""

        sources = [batches_for(m) for m in members]  # outside the scans: a shuffle is drawn once

        def one_step(carry, step):
            new, losses = [], []
            for m, (params, state, stop, metrics), (source, per_config) in zip(
                members, carry, sources, strict=True
            ):
                batch = source(step)
                extra = {}
                if self.plateau_metric is not None:
                    # The last evaluation is fed once, at the first step of the next period.
                    value = metrics[self.plateau_metric]
                    measured = (step % period == 0) & (step > 0)
                    extra = {"value": value, "measured": jnp.broadcast_to(measured, value.shape)}
                fn = _maybe_vmap(
                    lambda c, p, s, st, b, e, m=m: self._step(m, c, p, s, st, b, e),
                    m.configs is not None,
                    (0, 0, 0, 0, 0 if per_config else None, 0),
                )
                params, state, stop, loss = fn(m.configs, params, state, stop, batch, extra)
                new.append((params, state, stop, metrics))
                losses.append(loss)
            return tuple(new), tuple(losses)

        def one_period(carry, start):
            carry, losses = jax.lax.scan(one_step, carry, start + jnp.arange(period))
            if self.eval_fn is None:
                return carry, (losses, ())
            new, evaluated = [], []
            for m, (params, state, stop, _) in zip(members, carry, strict=True):
                batched = m.configs is not None
                metrics = _maybe_vmap(lambda p: _as_metrics(self.eval_fn(p)), batched, (0,))(params)
                metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
                stop = _maybe_vmap(self._observe, batched, (0, 0, 0))(stop, metrics, params)
                new.append((params, state, stop, metrics))
                evaluated.append(metrics)
            return tuple(new), (losses, tuple(evaluated))

        starts = first_step + period * jnp.arange(num_steps // period)
        return jax.lax.scan(one_period, tuple(carry), starts)

    def run(self, key: jax.Array, chunks: int, progress: bool) -> list[TrainResult]:
        period = self.period or math.gcd(self.steps, max(1, -(-self.steps // chunks)))
        periods = self.steps // period
        per_chunk = -(-periods // max(1, min(chunks, periods)))
        compiled = {}
        configs = tuple(m.configs for m in self.members)

        def chunk_fn(n_periods):
            if n_periods not in compiled:
                compiled[n_periods] = self._compiled_chunk(n_periods * period, period)
            return compiled[n_periods]

        carry = self.initial_carry()
        outputs, done, started = [], 0, time.perf_counter()
        bar = _progress_bar(self.steps) if progress else None
        while done < periods:
            n = min(per_chunk, periods - done)
            carry, out = chunk_fn(n)(
                carry, key, jnp.asarray(done * period, jnp.int32), self.data_arrays, configs
            )
            outputs.append(out)
            done += n
            if bar is not None:
                jax.block_until_ready(carry)
                bar(done * period, time.perf_counter() - started, out)
        return self._results(carry, outputs)

    def _cache_key(self, num_steps: int, period: int) -> tuple | None:
        """What the compiled chunk depends on besides its arguments' shapes, or None when a member has
        no identity: the program is then compiled for this call only."""
        members = tuple(
            (m.identity, None if m.configs is None else tuple(m.configs), m.group_size) for m in self.members
        )
        key = (
            self.loss_fn, self.eval_fn, self.plateau_metric, self.early_stopping, self.data_kind,
            members, num_steps, period,
        )  # fmt: skip
        return None if any(m.identity is None for m in self.members) else key

    def _compiled_chunk(self, num_steps: int, period: int) -> Callable:
        """The jitted, donated chunk ``(carry, key, first_step, arrays, configs) -> (carry, outputs)``,
        shared by later calls with the same functions (as `jax.jit` shares its compilations); the cached
        program holds none of this call's arrays."""

        def make():
            spec = copy.copy(self)
            spec.data_arrays = None
            spec.members = [replace(m, params=None, configs=None, sharding=None) for m in self.members]
            return jax.jit(partial(_Program.run_periods, spec, num_steps, period), donate_argnums=0)

        return _cached(self._cache_key(num_steps, period), make)

    def _results(self, carry, outputs) -> list[TrainResult]:
        results = []
        for i, (m, (params, state, stop, _)) in enumerate(zip(self.members, carry, strict=True)):
            batched = m.configs is not None
            # The scans stack (periods, period, [configs]); a run's history has steps on its last axis.
            loss = jnp.concatenate([out[0][i] for out in outputs])
            loss = loss.reshape((-1, *loss.shape[2:]))
            metrics = {}
            if self.eval_fn is not None:
                names = outputs[0][1][i].keys()
                metrics = {k: jnp.concatenate([out[1][i][k] for out in outputs]) for k in names}
            if batched:
                loss = loss.T
                metrics = {k: v.T for k, v in metrics.items()}
            n_evals = self.steps // self.period if self.period else 0
            eval_step = self.period * jnp.arange(1, n_evals + 1) if self.period else jnp.zeros([0], jnp.int32)
            if self.early_stopping is not None and self.early_stopping.restore_best_weights:
                params = stop.best_params
            results.append(TrainResult(params, state, History(loss, metrics, eval_step, stop.steps_trained)))
        return results


def _progress_bar(total: int) -> Callable:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=total, unit="step") if tqdm is not None else None
    shown = [0]

    def report(done: int, seconds: float, out) -> None:
        last_losses = [float(np.mean(np.asarray(loss)[-1])) for loss in out[0]]
        if bar is not None:
            bar.update(done - shown[0])
            bar.set_postfix(loss=f"{np.mean(last_losses):.4g}")
            if done >= total:
                bar.close()
        else:
            print(f"step {done}/{total}  loss {np.mean(last_losses):.4g}  {seconds:.1f} s", flush=True)
        shown[0] = done

    return report


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
    progress: bool = False,
) -> TrainResult:
    """Trains ``params`` with ``tx`` for ``steps`` steps of ``loss_fn(params, batch)``, in one compiled scan.

    ``data`` is a pytree of arrays indexed by step along axis 0 (step ``i`` uses entry ``i % n``) or a
    function ``(step, key) -> batch`` (see `shuffled_batches`); ``key`` (default ``PRNGKey(0)``) is folded
    with the step for it. Arrays and `shuffled_batches` enter the compiled program as arguments; arrays
    a function closes over become constants of the program, which slows compilation for large data.
    ``eval_fn(params)`` (a scalar or a dict of scalars, e.g. the validation loss)
    runs after every ``eval_every`` steps; ``plateau_metric`` names the metric passed as ``value=`` to a
    `reduce_on_plateau` in ``tx``; ``early_stopping`` freezes the run when its metric stops improving.
    ``chunks > 1`` (with ``progress=True``, a tqdm bar when tqdm is installed) reports between chunks.

    Params can be any pytree, e.g. the ``nnx.State`` of ``nnx.split(model)``. The caller's arrays are not
    donated; the program's own carry is. Returns the final params, optimizer state and the `History`.

    The compiled program is kept (those of the last 16 or so calls): a later call with the same
    ``loss_fn``, ``tx``, ``eval_fn`` and options and inputs of the same shapes (other params, other
    data, another key) does not compile again. As with `jax.jit`, what those functions read from
    Python globals is fixed when they are first traced.
    """
    program = _Program(
        loss_fn,
        [Member(lambda: tx, None, params, identity=tx)],
        data,
        steps,
        eval_fn,
        eval_every,
        plateau_metric,
        early_stopping,
    )
    return program.run(jax.random.PRNGKey(0) if key is None else key, chunks, progress)[0]
