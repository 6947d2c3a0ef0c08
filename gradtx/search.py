"""Hyperparameter search on the device: the one result type, random search, and what the searches share.

The searches: `random_search` (here), `gradtx.successive_halving` and `gradtx.hyperband`
(`gradtx.halving`), `gradtx.population_based_training` (`gradtx.population`). Each is one compiled
program and returns a `SearchResult`.

Every search takes the arguments of `gradtx.fit` and `gradtx.sweep` in their order, ``(loss_fn, params,
make_tx, space, data, steps)``: ``make_tx(**config)`` builds the optimizer of a configuration drawn from
``space`` (see `gradtx.spaces`), ``params`` are the shared initial params or a function ``key -> params``
called with ``PRNGKey(seed)`` (``seed`` a field of the space, as in `sweep`). ``eval_fn(params)`` gives
the ``metric`` the search ranks by (``mode="min"`` or ``"max"``). The configurations are drawn from
``fold_in(key, 0)``; the data (and PBT's draws) use ``fold_in(key, 1)``, so a trial trains as
``fit(..., key=fold_in(key, 1))`` of its configuration would. A diverged trial (NaN or inf metric) ranks
below every finite one: it is never chosen, never promoted while finite trials remain, and, each trial
being its own lane of a vmap, never changes another trial's numbers.

**Compilation cache.** On a CPU compiling a search's program takes seconds, about as long as a small
search trains. A notebook or script that runs again in a fresh process compiles again unless JAX's
persistent cache is on; before the first computation::

    jax.config.update("jax_compilation_cache_dir", "/tmp/jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

``SearchResult.compile_seconds`` shows what XLA's compilation cost in a call (``experiments/search/``
measures a rerun in a fresh process).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from gradtx.base import Params, Transformation
from gradtx.data import Data
from gradtx.engine import EvalFn, LossFn
from gradtx.spaces import Space, check_space, sample
from gradtx.sweeps import ParamsOrInit, SweepResult, member, train_members
from gradtx.training import positive_int

# --- the result ------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """What a search found: the best trial (its configuration, final params and metric) and one row per
    trial (configuration, steps trained, metric at every evaluation, where it stopped), the compute
    (configuration-steps trained) and the wall-clock time, compilation included."""

    method: str  # "random_search", "successive_halving", "hyperband" or "population_based_training"
    metric: str  # the metric of eval_fn the search ranked by
    mode: str  # "min" or "max"
    best_config: dict[str, float]  # PBT: the best member's hyperparameters at the end
    best_params: Params  # the best trial's params when it stopped (None when every trial diverged)
    best_metric: float  # the metric of best_params (NaN when every trial diverged)
    best_trial: int  # index of the best trial (-1 when every trial diverged)
    configs: dict[str, np.ndarray]  # (trials,): each trial's configuration (PBT: its first one)
    metric_history: np.ndarray  # (trials, evaluations): the metric, NaN where a trial was not evaluated
    eval_step: np.ndarray  # (evaluations,): the steps trained at each evaluation
    steps_trained: np.ndarray  # (trials,): where each trial stopped
    bracket: np.ndarray  # (trials,): Hyperband's bracket of each trial (0 for the other searches)
    rung: np.ndarray  # (trials,): the last rung each trial trained in (0 for random search and PBT)
    compute: int  # configuration-steps trained, all trials together
    seconds: float  # wall-clock time of the call, compilation included
    compile_seconds: float  # the part XLA spent compiling (JAX's backend_compile_duration events)
    lineage: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # PBT: "parent" and each field, (evaluations, trials)

    def __len__(self) -> int:
        return len(self.steps_trained)

    def rows(self) -> list[dict[str, float]]:
        """One dict per trial: its fields, bracket, rung, steps trained, the metric where it stopped and
        its best finite value (NaN when it never had one)."""
        sign = 1.0 if self.mode == "min" else -1.0
        rows = []
        for i in range(len(self)):
            seen = self.metric_history[i][: int(np.sum(self.eval_step <= self.steps_trained[i]))]
            finite = seen[np.isfinite(seen)]
            row: dict[str, float] = {"trial": i, **{k: v[i].item() for k, v in self.configs.items()}}
            row |= {"bracket": int(self.bracket[i]), "rung": int(self.rung[i])}
            row["steps_trained"] = int(self.steps_trained[i])
            row[f"final_{self.metric}"] = float(seen[-1]) if seen.size else float("nan")
            row[f"best_{self.metric}"] = float(sign * np.min(sign * finite)) if finite.size else float("nan")
            rows.append(row)
        return rows

    def to_markdown(self, max_rows: int | None = 20) -> str:
        """A summary line and the trials as a Markdown table, best final metric first (``max_rows`` of
        them; ``None``: all)."""
        rows = self.rows()
        sign = 1.0 if self.mode == "min" else -1.0
        final = np.asarray([r[f"final_{self.metric}"] for r in rows]) * sign
        order = np.argsort(np.where(np.isfinite(final), final, np.inf), kind="stable")
        keys = list(rows[0])
        lines = [
            f"{self.method}: best {self.metric} {self.best_metric:.4g} (trial {self.best_trial}), "
            f"{len(rows)} trials, {self.compute} configuration-steps, {self.seconds:.1f} s "
            f"({self.compile_seconds:.1f} s compiling)",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
        ]
        for i in order[:max_rows]:
            values = [rows[i][k] for k in keys]
            lines.append(
                "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values) + " |"
            )
        return "\n".join(lines)

    def best_so_far(self) -> tuple[np.ndarray, np.ndarray]:
        """``(compute, best)``: the configuration-steps spent after each evaluation round (brackets one
        after another, the trials of a round side by side) and the best finite metric seen so far."""
        period = int(self.eval_step[0]) if len(self.eval_step) else 1
        sign = 1.0 if self.mode == "min" else -1.0
        spent, compute, best, current = 0, [], [], np.inf
        for b in np.unique(self.bracket):
            mine = self.bracket == b
            for t, step in enumerate(self.eval_step):
                alive = mine & (self.steps_trained >= step)
                if not alive.any():
                    continue
                spent += int(alive.sum()) * period
                values = sign * self.metric_history[alive, t]
                values = values[np.isfinite(values)]
                current = min(current, values.min()) if values.size else current
                compute.append(spent)
                best.append(sign * current)
        return np.asarray(compute), np.asarray(best)

    def schedule(self, name: str, trial: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Population-based training: ``(steps, values)``, the value of hyperparameter ``name`` in effect
        from each period's first step, along the ancestry of ``trial`` (default: the best member):
        during period ``t`` the member was the parent recorded at ``t`` of the member of period ``t + 1``,
        with the value it was given when it copied (or its first configuration's)."""
        if name not in self.lineage or name == "parent":
            raise ValueError(
                f"SearchResult.schedule: no lineage of {name!r}; recorded: "
                f"{sorted(k for k in self.lineage if k != 'parent')} (population_based_training records one)"
            )
        parent, values = self.lineage["parent"], self.lineage[name]
        member = self.best_trial if trial is None else int(trial)
        out = np.empty(len(self.eval_step))
        for t in range(len(out) - 1, 0, -1):
            out[t] = values[t - 1, member]
            member = int(parent[t - 1, member])
        out[0] = self.configs[name][member]
        return np.concatenate([[0], self.eval_step[:-1]]), out


