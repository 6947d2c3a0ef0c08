"""Learning-rate range tests: the course's exponential test, and its parallel variant (one run per rate)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx.base import Params, Transformation
from gradtx.data import Data
from gradtx.engine import LossFn
from gradtx.schedules import exponential_schedule
from gradtx.sweeps import sweep
from gradtx.training import fit


class _Rate(NamedTuple):
    # make_tx(learning_rate) as a keyword factory for sweep, hashable so its program is found again.
    make_tx: Callable[[Any], Transformation]

    def __call__(self, learning_rate: Any) -> Transformation:
        return self.make_tx(learning_rate)


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
    loss_fn: LossFn,
    params: Params,
    make_tx: Callable[[Any], Transformation],
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
    Losses after the smoothed loss rises above its minimum ``m`` by more than ``3 |m|`` (4 times ``m``
    for a positive loss; a negative loss, e.g. a log-likelihood bound, rises by its own size) are
    reported as ``nan`` (diverged).
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"lr_range_test: needs 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 2:
        raise ValueError(f"lr_range_test: steps must be an int >= 2, got {steps!r}")
    schedule = exponential_schedule(min_lr, steps - 1, max_lr / min_lr)
    rates = np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float64)
    losses = np.asarray(
        fit(loss_fn, params, make_tx(schedule), data, steps, key=key).history.loss, np.float64
    )
    smoothed = _smooth(losses)
    finite = np.isfinite(smoothed)
    if not finite.any():
        raise ValueError(
            f"lr_range_test: the loss is not finite from the first step (at min_lr={min_lr:g}): the model "
            "or the data give NaN/inf before the rate matters; check them, or lower min_lr"
        )
    lowest = int(np.nanargmin(np.where(finite, smoothed, np.inf)))
    m = smoothed[lowest]
    diverged = np.flatnonzero(~finite | ((np.arange(steps) > lowest) & (smoothed - m > 3 * abs(m))))
    if diverged.size:
        losses[diverged[0] :] = smoothed[diverged[0] :] = np.nan
    return RangeTest(rates, losses, smoothed, float(rates[lowest] / 10))


def lr_range_sweep(
    loss_fn: LossFn,
    params: Params,
    make_tx: Callable[[Any], Transformation],
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
    result = sweep(loss_fn, params, _Rate(make_tx), {"learning_rate": rates}, data, steps, key=key)
    loss = np.asarray(result.history.loss, np.float64)
    final = loss[:, -max(1, steps // 10) :].mean(axis=1)
    final = np.where(np.isfinite(final), final, np.nan)
    if not np.isfinite(final).any():
        raise ValueError(
            f"lr_range_sweep: every run diverged (the final loss is NaN or inf at all {rates.size} rates, "
            f"{rates.min():g} to {rates.max():g}); try lower rates"
        )
    best = int(np.nanargmin(final))
    return RangeTest(rates, final, final, float(rates[best]))
