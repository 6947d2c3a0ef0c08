"""Plots of sweeps, range tests and searches (needs matplotlib: ``pip install gradtx[plot]``).

Each function draws on the ``ax`` it is given (a new figure's axes otherwise) and returns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.range_tests import RangeTest
from gradtx.search import SearchResult
from gradtx.sweeps import SweepResult
from gradtx.training import TrainResult


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots()[1]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    return np.convolve(y, np.ones(window) / window, mode="valid")


def plot_learning_curves(
    results: Mapping[str, SweepResult | TrainResult] | SweepResult | TrainResult,
    metric: str | None = None,
    label_by: Sequence[str] | None = None,
    smooth: int = 20,
    ax: Any = None,
) -> Any:
    """Training loss per step (moving average over ``smooth`` steps), or ``metric`` per evaluation, of
    every run: one line per configuration of a sweep, labelled by the fields ``label_by``."""
    ax = _axes(ax)
    if not isinstance(results, Mapping):
        results = {"": results}
    for name, result in results.items():
        history = result.history
        curves = np.asarray(history.metrics[metric] if metric else history.loss)
        x = np.asarray(history.eval_step) if metric else np.arange(curves.shape[-1])
        if isinstance(result, SweepResult):
            fields = label_by or [k for k in result.configs if k != "seed"]
            labels = [
                " ".join([name] + [f"{k}={result.configs[k][i]:.3g}" for k in fields]).strip()
                for i in range(len(result))
            ]
        else:
            curves, labels = curves[None], [name]
        for curve, label in zip(curves, labels, strict=True):
            y = curve if metric else _smooth(curve, smooth)
            ax.plot(x[len(x) - len(y) :], y, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric or "training loss")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    return ax


def plot_range_test(result: RangeTest, ax: Any = None, label: str | None = None) -> Any:
    """Loss against learning rate (log scale), with the suggested rate marked."""
    ax = _axes(ax)
    (line,) = ax.plot(result.rates, result.smoothed, label=label)
    ax.axvline(result.suggestion, color=line.get_color(), linestyle="--", alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    finite = result.smoothed[np.isfinite(result.smoothed)]
    if finite.size:
        ax.set_ylim(finite.min() * 0.9, min(finite.max(), 4 * finite.min()) * 1.1)
    return ax


def plot_sweep_heatmap(result: SweepResult, x: str, y: str, value: str = "final_loss", ax: Any = None) -> Any:
    """A 2-D sweep as a heat map of ``value`` (a key of `SweepResult.rows`), averaged over other fields
    (e.g. seeds), with log-scaled ticks labelled by the configuration values."""
    ax = _axes(ax)
    rows = result.rows()
    xs, ys = sorted({r[x] for r in rows}), sorted({r[y] for r in rows})
    grid = np.full((len(ys), len(xs)), np.nan)
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            cell = [r[value] for r in rows if r[x] == xv and r[y] == yv]
            grid[j, i] = np.nanmean(cell) if cell else np.nan
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(len(xs)), [f"{v:.2g}" for v in xs], rotation=45)
    ax.set_yticks(range(len(ys)), [f"{v:.2g}" for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.figure.colorbar(image, ax=ax, label=value)
    return ax


# --- searches ------------------------------------------------------------------------------------------


def plot_rungs(result: SearchResult, ax: Any = None) -> Any:
    """The metric of every trial of a search against the steps it trained, coloured by the last rung it
    reached (successive halving, Hyperband), the best trial in black: where each trial stopped."""
    import matplotlib.pyplot as plt

    ax = _axes(ax)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, int(result.rung.max()) + 1))
    for i in np.argsort(result.rung, kind="stable"):
        seen = result.eval_step <= result.steps_trained[i]
        ax.plot(result.eval_step[seen], result.metric_history[i, seen], color=colors[result.rung[i]], lw=0.8,
                alpha=0.7)  # fmt: skip
    if result.best_trial >= 0:
        seen = result.eval_step <= result.steps_trained[result.best_trial]
        ax.plot(result.eval_step[seen], result.metric_history[result.best_trial, seen], color="black", lw=2,
                label=f"best (trial {result.best_trial})")  # fmt: skip
    for r, color in enumerate(colors):
        ax.plot([], [], color=color, label=f"stopped at rung {r}")
    ax.set(xlabel="step", ylabel=result.metric, yscale="log", title=result.method)
    ax.legend(fontsize="small")
    return ax


def plot_best_so_far(
    results: Mapping[str, SearchResult | tuple[Sequence[float], Sequence[float]]],
    x: str = "compute",
    ax: Any = None,
) -> Any:
    """Best metric found so far against the compute (configuration-steps, ``x="compute"``) or the
    wall-clock time (``x="seconds"``) of each search. A `SearchResult` runs as one compiled program:
    against seconds its curve starts after its compilation and is placed along the rest of its time in
    proportion to its compute (one program runs at an even pace; its results come out at the end). A
    pair ``(x values, best values)`` draws another search's own record (e.g. an Optuna study's)."""
    if x not in ("compute", "seconds"):
        raise ValueError(f"plot_best_so_far: x must be 'compute' or 'seconds', got {x!r}")
    ax = _axes(ax)
    for name, result in results.items():
        if isinstance(result, SearchResult):
            spent, best = result.best_so_far()
            if x == "seconds":
                spent = result.compile_seconds + (result.seconds - result.compile_seconds) * spent / spent[-1]
        else:
            spent, best = (np.asarray(v, np.float64) for v in result)
        (line,) = ax.step(spent, best, where="post", label=name)
        ax.plot(spent[-1:], best[-1:], "o", color=line.get_color())  # where it ended (a lone evaluation too)
    ax.set(xlabel="configuration-steps" if x == "compute" else "wall-clock (s)", ylabel="best so far")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    return ax


def plot_lineage(result: SearchResult, name: str = "learning_rate", ax: Any = None) -> Any:
    """Population-based training: the value of hyperparameter ``name`` of every member at every period
    (grey), and along the best member's ancestry (black), against the steps."""
    ax = _axes(ax)
    values = np.asarray(result.lineage[name])  # (evaluations, members): after each period's explore
    starts = np.concatenate([[0], result.eval_step[:-1]])
    first = np.asarray(result.configs[name], np.float64)[None]
    ax.step(starts, np.concatenate([first, values[:-1]]), where="post", color="grey", lw=0.6, alpha=0.5)
    steps, schedule = result.schedule(name)
    ax.step(steps, schedule, where="post", color="black", lw=2, label="best member's ancestry")
    ax.set(xlabel="step", ylabel=name, yscale="log", title="PBT: every member, and the winner's lineage")
    ax.legend(fontsize="small")
    return ax


def plot_schedules(
    result: SearchResult,
    name: str = "learning_rate",
    schedules: Mapping[str, Any] | None = None,
    ax: Any = None,
) -> Any:
    """The schedule of ``name`` that population-based training found (along the best member's ancestry)
    next to other schedules, each a function ``step -> value`` (e.g. ``gradtx.one_cycle_schedule``)."""
    ax = _axes(ax)
    steps, values = result.schedule(name)
    ax.step(steps, values, where="post", lw=2, label="found by PBT")
    total = int(result.eval_step[-1])
    for label, schedule in (schedules or {}).items():
        grid = jnp.arange(total)
        ax.plot(grid, np.asarray(jax.vmap(schedule)(grid)), label=label)
    ax.set(xlabel="step", ylabel=name, yscale="log")
    ax.legend(fontsize="small")
    return ax
