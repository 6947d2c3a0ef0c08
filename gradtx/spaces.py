"""Search spaces: where a hyperparameter search draws its configurations from, sampled on the device.

A *space* is a dict ``{field: dimension or fixed number}`` whose fields are the arguments of the
optimizer factory ``make_tx(**config)``, e.g. ``{"learning_rate": log_uniform(1e-4, 1e-1), "beta_1":
uniform(0.8, 0.99), "beta_2": 0.999}``. A dimension is a small NamedTuple (hashable, so a space can be a
static argument of a compiled program) with

* ``sample(key, n)``: ``n`` values drawn independently, a JAX array (float32, or int32 for whole numbers),
  computed wherever JAX computes (the default device);
* ``perturb(values, up)``: the explore step of population-based training, each value moved up (where
  ``up``) or down and kept inside the dimension's bounds.

`sample` draws every field of a space from one key: field ``name`` uses ``fold_in(key, crc32(name))``,
so a field's values do not change when another field is added to or removed from the space.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

F32_MAX, F32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)


def _finite_number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    # Configurations are drawn as int32 (whole numbers) or float32: a value beyond those would wrap
    # around or become inf on the device.
    if isinstance(value, int | np.integer) and abs(int(value)) > np.iinfo(np.int32).max:
        raise ValueError(f"{owner}: {name} must fit in int32, got {value!r}")
    if abs(float(value)) > F32_MAX:
        raise ValueError(f"{owner}: {name} must fit in float32 (|x| <= {F32_MAX:.3g}), got {value!r}")
    return float(value)


class LogUniform(NamedTuple):
    """``log x ~ U(log low, log high)``: every decade between the bounds equally likely (learning
    rates, weight decays). Perturbed by multiplying with the factor, then clipped to the bounds."""

    low: float
    high: float

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        u = jax.random.uniform(key, (n,), jnp.float32, math.log(self.low), math.log(self.high))
        return jnp.clip(jnp.exp(u), self.low, self.high)  # exp(log x) may round past a bound

    def perturb(self, values: jax.Array, factor: jax.Array) -> jax.Array:
        return jnp.clip(values * factor, self.low, self.high)


class Uniform(NamedTuple):
    """``x ~ U(low, high)``. Perturbed by multiplying with the factor, then clipped to the bounds."""

    low: float
    high: float

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        return jax.random.uniform(key, (n,), jnp.float32, self.low, self.high)

    def perturb(self, values: jax.Array, factor: jax.Array) -> jax.Array:
        return jnp.clip(values * factor, self.low, self.high)


class IntUniform(NamedTuple):
    """A whole number drawn uniformly from ``low, low + 1, ..., high`` (both included). Perturbed by
    multiplying with the factor and rounding, then clipped to the bounds."""

    low: int
    high: int

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        return jax.random.randint(key, (n,), self.low, self.high + 1, jnp.int32)

    def perturb(self, values: jax.Array, factor: jax.Array) -> jax.Array:
        return jnp.clip(jnp.round(values * factor), self.low, self.high).astype(values.dtype)


class Choice(NamedTuple):
    """One of ``values`` (numbers), each equally likely. Perturbed, as Ray Tune's PBT does for lists,
    by moving to the next value in the given order (factor > 1) or the previous one (factor < 1),
    staying at the ends."""

    values: tuple[float, ...]

    def _table(self) -> jax.Array:
        whole = all(float(v).is_integer() and isinstance(v, int | np.integer) for v in self.values)
        return jnp.asarray(self.values, jnp.int32 if whole else jnp.float32)

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        return self._table()[jax.random.randint(key, (n,), 0, len(self.values))]

    def perturb(self, values: jax.Array, factor: jax.Array) -> jax.Array:
        table = self._table()
        index = jnp.argmin(jnp.abs(values[:, None] - table[None, :].astype(values.dtype)), axis=1)
        index = jnp.clip(index + jnp.where(factor > 1, 1, -1), 0, len(self.values) - 1)
        return table[index].astype(values.dtype)


Dimension = LogUniform | Uniform | IntUniform | Choice
Space = Mapping[str, Dimension | float | int]  # field -> a dimension, or a number every configuration gets


def log_uniform(low: float, high: float) -> LogUniform:
    """A dimension whose logarithm is uniform: ``x = exp(u)``, ``u ~ U(log low, log high)``,
    ``0 < low < high`` (see `LogUniform`)."""
    low, high = _finite_number("log_uniform", "low", low), _finite_number("log_uniform", "high", high)
    if not 0 < low < high:
        raise ValueError(f"log_uniform: needs 0 < low < high, got low={low:g}, high={high:g}")
    if low < F32_TINY:
        raise ValueError(
            f"log_uniform: low must be >= {F32_TINY:.3g} (float32's smallest normal), got {low:g}"
        )
    return LogUniform(low, high)


def uniform(low: float, high: float) -> Uniform:
    """A uniform dimension ``x ~ U(low, high)``, ``low < high`` (see `Uniform`)."""
    low, high = _finite_number("uniform", "low", low), _finite_number("uniform", "high", high)
    if not low < high:
        raise ValueError(f"uniform: needs low < high, got low={low:g}, high={high:g}")
    if high - low > F32_MAX:
        raise ValueError(f"uniform: high - low must fit in float32, got low={low:g}, high={high:g}")
    return Uniform(low, high)


def int_uniform(low: int, high: int) -> IntUniform:
    """A whole-number dimension, uniform over ``low, ..., high`` (both included; see `IntUniform`)."""
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"int_uniform: {name} must be an int, got {v!r}")
    if not low <= high:
        raise ValueError(f"int_uniform: needs low <= high, got low={low}, high={high}")
    if max(abs(int(low)), abs(int(high) + 1)) > np.iinfo(np.int32).max:
        raise ValueError(f"int_uniform: the bounds must fit in int32, got low={low}, high={high}")
    return IntUniform(int(low), int(high))


def choice(values: Sequence[float]) -> Choice:
    """A dimension over a list of numbers, each equally likely (see `Choice`). Options that change the
    program (bools, dtypes, names) cannot be drawn inside one vmapped program: give each its own
    search."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray) or len(values) == 0:
        raise ValueError(f"choice: values must be a non-empty list of numbers, got {values!r}")
    checked = []
    for v in values:
        _finite_number("choice", "every value", v)
        checked.append(int(v) if isinstance(v, int | np.integer) else float(v))
    return Choice(tuple(checked))


