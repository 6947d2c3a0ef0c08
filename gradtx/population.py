"""Population-based training on the device: the engine's population step exploits and explores between
periods, inside the one compiled program of a sweep (Jaderberg et al., 2017).

Every ``ready_every`` steps, after the evaluation, the members are ranked by ``metric`` (a NaN or inf
member below every finite one). Each of the worst ``fraction`` copies the params, the optimizer state
and its hyperparameters (one gather over the population axis) from a member drawn uniformly from the
best ``fraction`` (finite members only), then *explores*: each hyperparameter of the space is resampled
from the space with probability ``resample_probability``, else multiplied by a factor drawn from
``perturb`` and clipped to the space's bounds (see `gradtx.spaces`), and written into the state with
`gradtx.set_hyperparams`. Nothing is rebuilt or compiled again: hyperparameters are arrays in the state.
Nothing is copied after the last evaluation, so the final members are the ones that were evaluated.

The population step records, per period, each member's parent (itself when not replaced) and its
hyperparameters after exploring: ``SearchResult.lineage``, from which ``SearchResult.schedule(name)``
traces the hyperparameter schedule the best member followed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gradtx.base import Transformation
from gradtx.data import Data
from gradtx.engine import EvalFn, LossFn, Run
from gradtx.hyper import hyperparam_ranges, hyperparams, set_hyperparams
from gradtx.search import Clock, SearchResult, check_mode, draw, metric_name, side_by_side, split_key
from gradtx.spaces import Dimension, Space, check_space
from gradtx.sweeps import ParamsOrInit, member, train_members
from gradtx.training import positive_int

_PARENT = "parent"  # the lineage record of the member each one copied (itself when not replaced)


class Exploit(NamedTuple):
    """PBT's population step (see the module): hashable settings, so that the compiled program is found
    again, and a checkpoint's fingerprint names them."""

    metric: str
    sign: float  # 1 for mode="min", -1 for "max"
    count: int  # members replaced per period, and the number of best members they copy from
    dims: tuple[tuple[str, Dimension], ...]  # the hyperparameters explored
    factors: tuple[float, ...]
    resample_probability: float
    last_period: int  # no copy after the last evaluation

    def __call__(self, runs: Run, metrics: dict, key: jax.Array, period: jax.Array) -> tuple[Run, dict]:
        value = self.sign * metrics[self.metric]
        n = value.shape[0]
        members = jnp.arange(n)
        if self.count == 0:  # exploitation off: a sweep that records its (unchanging) lineage
            now = hyperparams(runs.opt_state)
            return runs, {_PARENT: members, **{name: now[name] for name, _ in self.dims}}
        finite = jnp.isfinite(value)
        order = jnp.lexsort((members, jnp.where(finite, value, jnp.inf)))  # best first, diverged last
        top, bottom = order[: self.count], order[n - self.count :]
        # One uniform draw serves every choice (each random call adds a generator to the compiled program:
        # measured, 0.35 s less compile on the digits MLP): a parent among the finite best (the first
        # `finite_top` of `top`), and per hyperparameter a factor and whether to resample.
        key, *sample_keys = jax.random.split(key, 1 + len(self.dims))
        u = jax.random.uniform(key, (1 + 2 * len(self.dims), n))
        finite_top = finite[top].sum()
        drawn = top[jnp.minimum(jnp.floor(u[0, : self.count] * finite_top).astype(jnp.int32), finite_top - 1)]
        allowed = (finite_top > 0) & (period < self.last_period)
        parent = members.at[bottom].set(jnp.where(allowed, drawn, bottom))
        runs = jax.tree.map(lambda x: jnp.take(x, parent, axis=0), runs)
        copied = parent != members
        now = hyperparams(runs.opt_state)
        factors = jnp.asarray(self.factors, jnp.float32)
        explored = {}
        for i, (name, dim) in enumerate(self.dims):
            old = now[name]
            factor = factors[
                jnp.minimum(
                    jnp.floor(u[1 + 2 * i] * len(self.factors)).astype(jnp.int32), len(self.factors) - 1
                )
            ]
            fresh = dim.sample(sample_keys[i], n).astype(old.dtype)
            resample = u[2 + 2 * i] < self.resample_probability
            new = jnp.where(resample, fresh, dim.perturb(old, factor).astype(old.dtype))
            explored[name] = jnp.where(copied, new, old)
        runs = runs._replace(opt_state=set_hyperparams(runs.opt_state, **explored))
        return runs, {_PARENT: parent, **explored}


def _explored(
    owner: str, space: dict, make_tx: Callable[..., Transformation], single: Any, first: dict
) -> tuple:
    """The space's dimensions PBT explores (every drawn field but ``seed``), each checked to be a constant
    hyperparameter of the optimizer's state whose valid range holds the dimension's bounds."""
    dims = tuple(sorted((k, d) for k, d in space.items() if isinstance(d, Dimension) and k != "seed"))
    state = jax.eval_shape(
        lambda p: make_tx(**{k: v for k, v in first.items() if k != "seed"}).init(p), single
    )
    held, ranges = hyperparams(state), hyperparam_ranges(state)
    for name, dim in dims:
        if name not in held:
            raise ValueError(
                f"{owner}: space field {name!r} is not a hyperparameter of the optimizer's state, which has "
                f"{sorted(held)}; PBT writes what it explores into the state: give {name!r} as a fixed "
                "number or name the hyperparameter as the state does"
            )
        try:
            set_hyperparams(state, **{name: first[name]})
        except ValueError as error:
            raise ValueError(f"{owner}: space field {name!r}: {error}") from None
        bounds = dim.values if hasattr(dim, "values") else (dim.low, dim.high)
        outside = [b for b in bounds if not ranges[name].contains(float(b))]
        if outside:
            raise ValueError(
                f"{owner}: space field {name!r} reaches {outside}, outside the hyperparameter's valid values "
                f"({ranges[name].describe()}); perturbing or resampling could write them into the state"
            )
    return dims


