"""Sweep throughput: 64 learning rates on the digits MLP, and the nine optimizers in one program.

Every method trains the same model (64-128-128-10, ReLU, batch 32) on the same 2,000 batches of
scikit-learn's digits, SGD with momentum 0.9, in the same process:

* optax, Python loop: one jitted step per iteration, the 64 configurations one after the other;
* optax, ``lax.scan``: one run compiled as a scan (its per-run time, times 64, is the sequential cost);
* ``gradtx.sweep``: the 64 configurations in one vmapped, compiled program (wall time of the call,
  compilation included, as a user experiences it).

Then the nine optimizers of the course: ``gradtx.compare`` (one program) against nine ``gradtx.fit`` calls.
Times are medians over repeats; results go to ``results.md`` next to this script.

    python experiments/sweeps/run.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import gradtx

HERE = Path(__file__).parent


def setup(steps: int, batch: int = 32):
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
    index = np.random.default_rng(0).integers(0, 1500, (steps, batch))
    return (x[:1500][index], y[:1500][index])


def init(key):
    keys = jax.random.split(key, 3)
    sizes = [64, 128, 128, 10]
    params = {}
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in)
        params[f"b{i}"] = jnp.zeros(n_out)
    return params


def loss_fn(p, batch):
    h, y = batch
    for i in range(3):
        h = h @ p[f"w{i}"] + p[f"b{i}"]
        h = jax.nn.relu(h) if i < 2 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


GROUP = 2  # configurations per group in the grouped sweep (the fastest of 1, 2, 4, 8 here)
OPTAX_TX = optax.inject_hyperparams(optax.sgd)(learning_rate=0.01, momentum=0.9)


@jax.jit
def optax_step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = OPTAX_TX.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


def optax_python_loop(lr, params, batches):
    """The loop users write: one jitted step per iteration, on batches from host (NumPy) arrays. The
    learning rate is injected into the state so that the 64 runs share one compiled step (compiled
    once, in the first run). (Indexing a device array per step instead costs 2-3x more here: every
    index is one more dispatched op.)"""
    state = OPTAX_TX.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    for i in range(len(batches[0])):
        params, state, loss = optax_step(params, state, (batches[0][i], batches[1][i]))
    return params, loss


def optax_scan(params, batches):
    tx = optax.sgd(0.01, momentum=0.9)

    @jax.jit
    def run(params, state, batches):
        def body(carry, batch):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        return jax.lax.scan(body, (params, state), batches)

    run(params, tx.init(params), batches)  # compile
    return [timed(lambda: run(params, tx.init(params), batches))[0] for _ in range(5)]


NINE = {
    "SGD": lambda: gradtx.sgd(0.01),
    "Momentum": lambda: gradtx.sgd(0.01, momentum=0.9),
    "NAG": lambda: gradtx.sgd(0.01, momentum=0.9, nesterov=True),
    "AdaGrad": lambda: gradtx.adagrad(0.01),
    "RMSProp": lambda: gradtx.rmsprop(0.001),
    "Adam": lambda: gradtx.adam(0.001),
    "AdaMax": lambda: gradtx.adamax(0.001),
    "Nadam": lambda: gradtx.nadam(0.001),
    "AdamW": lambda: gradtx.adamw(0.001, weight_decay=1e-5),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps and configurations")
    args = parser.parse_args()
    steps, n_configs, repeats = (400, 8, 1) if args.quick else (2000, 64, 3)
    batches = setup(steps)
    params = init(jax.random.PRNGKey(0))
    rates = np.logspace(-3, -0.5, n_configs)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    # optax Python loop, all configurations one after the other (the first run includes compilation).
    host_batches = jax.tree.map(np.asarray, batches)
    loop_time, _ = timed(lambda: [optax_python_loop(lr, params, host_batches) for lr in rates])
    scan_runs = optax_scan(params, batches)

    def gradtx_sweep(group_size):
        return gradtx.sweep(
            loss_fn,
            params,
            lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9),
            {"learning_rate": rates},
            batches,
            steps,
            group_size=group_size,
        ).history.loss

    sweep_times, grouped_times = [], []
    for _ in range(repeats):  # interleaved, so that load hits both alike
        sweep_times.append(timed(lambda: gradtx_sweep(None))[0])
        grouped_times.append(timed(lambda: gradtx_sweep(GROUP))[0])
    sweep_time, grouped_time = statistics.median(sweep_times), statistics.median(grouped_times)

    # The same factory object again: gradtx reuses the compiled program (a new lambda above, per
    # call, made every call above compile).
    factory = lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9)  # noqa: E731

    def again():
        return gradtx.sweep(loss_fn, params, factory, {"learning_rate": rates}, batches, steps).history.loss

    timed(again)
    cached_time = statistics.median(timed(again)[0] for _ in range(repeats))
    scan_time = statistics.median(scan_runs)

    say(f"# Sweeps: {n_configs} learning rates, digits MLP 64-128-128-10, batch 32, {steps} steps")
    say()
    say(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s); jax {jax.__version__}, "
        f"optax {optax.__version__}."
    )
    say()
    say(
        "| method | wall time (s) | per configuration (s) | `sweep` is faster by | "
        f"`sweep(group_size={GROUP})` is faster by |"
    )
    say("|---|---|---|---|---|")
    rows = [
        (f"optax, Python loop, {n_configs} runs in sequence", loop_time),
        (f"optax, `lax.scan`, one run x {n_configs} (compile excluded)", scan_time * n_configs),
        "`gradtx.sweep`, one vmap over all configurations (compile included)",
        f"`gradtx.sweep(group_size={GROUP})`, groups in sequence in one program (compile included)",
    ]
    rows[2:] = [
        (rows[2], sweep_time),
        (rows[3], grouped_time),
        ("`gradtx.sweep` called again with the same factory and loss (compiled program reused)", cached_time),
    ]
    for name, seconds in rows:
        say(
            f"| {name} | {seconds:.2f} | {seconds / n_configs:.3f} | {seconds / sweep_time:.1f}x | "
            f"{seconds / grouped_time:.1f}x |"
        )
    say()
    say(
        f"Calls ({repeats} each, medians quoted): `sweep` {', '.join(f'{t:.2f}' for t in sweep_times)} s; "
        f"`sweep(group_size={GROUP})` {', '.join(f'{t:.2f}' for t in grouped_times)} s; "
        f"optax scan runs {', '.join(f'{t:.3f}' for t in scan_runs)} s."
    )
    say()

    # The nine optimizers of the course: one program against nine separate runs.
    one_times, separate_times = [], []
    for _ in range(repeats):
        t, _ = timed(
            lambda: gradtx.compare(loss_fn, params, {k: make() for k, make in NINE.items()}, batches, steps)
        )
        one_times.append(t)
        t, _ = timed(lambda: [gradtx.fit(loss_fn, params, make(), batches, steps) for make in NINE.values()])
        separate_times.append(t)
    one, separate = statistics.median(one_times), statistics.median(separate_times)
    say("## The nine optimizers of the course")
    say()
    say("| method | wall time (s), compile included |")
    say("|---|---|")
    say(f"| `gradtx.compare`: nine optimizers in one program | {one:.2f} |")
    say(f"| nine `gradtx.fit` calls, one after the other | {separate:.2f} |")
    say()
    say(f"One program is {separate / one:.2f}x the speed of nine separate runs (medians of {repeats}).")
    if not args.quick:
        (HERE / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
