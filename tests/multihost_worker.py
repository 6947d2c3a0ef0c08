"""One process of a multi-process (multi-host) JAX run on this machine, started by tests/test_multihost.py.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR SCENARIO [SCENARIO ...]

Each process calls ``jax.distributed.initialize`` with the coordinator on ``localhost:PORT`` (process 0
hosts it); with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` it owns N CPU devices and
``jax.devices()`` lists the devices of all processes. Collectives between processes go through gloo
(TCP). Each scenario's results are gathered to every process (``process_allgather``) and saved as
``OUT_DIR/p<PROCESS_ID>/<scenario>/<name>.npy``, so that the test checks what every host reads; an
exception is saved as ``OUT_DIR/p<PROCESS_ID>/<scenario>.error`` and the next scenario runs.

The problem (data, params, functions) is defined here with NumPy only: importing this module creates
no JAX array (a worker must not touch a device before ``jax.distributed.initialize``), and the test
computes its one-process reference from the same definitions.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import numpy as np

# A sweep: linear regression, pre-batched data, params drawn from each configuration's seed.
STEPS = 40
EVAL_EVERY = 10
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(STEPS, 16, 5)).astype(np.float32)  # (steps, batch, features)
W_TRUE = _RNG.normal(size=(5, 3)).astype(np.float32)
Y = (X @ W_TRUE + 0.1 * _RNG.normal(size=(STEPS, 16, 3))).astype(np.float32)
X_VALID = _RNG.normal(size=(64, 5)).astype(np.float32)
Y_VALID = X_VALID @ W_TRUE
SWEEP = {"learning_rate": [0.01, 0.03, 0.1, 0.2, 0.3], "seed": [0, 1]}  # 10: padded to 16 on 8 devices

# A model-sharded step: a linear layer whose kernel is split over a 2 x 4 (data x model) mesh.
MESH_SHAPE = (2, 4)
LAYER_STEPS = 10
LAYER_X = _RNG.normal(size=(LAYER_STEPS, 32, 64)).astype(np.float32)  # the batch split over "data"
LAYER_Y = _RNG.normal(size=(LAYER_STEPS, 32, 128)).astype(np.float32)
LAYER_PARAMS = {"w": (0.1 * _RNG.normal(size=(64, 128))).astype(np.float32), "b": np.zeros(128, np.float32)}


def init_params(key):
    import jax

    k1, k2 = jax.random.split(key)
    return {"w": 0.1 * jax.random.normal(k1, (5, 3)), "b": 0.1 * jax.random.normal(k2, (3,))}


def loss_fn(p, batch):
    x, y = batch
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def valid(p):
    return {"valid_loss": loss_fn(p, (X_VALID, Y_VALID))}


def make_tx(learning_rate):
    import gradtx

    return gradtx.sgd(learning_rate, momentum=0.9)


def run_sweep(configs, mesh=None, **options):
    """The sweep of both the workers (``mesh=jax.devices()``) and the test's one-device reference."""
    import gradtx

    return gradtx.sweep(
        loss_fn=loss_fn, params=init_params, make_tx=make_tx, configs=configs, data=(X, Y), steps=STEPS,
        eval_fn=valid, eval_every=EVAL_EVERY, mesh=mesh, **options,
    )  # fmt: skip


def train_layer(params, xs, ys):
    """LAYER_STEPS jitted Adam steps on the layer, wherever ``params`` and the batches are placed (the
    workers' sharded arrays or the test's host arrays): ``(params, adam_state, losses)``."""
    import jax

    import gradtx

    tx = gradtx.adam(1e-2)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: ((x @ p["w"] + p["b"] - y) ** 2).mean())(params)
        updates, state = tx.update(grads, state, params)
        return gradtx.apply_updates(params, updates), state, loss

    state, losses = tx.init(params), []
    for i in range(LAYER_STEPS):
        params, state, loss = step(params, state, xs[i], ys[i])
        losses.append(loss)
    return params, state.inner[0], jax.numpy.stack(losses)


# --- scenarios (run in every process) ---------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _save(out: Path, **trees) -> None:
    """Gathers every leaf to this process and saves it as ``<name>.<key>...npy``."""
    import jax
    from jax.experimental import multihost_utils

    out.mkdir(parents=True, exist_ok=True)
    for name, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            gathered = multihost_utils.process_allgather(leaf, tiled=True)
            np.save(out / (".".join([name, *keys]) + ".npy"), np.asarray(gathered))


