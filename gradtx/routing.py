"""Routing: apply a transformation to some of the parameters only.

``masked(tx, mask)`` sends the selected leaves through ``tx`` and passes the others through unchanged;
``partition({label: tx, ...}, labels)`` sends each leaf to the transformation of its label. A mask (or
a labelling) is decided per leaf, once, from the leaf's path, shape and dtype, and may be given as

* a pytree of bools (labels) with the params' structure, or a prefix of it (``{"dense": True}``
  covers every leaf under ``"dense"``; a single label ``"adam"`` labels every leaf), also a pytree
  that is callable, such as an equinox module of bools;
* a function ``(path, leaf) -> bool`` (``-> label``), e.g. `weights_only`, or optax's form, a
  function ``params -> tree of bools`` (``-> tree of labels``): one required argument means the latter;
* for masks, a glob pattern on the path, or a list of patterns (a leaf is selected if any matches;
  a pattern that matches no parameter is an error, not a silent no-op); for labels,
  `label_by_path` turns ``{pattern: label}`` rules into a function (label strings are never patterns).

Paths are the keys joined with ``/``: ``"params/Dense_0/kernel"`` for Flax Linen,
``"hidden/kernel"`` for ``nnx.state(model, nnx.Param)`` (the ``.value`` of NNX's Variable wrapper
is not part of the name), ``"layers/0/kernel"`` inside lists. Patterns follow `fnmatch`, where ``*``
also matches ``/``: ``"*/kernel"`` is every kernel at any depth, ``"*bias"`` every bias.

The inner transformation sees the unselected leaves as ``None``, so its state holds nothing for them.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from gradtx.base import Params, State, Transformation, Updates, accepts_extra

MaskSpec = Any  # pytree of bools | Callable[[str, leaf], bool] | str | Sequence[str]
LabelSpec = Any  # pytree of labels | Callable[[str, leaf], Hashable]

_NNX_VALUE = ("value", "raw_value")  # the attribute through which an NNX Variable exposes its array


def _is_none(x: Any) -> bool:
    return x is None


def path_string(path: tuple) -> str:
    """A key path as ``"a/b/0/kernel"``: dict keys, attribute names and sequence indices joined by ``/``."""
    parts = []
    for key in path:
        if isinstance(key, DictKey):
            parts.append(str(key.key))
        elif isinstance(key, GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if path and isinstance(path[-1], GetAttrKey) and path[-1].name in _NNX_VALUE:
        parts.pop()  # so that an NNX kernel is "hidden/kernel", as in Linen, not "hidden/kernel/value"
    return "/".join(parts)


def weights_only(path: str, leaf: Any) -> bool:
    """The mask Keras's ``kernel_regularizer`` implies: leaves with ``ndim >= 2`` (kernels, embeddings),
    not biases, norm scales or scalars."""
    del path
    return len(getattr(leaf, "shape", ())) >= 2


def label_by_path(rules: Mapping[str, Hashable], default: Hashable | None = None) -> Callable:
    """A labelling for `partition`: the label of the first pattern in ``rules`` that matches the path,
    else ``default`` (an error names the path when there is no match and no default)."""
    rules = dict(rules)

    def label(path: str, leaf: Any) -> Hashable:
        for pattern, value in rules.items():
            if fnmatch.fnmatchcase(path, pattern):
                return value
        if default is None:
            raise ValueError(
                f"label_by_path: no pattern of {list(rules)} matches the parameter {path!r}, "
                "and no default label was given"
            )
        return default

    return label


def _is_patterns(spec: Any) -> bool:
    return isinstance(spec, str) or (
        isinstance(spec, Sequence) and len(spec) > 0 and all(isinstance(s, str) for s in spec)
    )


def _takes_tree(fn: Callable) -> bool:
    """Whether a mask/label function is optax's kind, ``params -> tree``, rather than ``(path, leaf)``."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return len(required) == 1 and not any(p.kind is p.VAR_POSITIONAL for p in parameters)


def resolve(owner: str, spec: Any, tree: Any, patterns: bool = True) -> list[Any]:
    """One mask value (or label) per leaf of ``tree``, in ``jax.tree.flatten`` order with ``None``
    leaves included (their entry is ``None``: there is nothing to route).

    ``spec`` is a pytree (a prefix of ``tree``), a function ``(path, leaf) -> value``, a function
    ``tree -> tree of values`` (optax's form), or, with ``patterns``, glob patterns on the paths, each
    of which must match some leaf (a pattern that matches nothing is a typo that would silently route
    nothing)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]
    paths = [path_string(path) for path, _ in flat]
    if patterns and _is_patterns(spec):
        globs = [spec] if isinstance(spec, str) else list(spec)
        unmatched = [g for g in globs if not any(fnmatch.fnmatchcase(p, g) for p in paths)]
        if unmatched:
            raise ValueError(f"{owner}: the pattern(s) {unmatched} match no parameter; the paths are {paths}")
        return [
            None if leaf is None else any(fnmatch.fnmatchcase(path, g) for g in globs)
            for path, (_, leaf) in zip(paths, flat, strict=True)
        ]
    # A callable that is also a container (an equinox-style module of bools) is a tree, not a function.
    if callable(spec) and jax.tree.leaves(spec) == [spec]:
        if _takes_tree(spec):
            return _resolve_tree(owner, spec(tree), tree)
        return [
            None if leaf is None else spec(path, leaf) for path, (_, leaf) in zip(paths, flat, strict=True)
        ]
    return _resolve_tree(owner, spec, tree)


def _resolve_tree(owner: str, spec: Any, tree: Any) -> list[Any]:
    # ``spec`` is a prefix of ``tree``: copy each of its values onto the leaves below it.
    def spread_one(value, sub):
        return jax.tree.map(lambda leaf: None if leaf is None else (value,), sub, is_leaf=_is_none)

    try:
        spread = jax.tree.map(spread_one, spec, tree, is_leaf=_is_none)
    except ValueError as error:
        raise ValueError(
            f"{owner}: the mask/labels tree must have the params' structure or a prefix of it "
            f"(or be a function of (path, leaf), or a glob pattern): {error}"
        ) from None
    # Each value was wrapped in a 1-tuple so that a label that is itself a tuple stays one leaf.
    flat = jax.tree.leaves(spread, is_leaf=lambda x: x is None or (isinstance(x, tuple) and len(x) == 1))
    return [None if x is None else x[0] for x in flat]


def _select(tree: Any, keep: list[bool]) -> Any:
    """``tree`` with the leaves not kept replaced by ``None``."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_none)
    return treedef.unflatten([leaf if k else None for leaf, k in zip(leaves, keep, strict=True)])


