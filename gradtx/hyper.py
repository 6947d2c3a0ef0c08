"""Hyperparameters are state: float32 scalars kept in each transformation's state.

Each hyperparameter may be given as a Python number, a JAX scalar, or a schedule ``step -> value``.
Constants are stored in the state as float32 arrays, never in the params' dtype (with bf16 params,
``beta_2=0.999`` would round to 1.0), so that without any wrapper they can be

* read: ``hyperparams(state)`` (for a schedule, the value in effect at the last step);
* changed between steps of a compiled training step without recompiling: ``set_hyperparams``;
* swept with ``jax.vmap``: build the optimizer (or call ``set_hyperparams``) inside the vmapped ``init``.

A scheduled hyperparameter is recomputed from the step at every update, so it is read-only: setting it
raises instead of being silently overwritten at the next step.

Each transformation's hyperparameters sit in one `Hyperparams` node of its state. The node describes
itself: it carries, as static metadata (part of the tree structure, not arrays), the name of the
transformation that owns it and the valid `Range` of each value, so reading and writing never consult
a table of names, and a user's own transformation may call a hyperparameter what it likes.

Invariant: a transformation's ``update`` reads its hyperparameters only from its state (through
``HyperSpec.resolve``), never from the values it was built with. That is what makes a vmapped state a
sweep and ``set_hyperparams`` effective without rebuilding or recompiling anything.

Addressing. A node's *location* is where it sits in the state: the labels of the `partition` s above it
and its owner, e.g. ``"decay/scale_by_learning_rate"``. ``hyperparams(state)`` names a value by its
name alone when that is unambiguous and qualifies it (``"decay/learning_rate"``) when two nodes share the
name; ``where=`` (a label, an owner, or a glob on the location) restricts reading and writing to some
nodes, and a write to an ambiguous name raises with the choices listed.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

Hyper = Any  # float | jax.Array | Callable[[step], value]


class Range(NamedTuple):
    """The valid values of a hyperparameter: finite numbers between ``low`` and ``high`` (each bound
    inclusive unless ``*_open``), whole numbers only with ``whole``. Static metadata of a node."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    whole: bool = False

    def contains(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return math.isfinite(x) and above and below and (not self.whole or x == int(x))

    def describe(self) -> str:
        kind = "a whole number " if self.whole else ""
        if self.low == -math.inf and self.high == math.inf:
            return "a finite whole number" if self.whole else "finite"
        if self.high == math.inf:
            return f"{kind}{'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"{kind}{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{kind}in {left}{self.low:g}, {self.high:g}{right}"


ANY = Range()
NONNEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_open=True)
UNIT_INTERVAL = Range(0.0, 1.0, high_open=True)  # [0, 1): betas, momentum, rho
CLOSED_UNIT_INTERVAL = Range(0.0, 1.0)  # [0, 1]
OPEN_UNIT_INTERVAL = Range(0.0, 1.0, low_open=True, high_open=True)  # (0, 1)
COUNT = Range(0.0, whole=True)  # 0, 1, 2, ...


@jax.tree_util.register_pytree_with_keys_class
class Hyperparams:
    """One transformation's hyperparameters: ``constant`` (float32 arrays: read with `hyperparams`, set
    with `set_hyperparams`) and ``scheduled`` (each schedule's value at the last step, read-only).

    ``owner`` and ``ranges`` (``((name, Range), ...)``) are static: they are part of the tree structure,
    so jit, vmap and checkpoints see only the arrays."""

    __slots__ = ("constant", "owner", "ranges", "scheduled")

    def __init__(
        self,
        constant: dict[str, jax.Array],
        scheduled: dict[str, jax.Array],
        owner: str = "",
        ranges: tuple[tuple[str, Range], ...] = (),
    ):
        self.constant, self.scheduled, self.owner, self.ranges = constant, scheduled, owner, ranges

    def tree_flatten_with_keys(self):
        children = ((GetAttrKey("constant"), self.constant), (GetAttrKey("scheduled"), self.scheduled))
        return children, (self.owner, self.ranges)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def range_of(self, name: str) -> Range:
        return dict(self.ranges).get(name, ANY)

    def __repr__(self) -> str:
        return f"Hyperparams({self.owner}: constant={self.constant}, scheduled={self.scheduled})"


def is_concrete(x: Any) -> bool:
    """Whether ``x`` has a value now (not a tracer inside jit or vmap), so it can be validated."""
    return not isinstance(x, jax.core.Tracer)


def check_value(owner: str, name: str, value: Any, rule: Range = ANY, scalar: bool = True) -> None:
    """Raises ``ValueError`` naming ``owner``, ``name`` and the value when a concrete value is invalid:
    not a number, outside ``rule``, or not finite once stored as float32 (``1e40`` overflows).

    ``scalar=False`` admits an array of values (one per configuration of a vmapped state)."""
    if isinstance(value, str | bytes) or not (
        isinstance(value, int | float | np.number | np.ndarray | jax.Array) or hasattr(value, "__jax_array__")
    ):
        raise ValueError(f"{owner}: {name} must be a number or a JAX array, got {value!r}")
    if jnp.issubdtype(jnp.result_type(value), jnp.complexfloating) or jnp.result_type(value) == jnp.bool_:
        raise ValueError(f"{owner}: {name} must be a real number, got {value!r}")
    if scalar and jnp.ndim(value) != 0:
        raise ValueError(
            f"{owner}: {name} must be a scalar (sweep several values with jax.vmap), "
            f"got shape {jnp.shape(value)}"
        )
    if not is_concrete(value):
        return
    for x in np.asarray(value, np.float64).ravel():
        if not math.isfinite(x):
            raise ValueError(f"{owner}: {name} must be finite, got {x}")
        if abs(x) > float(np.finfo(np.float32).max):  # stored as float32, it would become inf
            raise ValueError(f"{owner}: {name} must be finite in float32 (at most 3.4e38), got {x}")
        if not rule.contains(x):
            raise ValueError(f"{owner}: {name} must be {rule.describe()}, got {x}")


def as_float32(owner: str, name: str, value: Any, rule: Range = ANY) -> jax.Array:
    check_value(owner, name, value, rule)
    return jnp.asarray(value, jnp.float32)


class HyperSpec:
    """The hyperparameters of one transformation, as given at construction.

    ``HyperSpec(owner, name=(value, Range), ...)``: each value is a number, a JAX scalar or a schedule,
    checked against its range now (when concrete) and at every `set_hyperparams`. A bare value (no
    range) may be any finite number. A schedule's values are checked when it is evaluated outside jit.
    """

    def __init__(self, owner: str, **given: Hyper | tuple[Hyper, Range]):
        self.owner = owner
        split = {name: v if isinstance(v, tuple) else (v, ANY) for name, v in given.items()}
        self.ranges = tuple(sorted((name, rule) for name, (_, rule) in split.items()))
        self.schedules = {name: v for name, (v, _) in split.items() if callable(v)}
        self.constants = {
            name: as_float32(owner, name, v, rule) for name, (v, rule) in split.items() if not callable(v)
        }

    def _evaluate(self, step: jax.Array) -> dict[str, jax.Array]:
        rules = dict(self.ranges)
        return {
            name: as_float32(self.owner, name, s(step), rules[name]) for name, s in self.schedules.items()
        }

    def init(self) -> Hyperparams:
        # Fresh copies: a jitted step that donates its state deletes these buffers, and the next
        # ``init`` of the same transformation must not hand out deleted arrays.
        constant = {name: jnp.copy(v) for name, v in self.constants.items()}
        return Hyperparams(constant, self._evaluate(jnp.zeros([], jnp.int32)), self.owner, self.ranges)

    def resolve(
        self, hp: Hyperparams, step: jax.Array | None, *, schedule_step: jax.Array | None = None, **extra: Any
    ) -> tuple[dict[str, jax.Array], Hyperparams]:
        """The values for this step (constants from the state, schedules at the step) and the new node.

        Schedules read ``schedule_step`` when an enclosing transformation passes one, else ``step``: under
        gradient accumulation the schedules follow the micro-steps (as in Keras) while ``step``, which
        bias corrections read, counts the real updates. Call it as ``spec.resolve(state.hyperparams,
        step, **extra)`` so that the extra arguments of ``update`` reach it."""
        clock = step if schedule_step is None else schedule_step
        if self.schedules and clock is None:
            raise ValueError(
                f"{self.owner}: {sorted(self.schedules)} follow a schedule, which needs the step count; "
                "use the transformation inside gradtx.chain, which counts steps"
            )
        scheduled = self._evaluate(clock) if self.schedules else {}
        return {**hp.constant, **scheduled}, Hyperparams(hp.constant, scheduled, hp.owner, hp.ranges)


# --- reading and writing ------------------------------------------------------------------------------


class _Located(NamedTuple):
    parts: tuple[str, ...]  # partition labels (and dict keys) above the node, then its owner
    node: Hyperparams

    @property
    def location(self) -> str:
        return "/".join(self.parts)


def _is_node(x: Any) -> bool:
    return isinstance(x, Hyperparams)


def _locate(state: Any) -> list[_Located]:
    found = []
    for path, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_node)[0]:
        if not _is_node(node):
            continue
        parts = [str(k.key) for k in path if isinstance(k, DictKey)]
        # Members of a chain are told apart by position only where labels and owners do not suffice.
        position = [str(k.idx) for k in path if isinstance(k, SequenceKey)]
        suffix = ["#" + ".".join(position)] if position else []
        found.append(_Located((*parts, node.owner or "?", *suffix), node))
    return found


