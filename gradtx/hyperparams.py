"""Hyperparameters are state: float32 scalars kept in each transformation's state.

Each hyperparameter may be given as a Python float, a JAX scalar, or a schedule ``step -> value``.
Constants are stored in the state as float32 arrays, never in the params' dtype (with bf16 params,
``beta_2=0.999`` would round to 1.0), so that without any wrapper they can be

* read: ``hyperparams(state)`` (for a schedule, the value in effect at the last step);
* changed between steps of a compiled training step without recompiling: ``set_hyperparams``;
* swept with ``jax.vmap``: build the optimizer (or call ``set_hyperparams``) inside the vmapped ``init``.

A scheduled hyperparameter is recomputed from the step at every update, so it is read-only: setting it
raises instead of being silently overwritten at the next step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Hyper = Any  # float | jax.Array | Callable[[step], value]


class Hyperparams(NamedTuple):
    constant: dict[str, jax.Array]  # float32 scalars: read with hyperparams(), set with set_hyperparams()
    scheduled: dict[
        str, jax.Array
    ]  # each schedule's value at the last step (at step 0 before any): read-only


def _at_least_zero(x: float) -> bool:
    return x >= 0


def _unit_interval(x: float) -> bool:
    return 0 <= x < 1


def _count(x: float) -> bool:
    return x >= 0 and x == int(x)


def _closed_unit_interval(x: float) -> bool:
    return 0 <= x <= 1


# The valid range of each hyperparameter by name, so that construction and set_hyperparams check alike.
Rule = tuple[Callable[[float], bool], str]  # a predicate and how to say it: (_at_least_zero, ">= 0")

_RULES: dict[str, Rule] = {
    "learning_rate": (_at_least_zero, ">= 0"),
    "epsilon": (_at_least_zero, ">= 0"),
    "weight_decay": (_at_least_zero, ">= 0"),
    "initial_accumulator_value": (_at_least_zero, ">= 0"),
    "beta_1": (_unit_interval, "in [0, 1)"),
    "beta_2": (_unit_interval, "in [0, 1)"),
    "rho": (_unit_interval, "in [0, 1)"),
    "momentum": (_unit_interval, "in [0, 1)"),
    # reduce_on_plateau
    "factor": (lambda x: 0 < x < 1, "in (0, 1)"),
    "patience": (_count, "a whole number >= 0"),
    "cooldown": (_count, "a whole number >= 0"),
    "min_delta": (_at_least_zero, ">= 0"),
    "min_scale": (_closed_unit_interval, "in [0, 1]"),
    # regularization, constraints, dropout and pruning
    "l1": (_at_least_zero, ">= 0"),
    "l2": (_at_least_zero, ">= 0"),
    "max_value": (_at_least_zero, ">= 0"),
    "min_value": (_at_least_zero, ">= 0"),
    "rate": (_closed_unit_interval, "in [0, 1]"),
    "sparsity": (_unit_interval, "in [0, 1)"),
    "target_sparsity": (_unit_interval, "in [0, 1)"),
    "initial_sparsity": (_unit_interval, "in [0, 1)"),
    "final_sparsity": (_unit_interval, "in [0, 1)"),
}


def is_concrete(x: Any) -> bool:
    """Whether ``x`` has a value now (not a tracer inside jit or vmap), so it can be validated."""
    return not isinstance(x, jax.core.Tracer)


def check_value(owner: str, name: str, value: Any, scalar: bool = True, rule: Rule | None = None) -> None:
    """Raises ``ValueError`` naming ``owner``, ``name`` and the value when a concrete value is invalid.

    ``scalar=False`` admits an array of values (one per configuration of a vmapped state). ``rule``
    defaults to the rule registered for ``name``.
    """
    if scalar and jnp.ndim(value) != 0:
        raise ValueError(
            f"{owner}: {name} must be a scalar (sweep several values with jax.vmap), "
            f"got shape {jnp.shape(value)}"
        )
    if not is_concrete(value):
        return
    rule = rule or _RULES.get(name)
    for x in np.asarray(value, np.float64).ravel():
        if not math.isfinite(x):
            raise ValueError(f"{owner}: {name} must be finite, got {x}")
        if rule is not None and not rule[0](x):
            raise ValueError(f"{owner}: {name} must be {rule[1]}, got {x}")


def as_float32(owner: str, name: str, value: Any) -> jax.Array:
    check_value(owner, name, value)
    return jnp.asarray(value, jnp.float32)


class HyperSpec:
    """The hyperparameters of one transformation, as given at construction (floats, arrays or schedules)."""

    def __init__(self, owner: str, **given: Hyper):
        self.owner = owner
        self.schedules = {name: v for name, v in given.items() if callable(v)}
        self.constants = {name: as_float32(owner, name, v) for name, v in given.items() if not callable(v)}

    def _evaluate(self, step: jax.Array) -> dict[str, jax.Array]:
        return {name: as_float32(self.owner, name, s(step)) for name, s in self.schedules.items()}

    def init(self) -> Hyperparams:
        # Fresh copies: a jitted step that donates its state deletes these buffers, and the next
        # ``init`` of the same transformation must not hand out deleted arrays.
        constant = {name: jnp.copy(v) for name, v in self.constants.items()}
        return Hyperparams(constant, self._evaluate(jnp.zeros([], jnp.int32)))

    def resolve(self, hp: Hyperparams, step: jax.Array | None) -> tuple[dict[str, jax.Array], Hyperparams]:
        """The values for this step (constants from the state, schedules at ``step``) and the new node."""
        if self.schedules and step is None:
            raise ValueError(
                f"{self.owner}: {sorted(self.schedules)} follow a schedule, which needs the step count; "
                "use the transformation inside gradtx.chain, which counts steps"
            )
        scheduled = self._evaluate(step) if self.schedules else {}
        return {**hp.constant, **scheduled}, Hyperparams(hp.constant, scheduled)


def _nodes(state: Any) -> list[Hyperparams]:
    is_node = lambda x: isinstance(x, Hyperparams)  # noqa: E731
    return [x for x in jax.tree.leaves(state, is_leaf=is_node) if is_node(x)]


def hyperparams(state: Any) -> dict[str, jax.Array]:
    """All hyperparameters in an optimizer state, by name: constants and the last value of each schedule.

    Where two transformations of a chain share a name, the first one's value is reported.
    """
    found: dict[str, jax.Array] = {}
    for node in _nodes(state):
        for name, value in {**node.constant, **node.scheduled}.items():
            found.setdefault(name, value)
    return found


def set_hyperparams(state: Any, **values: Any) -> Any:
    """A copy of ``state`` with the named constant hyperparameters replaced (in every transformation
    that has them). Shapes and dtypes are kept, so a jitted step does not recompile.

    Raises ``ValueError`` for a name the state does not have, for a scheduled hyperparameter, and for
    an invalid concrete value.
    """
    nodes = _nodes(state)
    constant = {name for node in nodes for name in node.constant}
    scheduled = {name for node in nodes for name in node.scheduled}
    for name, value in values.items():
        if name not in constant:
            if name in scheduled:
                raise ValueError(
                    f"set_hyperparams: {name} follows a schedule, which sets it at every step; "
                    "build the optimizer with a constant (or another schedule) to change it"
                )
            raise ValueError(
                f"set_hyperparams: the state has no hyperparameter {name!r}; it has {sorted(constant)}"
            )
        check_value("set_hyperparams", name, value, scalar=False)

    def replace(node):
        if not isinstance(node, Hyperparams):
            return node
        new = {
            name: jnp.broadcast_to(jnp.asarray(values[name], jnp.float32), jnp.shape(old))
            if name in values
            else old
            for name, old in node.constant.items()
        }
        return Hyperparams(new, node.scheduled)

    return jax.tree.map(replace, state, is_leaf=lambda x: isinstance(x, Hyperparams))
