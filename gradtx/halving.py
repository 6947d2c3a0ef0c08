"""Successive halving and Hyperband on the device, each search one compiled program.

**Why a pool.** A vmap computes every lane, so freezing eliminated trials in a fixed-width vmap saves no
time; compiling each rung at its own width saves the compute but not the time on a CPU: measured on the
digits MLP (2 loaded cores), one rung's program took 3-4 s to compile and the five rungs of an
81-configuration search 27-31 s in one jit (compile time grows with the number of inlined rungs, 15 for
Hyperband), against 2-3 s of training. So these searches keep a *pool* of trials (params, optimizer state
with its hyperparameters, scores) and train it in groups of ``group_size`` lanes: a `lax.fori_loop` over
the rungs, one over the groups a rung needs (``ceil(width / group_size)``), one over the rung's periods,
each period the engine's `run_chunk` on one group. After a rung the pool is reordered by one gather so
that the survivors (the best ``1/eta`` by the rung statistic) come first and continue from where they
stopped. The schedule of rungs and brackets (and the rung statistic) is data of the program, so a
search compiles one group step once, whatever its number of rungs and brackets (measured at the same
load: 1.6x the compile time of one rung's program, against 5x for five inlined rungs); a run resumed
from its checkpoints (one per rung) or reporting progress calls the same compiled program rung by rung,
with bit-identical results.

**Compute and time.** The compute reported is the configuration-steps of the trials; the last group of a
rung may carry idle lanes (``ceil(width / group_size) * group_size - width``), computed but not counted.
On a CPU small groups are fastest (the digits MLP, 81 configurations: groups of 1 and 3 took the
same time, groups of 9 twice as long; ``group_size=1``, the default without a mesh, wastes nothing); on
an accelerator choose a group wide enough to fill it (the last rungs' few trials then run on mostly
idle lanes: on a device with lanes to spare, successive halving takes about as many sequential periods
as the full search). With ``mesh`` the lanes of each group are split over
the devices, so ``group_size`` must be a multiple of the device count (its default).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradtx.base import Params, Transformation
from gradtx.checkpoints import Checkpoints
from gradtx.data import Data
from gradtx.engine import EvalFn, Family, Loop, LossFn, Run, new_run, run_chunk
from gradtx.search import Clock, SearchResult, check_mode, draw, metric_name, split_key
from gradtx.spaces import Space
from gradtx.sweeps import ParamsOrInit, member
from gradtx.training import (
    check_loss,
    check_plateau,
    check_progress,
    fingerprint,
    metric_shapes,
    plan,
    positive_int,
)


class Rung(NamedTuple):
    """One rung of a successive-halving bracket (all counts static; periods are evaluations)."""

    bracket: int  # the bracket it belongs to (Hyperband), 0 for successive halving
    index: int  # its place in the bracket, 0 for the first
    width: int  # trials trained in it
    first: int  # periods each of them has trained before it
    periods: int  # periods it trains them
    keep: int  # trials promoted to the next rung, 0 after the bracket's last
    offset: int  # the bracket's first trial


def halving_rungs(
    num_configs: int, eta: int, rungs: int, first_periods: int = 1, bracket: int = 0, offset: int = 0
) -> list[Rung]:
    """Successive halving's rungs (Jamieson & Talwalkar, 2016; Li et al., 2018): rung ``i`` trains
    ``n_i = floor(num_configs / eta^i)`` trials until each has trained ``first_periods * eta^i`` periods."""
    widths = [num_configs // eta**i for i in range(rungs)]
    ends = [first_periods * eta**i for i in range(rungs)]
    return [
        Rung(
            bracket,
            i,
            w,
            ends[i - 1] if i else 0,
            ends[i] - (ends[i - 1] if i else 0),
            widths[i + 1] if i + 1 < rungs else 0,
            offset,
        )
        for i, w in enumerate(widths)
    ]


class _Score(NamedTuple):
    current: jax.Array  # the last evaluation, signed so that lower is better (NaN: diverged)
    best: jax.Array  # the lowest signed value so far (NaN values skipped)
    ema: jax.Array  # exponential moving average of the signed values


class _Best(NamedTuple):
    params: Params
    value: jax.Array  # its signed metric
    steps: jax.Array  # int32: steps it had trained (a trial that trained longer wins)
    trial: jax.Array  # int32, -1 before any finite evaluation


class _Pool(NamedTuple):
    """The search's state between rungs. Pool arrays are lanes first, ``(group, pool // group, ...)``:
    slot ``g * group + lane`` is element ``[lane, g]``, so group ``g`` is one index on axis 1 and the
    lane axis is the one a mesh splits."""

    runs: Run
    configs: dict[str, jax.Array]
    trial: jax.Array  # int32: the trial in each slot
    score: _Score
    history: jax.Array  # (trials, evaluations) float32: the metric, NaN where not evaluated
    steps: jax.Array  # (trials,) int32
    rung: jax.Array  # (trials,) int32: the last rung each trial trained in, -1 before
    best: _Best


_STATISTICS = ("current", "best", "ema")  # the rung statistics, in _Score's order


class _Rule(NamedTuple):
    """How a rung ranks (arrays, so that every rule runs the same compiled program)."""

    statistic: jax.Array  # int32: the index in _STATISTICS
    smoothing: jax.Array  # float32: the moving average's weight of the old value


class _Halving(NamedTuple):
    """What the program does (static and hashable: the key of its compiled program)."""

    loop: Loop
    family: Family
    rungs: tuple[Rung, ...]
    pool: int  # slots: the widest rung, rounded up to a multiple of group
    group: int  # lanes trained side by side
    trials: int
    metric: str
    sign: float
    metric_names: tuple[str, ...]
    sharding: NamedSharding | None  # of the lane axis, with a mesh


def _constrain(s: _Halving, tree: Any) -> Any:
    if s.sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, s.sharding), tree)


def _to_lanes(s: _Halving, tree: Any) -> Any:
    lanes = lambda x: x.reshape(s.pool // s.group, s.group, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
    return _constrain(s, jax.tree.map(lanes, tree))


def _from_lanes(s: _Halving, tree: Any) -> Any:
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(s.pool, *x.shape[2:]), tree)


def _fresh_lanes(s: _Halving, configs: dict, params: Params, offset: jax.Array) -> tuple:
    """A bracket's first ``pool`` trials (from ``offset``), not trained yet: (runs, configs, trial, score)."""
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, offset, s.pool)  # noqa: E731
    config, prm = jax.tree.map(take, (configs, params))

    def one(config, p):
        return new_run(s.loop, p, s.family.build(config).init(p), dict.fromkeys(s.metric_names))

    nan, inf = jnp.full(s.pool, jnp.nan, jnp.float32), jnp.full(s.pool, jnp.inf, jnp.float32)
    return _to_lanes(
        s, (jax.vmap(one)(config, prm), config, offset + jnp.arange(s.pool), _Score(nan, inf, nan))
    )