def population_based_training(
    loss_fn: LossFn,
    params: ParamsOrInit,
    make_tx: Callable[..., Transformation],
    space: Space,
    data: Data,
    steps: int,
    *,
    population: int = 16,
    ready_every: int,
    fraction: float = 0.25,
    perturb: Sequence[float] = (0.8, 1.25),
    resample_probability: float = 0.25,
    key: jax.Array | None = None,
    eval_fn: EvalFn | None = None,
    metric: str | None = None,
    mode: str = "min",
    mesh: Mesh | Sequence[jax.Device] | None = None,
    group_size: int | None = None,
    checkpoint_dir: str | None = None,
    chunks: int = 1,
    progress: bool | Callable[[int, int], None] = False,
) -> SearchResult:
    """Population-based training: every ``ready_every`` steps the worst ``fraction`` of the population
    copy params, optimizer state and hyperparameters from members of the best ``fraction``, then perturb
    (x ``perturb``) or resample (probability ``resample_probability``) those hyperparameters (Jaderberg et
    al., 2017), all inside one compiled program (see `gradtx.population`).

    Arguments in `gradtx.sweep`'s order, ``(loss_fn, params, make_tx, space, data, steps)``: ``population``
    configurations are drawn from ``space``; each drawn field (``seed`` aside) must be a constant
    hyperparameter of ``make_tx(**config)``'s state, an error up front otherwise. ``fraction=0`` turns
    exploitation off (a sweep of the drawn configurations). ``mesh`` and ``group_size`` as in `sweep`
    (``population`` must then be a multiple of the device count or group size: padding members would
    take part in the exploitation); ``checkpoint_dir``, ``chunks`` and ``progress`` as in `gradtx.fit`.
    The best member is the one with the best finite metric at the last evaluation; ``best_config`` holds
    its final hyperparameters and `SearchResult.schedule` the schedule it followed."""
    owner = "population_based_training"
    clock = Clock()
    sign = check_mode(owner, mode)
    population = positive_int(owner, "population", population)
    ready_every, steps = positive_int(owner, "ready_every", ready_every), positive_int(owner, "steps", steps)
    if not (isinstance(fraction, int | float) and 0 <= fraction <= 0.5):
        raise ValueError(f"{owner}: fraction must be in [0, 0.5], got {fraction!r}")
    count = int(fraction * population)
    if fraction > 0 and count == 0:
        raise ValueError(f"{owner}: fraction={fraction} of population={population} replaces no member")
    if steps % ready_every or steps // ready_every < 2:
        raise ValueError(
            f"{owner}: ready_every must divide steps={steps} into at least two periods (one exploitation "
            f"between them), got ready_every={ready_every}"
        )
    numbers = isinstance(perturb, Sequence) and not isinstance(perturb, str)
    numbers = numbers and all(
        isinstance(f, int | float | np.integer | np.floating) and not isinstance(f, bool) for f in perturb
    )
    factors = tuple(float(f) for f in perturb) if numbers else ()
    if not factors or not all(np.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"{owner}: perturb must be a non-empty list of factors > 0, got {perturb!r}")
    if not (isinstance(resample_probability, int | float) and 0 <= resample_probability <= 1):
        raise ValueError(f"{owner}: resample_probability must be in [0, 1], got {resample_probability!r}")
    metric = metric_name(owner, eval_fn, params, metric)
    sample_key, data_key = split_key(owner, key)
    space = check_space(owner, space)
    configs = draw(owner, space, sample_key, population)
    m = member(owner, make_tx, configs, params, mesh=mesh, group_size=group_size)
    if len(next(iter(m.configs.values()))) != population:
        raise ValueError(
            f"{owner}: population={population} must be a multiple of the mesh's device count and of "
            "group_size (padding members would take part in the exploitation)"
        )
    single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), m.params)
    dims = _explored(owner, space, make_tx, single, {k: v[0].item() for k, v in configs.items()})
    step = Exploit(metric, sign, count, dims, factors, float(resample_probability), steps // ready_every - 1)
    (swept,) = train_members(
        owner, [m], loss_fn, data, steps, key=data_key, eval_fn=eval_fn, eval_every=ready_every,
        plateau_metric=None, early_stopping=None, chunks=chunks, progress=progress,
        checkpoint_dir=checkpoint_dir, population=step,
    )  # fmt: skip
    final = {k: np.asarray(v) for k, v in hyperparams(swept.opt_state).items()}
    final = {k: final[k] if k in final and k != "seed" else v for k, v in configs.items()}
    return side_by_side(owner, metric, mode, swept, configs, clock, final)