def _matches(entry: _Located, where: str | None) -> bool:
    if where is None:
        return True
    loc = entry.location
    return where in entry.parts or fnmatch.fnmatchcase(loc, where) or loc.startswith(where.rstrip("/") + "/")


def _names(entries: list[_Located], kind: str) -> dict[str, tuple[_Located, str]]:
    """``{display name: (entry, hyperparameter name)}`` for the ``kind`` ('constant', 'scheduled' or
    'both') values of ``entries``: the bare name when only one node has it, else the shortest prefix of
    the location that tells the nodes apart, then the name."""

    def names_of(e: _Located) -> list[str]:
        if kind == "constant":
            return list(e.node.constant)
        if kind == "scheduled":
            return list(e.node.scheduled)
        return [*e.node.constant, *e.node.scheduled]

    holders: dict[str, list[_Located]] = {}
    for e in entries:
        for name in names_of(e):
            holders.setdefault(name, []).append(e)
    out: dict[str, tuple[_Located, str]] = {}
    for name, es in holders.items():
        if len(es) == 1:
            out[name] = (es[0], name)
            continue
        for e in es:
            out[_qualified(e, es) + "/" + name] = (e, name)
    return out


def _qualified(e: _Located, among: list[_Located]) -> str:
    # Drop the parts every holder shares (e.g. the owner "scale_by_learning_rate" of both members of a
    # partition), keep the rest: "a" and "b" rather than "a/scale_by_learning_rate".
    others = [o for o in among if o is not e]
    n = len(e.parts)
    shared = [i for i in range(n) if all(i < len(o.parts) and o.parts[i] == e.parts[i] for o in others)]
    for positions in (False, True):  # chain positions ("#0.1") only where labels and owners tie

        def kept(x: _Located, positions=positions) -> list[str]:
            return [p for i, p in enumerate(x.parts) if i not in shared and (positions or p[0] != "#")]

        if kept(e) and all(kept(o) != kept(e) for o in others):
            return "/".join(kept(e))
    return e.location


