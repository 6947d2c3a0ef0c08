"""Plots of sweeps and range tests (needs matplotlib: ``pip install gradtx[plot]``).

Each function draws on the ``ax`` it is given (a new figure's axes otherwise) and returns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradtx.range_tests import RangeTest
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