def sharded_adam(out: Path) -> None:
    """Adam on a kernel split over data x model (each device holds 1/8 of it and of each moment); the
    batch is split over the data axis, so the gradient needs collectives between the processes."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradtx

    mesh = jax.make_mesh(MESH_SHAPE, ("data", "model"))
    spec = {"w": P("data", "model"), "b": P("model")}
    # Every process holds the same host arrays; device_put keeps the shards of its own devices.
    params = jax.device_put(LAYER_PARAMS, {k: NamedSharding(mesh, s) for k, s in spec.items()})
    xs, ys = jax.device_put((LAYER_X, LAYER_Y), NamedSharding(mesh, P(None, "data")))

    tx = gradtx.adam(1e-2)
    state = tx.init(params)
    hlo = jax.jit(lambda p, s, g: tx.update(g, s, p)).lower(params, state, params).compile().as_text()
    found = [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if op in hlo]
    _check(not found, f"the sharded Adam update communicates: {found}")

    params, adam, losses = train_layer(params, xs, ys)
    for name, x in [("params", params["w"]), ("mu", adam.mu["w"]), ("nu", adam.nu["w"])]:
        _check(x.sharding.spec == spec["w"], f"{name}[w] is not sharded like w: {x.sharding}")
        shards = {s.data.shape for s in x.addressable_shards}
        _check(
            len(x.addressable_shards) == jax.local_device_count() and shards == {(32, 32)},
            f"each of this process's devices should hold a (32, 32) block of {name}[w], got {shards}",
        )
    _save(out, params=params, mu=adam.mu, nu=adam.nu, loss=losses)


def padded_sweep(out: Path) -> None:
    """10 configurations over all 8 devices of both processes (padded to 16, the padding dropped)."""
    import jax

    import gradtx

    result = run_sweep(gradtx.grid(**SWEEP), mesh=jax.devices())
    _save(out, loss=result.history.loss, metrics=result.history.metrics, params=result.params)
    # What a host reads without gathering: the rows (nothing else in this process needs the others).
    np.save(out / "final_loss.npy", np.asarray([row["final_loss"] for row in result.rows()]))


UNPADDED = {"learning_rate": list(np.geomspace(0.005, 0.3, 16))}  # 16: 2 per device, no padding


def unpadded_sweep(out: Path) -> None:
    """16 configurations, 2 per device of either process: the params stay split between the processes;
    the history is read on each process (rows, the arrays themselves) without gathering; progress is
    reported between 2 chunks."""
    import jax

    result = run_sweep(UNPADDED, mesh=jax.devices(), chunks=2, progress=True)
    shards = result.params["w"].addressable_shards
    sizes = {s.data.shape[0] for s in shards}
    _check(
        len(shards) == jax.local_device_count() and sizes == {2},
        f"each of this process's {jax.local_device_count()} devices should hold 2 of the 16 configurations' "
        f"params, got {len(shards)} shards of {sizes}",
    )
    _save(out, params=result.params)
    for name, value in [("loss", result.history.loss), ("steps_trained", result.history.steps_trained)]:
        np.save(out / f"{name}.npy", np.asarray(value))  # no gathering: the history is on every process
    np.save(out / "final_loss.npy", np.asarray([row["final_loss"] for row in result.rows()]))
    np.save(out / "best.npy", np.asarray(result.best()["learning_rate"]))


def layer_loss(p, batch):
    x, y = batch
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def fit_layer(params, data, **options):
    """`gradtx.fit` of the layer with Adam: the workers' sharded run and the test's one-device one."""
    import gradtx

    return gradtx.fit(
        loss_fn=layer_loss, params=params, tx=gradtx.adam(1e-2), data=data, steps=LAYER_STEPS, **options
    )


def sharded_fit(out: Path) -> None:
    """`gradtx.fit` on the kernel split over data x model (jax.make_mesh: Explicit axes) with the batches
    split over data, in 2 chunks with progress: the params and every moment keep their sharding."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh(MESH_SHAPE, ("data", "model"))
    spec = {"w": P("data", "model"), "b": P("model")}
    params = jax.device_put(LAYER_PARAMS, {k: NamedSharding(mesh, s) for k, s in spec.items()})
    data = jax.device_put((LAYER_X, LAYER_Y), NamedSharding(mesh, P(None, "data")))
    result = fit_layer(params, data, chunks=2, progress=True)
    adam = result.opt_state.inner[0]
    for name, x in [("params", result.params["w"]), ("mu", adam.mu["w"]), ("nu", adam.nu["w"])]:
        _check(x.sharding.spec == spec["w"], f"{name}[w] is not sharded like w: {x.sharding}")
    _save(out, params=result.params, mu=adam.mu, nu=adam.nu, loss=result.history.loss)


SCENARIOS = {
    "sharded_adam": sharded_adam,
    "padded_sweep": padded_sweep,
    "unpadded_sweep": unpadded_sweep,
    "sharded_fit": sharded_fit,
}


def main(argv: list[str]) -> None:
    process, processes, port, out, *scenarios = argv
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before the backend starts
    jax.distributed.initialize(
        f"localhost:{port}",
        num_processes=int(processes),
        process_id=int(process),
        initialization_timeout=120,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    _check(
        jax.process_count() == int(processes) and len(jax.devices()) > jax.local_device_count(),
        f"not a {processes}-process run: {jax.devices()}",
    )
    mine = Path(out) / f"p{process}"
    mine.mkdir(parents=True, exist_ok=True)
    for name in scenarios:
        try:
            SCENARIOS[name](mine / name)
        except Exception:
            (mine / f"{name}.error").write_text(traceback.format_exc())
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