def hyperparams(state: Any, where: str | None = None) -> dict[str, jax.Array]:
    """Every hyperparameter in an optimizer state: constants and the last value of each schedule.

    A name held by one transformation is reported as it is (``"learning_rate"``); a name held by several
    is qualified by where each sits (``"a/learning_rate"``, ``"b/learning_rate"`` for the members of a
    ``partition({"a": ..., "b": ...})``), so no value is hidden. ``where`` (a partition label, an owner
    such as ``"scale_by_adam"``, or a glob on the location ``"a/*"``) keeps only the matching nodes.
    """
    entries = [e for e in _locate(state) if _matches(e, where)]
    if where is not None and not entries:
        raise ValueError(
            f"hyperparams: no transformation in the state matches where={where!r}; the locations are "
            f"{sorted({e.location for e in _locate(state)})}"
        )
    return {
        display: {**e.node.constant, **e.node.scheduled}[name]
        for display, (e, name) in _names(entries, "both").items()
    }


def hyperparam_ranges(state: Any, where: str | None = None) -> dict[str, Range]:
    """The valid `Range` of each hyperparameter, named as `hyperparams` names them."""
    entries = [e for e in _locate(state) if _matches(e, where)]
    return {display: e.node.range_of(name) for display, (e, name) in _names(entries, "both").items()}