def check_space(owner: str, space: Any) -> dict[str, Dimension | float | int]:
    """The space as a plain dict, checked: field names are strings, values dimensions or numbers."""
    if not isinstance(space, Mapping) or not space:
        raise ValueError(
            f"{owner}: space must be a non-empty dict {{field: gradtx.log_uniform(...) | uniform | choice | "
            f"int_uniform | a number}}, got {space!r}"
        )
    checked = {}
    for name, dim in space.items():
        if not isinstance(name, str):
            raise ValueError(
                f"{owner}: space fields must be strings (the arguments of make_tx), got {name!r}"
            )
        if not isinstance(dim, Dimension):
            _finite_number(owner, f"space[{name!r}]", dim)
        checked[name] = dim
    return checked


def _field_key(key: jax.Array, name: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@partial(jax.jit, static_argnames=("fields", "n"))
def _sample(fields: tuple, key: jax.Array, n: int) -> dict[str, jax.Array]:
    out = {}
    for name, dim in fields:
        if isinstance(dim, Dimension):
            out[name] = dim.sample(_field_key(key, name), n)
        else:
            out[name] = jnp.full((n,), dim, jnp.int32 if isinstance(dim, int) else jnp.float32)
    return out


def sample(space: Space, key: jax.Array, n: int) -> dict[str, jax.Array]:
    """``n`` configurations drawn from ``space``: ``{field: (n,) array}``, a fixed number repeated.

    One compiled program per space and ``n`` draws every field on the device; field ``name`` uses the
    key ``fold_in(key, crc32(name))``, so the same key gives the same configurations."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"sample: n must be an int >= 1, got {n!r}")
    fields = tuple(sorted(check_space("sample", space).items()))
    return _sample(fields, key, int(n))
