"""Sparse models: magnitude pruning with TF-MOT's sparsity schedules, a one-shot pruner, a report.

The course's three ways to a sparse model, here:

1. train, then zero the tiny weights: `prune_by_magnitude` (one shot);
2. a strong l1 penalty (`gradtx.l1`), then 1.;
3. gradual magnitude pruning (Zhu & Gupta, 2017; TF-MOT's ``prune_low_magnitude``): the
   `magnitude_pruning` transformation, driven by `constant_sparsity` or `polynomial_decay_sparsity`.

Counting. Sparsity ``s`` on ``n`` weights keeps ``max(round(n * (1 - s)), 1)`` of them (TF-MOT's
count, with round half to even) and zeroes the others, smallest magnitudes first. Where magnitudes tie,
the earlier position (in row-major order) is pruned first, so the count is exact; TF-MOT instead keeps
every weight tied with its threshold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gradtx.base import Params, Transformation, is_float, leafwise
from gradtx.hyper import UNIT_INTERVAL, Hyper, Hyperparams, HyperSpec, check_value
from gradtx.routing import MaskSpec, select_leaves

SCOPES = ("per_leaf", "global")


@dataclasses.dataclass(frozen=True)
class SparsitySchedule:
    """When to prune and to what sparsity, with TF-MOT's semantics (``tfmot.sparsity.keras``).

    Pruning happens at the steps ``begin_step <= step <= end_step`` (any ``step >= begin_step`` when
    ``end_step == -1``) with ``(step - begin_step) % frequency == 0``. The sparsity is ``target_sparsity``
    (constant), or ``s(step) = final + (initial - final) * (1 - p)**power`` with
    ``p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`` (polynomial decay).

    The sparsities live in the pruning state as float32 hyperparameters, so ``jax.vmap`` can sweep them
    and ``set_hyperparams`` can change them; the steps and ``power`` are fixed Python numbers.
    """

    sparsities: dict[str, Hyper]  # {"target_sparsity"} or {"initial_sparsity", "final_sparsity"}
    begin_step: int
    end_step: int
    frequency: int
    power: float | None  # None: constant sparsity

    def should_prune(self, step: jax.Array) -> jax.Array:
        """Whether the update made at ``step`` (0-based) prunes, as a bool array."""
        step = jnp.asarray(step, jnp.int32)
        in_range = (step >= self.begin_step) & ((step <= self.end_step) | (self.end_step < 0))
        return in_range & ((step - self.begin_step) % self.frequency == 0)

    def sparsity(self, step: jax.Array, values: dict[str, jax.Array] | None = None) -> jax.Array:
        """The float32 sparsity at ``step``, from ``values`` (the state's sparsities) or the schedule's."""
        if values is None:
            values = {k: jnp.asarray(v, jnp.float32) for k, v in self.sparsities.items()}
        if self.power is None:
            return values["target_sparsity"]
        elapsed = jnp.asarray(step, jnp.int32) - self.begin_step
        p = jnp.clip(elapsed.astype(jnp.float32) / (self.end_step - self.begin_step), 0.0, 1.0)
        initial, final = values["initial_sparsity"], values["final_sparsity"]
        return final + (initial - final) * jnp.power(1.0 - p, jnp.float32(self.power))

    def __call__(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(should_prune, sparsity)`` at ``step``, the protocol of TF-MOT's ``PruningSchedule``."""
        return self.should_prune(step), self.sparsity(step)


def _check_steps(owner: str, begin_step: int, end_step: int, frequency: int, allow_forever: bool) -> None:
    for name, value in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be a Python int, got {value!r}")
    if begin_step < 0:
        raise ValueError(f"{owner}: begin_step must be >= 0, got {begin_step}")
    if frequency <= 0:
        raise ValueError(f"{owner}: frequency must be > 0, got {frequency}")
    if allow_forever and end_step == -1:
        return
    if allow_forever and end_step < begin_step:
        raise ValueError(f"{owner}: end_step must be -1 or >= begin_step ({begin_step}), got {end_step}")
    # The polynomial divides by end_step - begin_step (TF-MOT would produce NaN at end == begin).
    if not allow_forever and end_step <= begin_step:
        raise ValueError(f"{owner}: end_step must be > begin_step ({begin_step}), got {end_step}")


def constant_sparsity(
    target_sparsity: Hyper, begin_step: int = 0, end_step: int = -1, frequency: int = 100
) -> SparsitySchedule:
    """Prune to ``target_sparsity`` at ``begin_step`` and every ``frequency`` steps after it, up to
    ``end_step`` (``-1``: until the end of training).  (TF-MOT ``ConstantSparsity``.)"""
    check_value("constant_sparsity", "target_sparsity", target_sparsity, UNIT_INTERVAL)
    _check_steps("constant_sparsity", begin_step, end_step, frequency, allow_forever=True)
    return SparsitySchedule({"target_sparsity": target_sparsity}, begin_step, end_step, frequency, None)


def polynomial_decay_sparsity(
    initial_sparsity: Hyper,
    final_sparsity: Hyper,
    begin_step: int,
    end_step: int,
    power: float = 3,
    frequency: int = 100,
) -> SparsitySchedule:
    """Gradual pruning:  ``s(step) = final + (initial - final) * (1 - p)**power``,
    ``p = clip((step - begin_step) / (end_step - begin_step), 0, 1)``, applied at ``begin_step`` and every
    ``frequency`` steps up to ``end_step``.  (TF-MOT ``PolynomialDecay``; Zhu & Gupta, 2017.)

    The sparsity rises fast at first, while the network can recover, and levels off at ``final``.
    """
    check_value("polynomial_decay_sparsity", "initial_sparsity", initial_sparsity, UNIT_INTERVAL)
    check_value("polynomial_decay_sparsity", "final_sparsity", final_sparsity, UNIT_INTERVAL)
    _check_steps("polynomial_decay_sparsity", begin_step, end_step, frequency, allow_forever=False)
    if not (isinstance(power, int | float) and math.isfinite(power) and power > 0):
        raise ValueError(f"polynomial_decay_sparsity: power must be a finite number > 0, got {power!r}")
    sparsities = {"initial_sparsity": initial_sparsity, "final_sparsity": final_sparsity}
    return SparsitySchedule(sparsities, begin_step, end_step, frequency, float(power))


def _check_scope(owner: str, scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"{owner}: scope must be one of {SCOPES}, got {scope!r}")


def _keep_largest(magnitude: jax.Array, sparsity: jax.Array) -> jax.Array:
    """A bool mask keeping the ``max(round(n * (1 - s)), 1)`` largest entries of a 1-D ``magnitude``."""
    n = magnitude.size
    kept = jnp.maximum(jnp.round(jnp.float32(n) * (1 - sparsity)), 1).astype(jnp.int32)
    order = jnp.argsort(magnitude, stable=True)  # ascending; ties in position order
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return rank >= n - kept


def _keep_masks(magnitudes: list[jax.Array], sparsity: jax.Array, scope: str) -> list[jax.Array]:
    """Per array of magnitudes, the bool mask of the weights kept (ranked per array or all together)."""
    if not magnitudes:
        return []
    if scope == "per_leaf":
        return [_keep_largest(m.ravel(), sparsity).reshape(m.shape) for m in magnitudes]
    flat = _keep_largest(jnp.concatenate([m.ravel().astype(jnp.float32) for m in magnitudes]), sparsity)
    bounds = [0]
    for m in magnitudes:
        bounds.append(bounds[-1] + m.size)
    return [flat[a:b].reshape(m.shape) for a, b, m in zip(bounds, bounds[1:], magnitudes, strict=False)]


def prune_by_magnitude(
    params: Params, sparsity: Hyper, *, scope: str = "per_leaf", mask: MaskSpec | None = None
) -> Params:
    """One-shot magnitude pruning:  ``w <- w * [|w| among the largest max(round(n*(1 - s)), 1)]``.

    The course's "train, then zero the tiny weights". ``scope="per_leaf"`` gives every leaf the sparsity
    ``s``; ``"global"`` ranks all selected weights together (a layer of small weights loses more).
    ``mask`` (the forms of `gradtx.masked`, e.g. ``mask=gradtx.weights_only``) picks the leaves to
    prune; the others, and non-floating leaves, are returned as they are. ``sparsity`` may be a JAX
    scalar (``jax.vmap`` sweeps it).
    """
    check_value("prune_by_magnitude", "sparsity", sparsity, UNIT_INTERVAL)
    _check_scope("prune_by_magnitude", scope)
    leaves, treedef = jax.tree.flatten(params)
    selected = select_leaves("prune_by_magnitude", params, mask)
    chosen = [i for i, k in enumerate(selected) if k and is_float(leaves[i])]
    s = jnp.asarray(sparsity, jnp.float32)
    keeps = _keep_masks([jnp.abs(leaves[i]) for i in chosen], s, scope)
    for i, keep in zip(chosen, keeps, strict=True):
        leaves[i] = jnp.where(keep, leaves[i], jnp.zeros((), jnp.result_type(leaves[i])))
    return treedef.unflatten(leaves)


class SparsityReport(NamedTuple):
    per_leaf: Any  # the params' tree with the fraction of exact zeros of each float leaf (None elsewhere)
    total: jax.Array  # zeros / size over all those leaves
    zeros: jax.Array  # int32 count of exact zeros over all those leaves
    size: int  # number of weights in those leaves


def sparsity(params: Params, *, mask: MaskSpec | None = None) -> SparsityReport:
    """The fraction of exact zeros per floating leaf (that ``mask`` selects) and over all of them:
    ``zeros / size``."""
    leaves, treedef = jax.tree.flatten(params)
    keep = select_leaves("sparsity", params, mask)
    per_leaf, zeros, size = [], jnp.zeros([], jnp.int32), 0
    for leaf, k in zip(leaves, keep, strict=True):
        if not (k and is_float(leaf)) or jnp.size(leaf) == 0:
            per_leaf.append(None)
            continue
        z = jnp.sum(jnp.asarray(leaf) == 0, dtype=jnp.int32)
        per_leaf.append(z / jnp.size(leaf))
        zeros, size = zeros + z, size + int(jnp.size(leaf))
    total = zeros / size if size else jnp.zeros([], jnp.float32)
    return SparsityReport(treedef.unflatten(per_leaf), jnp.asarray(total, jnp.float32), zeros, size)


class PruningState(NamedTuple):
    mask: Any  # bool per weight: False where the weight is pruned (a placeholder for non-float leaves)
    hyperparams: Hyperparams  # the schedule's sparsities, float32


def magnitude_pruning(schedule: SparsitySchedule, *, scope: str = "per_leaf") -> Transformation:
    """Gradual magnitude pruning:  at a pruning step,  ``mask <- top_k(|mask * (theta + u)|)``;  always
    ``u <- where(mask, u, -theta)``,  so that ``theta + u`` is exactly 0 where the mask is off.

    Which step prunes: the update made with ``step = s`` (the chain's 0-based count of updates done
    before it) recomputes the mask if ``schedule.should_prune(s)``, at sparsity ``schedule.sparsity(s)``,
    from the magnitudes of the params this update produces (already pruned weights count as 0, so they
    stay pruned while the sparsity does not decrease). After that update the params have exactly that
    sparsity. Between pruning steps the mask is kept and the pruned weights stay exactly 0, whatever
    the optimizer's momentum would do to them. (TF-MOT computes its mask from the weights before the
    update at the same step; the counts are the same.)

    Put it last in the chain and route it to the weights to prune:
    ``chain(adam(1e-3), masked(magnitude_pruning(polynomial_decay_sparsity(0, 0.9, 0, 1000)),
    weights_only))``. ``scope="global"`` ranks all the leaves it sees together.
    """
    _check_scope("magnitude_pruning", scope)
    if not isinstance(schedule, SparsitySchedule):
        raise ValueError(
            "magnitude_pruning: schedule must come from gradtx.constant_sparsity or "
            f"gradtx.polynomial_decay_sparsity, got {schedule!r}"
        )
    spec = HyperSpec(
        "magnitude_pruning", **{name: (s, UNIT_INTERVAL) for name, s in schedule.sparsities.items()}
    )

    def init(params):
        masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p) if is_float(p) else (), bool), params)
        return PruningState(masks, spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        if params is None:
            raise ValueError("magnitude_pruning needs the params: call update(updates, state, params)")
        if step is None:
            raise ValueError(
                "magnitude_pruning needs the step count for its schedule; use it inside gradtx.chain"
            )
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        # The magnitudes the params would have after this update, with pruned weights at 0.
        candidate, _, _ = leafwise(
            "magnitude_pruning",
            lambda u, p, m: (jnp.where(m, jnp.abs(p + u.astype(p.dtype)), 0), p, m),
            updates,
            params,
            state.mask,
        )
        flat_c, treedef = jax.tree.flatten(candidate)
        flat_m = treedef.flatten_up_to(state.mask)
        floats = [i for i, c in enumerate(flat_c) if is_float(c)]

        def recompute():
            keeps = _keep_masks([flat_c[i] for i in floats], schedule.sparsity(step, h), scope)
            new = list(flat_m)
            for i, keep in zip(floats, keeps, strict=True):
                new[i] = keep
            return new

        flat_m = lax.cond(schedule.should_prune(step), recompute, lambda: list(flat_m))
        mask = treedef.unflatten(flat_m)
        updates, _, _ = leafwise(
            "magnitude_pruning",
            lambda u, p, m: (jnp.where(m, u, -p.astype(u.dtype)), p, m),
            updates,
            params,
            mask,
        )
        return updates, PruningState(mask, hp)

    return Transformation(init, update)
