"""Driving the engine: checked plans, the chunks run one after another (progress reports and checkpoints
between them, resumption from the last one), the histories, and `fit`.

`gradtx.engine` holds the logic of one run and the compiled chunk; `gradtx.sweeps` builds `sweep` and
`compare` on the same functions as `fit` does here.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import operator
import time
import types
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.base import Params, State, Transformation, step_count
from gradtx.checkpoints import Checkpoints, digest
from gradtx.data import Data, source, takes_two
from gradtx.engine import (
    EarlyStopping,
    EvalFn,
    Family,
    History,
    Loop,
    LossFn,
    PopulationStep,
    Run,
    StepOutputs,
    TrainResult,
    across,
    new_run,
    run_chunk,
)
from gradtx.plateau import PlateauState

# --- the driver ------------------------------------------------------------------------------------------


def check_progress(owner: str, progress: Any) -> None:
    """``progress`` is a bool or a function ``(steps_done, steps)``; anything else (a string) is named."""
    if not (isinstance(progress, bool) or (callable(progress) and takes_two(progress))):
        raise ValueError(
            f"{owner}: progress must be True, False or a function (steps_done, steps), got {progress!r}"
        )


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
    if chunks > steps // period:  # a chunk ends only where an evaluation does
        raise ValueError(
            f"{owner}: chunks={chunks} needs at least {chunks} evaluations, got {steps // period} "
            f"(steps={steps}, eval_every={period}); give eval_every <= {steps // chunks} dividing steps"
        )
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
    try:
        raw = jax.eval_shape(loop.eval_fn, single_params)
    except TypeError as error:  # a string, None: not an array
        raise ValueError(
            f"{owner}: eval_fn(params) must return a dict {{name: scalar}} or one scalar ({error})"
        ) from None
    raw = dict(raw) if isinstance(raw, Mapping) else {"eval": raw}
    for name, s in raw.items():
        if not isinstance(name, str) or not isinstance(s, jax.ShapeDtypeStruct):
            raise ValueError(
                f"{owner}: eval_fn(params) must return a dict {{name: scalar}} with string names and one "
                f"array each, got {name!r}: {s!r}"
            )
        if jnp.issubdtype(s.dtype, jnp.complexfloating):
            raise ValueError(f"{owner}: eval_fn's metric {name!r} must be real, got {s.dtype}")
    # `evaluate` keeps these names and shapes (in float32): no second trace of eval_fn.
    shapes = {name: jax.ShapeDtypeStruct(s.shape, jnp.float32) for name, s in raw.items()}
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

    return across(family, one, (0, 0, 0))(config, params, opt_state)


@partial(jax.jit, static_argnums=0)
def _first_loss(loop: Loop, params: Params, arrays: Any) -> Any:
    table = loop.source.tables(jnp.int32(0), 1, jax.random.PRNGKey(0), arrays)
    return loop.loss_fn(params, loop.source.batch(table, arrays, jnp.int32(0)))


def check_loss(owner: str, loop: Loop, single_params: Params, arrays: Any) -> None:
    """``loss_fn`` on the first batch must give one real number (traced for shapes only, once per
    loss and shapes: ``jax.jit``'s cache): a vector of per-example losses, a ``(loss, aux)`` pair or an
    int would fail deep inside ``jax.grad``."""
    out = jax.eval_shape(partial(_first_loss, loop), single_params, arrays)
    if not (
        isinstance(out, jax.ShapeDtypeStruct) and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        got = (
            f"{out.dtype}{list(out.shape)}"
            if isinstance(out, jax.ShapeDtypeStruct)
            else f"a {type(out).__name__} of {len(jax.tree.leaves(out))} arrays"
        )
        raise ValueError(
            f"{owner}: loss_fn(params, batch) must return one float (the mean loss of the batch), got {got}"
        )


def initial_runs(
    owner: str, p: Plan, configs: tuple, params: tuple, opt_states: tuple, shardings: tuple, arrays: Any
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
        if not carry:  # one loss for every family
            check_loss(owner, p.loop, single, arrays)
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
        last = [float(np.mean(np.asarray(out.loss)[-1])) for out, *_ in outputs]
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
    if checkpoints is not None:
        restored = checkpoints.restore(carry)
        if restored is not None:
            carry, flat, done = restored
            outputs = [_nested(len(p.families), flat)]
    if callable(progress):  # the user's own report, (steps done, steps in all)
        bar = lambda done, seconds, out: progress(done, p.steps)  # noqa: E731
    else:
        bar = _progress_bar(p.steps, done * p.loop.period) if progress else None
    started = time.perf_counter()
    while done < periods:
        n = min(per_chunk, periods - done)
        first = jnp.asarray(first_step + done * p.loop.period, jnp.int32)
        carry, out = run_chunk(p.loop, p.families, n, carry, configs, key, first, arrays)
        out = jax.tree.map(host_readable, out)  # small: (periods, configurations, period) per family
        outputs.append(out)
        done += n
        if checkpoints is not None:
            history = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *outputs)
            outputs = [history]
            checkpoints.save(done, carry, _flat(history))
        if bar is not None:
            jax.block_until_ready(carry)
            bar(done * p.loop.period, time.perf_counter() - started, out)
    return carry, outputs


def _flat(outputs: tuple) -> dict[str, np.ndarray]:
    """The history of each family as ``{"<family>/<steps|metrics|records>/<name>": array}``."""
    flat = {}
    for i, (steps, metrics, records) in enumerate(outputs):
        parts = {"steps": steps._asdict(), "metrics": metrics, "records": records}
        flat |= {f"{i}/{part}/{name}": v for part, values in parts.items() for name, v in values.items()}
    return flat


def _nested(families: int, flat: dict[str, np.ndarray]) -> tuple:
    """The inverse of `_flat`."""
    parts = [{"steps": {}, "metrics": {}, "records": {}} for _ in range(families)]
    for path, value in flat.items():
        i, part, name = path.split("/", 2)
        parts[int(i)][part][name] = value
    return tuple((StepOutputs(**d["steps"]), d["metrics"], d["records"]) for d in parts)


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
        per_step = [x.reshape(-1, *x.shape[2:]) for x in per_step]  # (periods, period[, k]) -> (steps[, k])
        if family.batched:
            per_step = [x.T for x in per_step]  # configurations first
        metrics = {}
        if p.loop.eval_fn is not None:
            metrics = {k: jnp.concatenate([jnp.asarray(o[i][1][k]) for o in outputs]) for k in run.metrics}
            if family.batched:
                metrics = {k: v.T for k, v in metrics.items()}
        records = jax.tree.map(
            lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *[o[i][2] for o in outputs]
        )
        history = History(*per_step, metrics, eval_step, host_readable(run.steps_trained), records)
        result.append(history)
    return result


_PLAIN = (int, float, complex, str, bytes, bool, type(None), np.generic)


def function_id(f: Any, depth: int = 0) -> str:
    """A function's name and a digest of its bytecode and constants (nested functions included), of
    the plain values (numbers, strings) bound by a ``functools.partial`` or held in its closure, and of
    the functions it closes over; the same in every process: an edited loss function, another lambda
    or another bound ``scale`` is not the saved run's. Other objects (arrays, modules) are left out:
    their ``repr`` may hold a memory address."""
    h = hashlib.blake2b(digest_size=6)

    def value(v: Any) -> None:
        if isinstance(v, _PLAIN):
            h.update(repr(v).encode())
        elif isinstance(v, tuple | list):
            for x in v:
                value(x)
        elif callable(v) and depth < 4:
            h.update(function_id(v, depth + 1).encode())

    while isinstance(f, partial):  # functools.partial: the function and what it binds
        value((f.args, tuple(sorted(f.keywords.items()))))
        f = f.func
    f = inspect.unwrap(f)  # jax.jit and decorated functions
    name = getattr(f, "__qualname__", type(f).__name__)
    code = getattr(f, "__code__", None) or getattr(type(f).__call__, "__code__", None)  # a callable object
    if code is None:
        return name

    def feed(c: types.CodeType) -> None:
        h.update(c.co_code)
        for const in c.co_consts:
            if isinstance(const, types.CodeType):  # its repr holds a memory address
                feed(const)
            else:
                h.update(repr(const).encode())

    feed(code)
    for cell in getattr(f, "__closure__", None) or ():
        try:
            value(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return f"{name}:{h.hexdigest()}"


def fingerprint(
    owner: str,
    p: Plan,
    configs: tuple,
    params: tuple,
    arrays: Any,
    key: jax.Array,
    first_step: int,
    carry: Any,
) -> dict:
    """What identifies a training call across processes: functions by name and bytecode, arrays (the
    initial carry: params, optimizer states with their hyperparameters, configurations) by digest."""
    name = function_id
    # A population step given as a NamedTuple of settings (PBT's) is named by its values.
    settings = lambda f: repr(f) if isinstance(f, tuple) else name(f)  # noqa: E731
    loop = p.loop
    return {
        "owner": owner,
        "steps": p.steps,
        "chunks": p.chunks,
        "period": loop.period,
        "first_step": first_step,
        "loss_fn": name(loop.loss_fn),
        "eval_fn": None if loop.eval_fn is None else name(loop.eval_fn),
        "population": None if loop.population is None else settings(loop.population),
        "plateau_metric": loop.plateau_metric,
        "early_stopping": None
        if loop.early_stopping is None
        else [v.item() if isinstance(v, np.generic) else v for v in loop.early_stopping],
        "data": repr(loop.source) if not callable(getattr(loop.source, "fn", None)) else name(loop.source.fn),
        "families": [[f.batched, f.group_size] for f in p.families],
        "configs": digest([c for c in configs if c is not None]),
        "params": digest(params),
        "optimizer": digest(carry),  # the state's types, hyperparameters and values
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
    if isinstance(tx, type) or not (
        callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))
    ):
        raise ValueError(
            f"fit: tx must be an optimizer (init, update), got {tx!r}; call a factory first "
            "(gradtx.adam(1e-3)), or sweep its arguments with gradtx.sweep"
        )
    family = Family(tx)
    p, arrays = plan(
        "fit", loss_fn, data, steps, eval_fn, eval_every, plateau_metric, early_stopping, chunks, (family,)
    )
    check_progress("fit", progress)
    if opt_state is not None:
        _check_opt_state(tx, params, opt_state)
    if initial_step is None:
        initial_step = int(_step_of(opt_state)) if opt_state is not None else 0
    try:
        initial_step = operator.index(initial_step)
    except TypeError:
        raise ValueError(f"fit: initial_step must be an int >= 0, got {initial_step!r}") from None
    if isinstance(initial_step, bool) or initial_step < 0:
        raise ValueError(f"fit: initial_step must be an int >= 0, got {initial_step!r}")
    if initial_step + p.steps > np.iinfo(np.int32).max:  # the step counters are int32
        raise ValueError(f"fit: initial_step + steps must be < 2**31, got {initial_step} + {p.steps}")
    key = jax.random.PRNGKey(0) if key is None else key
    carry = initial_runs("fit", p, (None,), (params,), (opt_state,), (None,), arrays)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = Checkpoints(
            checkpoint_dir, fingerprint("fit", p, (None,), params, arrays, key, initial_step, carry)
        )
    try:
        carry, outputs = run_plan(p, carry, (None,), key, arrays, initial_step, progress, checkpoints)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    (history,) = histories(p, carry, outputs, initial_step)
    (run,) = carry
    return TrainResult(_final_params(p.loop, run), run.opt_state, history)


def _check_opt_state(tx: Transformation, params: Params, opt_state: State) -> None:
    """``opt_state`` must be a state of ``tx`` for these params: its structure, shapes and dtypes."""
    expected = jax.eval_shape(tx.init, params)
    same = jax.tree.structure(expected) == jax.tree.structure(opt_state)
    if same:
        pairs = zip(jax.tree.leaves(expected), jax.tree.leaves(opt_state), strict=True)
        same = all(e.shape == jnp.shape(s) and e.dtype == jnp.result_type(s) for e, s in pairs)
    if not same:
        raise ValueError(
            "fit: opt_state is not a state of this optimizer for these params (its structure, shapes or "
            f"dtypes differ from tx.init(params)): got {type(opt_state).__name__}, expected "
            f"{type(expected).__name__}; pass the opt_state of a run of the same optimizer (not a sweep's)"
        )


def _step_of(opt_state: State) -> jax.Array:
    try:
        return step_count(opt_state)
    except ValueError:
        return jnp.zeros([], jnp.int32)


def _final_params(loop: Loop, run: Run) -> Params:
    if loop.early_stopping is not None and loop.early_stopping.restore_best_weights:
        return run.stop.best_params
    return run.params
