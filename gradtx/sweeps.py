"""Many trainings in one compiled program: hyperparameter sweeps, optimizer families side by side, and
the learning-rate range test.

A *configuration* is a dict of hyperparameters given to an optimizer factory, ``make_tx(**config)``.
`sweep` trains all configurations of one factory with ``jax.vmap`` (every optimizer state holds its
hyperparameters as arrays, so a vmapped state is a sweep). `compare` puts several factories, each with
its own configurations and state shapes, in one program: their states are a tuple stepped together,
each family vmapped over its configurations. Every run sees the same batches.

The configuration field ``seed`` is reserved: when ``params`` is a function ``key -> params`` it
initializes each run from ``PRNGKey(seed)``; it is not passed to ``make_tx``.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradtx.base import Params, State, Transformation
from gradtx.schedules import exponential_schedule
from gradtx.training import (
    Data,
    EarlyStopping,
    EvalFn,
    History,
    LossFn,
    Member,
    TrainResult,
    _cached,
    _Program,
    fit,
)

Configs = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]
ParamsOrInit = Params | Callable[[jax.Array], Params]


def grid(**axes: Sequence[Any]) -> dict[str, np.ndarray]:
    """Every combination of the given values: ``grid(learning_rate=[1e-3, 1e-2], seed=[0, 1, 2])`` is six
    configurations, as a dict of equally long arrays (the last axis varies fastest)."""
    if not axes or any(len(v) == 0 for v in axes.values()):
        raise ValueError(f"grid: every axis needs at least one value, got {dict(axes)}")
    combos = list(itertools.product(*axes.values()))
    return {name: np.asarray([c[i] for c in combos]) for i, name in enumerate(axes)}


def _as_configs(owner: str, configs: Configs) -> dict[str, np.ndarray]:
    if isinstance(configs, Mapping):
        table = {name: np.asarray(v) for name, v in configs.items()}
    else:
        rows = list(configs)
        names = [tuple(sorted(r)) for r in rows]
        if rows and len(set(names)) != 1:
            raise ValueError(
                f"{owner}: every configuration must have the same fields, got {sorted(set(names))}"
            )
        table = {name: np.asarray([r[name] for r in rows]) for name in (rows[0] if rows else {})}
    lengths = {len(v) if v.ndim else -1 for v in table.values()}
    if not table or lengths == {0}:
        raise ValueError(f"{owner}: the sweep is empty: give at least one configuration")
    for name, v in table.items():
        if v.dtype.kind not in "biuf":
            raise ValueError(
                f"{owner}: configuration field {name!r} must hold numbers, got {v.tolist()!r}; options "
                "that change the program (dtypes, names) cannot be vmapped: give each its own family "
                "in gradtx.compare"
            )
    if len(lengths) != 1 or -1 in lengths:
        raise ValueError(
            f"{owner}: every field needs one value per configuration, got lengths "
            f"{ {k: (len(v) if v.ndim else 'scalar') for k, v in table.items()} }"
        )
    return table


def _check_factory(
    owner: str, make_tx: Callable[..., Transformation], configs: dict[str, np.ndarray]
) -> None:
    """Fails before compiling when the factory does not take a field, or rejects a value."""
    fields = [k for k in configs if k != "seed"]
    try:
        parameters = inspect.signature(make_tx).parameters.values()
    except (TypeError, ValueError):
        parameters = None
    if parameters is not None and not any(p.kind is p.VAR_KEYWORD for p in parameters):
        accepted = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = sorted(set(fields) - accepted)
        if unknown:
            raise ValueError(
                f"{owner}: the optimizer factory does not accept the configuration field(s) {unknown}; "
                f"it takes {sorted(accepted)}"
            )
    for i in range(len(next(iter(configs.values())))):
        make_tx(**{k: configs[k][i].item() for k in fields})  # concrete values: validated at construction


def _check_vmappable(
    owner: str, make_tx: Callable[..., Transformation], arrays: dict[str, np.ndarray], params: Params
) -> None:
    """Traces one vmapped init + update (shapes only, nothing runs) so that a field the factory uses as
    a Python value (a bool flag such as ``amsgrad``, a count) fails here, named, not deep in the
    compilation of the whole program."""
    fields = {k: v for k, v in arrays.items() if k != "seed"}
    single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), params)
    first = {k: v[0].item() for k, v in fields.items()}

    def traces(swept: dict) -> bool:
        def one(config, p):
            tx = make_tx(**{**first, **config})
            return tx.update(p, tx.init(p), p)

        try:
            jax.eval_shape(jax.vmap(one, in_axes=(0, None)), swept, single)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
            return False
        except Exception:  # anything else (e.g. an update that needs value=) shows in the run itself
            return True
        return True

    if not traces(fields):
        culprits = [k for k in fields if not traces({k: fields[k]})] or sorted(fields)
        raise ValueError(
            f"{owner}: the optimizer factory uses configuration field(s) {culprits} as Python values (a "
            "bool flag, a count), which one vmapped program cannot vary; sweep numeric hyperparameters "
            "and give each structural option its own family in gradtx.compare"
        )


def _stacked_params(params: ParamsOrInit, configs: dict[str, np.ndarray]) -> Params:
    k = len(next(iter(configs.values())))
    if callable(params):
        seeds = configs.get("seed", np.zeros(k, np.int64))
        # Kept like the training programs: a repeated sweep compiles nothing.
        init = _cached(
            ("params", params), lambda: jax.jit(jax.vmap(lambda seed: params(jax.random.PRNGKey(seed))))
        )
        return init(jnp.asarray(seeds))
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *jnp.shape(x))), params)


def _config_sharding(mesh: Mesh | Sequence[jax.Device] | None) -> NamedSharding | None:
    """Where the configuration axis goes: split over every device of ``mesh`` (a `Mesh`, or a list of
    devices for a 1-D one)."""
    if mesh is None:
        return None
    devices = np.asarray(mesh.devices if isinstance(mesh, Mesh) else list(mesh)).reshape(-1)
    if devices.size == 0:
        raise ValueError("mesh: give a jax.sharding.Mesh or a non-empty list of devices")
    # One flat axis over all the devices, with automatic (propagated) sharding whatever the axis types
    # of the given mesh: the configuration axis is the only one split.
    return NamedSharding(Mesh(devices, ("configs",)), PartitionSpec("configs"))


def _member(
    owner: str,
    make_tx: Callable[..., Transformation],
    configs: Configs,
    params,
    sharding: NamedSharding | None = None,
    group_size: int | None = None,
) -> tuple[Member, dict[str, np.ndarray]]:
    """The member and its configurations. With a ``sharding`` (or a ``group_size``), the configurations
    are padded (the last one repeated) to a multiple of the number of devices (of the group size); a
    sharding places them along the configuration axis."""
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) or group_size < 1:
            raise ValueError(f"{owner}: group_size must be a positive int or None, got {group_size!r}")
        if sharding is not None:
            raise ValueError(f"{owner}: give group_size or mesh, not both (a mesh already splits the sweep)")
    table = _as_configs(owner, configs)
    _check_factory(owner, make_tx, table)

    def build(**config):
        return make_tx(**{k: v for k, v in config.items() if k != "seed"})

    k = len(next(iter(table.values())))
    multiple = sharding.mesh.size if sharding is not None else min(group_size or 1, k)
    extra = -k % multiple
    padded = {name: np.concatenate([v, np.repeat(v[-1:], extra, axis=0)]) for name, v in table.items()}
    arrays, params = {k: jnp.asarray(v) for k, v in padded.items()}, _stacked_params(params, padded)
    _check_vmappable(owner, build, padded, params)
    if sharding is not None:
        arrays, params = jax.device_put((arrays, params), sharding)
    group = None if group_size is None or group_size >= k else int(group_size)
    return Member(build, arrays, params, sharding, group, identity=make_tx), table


def _sweep_result(configs: dict[str, np.ndarray], result: TrainResult) -> SweepResult:
    """Drops the padding configurations (if any) from a vmapped result."""
    k = len(next(iter(configs.values())))
    params, state = jax.tree.map(lambda x: x[:k], (result.params, result.opt_state))
    h = result.history
    history = History(
        h.loss[:k], {name: v[:k] for name, v in h.metrics.items()}, h.eval_step, h.steps_trained[:k]
    )
    return SweepResult(configs, params, state, history)


@dataclass
class SweepResult:
    """The runs of one sweep, configuration ``i`` at index ``i`` of every array."""

    configs: dict[str, np.ndarray]
    params: Params
    opt_state: State
    history: History

    def __len__(self) -> int:
        return len(next(iter(self.configs.values())))

    def rows(self) -> list[dict[str, float]]:
        """One dict per configuration: its fields, the final training loss (mean of the last 5% of steps),
        the final and best value of each metric, and the steps trained."""
        loss = np.asarray(self.history.loss)
        tail = max(1, loss.shape[1] // 20)
        rows = []
        for i in range(len(self)):
            row: dict[str, float] = {k: v[i].item() for k, v in self.configs.items()}
            row["final_loss"] = float(loss[i, -tail:].mean())
            for name, values in self.history.metrics.items():
                v = np.asarray(values[i])
                row[f"final_{name}"], row[f"min_{name}"], row[f"max_{name}"] = (
                    float(v[-1]),
                    float(v.min()),
                    float(v.max()),
                )
            row["steps_trained"] = int(self.history.steps_trained[i])
            rows.append(row)
        return rows

    def best(self, key: str = "final_loss", mode: str = "min") -> dict[str, float]:
        """The row with the lowest (``mode="min"``) or highest value of ``key``."""
        rows = self.rows()
        values = [r[key] for r in rows]
        return rows[int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))]

    def to_markdown(self, keys: Sequence[str] | None = None) -> str:
        rows = self.rows()
        keys = list(keys or rows[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            lines.append(
                "| "
                + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
                + " |"
            )
        return "\n".join(lines)


def _run(
    members, loss_fn, data, steps, key, eval_fn, eval_every, plateau_metric, early_stopping, chunks, progress
):
    program = _Program(loss_fn, members, data, steps, eval_fn, eval_every, plateau_metric, early_stopping)
    return program.run(jax.random.PRNGKey(0) if key is None else key, chunks, progress)


def sweep(
    make_tx: Callable[..., Transformation],
    configs: Configs,
    loss_fn: LossFn,
    params: ParamsOrInit,
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
    mesh: Mesh | Sequence[jax.Device] | None = None,
    group_size: int | None = None,
) -> SweepResult:
    """Trains ``make_tx(**config)`` for every configuration in one vmapped, compiled program.

    ``configs``: a dict of equally long sequences (see `grid`) or a list of dicts. ``params``: the
    initial params shared by all runs, or a function ``key -> params`` called with ``PRNGKey(seed)``.
    The other arguments are those of `gradtx.fit`; each configuration's result equals its own `fit`
    to float rounding, and under ``early_stopping`` each configuration stops on its own.

    ``mesh`` (a `jax.sharding.Mesh` or a list of devices) splits the configurations over the devices:
    they are padded to a multiple of the device count (the padding is dropped from the result), and
    every array with a configuration axis (params, optimizer state, history) is sharded along it.

    ``group_size`` trains the configurations that many at a time (vmapped), the groups one after
    another inside the same compiled program (padded to a multiple, the padding dropped). One wide
    vmap (the default, ``None``) suits a GPU or TPU. On a CPU it depends on the machine: groups of 2
    trained a 64-rate sweep 1.4x faster on a loaded Intel Xeon and 0.9-1.1x as fast on an AMD EPYC
    (``experiments/sweeps/``). The results are the same to float rounding.

    As in `gradtx.fit`, the compiled program is kept: calling again with the same ``make_tx`` object,
    ``loss_fn`` and options (other values of the same fields, other params or data) does not compile.
    """
    member, table = _member("sweep", make_tx, configs, params, _config_sharding(mesh), group_size)
    (result,) = _run(
        [member],
        loss_fn,
        data,
        steps,
        key,
        eval_fn,
        eval_every,
        plateau_metric,
        early_stopping,
        chunks,
        progress,
    )
    return _sweep_result(table, result)


def compare(
    families: Mapping[str, Transformation | tuple[Callable[..., Transformation], Configs]],
    loss_fn: LossFn,
    params: ParamsOrInit,
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
    mesh: Mesh | Sequence[jax.Device] | None = None,
    group_size: int | None = None,
) -> dict[str, SweepResult | TrainResult]:
    """Trains several optimizer families side by side in one compiled program on the same batches.

    Each value of ``families`` is a `Transformation` (one run, a `TrainResult`) or a pair
    ``(make_tx, configs)`` (a vmapped sweep of that family, a `SweepResult`). States of different
    shapes are carried together as a tuple, so e.g. the nine optimizers of the course run in one
    program: ``compare({"sgd": gradtx.sgd(0.01), "adam": gradtx.adam(1e-3), ...}, ...)``. With
    ``mesh``, each sweep's configurations are split over the devices, and with ``group_size`` each
    sweep trains its configurations that many at a time, as in `sweep`.
    """
    if not families:
        raise ValueError("compare: give at least one optimizer family")
    members, tables = [], []
    sharding = _config_sharding(mesh)
    for name, family in families.items():
        if isinstance(family, Transformation):
            p = params(jax.random.PRNGKey(0)) if callable(params) else params
            members.append(Member(lambda family=family: family, None, p, identity=family))
            tables.append(None)
        else:
            make_tx, configs = family
            member, table = _member(f"compare[{name!r}]", make_tx, configs, params, sharding, group_size)
            members.append(member)
            tables.append(table)
    results = _run(
        members,
        loss_fn,
        data,
        steps,
        key,
        eval_fn,
        eval_every,
        plateau_metric,
        early_stopping,
        chunks,
        progress,
    )
    out: dict[str, SweepResult | TrainResult] = {}
    for name, table, r in zip(families, tables, results, strict=True):
        out[name] = r if table is None else _sweep_result(table, r)
    return out


class RangeTest(NamedTuple):
    rates: np.ndarray  # the learning rate of each step (exponential test) or of each run (parallel)
    losses: np.ndarray  # the loss at each rate
    smoothed: np.ndarray  # losses smoothed (exponential test) or the same (parallel)
    suggestion: float  # the suggested learning rate (see each function for the rule)


def _smooth(losses: np.ndarray, beta: float = 0.98) -> np.ndarray:
    # Bias-corrected exponential moving average, so the first steps are not pulled towards 0.
    out, avg = np.empty_like(losses), 0.0
    for t, x in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * x
        out[t - 1] = avg / (1 - beta**t)
    return out


def lr_range_test(
    make_tx: Callable[[Any], Transformation],
    loss_fn: LossFn,
    params: Params,
    data: Data,
    steps: int = 300,
    min_lr: float = 1e-5,
    max_lr: float = 10.0,
    *,
    key: jax.Array | None = None,
) -> RangeTest:
    """The course's learning-rate range test: train ``steps`` steps with the rate growing exponentially
    from ``min_lr`` to ``max_lr`` (``make_tx(schedule)`` builds the optimizer), record the loss.

    Rule for the suggestion: smooth the loss (bias-corrected moving average, 0.98), find the rate where
    it is lowest (just before it shoots up), and suggest a rate 10 times lower, as the course advises.
    Losses after the smoothed loss exceeds 4 times its minimum are reported as ``nan`` (diverged).
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"lr_range_test: needs 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if steps < 2:
        raise ValueError(f"lr_range_test: steps must be >= 2, got {steps}")
    schedule = exponential_schedule(min_lr, steps - 1, max_lr / min_lr)
    rates = np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float64)
    losses = np.asarray(
        fit(loss_fn, params, make_tx(schedule), data, steps, key=key).history.loss, np.float64
    )
    smoothed = _smooth(losses)
    finite = np.isfinite(smoothed)
    lowest = int(np.nanargmin(np.where(finite, smoothed, np.inf)))
    diverged = np.flatnonzero(~finite | ((np.arange(steps) > lowest) & (smoothed > 4 * smoothed[lowest])))
    if diverged.size:
        losses[diverged[0] :] = smoothed[diverged[0] :] = np.nan
    return RangeTest(rates, losses, smoothed, float(rates[lowest] / 10))


