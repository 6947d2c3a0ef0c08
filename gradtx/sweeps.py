"""Many trainings in one compiled program: hyperparameter sweeps and optimizer families side by side.

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
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradtx.base import Params, State, Transformation
from gradtx.checkpoints import Checkpoints
from gradtx.data import Data
from gradtx.engine import (
    EarlyStopping,
    EvalFn,
    Family,
    History,
    LossFn,
    PopulationStep,
    StepOutputs,
    TrainResult,
)
from gradtx.training import check_progress, fingerprint, histories, initial_runs, plan, run_plan

Configs = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]
ParamsOrInit = Params | Callable[[jax.Array], Params]


def grid(**axes: Sequence[Any]) -> dict[str, np.ndarray]:
    """Every combination of the given values: ``grid(learning_rate=[1e-3, 1e-2], seed=[0, 1, 2])`` is six
    configurations, as a dict of equally long arrays (the last axis varies fastest)."""
    if not axes or any(len(v) == 0 for v in axes.values()):
        raise ValueError(f"grid: every axis needs at least one value, got {dict(axes)}")
    combos = list(itertools.product(*axes.values()))
    return {name: np.asarray([c[i] for c in combos]) for i, name in enumerate(axes)}


_ORDER = "the order is (loss_fn, params, make_tx, configs, data, steps), as in gradtx.fit"


def _as_configs(owner: str, configs: Configs) -> dict[str, np.ndarray]:
    is_rows = isinstance(configs, Sequence) and all(isinstance(r, Mapping) for r in configs)
    if not isinstance(configs, Mapping) and not is_rows:
        raise ValueError(
            f"{owner}: configs must be a dict of equally long sequences (see gradtx.grid) or a list of "
            f"dicts, got {type(configs).__name__}; {_ORDER}"
        )
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
            f"{ {k: (len(v) if v.ndim else 'scalar') for k, v in table.items()} }; {_ORDER}"
        )
    for name, v in table.items():
        if v.ndim != 1:
            raise ValueError(
                f"{owner}: configuration field {name!r} must hold one number per configuration, got shape "
                f"{v.shape}"
            )
    seed = table.get("seed")
    whole = seed is not None and (
        seed.dtype.kind in "iu" or (seed.dtype.kind == "f" and (seed == np.round(seed)).all())
    )
    if seed is not None and not whole:
        raise ValueError(f"{owner}: the seed field must hold whole numbers, got {seed.tolist()!r}")
    if seed is not None:
        table["seed"] = seed.astype(np.int64)
    return table


def _check_factory(
    owner: str, make_tx: Callable[..., Transformation], configs: dict[str, np.ndarray]
) -> None:
    """Fails before compiling when the factory does not take a field, or rejects a value."""
    if not callable(make_tx) or isinstance(make_tx, Transformation):
        raise ValueError(
            f"{owner}: make_tx must be a function config -> optimizer, got {make_tx!r}; {_ORDER}"
        )
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

    class Refused(Exception):
        """The factory accepted these values as numbers (checked before) but refuses them traced."""

    def traces(swept: dict) -> bool:
        def one(config, p):
            try:
                tx = make_tx(**{**first, **config})
            except (TypeError, ValueError) as error:  # e.g. "must be an integer": a structural option
                raise Refused from error
            return tx.update(p, tx.init(p), p)

        try:
            jax.eval_shape(jax.vmap(one, in_axes=(0, None)), swept, single)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError, Refused):
            return False
        except Exception:  # anything else (e.g. an update that needs value=) shows in the run itself
            return True
        return True

    if not traces(fields):
        culprits = [k for k in fields if not traces({k: fields[k]})] or sorted(fields)
        raise ValueError(
            f"{owner}: the optimizer factory uses configuration field(s) {culprits} as Python values (a "
            "bool flag, a count), which one vmapped program cannot vary; set such an option inside "
            "make_tx (e.g. functools.partial(gradtx.adam, gradient_accumulation_steps=2)), or give each "
            "of its values its own family in gradtx.compare"
        )


class WithoutSeed(NamedTuple):
    """``make_tx(**config)`` with the reserved ``seed`` field left out: hashable, so that the compiled
    program of a sweep is found again for the same factory."""

    make_tx: Callable[..., Transformation]

    def __call__(self, **config: Any) -> Transformation:
        return self.make_tx(**{k: v for k, v in config.items() if k != "seed"})


@partial(jax.jit, static_argnums=0)
def _init_params(init: Callable[[jax.Array], Params], seeds: jax.Array) -> Params:
    return jax.vmap(lambda seed: init(jax.random.PRNGKey(seed)))(seeds)


def _stacked_params(params: ParamsOrInit, configs: dict[str, np.ndarray]) -> Params:
    k = len(next(iter(configs.values())))
    if callable(params):
        return _init_params(params, jnp.asarray(configs.get("seed", np.zeros(k, np.int64))))
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


class _Member(NamedTuple):
    family: Family
    configs: dict[str, jax.Array] | None  # padded, on the devices
    params: Params
    sharding: NamedSharding | None
    table: dict[str, np.ndarray] | None  # the configurations as given (no padding)
    seeded: bool = False  # params is a function of the seed's key


def _member(
    owner: str,
    make_tx: Callable[..., Transformation],
    configs: Configs,
    params: ParamsOrInit,
    sharding: NamedSharding | None = None,
    group_size: int | None = None,
) -> _Member:
    """A vmapped family and its configurations. With a ``sharding`` (or a ``group_size``), the
    configurations are padded (the last one repeated) to a multiple of the number of devices (of the
    group size); a sharding places them along the configuration axis."""
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) or group_size < 1:
            raise ValueError(f"{owner}: group_size must be a positive int or None, got {group_size!r}")
        if sharding is not None:
            raise ValueError(f"{owner}: give group_size or mesh, not both (a mesh already splits the sweep)")
    table = _as_configs(owner, configs)
    _check_factory(owner, make_tx, table)
    build = WithoutSeed(make_tx)
    k = len(next(iter(table.values())))
    multiple = sharding.mesh.size if sharding is not None else min(group_size or 1, k)
    extra = -k % multiple
    padded = {name: np.concatenate([v, np.repeat(v[-1:], extra, axis=0)]) for name, v in table.items()}
    arrays, stacked = {k: jnp.asarray(v) for k, v in padded.items()}, _stacked_params(params, padded)
    _check_vmappable(owner, build, padded, stacked)
    if sharding is not None:
        arrays, stacked = jax.device_put((arrays, stacked), sharding)
    group = None if group_size is None or group_size >= k else int(group_size)
    return _Member(Family(build, True, group), arrays, stacked, sharding, table, callable(params))


def _plain(make: Transformation, params: ParamsOrInit) -> _Member:
    p = params(jax.random.PRNGKey(0)) if callable(params) else params
    return _Member(Family(make), None, p, None, None)


def member(
    owner: str,
    make_tx: Callable[..., Transformation],
    configs: Configs,
    params: ParamsOrInit,
    *,
    mesh: Mesh | Sequence[jax.Device] | None = None,
    group_size: int | None = None,
) -> _Member:
    """One factory's configurations as `train_members` trains them: checked with `sweep`'s errors (fields,
    values, fields the factory uses as Python values), each configuration's initial params (from
    ``PRNGKey(seed)`` when ``params`` is a function), padded and placed along ``mesh`` as in `sweep`.
    The entry point of the searches in `gradtx.search`."""
    return _member(owner, make_tx, configs, params, _config_sharding(mesh), group_size)


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
        """One dict per configuration: its fields, the final training loss (mean of the last 5% of
        steps), the final value of each metric and its best (lowest and highest) finite value (NaN only
        when every evaluation was NaN), and the steps trained."""
        loss = np.asarray(self.history.loss)
        tail = max(1, loss.shape[1] // 20)
        rows = []
        for i in range(len(self)):
            row: dict[str, float] = {k: v[i].item() for k, v in self.configs.items()}
            row["final_loss"] = float(loss[i, -tail:].mean())
            for name, values in self.history.metrics.items():
                v = np.asarray(values[i], np.float64)
                finite = v[np.isfinite(v)]
                row[f"final_{name}"] = float(v[-1])
                row[f"min_{name}"] = float(finite.min()) if finite.size else float("nan")
                row[f"max_{name}"] = float(finite.max()) if finite.size else float("nan")
            row["steps_trained"] = int(self.history.steps_trained[i])
            rows.append(row)
        return rows

    def best(self, key: str = "final_loss", mode: str = "min") -> dict[str, float]:
        """The row with the lowest (``mode="min"``) or highest finite value of ``key``; a ValueError
        when no run has a finite one (every run diverged)."""
        if mode not in ("min", "max"):
            raise ValueError(f"SweepResult.best: mode must be 'min' or 'max', got {mode!r}")
        rows = self.rows()
        if key not in rows[0]:
            raise ValueError(f"SweepResult.best: no column {key!r}; the columns are {list(rows[0])}")
        values = np.asarray([r[key] for r in rows], np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            raise ValueError(f"SweepResult.best: every run has a non-finite {key} (all {len(rows)} diverged)")
        sign = 1.0 if mode == "min" else -1.0
        return rows[int(np.argmin(np.where(finite, sign * values, np.inf)))]

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


def _sweep_result(member: _Member, params: Params, opt_state: State, history: History) -> SweepResult:
    """A family's result without its padding configurations."""
    k = len(next(iter(member.table.values())))
    cut = lambda x: x[:k]  # noqa: E731
    history = history._replace(
        **{name: cut(getattr(history, name)) for name in StepOutputs._fields},
        metrics={name: cut(v) for name, v in history.metrics.items()},
        steps_trained=cut(history.steps_trained),
    )
    return SweepResult(member.table, *jax.tree.map(cut, (params, opt_state)), history)