def _fresh(s: _Halving, configs: dict, params: Params, offset: jax.Array, pool: _Pool) -> _Pool:
    runs, config, trial, score = _fresh_lanes(s, configs, params, offset)
    return pool._replace(runs=runs, configs=config, trial=trial, score=score)


def _train_group(s, rule, key, arrays, width, first, periods, index, g, pool: _Pool) -> _Pool:
    """The rung's ``periods`` periods for group ``g``; each evaluation updates the scores and history."""
    get = lambda x: jax.lax.dynamic_index_in_dim(x, g, axis=1, keepdims=False)  # noqa: E731
    runs, config, trial, score = _constrain(
        s, jax.tree.map(get, (pool.runs, pool.configs, pool.trial, pool.score))
    )
    row = jnp.where(g * s.group + jnp.arange(s.group) < width, trial, s.trials)  # out of range: dropped

    def one_period(t, carry):
        runs, score, history = carry
        at = first + t
        (runs,), ((_, metrics, _),) = run_chunk(
            s.loop, (s.family,), 1, (runs,), (config,), key, at * s.loop.period, arrays
        )
        value = metrics[s.metric][0]
        signed = s.sign * value
        ema = jnp.where(
            runs.evaluations == 1, signed, rule.smoothing * score.ema + (1 - rule.smoothing) * signed
        )
        history = history.at[row, at].set(value, mode="drop")
        return runs, _Score(signed, jnp.fmin(score.best, signed), ema), history

    runs, score, history = jax.lax.fori_loop(0, periods, one_period, (runs, score, pool.history))
    put = lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, g, axis=1)  # noqa: E731
    return pool._replace(
        runs=jax.tree.map(put, pool.runs, runs),
        score=jax.tree.map(put, pool.score, score),
        history=history,
        steps=pool.steps.at[row].set(runs.steps_trained, mode="drop"),
        rung=pool.rung.at[row].set(index, mode="drop"),
    )