def _run(inner: Transformation, updates, state, params, extra):
    kwargs = extra if accepts_extra(inner.update) else {}
    return inner.update(updates, state, params, **kwargs)


def _merge(updates: Updates, parts: list[tuple[list[bool], Updates]]) -> Updates:
    """``updates`` with the leaves each part selects replaced by that part's results."""
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_none)
    for keep, new in parts:
        new_leaves = treedef.flatten_up_to(new)
        leaves = [n if k else old for old, n, k in zip(leaves, new_leaves, keep, strict=True)]
    return treedef.unflatten(leaves)


class MaskedState(NamedTuple):
    inner: State  # the inner transformation's state, built on the selected leaves only


def masked(inner: Transformation, mask: MaskSpec) -> Transformation:
    """``u_i <- inner(g)_i`` where ``mask_i``, else ``u_i <- g_i``.

    ``mask``: a pytree of bools (or a prefix of the params' tree), a function ``(path, leaf) -> bool``
    such as `weights_only` (or ``params -> tree of bools``), or glob patterns on the path such as
    ``"*/kernel"``, each of which must match a parameter (see the module docstring). ``chain``'s
    ``step`` and other extra arguments reach ``inner``.
    """

    def keep(tree) -> list[bool]:
        values = resolve("masked", mask, tree)
        for v in values:
            is_bool = isinstance(v, bool | np.bool_) or np.dtype(getattr(v, "dtype", object)) == np.bool_
            if v is not None and not is_bool:
                raise ValueError(f"masked: the mask must give a bool per leaf, got {v!r}")
        return [v is not None and bool(v) for v in values]

    def init(params):
        return MaskedState(inner.init(_select(params, keep(params))))

    def update(updates, state, params=None, **extra):
        k = keep(updates)
        sub_params = None if params is None else _select(params, k)
        new, inner_state = _run(inner, _select(updates, k), state.inner, sub_params, extra)
        return _merge(updates, [(k, new)]), MaskedState(inner_state)

    return Transformation(init, update)


class PartitionState(NamedTuple):
    inner: dict  # label -> the state of that label's transformation, built on its leaves only


def partition(transforms: Mapping[Hashable, Transformation], labels: LabelSpec) -> Transformation:
    """``u_i <- transforms[label_i](g)_i``: each leaf goes through the transformation of its label.

    ``labels``: a pytree of labels (or a prefix of the params' tree, e.g. one label for all), a function
    ``(path, leaf) -> label`` such as ``label_by_path({"*/kernel": "decay"}, default="plain")``, or
    optax's form, a function ``params -> tree of labels``.
    Every leaf needs a label that ``transforms`` has. Each transformation keeps its own state (and,
    if it is a `chain`, its own step count, which an enclosing chain overrides).
    """
    transforms = dict(transforms)
    if not transforms:
        raise ValueError("partition: transforms is empty; give at least one {label: transformation}")

    def assign(tree) -> dict[Hashable, list[bool]]:
        # Labels are values, never glob patterns: "a" labels every leaf, ("a", "b") a tuple of two.
        values = resolve("partition", labels, tree, patterns=False)
        paths = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]]
        for path, v in zip(paths, values, strict=True):
            if v is not None and v not in transforms:
                raise ValueError(
                    f"partition: the parameter {path!r} has label {v!r}, which is not one of the "
                    f"transforms' labels {sorted(transforms, key=repr)}"
                )
        return {label: [v is not None and v == label for v in values] for label in transforms}

    def init(params):
        selection = assign(params)
        return PartitionState({lab: t.init(_select(params, selection[lab])) for lab, t in transforms.items()})

    def update(updates, state, params=None, **extra):
        selection = assign(updates)
        parts, inner = [], {}
        for lab, t in transforms.items():
            k = selection[lab]
            sub_params = None if params is None else _select(params, k)
            new, inner[lab] = _run(t, _select(updates, k), state.inner[lab], sub_params, extra)
            parts.append((k, new))
        return _merge(updates, parts), PartitionState(inner)

    return Transformation(init, update)


def select_leaves(owner: str, tree: Params, mask: MaskSpec | None) -> list[bool]:
    """The mask as one bool per leaf of ``tree`` (all ``True`` when ``mask`` is ``None``): the
    ``mask=`` argument of the penalty, sparsity and pruning functions."""
    if mask is None:
        return [leaf is not None for leaf in jax.tree.leaves(tree, is_leaf=_is_none)]
    return [v is not None and bool(v) for v in resolve(owner, mask, tree)]