def lr_range_sweep(
    make_tx: Callable[[Any], Transformation],
    loss_fn: LossFn,
    params: Params,
    data: Data,
    steps: int = 300,
    rates: Sequence[float] | None = None,
    *,
    key: jax.Array | None = None,
) -> RangeTest:
    """The parallel range test: train one run per constant rate (default: 25 rates from 1e-5 to 10,
    log-spaced) for ``steps`` steps, all at once with vmap, and record each run's final loss (the mean
    over its last 10% of steps; ``nan`` or ``inf`` for a run that diverged).

    Rule for the suggestion: the rate with the lowest final loss, i.e. the best constant rate for this
    budget. Unlike the exponential test, each rate is judged after a full run, not after a few steps
    at that rate, so no safety factor of 10 is applied.
    """
    rates = np.logspace(-5, 1, 25) if rates is None else np.asarray(rates, np.float64)
    if rates.ndim != 1 or rates.size == 0 or np.any(rates <= 0):
        raise ValueError(f"lr_range_sweep: rates must be a non-empty list of positive numbers, got {rates}")
    result = sweep(
        lambda learning_rate: make_tx(learning_rate),
        {"learning_rate": rates},
        loss_fn,
        params,
        data,
        steps,
        key=key,
    )
    loss = np.asarray(result.history.loss, np.float64)
    final = loss[:, -max(1, steps // 10) :].mean(axis=1)
    final = np.where(np.isfinite(final), final, np.nan)
    best = int(np.nanargmin(final)) if np.isfinite(final).any() else 0
    return RangeTest(rates, final, final, float(rates[best]))