def _rank(s: _Halving, rule: _Rule, score: _Score, width: jax.Array) -> jax.Array:
    """The pool's slots best first: active finite trials by the rung statistic, then the diverged ones,
    then the inactive slots; ties by slot."""
    slot = jnp.arange(s.pool)
    statistic = jnp.stack(score)[rule.statistic]
    finite = jnp.isfinite(score.current)
    value = jnp.where(finite & ~jnp.isnan(statistic), statistic, jnp.inf)
    category = jnp.where(slot < width, jnp.where(finite, 0, 1), 2)
    return jnp.lexsort((slot, value, category))


def _rung(s: _Halving, rule, configs, params, key, arrays, j, pool: _Pool) -> _Pool:
    column = lambda name: jnp.asarray([getattr(r, name) for r in s.rungs], jnp.int32)[j]  # noqa: E731
    width, index = column("width"), column("index")
    pool = jax.lax.cond(index == 0, partial(_fresh, s, configs, params, column("offset")), lambda p: p, pool)
    train = partial(_train_group, s, rule, key, arrays, width, column("first"), column("periods"), index)
    pool = jax.lax.fori_loop(0, (width + s.group - 1) // s.group, train, pool)
    # The best trial: a finite one that trained longest, then by its metric (every bracket's last rung
    # trains to max_steps, so Hyperband's brackets compare at equal steps).
    current, trial = _from_lanes(s, (pool.score.current, pool.trial))
    candidates = jnp.where((jnp.arange(s.pool) < width) & jnp.isfinite(current), current, jnp.inf)
    c = jnp.argmin(candidates)
    steps, old = pool.steps[trial[c]], pool.best
    better = jnp.isfinite(candidates[c]) & (
        (steps > old.steps) | ((steps == old.steps) & (candidates[c] < old.value))
    )
    new = _Best(
        jax.tree.map(lambda x: x[c % s.group, c // s.group], pool.runs.params), candidates[c], steps, trial[c]
    )
    best = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, old)
    # Survivors first: the gather that continues them where they stopped.
    order = _rank(s, rule, _from_lanes(s, pool.score), width)
    moved = _to_lanes(
        s,
        jax.tree.map(
            lambda x: jnp.take(x, order, axis=0),
            _from_lanes(s, (pool.runs, pool.configs, pool.trial, pool.score)),
        ),
    )
    return pool._replace(runs=moved[0], configs=moved[1], trial=moved[2], score=moved[3], best=best)


@partial(jax.jit, static_argnames=("search",), donate_argnames=("pool",))
def _program(search: _Halving, pool: _Pool, start, stop, rule, configs, params, key, arrays) -> _Pool:
    """Rungs ``start .. stop - 1`` of the search: one compiled program for any range of rungs."""
    return jax.lax.fori_loop(start, stop, partial(_rung, search, rule, configs, params, key, arrays), pool)


def _placed(s: _Halving, pool: _Pool) -> _Pool:
    """The pool's lanes split over the mesh, the rest replicated on it (or uncommitted without one)."""
    lanes = (pool.runs, pool.configs, pool.trial, pool.score)
    if s.sharding is None:
        return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), pool)
    replicated = NamedSharding(s.sharding.mesh, PartitionSpec())
    rest = jax.device_put((pool.history, pool.steps, pool.rung, pool.best), replicated)
    lanes = jax.device_put(jax.tree.map(np.asarray, lanes), s.sharding)
    return _Pool(*lanes, *rest)


def _empty(s: _Halving, configs, params) -> _Pool:
    """A pool of zeros of the program's shapes (the first rung fills it); nothing is compiled."""
    abstract = jax.eval_shape(lambda c, p: _fresh_lanes(s, c, p, 0), configs, params)
    runs, config, trial, score = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    single = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), params)
    best = _Best(single, np.float32(np.inf), np.int32(-1), np.int32(-1))
    history = np.full((s.trials, _evaluations(s.rungs)), np.nan, np.float32)
    steps, rung = np.zeros(s.trials, np.int32), np.full(s.trials, -1, np.int32)
    return _placed(s, _Pool(runs, config, trial, score, history, steps, rung, best))


def _evaluations(rungs: Sequence[Rung]) -> int:
    return max(r.first + r.periods for r in rungs)


# --- the driver ----------------------------------------------------------------------------------------