def _check_shape(name: str, value: Any, shape: tuple) -> None:
    if jnp.ndim(value) == 0 or jnp.shape(value) == shape:
        return
    raise ValueError(
        f"set_hyperparams: {name} must be a scalar or have the state's shape {shape} (one value per "
        f"configuration of a vmapped state), got shape {jnp.shape(value)}"
    )


def set_hyperparams(state: Any, where: str | None = None, **values: Any) -> Any:
    """A copy of ``state`` with the named constant hyperparameters replaced. Shapes and dtypes are kept,
    so a jitted step does not recompile.

    Names are those `hyperparams` reports: the bare name where one transformation holds it, the
    qualified one (``**{"a/learning_rate": 0.1}``) otherwise, or the bare name with ``where=`` choosing
    the node. A bare name held by several transformations raises and lists the choices. Raises
    ``ValueError`` also for a name the state does not have, for a scheduled hyperparameter, for a value
    outside the node's range, and for a value whose shape is neither scalar nor the state's.
    """
    if not values:
        raise ValueError("set_hyperparams: no values given (set_hyperparams(state, learning_rate=0.01))")
    entries = [e for e in _locate(state) if _matches(e, where)]
    if where is not None and not entries:
        raise ValueError(
            f"set_hyperparams: no transformation in the state matches where={where!r}; the locations are "
            f"{sorted({e.location for e in _locate(state)})}"
        )
    constant = _names(entries, "constant")
    scheduled = _names(entries, "scheduled")
    bare_holders: dict[str, list[str]] = {}
    for display, (_, name) in constant.items():
        bare_holders.setdefault(name, []).append(display)
    chosen: dict[int, dict[str, Any]] = {}  # id(node) -> {name: value}
    for given, value in values.items():
        if given not in constant:
            if given in bare_holders and len(bare_holders[given]) > 1:
                raise ValueError(
                    f"set_hyperparams: {given!r} is held by several transformations: "
                    f"{sorted(bare_holders[given])}; name one of them (set_hyperparams(state, "
                    f"**{{{sorted(bare_holders[given])[0]!r}: ...}})) or pass where= (a partition label "
                    "or an owner)"
                )
            if given in scheduled or given in {n for _, n in scheduled.values()}:
                raise ValueError(
                    f"set_hyperparams: {given} follows a schedule, which sets it at every step; "
                    "build the optimizer with a constant (or another schedule) to change it"
                )
            raise ValueError(
                f"set_hyperparams: the state has no hyperparameter {given!r}"
                + (f" at {where!r}" if where is not None else "")
                + f"; it has {sorted(constant)}"
            )
        entry, name = constant[given]
        old = entry.node.constant[name]
        check_value("set_hyperparams", given, value, entry.node.range_of(name), scalar=False)
        _check_shape(given, value, jnp.shape(old))
        chosen.setdefault(id(entry.node), {})[name] = value

    def replace(node):
        if not _is_node(node) or id(node) not in chosen:
            return node
        new = dict(node.constant)
        for name, value in chosen[id(node)].items():
            new[name] = jnp.broadcast_to(jnp.asarray(value, jnp.float32), jnp.shape(node.constant[name]))
        return Hyperparams(new, node.scheduled, node.owner, node.ranges)

    return jax.tree.map(replace, state, is_leaf=_is_node)


def find_hyperparam(owner: str, state: Any, name: str, where: str | None = None) -> jax.Array:
    """The one value of ``name`` in ``state`` (at ``where``); an error that lists the choices when
    several transformations hold it, or none does."""
    entries = [e for e in _locate(state) if _matches(e, where)]
    holders = [e for e in entries if name in e.node.constant or name in e.node.scheduled]
    if len(holders) != 1:
        listed = sorted(_names(holders, "both")) if holders else sorted(_names(entries, "both"))
        problem = "several transformations hold" if holders else "the state has no"
        raise ValueError(f"{owner}: {problem} {name!r} ({listed}); pass where= to choose one")
    node = holders[0].node
    return {**node.constant, **node.scheduled}[name]
