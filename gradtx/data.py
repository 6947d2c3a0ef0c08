"""Batch sources for `gradtx.fit` and the sweeps: where the batch of step ``i`` comes from.

A source is split in two so that compiled programs can be shared between calls: a small hashable
*spec* (what kind of source, its batch size: a static argument of the compiled chunk) and the data's
*arrays* (an argument of the chunk, never a constant compiled into it: embedded in the program, a large
data set made compilation slower with its size). Each compiled chunk calls ``spec.tables(...)`` once,
outside its scan over steps, so that per-epoch work (a shuffle) is not repeated at every step, and
``spec.batch(table, arrays, step)`` for each step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Data = Any  # a pytree of arrays indexed by step along axis 0, a ShuffledBatches, or (step, key) -> batch


class Indexed(NamedTuple):
    """Pre-batched arrays: step ``i`` uses entry ``i % n`` along axis 0 (so one epoch of pre-made
    batches can be trained on for several epochs)."""

    per_seed: bool = False

    def tables(self, first_step, num_steps, key, arrays, seeds=None):
        return ()

    def batch(self, table, arrays, step):
        n = jax.tree.leaves(arrays)[0].shape[0]
        return jax.tree.map(lambda x: x[step % n], arrays)


class FromFunction(NamedTuple):
    """A function ``(step, key) -> batch``, called with ``fold_in(key, step)``."""

    fn: Callable[[jax.Array, jax.Array], Any]
    per_seed: bool = False

    def tables(self, first_step, num_steps, key, arrays, seeds=None):
        return key

    def batch(self, key, arrays, step):
        return self.fn(step, jax.random.fold_in(key, step))


_MAX_TABLE = 1 << 22  # entries (int32) of a chunk's table of permutations: 16 MB


class Shuffled(NamedTuple):
    """Minibatches reshuffled every epoch (see `ShuffledBatches`)."""

    batch_size: int
    per_seed: bool = False

    def tables(self, first_step, num_steps: int, key, arrays, seeds=None):
        """The permutations of the epochs the chunk spans, drawn once: ``(orders, first_epoch)`` with
        ``orders`` of shape (epochs, n), or (k, epochs, n) with one key per seed (``fold_in(key, seed)``).
        When that table would be large (few batches per epoch over a long chunk: full-batch training
        held one permutation per step), ``(keys, None)`` instead: `batch` then draws its epoch's
        permutation at each step, the same one the table would hold."""
        n = jax.tree.leaves(arrays)[0].shape[0]
        per_epoch = n // self.batch_size
        first_epoch = first_step // per_epoch
        count = num_steps // per_epoch + 2  # the epochs the chunk's steps span
        keys = key if seeds is None else jax.vmap(lambda seed: jax.random.fold_in(key, seed))(seeds)
        if count * n > _MAX_TABLE:
            return keys, None
        epochs = first_epoch + jnp.arange(count)

        def orders(key):
            return jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), n))(epochs)

        return (orders(keys) if seeds is None else jax.vmap(orders)(keys)), first_epoch

    def batch(self, table, arrays, step):
        orders, first_epoch = table
        n = jax.tree.leaves(arrays)[0].shape[0]
        per_epoch = n // self.batch_size
        if first_epoch is None:  # no table: ``orders`` is the key
            order = jax.random.permutation(jax.random.fold_in(orders, step // per_epoch), n)
        else:
            order = orders[step // per_epoch - first_epoch]
        index = jax.lax.dynamic_slice_in_dim(order, (step % per_epoch) * self.batch_size, self.batch_size)
        return jax.tree.map(lambda x: x[index], arrays)


class ShuffledBatches:
    """Minibatches of ``data`` (a pytree of arrays with the examples along axis 0), reshuffled every
    epoch from the run's key: step ``i`` is batch ``i % (n // batch_size)`` of epoch ``i // (n //
    batch_size)``. The last ``n % batch_size`` examples of each shuffled epoch are left out.
    ``per_epoch`` (the number of batches per epoch) is the ``eval_every`` of once-per-epoch evaluation.

    Each compiled chunk draws the permutations of the epochs it spans once, before its steps, because
    a permutation per step would cost more than the step itself on small models (unless that table
    would pass 4M entries: with few batches per epoch each step draws its epoch's permutation). The
    data order is a function of the key and the step only, so a resumed run sees the batches it would
    have seen.

    In a sweep every configuration sees the same batches (one gather serves them all), unless
    ``per_seed``: then a configuration with a ``seed`` field shuffles with ``fold_in(key, seed)``, as
    separate runs with their own seeds would (its run equals ``fit(..., key=fold_in(key, seed))``).
    """

    def __init__(self, data: Any, batch_size: int, per_seed: bool = False):
        leaves = jax.tree.leaves(data)
        if not leaves:
            raise ValueError(
                f"shuffled_batches: data must hold arrays of examples (along axis 0), got {data!r}"
            )
        if any(np.ndim(x) == 0 for x in leaves):
            raise ValueError("shuffled_batches: data holds a scalar, not an array of examples (along axis 0)")
        sizes = {np.shape(x)[0] for x in leaves}
        if len(sizes) != 1:
            raise ValueError(
                f"shuffled_batches: the arrays hold different numbers of examples: {sorted(sizes)}"
            )
        (self.n,) = sizes
        if self.n == 0:
            raise ValueError("shuffled_batches: the arrays hold no examples")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
            raise ValueError(f"shuffled_batches: batch_size must be an int, got {batch_size!r}")
        if not 0 < batch_size <= self.n:
            raise ValueError(f"shuffled_batches: batch_size must be in [1, {self.n}], got {batch_size}")
        self.data, self.batch_size, self.per_epoch = data, int(batch_size), self.n // int(batch_size)
        self.per_seed = bool(per_seed)

    def prepare(
        self, first_step: jax.Array, num_steps: int, key: jax.Array, data: Any = None
    ) -> Callable[[jax.Array], Any]:
        """``batch_at(step)`` for the steps ``first_step ..`` of one chunk; ``data`` (default: this
        source's arrays) lets a compiled caller pass the arrays in as an argument."""
        arrays = self.data if data is None else data
        spec = Shuffled(self.batch_size)
        table = spec.tables(first_step, num_steps, key, arrays)
        return lambda step: spec.batch(table, arrays, step)


def shuffled_batches(data: Any, batch_size: int, per_seed: bool = False) -> ShuffledBatches:
    """A batch source for `fit` and the sweeps: see `ShuffledBatches`."""
    return ShuffledBatches(data, batch_size, per_seed)


Spec = Indexed | FromFunction | Shuffled


def takes_two(fn: Callable) -> bool:
    """Whether ``fn(a, b)`` binds (True when the signature cannot be read, as for some builtins)."""
    try:
        inspect.signature(fn).bind(0, 0)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def source(data: Data) -> tuple[Spec, Any]:
    """``(spec, arrays)`` for ``data``, checked: arrays must agree on their number of batches."""
    if isinstance(data, ShuffledBatches):
        return Shuffled(data.batch_size, data.per_seed), data.data
    if callable(data):
        if not takes_two(data):
            raise ValueError(f"data: a function of data must take (step, key), got {data!r}")
        return FromFunction(data), ()
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data: the batch tree is empty")
    lengths = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(lengths) != 1 or None in lengths:
        shapes = jax.tree.map(np.shape, data)
        raise ValueError(
            f"data: every array must have the same number of batches along axis 0, got shapes {shapes}"
        )
    return Indexed(), data