def _levels(owner: str, max_steps: int, min_steps: int | None, eta: int, cap: int) -> tuple[int, int]:
    """``(min_steps, s)`` with ``max_steps = min_steps * eta^s``: given, or by default the largest
    ``s <= cap`` that divides ``max_steps`` into whole steps."""
    if min_steps is None:
        s = next(s for s in range(cap, -1, -1) if max_steps % eta**s == 0)
        if s == 0:
            raise ValueError(
                f"{owner}: max_steps={max_steps} is not a multiple of eta={eta}: give min_steps such that "
                f"max_steps / min_steps is a power of eta"
            )
        return max_steps // eta**s, s
    min_steps = positive_int(owner, "min_steps", min_steps)
    s, ratio = 0, max_steps // min_steps
    while ratio % eta == 0:
        ratio, s = ratio // eta, s + 1
    if max_steps % min_steps or ratio != 1 or s == 0:
        raise ValueError(
            f"{owner}: max_steps / min_steps must be eta^s for a whole s >= 1, got max_steps={max_steps}, "
            f"min_steps={min_steps}, eta={eta}"
        )
    if s > cap:
        raise ValueError(
            f"{owner}: min_steps={min_steps} asks for {s + 1} rungs, more than the {cap + 1} that leave a "
            "trial in the last one (num_configs >= eta^(rungs - 1))"
        )
    return min_steps, s


def _eta(owner: str, eta: Any) -> int:
    eta = positive_int(owner, "eta", eta)
    if eta < 2:
        raise ValueError(f"{owner}: eta must be >= 2, got {eta}")
    return eta


def _group(owner: str, group_size: int | None, devices: int) -> int:
    if group_size is None:
        return devices
    group = positive_int(owner, "group_size", group_size)
    if group % devices:
        raise ValueError(
            f"{owner}: group_size must be a multiple of the mesh's {devices} devices (its lanes are split "
            f"over them), got {group}"
        )
    return group


def _search(
    owner: str,
    rungs: list[Rung],
    loss_fn: LossFn,
    params: ParamsOrInit,
    make_tx: Callable[..., Transformation],
    space: Space,
    data: Data,
    max_steps: int,
    min_steps: int,
    *,
    key: jax.Array | None,
    eval_fn: EvalFn | None,
    metric: str | None,
    mode: str,
    rung_metric: str,
    smoothing: float,
    group_size: int | None,
    mesh: Mesh | Sequence[jax.Device] | None,
    checkpoint_dir: str | None,
    progress: bool | Callable[[int, int], None],
) -> SearchResult:
    clock = Clock()
    check_progress(owner, progress)
    sign = check_mode(owner, mode)
    if rung_metric not in _STATISTICS:
        raise ValueError(f"{owner}: rung_metric must be 'current', 'best' or 'ema', got {rung_metric!r}")
    if not (isinstance(smoothing, int | float) and 0 <= smoothing < 1):
        raise ValueError(f"{owner}: smoothing must be in [0, 1), got {smoothing!r}")
    metric = metric_name(owner, eval_fn, params, metric)
    sample_key, data_key = split_key(owner, key)
    trials = max(r.offset + r.width for r in rungs)
    devices = 1 if mesh is None else int(np.asarray(mesh.devices if isinstance(mesh, Mesh) else mesh).size)
    group = _group(owner, group_size, devices)
    pool = -(-max(r.width for r in rungs) // group) * group
    configs = draw(owner, space, sample_key, trials)
    # The pool's slice of a bracket reads `pool` rows from its first trial: pad with copies of the last.
    padded = {k: np.concatenate([v, np.repeat(v[-1:], pool, axis=0)]) for k, v in configs.items()}
    m = member(owner, make_tx, padded, params, mesh=mesh)
    p, arrays = plan(owner, loss_fn, data, max_steps, eval_fn, min_steps, None, None, 1, (m.family,))
    single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), m.params)
    first = {k: v[0].item() for k, v in padded.items()}
    check_plateau(owner, p.loop, (jax.eval_shape(lambda q: m.family.build(first).init(q), single),))
    check_loss(owner, p.loop, single, arrays)
    names = tuple(sorted(metric_shapes(owner, p.loop, single)))
    search = _Halving(p.loop, m.family, tuple(rungs), pool, group, trials, metric, sign, names, m.sharding)
    rule = _Rule(jnp.int32(_STATISTICS.index(rung_metric)), jnp.float32(smoothing))
    state = _empty(search, m.configs, m.params)
    done, checkpoints = 0, None
    if checkpoint_dir is not None:
        settings = {
            "rungs": [list(r) for r in rungs],
            "group": group,
            "metric": metric,
            "mode": mode,
            "rung_metric": rung_metric,
            "smoothing": smoothing,
        }
        checkpoints = Checkpoints(
            checkpoint_dir,
            fingerprint(owner, p, (m.configs,), (m.params,), arrays, data_key, 0, state) | settings,
        )
    args = (rule, m.configs, m.params, data_key, arrays)
    try:
        if checkpoints is not None:
            restored = checkpoints.restore(state)
            if restored is not None:
                state, _, done = restored
                state = _placed(search, state)
        if checkpoints is None and not progress:
            state = _program(search, state, 0, len(rungs), *args)
        for j in range(done, len(rungs) if checkpoints is not None or progress else 0):
            state = _program(search, state, j, j + 1, *args)
            if checkpoints is not None:
                checkpoints.save(j + 1, state, {})
            if callable(progress):
                progress(j + 1, len(rungs))
            elif progress:
                r = rungs[j]
                print(
                    f"{owner}: rung {j + 1}/{len(rungs)} (bracket {r.bracket}, {r.width} trials to "
                    f"{(r.first + r.periods) * min_steps} steps) done",
                    flush=True,
                )
    finally:
        if checkpoints is not None:
            checkpoints.close()
    return _result(owner, search, state, {k: v for k, v in configs.items()}, clock)