def train_members(
    owner: str,
    members: Sequence[_Member],
    loss_fn: LossFn,
    data: Data,
    steps: int,
    *,
    key: jax.Array | None,
    eval_fn: EvalFn | None,
    eval_every: int | None,
    plateau_metric: str | None,
    early_stopping: EarlyStopping | None,
    chunks: int,
    progress: bool | Callable[[int, int], None],
    checkpoint_dir: str | None,
    population: PopulationStep | None = None,
) -> list[SweepResult | TrainResult]:
    """Trains the members side by side in one program (the engine of `sweep`, `compare` and the
    searches); one result per member."""
    families = tuple(m.family for m in members)
    p, arrays = plan(
        owner,
        loss_fn,
        data,
        steps,
        eval_fn,
        eval_every,
        plateau_metric,
        early_stopping,
        chunks,
        families,
        population,
    )
    check_progress(owner, progress)
    for m in members:
        if m.table is not None and "seed" in m.table and not m.seeded and not p.loop.source.per_seed:
            raise ValueError(
                f"{owner}: the configurations' seed field would change nothing: params is a pytree (give a "
                "function key -> params to initialize each seed differently) and the data does not shuffle "
                "per seed (gradtx.shuffled_batches(..., per_seed=True))"
            )
    key = jax.random.PRNGKey(0) if key is None else key
    configs = tuple(m.configs for m in members)
    params = tuple(m.params for m in members)
    none = (None,) * len(members)
    carry = initial_runs(owner, p, configs, params, none, tuple(m.sharding for m in members), arrays)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = Checkpoints(
            checkpoint_dir, fingerprint(owner, p, configs, params, arrays, key, 0, carry)
        )
    try:
        carry, outputs = run_plan(p, carry, configs, key, arrays, 0, progress, checkpoints)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    results: list[SweepResult | TrainResult] = []
    for m, run, history in zip(members, carry, histories(p, carry, outputs, 0), strict=True):
        restore = early_stopping is not None and early_stopping.restore_best_weights
        final = run.stop.best_params if restore else run.params
        if m.family.batched:
            results.append(_sweep_result(m, final, run.opt_state, history))
        else:
            results.append(TrainResult(final, run.opt_state, history))
    return results


