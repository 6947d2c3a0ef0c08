"""Resumable training: the engine's carry and history written after every chunk, read back on the next call.

What is saved, after each finished chunk: the whole carry (params, optimizer state, early-stopping and
plateau state, the last evaluation), the history so far, the number of periods done, and a fingerprint
of the call (steps, chunks, options, the functions by name and bytecode, the configurations, digests
of the initial params, of the initial optimizer states (their types and hyperparameters) and of the
data). The data position needs no saving: the batch of step ``i`` is a function of the key and ``i``.

Two formats, chosen by where the carry lives:

* in one process (every array addressable here): one ``.npz`` file per checkpoint, written under a
  temporary name, flushed to disk and renamed into place (``os.replace`` is atomic), then the previous
  file is removed. No dependency beyond NumPy, and a save costs about the time of copying the carry;
* across processes (``jax.distributed``): orbax (`orbax-checkpoint`, the ``checkpoint`` extra), whose
  step directories are likewise written under a temporary name and committed by a rename, every
  process writing its own shards.

Either way a checkpoint is complete or absent: a process killed mid-chunk (or mid-save) loses at most
that chunk, and the next call with the same arguments resumes from the last finished one and, running
the same compiled chunks on the same inputs, gives a bit-identical result. A call whose arguments
differ from the saved run's raises and names what differs, instead of resuming another run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

_PREFIX = "checkpoint-"  # checkpoint-00000012.npz: 12 periods done


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host(x: Any) -> np.ndarray:
    """A host copy; a typed PRNG key (``jax.random.key``, Flax NNX's ``Rngs``) as its raw key data."""
    return np.asarray(jax.random.key_data(x) if _is_key(x) else x)


def digest(tree: Any) -> str:
    """A short hash of the values, shapes and dtypes of a pytree of arrays (host copies)."""
    h = hashlib.blake2b(digest_size=12)
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils  # every process computes the digest

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        a = _host(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(str(jax.tree.structure(tree)).encode())
    return h.hexdigest()


def _placed_like(value: np.ndarray, like: Any) -> jax.Array:
    """``value`` as an array placed like ``like``: with its sharding when ``like`` is committed to
    devices, else uncommitted (as a fresh carry is), so that a resumed run finds the compiled chunks of
    a fresh one instead of compiling them again."""
    if _is_key(like):
        value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    else:
        value = value.view(np.dtype(like.dtype))
    if isinstance(like, jax.Array) and like.committed:
        return jax.device_put(value, like.sharding)
    return jax.numpy.asarray(value)


def _local(tree: Any) -> bool:
    return all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in jax.tree.leaves(tree))


class Checkpoints:
    """The checkpoints of one training call in ``directory``, tagged with ``fingerprint`` (a dict of
    JSON values that identifies the call)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any]):
        if not os.fspath(directory):
            raise ValueError("checkpoint_dir must name a directory, got ''")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint_dir {self.directory} is a file, not a directory")
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back
        self._orbax = None

    # --- the two formats --------------------------------------------------------------------------------

    def _files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.directory, _PREFIX + "*.npz")))

    def _manager(self):
        if self._orbax is None:
            try:
                import orbax.checkpoint as ocp
            except ImportError as error:  # pragma: no cover - exercised only without the extra
                raise ImportError(
                    "checkpoint_dir across processes needs orbax-checkpoint: pip install 'gradtx[checkpoint]'"
                ) from error
            options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
            self._orbax = ocp, ocp.CheckpointManager(os.path.join(self.directory, "orbax"), options=options)
        return self._orbax

    def _check(self, saved: dict) -> None:
        if saved == self.fingerprint:
            return
        keys = sorted(set(saved) | set(self.fingerprint))
        differ = [
            f"{k}: saved {saved.get(k)!r}, now {self.fingerprint.get(k)!r}"
            for k in keys
            if saved.get(k) != self.fingerprint.get(k)
        ]
        raise ValueError(
            f"checkpoint_dir {self.directory} holds a run with other arguments ({'; '.join(differ)}): "
            "give another directory, or delete it to start again"
        )

    # --- reading and writing ----------------------------------------------------------------------------

    def restore(self, carry_like: Any) -> tuple[Any, dict[str, np.ndarray], int] | None:
        """``(carry, history by name, periods done)`` of the last finished chunk, or None for a fresh
        directory. ``carry_like`` gives the structure, shapes, dtypes and shardings to restore into."""
        for stale in glob.glob(os.path.join(self.directory, ".partial-*")):
            os.remove(stale)  # a save cut short by a kill: never committed
        files = self._files()
        if files:
            try:
                with np.load(files[-1]) as saved:
                    meta = json.loads(str(saved["meta"]))
                    arrays = {name: saved[name] for name in saved.files if name != "meta"}
            except Exception as error:  # a zip, CRC or EOF error: the file was damaged after its commit
                raise ValueError(
                    f"checkpoint_dir {self.directory}: {os.path.basename(files[-1])} cannot be read "
                    f"({type(error).__name__}: {error}); delete it to start again"
                ) from None
            self._check(meta["fingerprint"])
            leaves, treedef = jax.tree.flatten(carry_like)
            saved_leaves = [arrays[f"c{i:05d}"] for i in range(meta["carry_leaves"])]
            if len(saved_leaves) != len(leaves):
                raise ValueError(
                    f"checkpoint_dir {self.directory}: the saved state has {len(saved_leaves)} arrays where "
                    f"this run has {len(leaves)}"
                )
            for i, (value, like) in enumerate(zip(saved_leaves, leaves, strict=True)):
                stored = jax.eval_shape(jax.random.key_data, like) if _is_key(like) else like  # as saved
                if value.shape != stored.shape or value.dtype.itemsize != np.dtype(stored.dtype).itemsize:
                    raise ValueError(
                        f"checkpoint_dir {self.directory}: the saved state's leaf {i} is {value.dtype}"
                        f"{list(value.shape)} where this run has {like.dtype}{list(like.shape)}"
                    )
            carry = [_placed_like(value, like) for value, like in zip(saved_leaves, leaves, strict=True)]
            history = {name: arrays[f"h{i:05d}"] for i, name in enumerate(meta["history"])}
            return treedef.unflatten(carry), history, int(meta["periods_done"])
        if not os.path.isdir(os.path.join(self.directory, "orbax")):
            return None
        ocp, manager = self._manager()
        step = manager.latest_step()
        if step is None:
            return None
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        self._check(meta["fingerprint"])
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, carry_like)
        args = ocp.args.Composite(
            carry=ocp.args.StandardRestore(abstract), history=ocp.args.StandardRestore()
        )
        restored = manager.restore(step, args=args)
        history = {name: np.asarray(restored.history[f"{i:05d}"]) for i, name in enumerate(meta["history"])}
        return restored.carry, history, int(meta["periods_done"])

    def save(self, periods_done: int, carry: Any, history: dict[str, np.ndarray]) -> None:
        """Writes one checkpoint and returns once it is committed (then the previous one is removed)."""
        meta = {
            "fingerprint": self.fingerprint,
            "periods_done": periods_done,
            "carry_leaves": len(jax.tree.leaves(carry)),
            "history": list(history),
        }
        if not _local(carry):
            ocp, manager = self._manager()
            by_index = {f"{i:05d}": np.asarray(x) for i, x in enumerate(history.values())}
            args = ocp.args.Composite(
                carry=ocp.args.StandardSave(carry),
                history=ocp.args.StandardSave(by_index),
                meta=ocp.args.JsonSave(meta),
            )
            manager.save(periods_done, args=args, force=True)
            manager.wait_until_finished()
            return
        os.makedirs(self.directory, exist_ok=True)
        arrays = {f"c{i:05d}": _host(x) for i, x in enumerate(jax.tree.leaves(carry))}
        arrays |= {f"h{i:05d}": np.asarray(x) for i, x in enumerate(history.values())}
        final = os.path.join(self.directory, f"{_PREFIX}{periods_done:08d}.npz")
        partial = os.path.join(self.directory, f".partial-{os.getpid()}-{periods_done:08d}.npz")
        with open(partial, "wb") as f:
            np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, final)  # atomic: the checkpoint is complete or absent
        for old in self._files():
            if old != final:
                os.remove(old)

    def close(self) -> None:
        if self._orbax is not None:
            self._orbax[1].close()
        for leftover in glob.glob(os.path.join(self.directory, f".partial-{os.getpid()}-*")):
            os.remove(leftover)