def _result(owner: str, s: _Halving, state: _Pool, configs: dict, clock: Clock) -> SearchResult:
    steps, best = np.asarray(state.steps), int(state.best.trial)
    bracket = np.zeros(s.trials, int)
    for r in s.rungs:
        if r.index == 0:
            bracket[r.offset : r.offset + r.width] = r.bracket
    if best < 0:
        warnings.warn(f"{owner}: every trial diverged (no finite metric): no best trial", stacklevel=3)
    seconds, compiling = clock.read()
    return SearchResult(
        method=owner,
        metric=s.metric,
        mode="min" if s.sign > 0 else "max",
        best_config={k: v[best].item() for k, v in configs.items()} if best >= 0 else {},
        best_params=state.best.params if best >= 0 else None,
        best_metric=s.sign * float(state.best.value) if best >= 0 else float("nan"),
        best_trial=best,
        configs=configs,
        metric_history=np.asarray(state.history, np.float64),
        eval_step=s.loop.period * np.arange(1, _evaluations(s.rungs) + 1),
        steps_trained=steps,
        bracket=bracket,
        rung=np.asarray(state.rung),
        compute=int(steps.sum()),
        seconds=seconds,
        compile_seconds=compiling,
    )


# --- the searches ----------------------------------------------------------------------------------------