# --- shared checks -----------------------------------------------------------------------------------------


def check_mode(owner: str, mode: str) -> float:
    if mode not in ("min", "max"):
        raise ValueError(f"{owner}: mode must be 'min' or 'max', got {mode!r}")
    return 1.0 if mode == "min" else -1.0


def single_params(params: ParamsOrInit) -> Any:
    """The shapes of one trial's params."""
    return jax.eval_shape(params, jax.random.PRNGKey(0)) if callable(params) else params


def metric_name(owner: str, eval_fn: EvalFn | None, params: ParamsOrInit, metric: str | None) -> str:
    """The checked name of the metric the search ranks by (``eval`` for an eval_fn returning a scalar)."""
    if eval_fn is None:
        raise ValueError(f"{owner}: a search needs eval_fn(params) -> a metric (e.g. the validation loss)")
    shapes = jax.eval_shape(eval_fn, single_params(params))
    names = sorted(shapes) if isinstance(shapes, Mapping) else ["eval"]
    if metric is None and len(names) == 1:
        return names[0]
    if metric not in names:
        raise ValueError(f"{owner}: metric must name one of eval_fn's metrics {names}, got {metric!r}")
    return metric


def split_key(owner: str, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    key = jax.random.PRNGKey(0) if key is None else key
    try:
        return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: key must be a JAX random key (jax.random.key(0) or jax.random.PRNGKey(0)), got {key!r}"
        ) from None


def draw(owner: str, space: Space, key: jax.Array, n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in sample(check_space(owner, space), key, n).items()}