def sweep(
    loss_fn: LossFn,
    params: ParamsOrInit,
    make_tx: Callable[..., Transformation],
    configs: Configs,
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
    mesh: Mesh | Sequence[jax.Device] | None = None,
    group_size: int | None = None,
    checkpoint_dir: str | None = None,
) -> SweepResult:
    """Trains ``make_tx(**config)`` for every configuration in one vmapped, compiled program.

    The arguments come in `gradtx.fit`'s order, ``(loss_fn, params, optimizer, data, steps)``, with the
    optimizer given as a factory and its configurations. ``configs``: a dict of equally long sequences
    (see `grid`) or a list of dicts. ``params``: the initial params shared by all runs, or a function
    ``key -> params`` called with ``PRNGKey(seed)``. The other arguments are those of `gradtx.fit`; each
    configuration's result equals its own `fit` to float rounding, and under ``early_stopping`` each
    configuration stops on its own. ``checkpoint_dir`` makes the sweep resumable, as in `gradtx.fit`.

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
    member = _member("sweep", make_tx, configs, params, _config_sharding(mesh), group_size)
    (result,) = train_members(
        "sweep", [member], loss_fn, data, steps, key=key, eval_fn=eval_fn, eval_every=eval_every,
        plateau_metric=plateau_metric, early_stopping=early_stopping, chunks=chunks, progress=progress,
        checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    return result


def compare(
    loss_fn: LossFn,
    params: ParamsOrInit,
    families: Mapping[str, Transformation | tuple[Callable[..., Transformation], Configs]],
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
    mesh: Mesh | Sequence[jax.Device] | None = None,
    group_size: int | None = None,
    checkpoint_dir: str | None = None,
) -> dict[str, SweepResult | TrainResult]:
    """Trains several optimizer families side by side in one compiled program on the same batches.

    Each value of ``families`` is a `Transformation` (one run, a `TrainResult`) or a pair
    ``(make_tx, configs)`` (a vmapped sweep of that family, a `SweepResult`). States of different
    shapes are carried together as a tuple, so e.g. the nine optimizers of the course run in one
    program: ``compare(loss_fn, params, {"sgd": gradtx.sgd(0.01), "adam": gradtx.adam(1e-3), ...},
    data, steps)``. With ``mesh``, each sweep's configurations are split over the devices, and with
    ``group_size`` each sweep trains its configurations that many at a time, as in `sweep`;
    ``checkpoint_dir`` makes it resumable, as in `gradtx.fit`.
    """
    if not isinstance(families, Mapping) or not families:
        raise ValueError(
            "compare: families must be a non-empty dict {name: optimizer or (make_tx, configs)}, got "
            f"{type(families).__name__} (the order is compare(loss_fn, params, families, data, steps))"
        )
    sharding = _config_sharding(mesh)
    members = []
    for name, family in families.items():
        if isinstance(family, Transformation) or (hasattr(family, "init") and hasattr(family, "update")):
            members.append(_plain(family, params))
        elif isinstance(family, tuple | list) and len(family) == 2:
            make_tx, configs = family
            members.append(_member(f"compare[{name!r}]", make_tx, configs, params, sharding, group_size))
        else:
            raise ValueError(
                f"compare: family {name!r} must be an optimizer (e.g. gradtx.adam(1e-3)) or a pair (make_tx, "
                f"configs) to sweep, got {family!r}"
            )
    if group_size is not None and not any(m.family.batched for m in members):
        raise ValueError(
            f"compare: group_size={group_size!r} groups the configurations of swept families, and every "
            "family here is a single optimizer"
        )
    results = train_members(
        "compare", members, loss_fn, data, steps, key=key, eval_fn=eval_fn, eval_every=eval_every,
        plateau_metric=plateau_metric, early_stopping=early_stopping, chunks=chunks, progress=progress,
        checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    return dict(zip(families, results, strict=True))