def successive_halving(
    loss_fn: LossFn,
    params: ParamsOrInit,
    make_tx: Callable[..., Transformation],
    space: Space,
    data: Data,
    max_steps: int,
    *,
    num_configs: int = 81,
    eta: int = 3,
    min_steps: int | None = None,
    key: jax.Array | None = None,
    eval_fn: EvalFn | None = None,
    metric: str | None = None,
    mode: str = "min",
    rung_metric: str = "current",
    smoothing: float = 0.5,
    group_size: int | None = None,
    mesh: Mesh | Sequence[jax.Device] | None = None,
    checkpoint_dir: str | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> SearchResult:
    """Successive halving: rung ``i`` trains ``n_i = floor(num_configs / eta^i)`` trials until each has
    trained ``min_steps * eta^i`` steps, then the best ``n_{i+1}`` continue from where they stopped
    (Jamieson & Talwalkar, 2016; the rungs of Li et al.'s Hyperband, 2018), in one compiled program.

    Arguments in `gradtx.sweep`'s order, ``(loss_fn, params, make_tx, space, data, max_steps)``, the
    configurations drawn from ``space``. The last rung trains to ``max_steps = min_steps * eta^s``;
    ``min_steps`` (the evaluation period) defaults to the smallest that keeps ``n_s >= 1`` and whole
    steps (81 configurations, ``eta=3``, ``max_steps=1620``: rungs of 81, 27, 9, 3, 1 trials to 20, 60,
    180, 540, 1620 steps, 5,940 configuration-steps against 131,220 for training all of them).

    ``rung_metric`` is the statistic a rung ranks by: ``"current"`` (the last evaluation), ``"best"``
    (the best so far) or ``"ema"`` (exponential moving average, ``ema <- smoothing * ema + (1 -
    smoothing) * value``, over every evaluation); a trial whose last evaluation is NaN or inf ranks
    below every finite one whatever the statistic (``experiments/search/`` compares the three). The best
    trial is the finite one that trained longest, then by its last metric; its params are those when it
    stopped. ``group_size`` lanes train side by side (see `gradtx.halving`); ``mesh`` splits them over
    devices; ``checkpoint_dir`` saves after every rung and resumes bit-identically."""
    owner = "successive_halving"
    num_configs, eta = positive_int(owner, "num_configs", num_configs), _eta(owner, eta)
    max_steps = positive_int(owner, "max_steps", max_steps)
    cap = 0  # the most halvings that leave a trial: eta^cap <= num_configs
    while eta ** (cap + 1) <= num_configs:
        cap += 1
    if cap == 0:
        raise ValueError(f"{owner}: num_configs must be >= eta={eta} for a second rung, got {num_configs}")
    min_steps, s = _levels(owner, max_steps, min_steps, eta, cap)
    return _search(
        owner, halving_rungs(num_configs, eta, s + 1), loss_fn, params, make_tx, space, data, max_steps,
        min_steps, key=key, eval_fn=eval_fn, metric=metric, mode=mode, rung_metric=rung_metric,
        smoothing=smoothing, group_size=group_size, mesh=mesh, checkpoint_dir=checkpoint_dir,
        progress=progress,
    )  # fmt: skip


def hyperband_rungs(eta: int, s_max: int) -> list[Rung]:
    """Hyperband's brackets ``s = s_max, ..., 0`` (Li et al., 2018): bracket ``s`` is successive halving of
    ``ceil((s_max + 1) * eta^s / (s + 1))`` trials whose first rung trains ``eta^(s_max - s)`` periods."""
    rungs, offset = [], 0
    for b, s in enumerate(range(s_max, -1, -1)):
        n = -(-((s_max + 1) * eta**s) // (s + 1))
        rungs += halving_rungs(n, eta, s + 1, eta ** (s_max - s), b, offset)
        offset += n
    return rungs


def hyperband(
    loss_fn: LossFn,
    params: ParamsOrInit,
    make_tx: Callable[..., Transformation],
    space: Space,
    data: Data,
    max_steps: int,
    *,
    eta: int = 3,
    min_steps: int | None = None,
    key: jax.Array | None = None,
    eval_fn: EvalFn | None = None,
    metric: str | None = None,
    mode: str = "min",
    rung_metric: str = "current",
    smoothing: float = 0.5,
    group_size: int | None = None,
    mesh: Mesh | Sequence[jax.Device] | None = None,
    checkpoint_dir: str | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> SearchResult:
    """Hyperband: successive halving in brackets ``s = s_max, ..., 0``, bracket ``s`` starting
    ``ceil((s_max + 1) eta^s / (s + 1))`` fresh trials at ``max_steps / eta^s`` steps (Li et al., 2018),
    all brackets one after another in one compiled program.

    Arguments in `gradtx.sweep`'s order, ``(loss_fn, params, make_tx, space, data, max_steps)``.
    ``max_steps = min_steps * eta^s_max``; ``min_steps`` defaults to the smallest whole number of steps
    with ``s_max <= 4`` (``eta=3``, ``max_steps=1620``: five brackets of 81, 34, 15, 8 and 5 trials, 143
    in all, 31,620 configuration-steps, 24% of training 81 configurations fully). Every bracket ends at
    ``max_steps``; the best trial is the finite one with the best metric there. The other arguments are
    those of `successive_halving`."""
    owner = "hyperband"
    eta, max_steps = _eta(owner, eta), positive_int(owner, "max_steps", max_steps)
    min_steps, s_max = _levels(owner, max_steps, min_steps, eta, 4 if min_steps is None else max_steps)
    return _search(
        owner, hyperband_rungs(eta, s_max), loss_fn, params, make_tx, space, data, max_steps, min_steps,
        key=key, eval_fn=eval_fn, metric=metric, mode=mode, rung_metric=rung_metric, smoothing=smoothing,
        group_size=group_size, mesh=mesh, checkpoint_dir=checkpoint_dir, progress=progress,
    )  # fmt: skip