class Clock:
    """Wall-clock time of a call and the part of it XLA spent compiling (JAX's monitoring events)."""

    compiling = 0.0  # seconds of backend compilation since the listener was registered
    listening = False

    @classmethod
    def _hear(cls, event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            cls.compiling += duration

    def __init__(self):
        if not Clock.listening:  # registered once: JAX keeps its listeners for the process
            jax.monitoring.register_event_duration_secs_listener(Clock._hear)
            Clock.listening = True
        self.start, self.compiled = time.perf_counter(), Clock.compiling

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.start, Clock.compiling - self.compiled


def best_finite(final: np.ndarray, sign: float) -> int:
    """The trial with the best finite final metric, or -1 (with a warning) when none is finite."""
    signed = sign * np.asarray(final, np.float64)
    if not np.isfinite(signed).any():
        warnings.warn("search: every trial diverged (no finite metric): no best trial", stacklevel=3)
        return -1
    return int(np.argmin(np.where(np.isfinite(signed), signed, np.inf)))


# --- random search ---------------------------------------------------------------------------------------


def random_search(
    loss_fn: LossFn,
    params: ParamsOrInit,
    make_tx: Callable[..., Transformation],
    space: Space,
    data: Data,
    steps: int,
    *,
    num_configs: int,
    key: jax.Array | None = None,
    eval_fn: EvalFn | None = None,
    metric: str | None = None,
    mode: str = "min",
    eval_every: int | None = None,
    mesh: Mesh | Sequence[jax.Device] | None = None,
    group_size: int | None = None,
    checkpoint_dir: str | None = None,
    chunks: int = 1,
    progress: bool | Callable[[int, int], None] = False,
) -> SearchResult:
    """Random search: ``num_configs`` configurations drawn from ``space``, each trained ``steps`` steps
    (one `gradtx.sweep`), the best finite final ``metric`` chosen (Bergstra & Bengio, 2012).

    Arguments in `gradtx.sweep`'s order, ``(loss_fn, params, make_tx, space, data, steps)``; ``mesh``,
    ``group_size``, ``checkpoint_dir``, ``chunks`` and ``progress`` as in `sweep`; ``eval_every`` (default:
    only after the last step) fills ``metric_history``."""
    clock = Clock()
    check_mode("random_search", mode)
    metric = metric_name("random_search", eval_fn, params, metric)
    sample_key, data_key = split_key("random_search", key)
    configs = draw(
        "random_search", space, sample_key, positive_int("random_search", "num_configs", num_configs)
    )
    m = member("random_search", make_tx, configs, params, mesh=mesh, group_size=group_size)
    (swept,) = train_members(
        "random_search", [m], loss_fn, data, steps, key=data_key, eval_fn=eval_fn, eval_every=eval_every,
        plateau_metric=None, early_stopping=None, chunks=chunks, progress=progress,
        checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    return side_by_side("random_search", metric, mode, swept, configs, clock)


def side_by_side(
    method: str,
    metric: str,
    mode: str,
    swept: SweepResult,
    configs: dict[str, np.ndarray],
    clock: Clock,
    final_configs: dict[str, np.ndarray] | None = None,
) -> SearchResult:
    """The result of trials trained side by side to the same step (random search, PBT): the best is the
    one with the best finite metric at the last evaluation; ``final_configs`` (default ``configs``) are
    the trials' configurations at the end (PBT's hyperparameters after exploring)."""
    history = np.asarray(swept.history.metrics[metric], np.float64)
    best = best_finite(history[:, -1], check_mode(method, mode))
    steps_trained = np.asarray(swept.history.steps_trained)
    final_configs = configs if final_configs is None else final_configs
    seconds, compiling = clock.read()
    return SearchResult(
        method=method,
        metric=metric,
        mode=mode,
        best_config={k: v[best].item() for k, v in final_configs.items()} if best >= 0 else {},
        best_params=jax.tree.map(lambda x: x[best], swept.params) if best >= 0 else None,
        best_metric=float(history[best, -1]) if best >= 0 else float("nan"),
        best_trial=best,
        configs=configs,
        metric_history=history,
        eval_step=np.asarray(swept.history.eval_step),
        steps_trained=steps_trained,
        bracket=np.zeros(len(steps_trained), int),
        rung=np.zeros(len(steps_trained), int),
        compute=int(steps_trained.sum()),
        seconds=seconds,
        compile_seconds=compiling,
        lineage={k: np.asarray(v) for k, v in swept.history.records.items()},
    )
