"""Adam with a bfloat16 first moment (``mu_dtype=jnp.bfloat16``): what it saves and what it costs.

Two measurements in one process:

* accuracy: the digits MLP (64-128-128-10) trained by Adam with the first moment in float32 and in
  bfloat16, at two learning rates, five seeds each, all in one `gradtx.compare` program; final training
  loss and validation accuracy, mean and std over seeds;
* speed and memory: one donated Adam step on a 16M-parameter leaf, float32 vs bfloat16 first moment,
  gradtx and optax (``optax.adam(mu_dtype=...)``), interleaved medians (helpers of ``run.py``).

    python experiments/bench/reduced_precision.py

Writes ``experiments/bench/reduced_precision.md``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import gradtx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from run import compile_step, runner, time_interleaved  # noqa: E402

# The digits MLP of the sweep benchmark (its ``run.py``, loaded by path: the name clashes with ours).
_spec = importlib.util.spec_from_file_location("sweeps_run", HERE.parent / "sweeps" / "run.py")
sweeps_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweeps_run)
init = sweeps_run.init

STEPS, BATCH, SEEDS, RATES = 3000, 32, 5, (1e-3, 3e-3)


def digits():
    x, y = load_digits(return_X_y=True)
    x = jnp.asarray(x / 16.0, jnp.float32)
    order = np.random.default_rng(0).permutation(len(y))
    train, valid = order[:1400], order[1400:]
    index = np.random.default_rng(1).integers(0, len(train), (STEPS, BATCH))
    return (x[train][index], jnp.asarray(y)[train][index]), (x[valid], jnp.asarray(y)[valid])


def logits(p, x):
    for i in range(3):
        x = x @ p[f"w{i}"] + p[f"b{i}"]
        x = jax.nn.relu(x) if i < 2 else x
    return x


def loss_fn(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()


def accuracy(lines):
    batches, (xv, yv) = digits()
    families = {
        f"{name}, lr {lr:g}": (
            lambda dtype=dtype, lr=lr: gradtx.adam(lr, mu_dtype=dtype),
            {"seed": np.arange(SEEDS)},
        )
        for lr in RATES
        for name, dtype in (("float32 m", None), ("bfloat16 m", jnp.bfloat16))
    }
    results = gradtx.compare(
        loss_fn, init, families,
        batches,
        STEPS,
        eval_fn=lambda p: {"accuracy": (logits(p, xv).argmax(-1) == yv).mean()},
        eval_every=STEPS,
    )
    lines += [
        f"## Accuracy: digits MLP 64-128-128-10, Adam, batch {BATCH}, {STEPS} steps, {SEEDS} seeds",
        "",
        "| first moment, learning rate | final training loss | validation accuracy | "
        "max abs param difference vs float32 m (same seed) |",
        "|---|---|---|---|",
    ]
    for name, result in results.items():
        loss = np.asarray(result.history.loss[:, -STEPS // 20 :].mean(1))
        acc = np.asarray(result.history.metrics["accuracy"][:, -1])
        reference = results[name.replace("bfloat16", "float32")].params
        pairs = zip(jax.tree.leaves(result.params), jax.tree.leaves(reference), strict=True)
        diff = max(float(jnp.abs(a - b).max()) for a, b in pairs)
        lines.append(
            f"| {name} | {loss.mean():.2e} ± {loss.std():.1e} | "
            f"{acc.mean():.4f} ± {acc.std():.4f} | {diff:.1e} |"
        )
    lines.append("")


def speed(lines, n=1 << 24, reps=30):
    params = {"w": jax.random.normal(jax.random.key(0), (n,))}
    grads = {"w": 1e-2 * jax.random.normal(jax.random.key(1), (n,))}
    txs = {
        "gradtx, float32 m": gradtx.adam(1e-3),
        "gradtx, bfloat16 m": gradtx.adam(1e-3, mu_dtype=jnp.bfloat16),
        "optax, float32 m": optax.adam(1e-3, eps=1e-7),
        "optax, bfloat16 m": optax.adam(1e-3, eps=1e-7, mu_dtype=jnp.bfloat16),
    }
    compiled = {k: compile_step(tx, params, grads) for k, tx in txs.items()}
    runs = [runner(compiled[k][0], params, tx.init(params), grads) for k, tx in txs.items()]
    times = time_interleaved(runs, reps)
    lines += [
        f"## One donated Adam step on a {n / 2**20:.0f}M-parameter leaf (median of {reps}, interleaved)",
        "",
        "| optimizer | step ms | vs gradtx float32 m | state MiB | peak MiB (memory analysis) |",
        "|---|---|---|---|---|",
    ]
    for (name, tx), t in zip(txs.items(), times, strict=True):
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(tx.init(params)))
        lines.append(
            f"| {name} | {1e3 * t:.2f} | {t / times[0]:.2f}x | {state_bytes / 2**20:.0f} | "
            f"{compiled[name][2]['peak'] / 2**20:.0f} |"
        )
    lines.append("")


def main():
    start = time.perf_counter()
    lines = [
        "# Adam with a bfloat16 first moment",
        "",
        "Written by `experiments/bench/reduced_precision.py`. "
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].platform}; jax {jax.__version__}, optax {optax.__version__}.",
        "",
    ]
    accuracy(lines)
    speed(lines)
    lines.append(f"Run time {time.perf_counter() - start:.0f} s.")
    (HERE / "reduced_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
