"""Resumable training: the engine's carry and history written after every chunk, read back on the next call.

What is saved, after each finished chunk: the whole carry (params, optimizer state, early-stopping and
plateau state, the last evaluation), the history so far, the number of periods done, and a fingerprint
of the call (steps, chunks, options, the configurations, a digest of the initial params and of the
data). The data position needs no saving: the batch of step ``i`` is a function of the key and ``i``.

Atomicity comes from orbax (`orbax-checkpoint`, the ``checkpoint`` extra): a step directory is written
under a temporary name and renamed when complete, and the previous checkpoint is deleted only after
the new one is committed. A process killed mid-chunk (or mid-save) therefore loses at most that chunk;
the next call with the same arguments resumes from the last finished one and, running the same
compiled chunks on the same inputs, gives a bit-identical result. A call whose arguments differ from
the saved run's raises and names what differs, instead of resuming another run.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

_KEEP = 2  # the last committed checkpoint survives while the next one is written


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "checkpoint_dir needs orbax-checkpoint: pip install 'gradtx[checkpoint]'"
        ) from error
    return ocp


def digest(tree: Any) -> str:
    """A short hash of the values, shapes and dtypes of a pytree of arrays (host copies)."""
    h = hashlib.blake2b(digest_size=12)
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils  # every process computes the digest

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(str(jax.tree.structure(tree)).encode())
    return h.hexdigest()


class Checkpoints:
    """The checkpoints of one training call in ``directory``, tagged with ``fingerprint`` (a dict of
    JSON values that identifies the call)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any]):
        ocp = _orbax()
        self.ocp = ocp
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.fspath(directory)),
            options=ocp.CheckpointManagerOptions(max_to_keep=_KEEP, enable_async_checkpointing=False),
        )

    def restore(self, carry_like: Any) -> tuple[Any, list[Any], int] | None:
        """``(carry, history leaves, periods done)`` of the last finished chunk, or None for a fresh
        directory. ``carry_like`` gives the structure, shapes, dtypes and shardings to restore into."""
        step = self.manager.latest_step()
        if step is None:
            return None
        ocp = self.ocp
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        saved = meta["fingerprint"]
        if saved != self.fingerprint:
            keys = sorted(set(saved) | set(self.fingerprint))
            differ = [f"{k}: saved {saved.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in keys
                      if saved.get(k) != self.fingerprint.get(k)]  # fmt: skip
            raise ValueError(
                f"checkpoint_dir {self.manager.directory} holds a run with other arguments ("
                + "; ".join(differ)
                + "): give another directory, or delete it to start again"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, carry_like)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                carry=ocp.args.StandardRestore(abstract), history=ocp.args.StandardRestore()
            ),
        )
        history = [np.asarray(restored.history[k]) for k in sorted(restored.history)]
        return restored.carry, history, int(meta["periods_done"])

    def save(self, periods_done: int, carry: Any, history_leaves: list[np.ndarray]) -> None:
        """Writes one checkpoint and waits until it is committed."""
        ocp = self.ocp
        history = {f"{i:05d}": np.asarray(x) for i, x in enumerate(history_leaves)}
        meta = {"fingerprint": self.fingerprint, "periods_done": periods_done}
        self.manager.save(
            periods_done,
            args=ocp.args.Composite(
                carry=ocp.args.StandardSave(carry),
                history=ocp.args.StandardSave(history),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
