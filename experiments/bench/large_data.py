"""Large data in `gradtx.fit`: arrays passed to the compiled program as an argument, against a batch
function that closes over the same arrays (which compiles them in as constants). Writes
``large_data.md``.

A softmax regression on random 784-feature inputs, 100 steps of batch 32, data of 24 to 192 MiB;
the wall time of a whole `fit` call (compilation included, as a user experiences it), median of 3.

    python experiments/bench/large_data.py
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import gradtx

STEPS, BATCH, FEATURES = 100, 32, 784


def loss_fn(params, batch):
    x, y = batch
    logits = x @ params["w"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


def seconds(data) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        result = gradtx.fit(loss_fn, {"w": jnp.zeros((FEATURES, 10))}, gradtx.sgd(0.01), data, STEPS)
        jax.block_until_ready(result.params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rows = []
    for batches in [250, 1000, 2000]:
        x = jax.block_until_ready(jax.random.normal(jax.random.key(0), (batches, BATCH, FEATURES)))
        y = jnp.zeros((batches, BATCH), jnp.int32)
        as_argument = seconds((x, y))
        as_constant = seconds(lambda step, key, x=x, y=y, n=batches: (x[step % n], y[step % n]))
        rows.append((x.nbytes / 2**20, as_argument, as_constant))
        print(f"{rows[-1][0]:.0f} MiB: arrays {as_argument:.2f} s, closed over {as_constant:.2f} s")
    lines = [
        "# Large data in `fit`: an argument of the program, not a constant",
        "",
        f"Written by `experiments/bench/large_data.py`. {os.cpu_count()} cores, {jax.devices()[0].platform}; "
        f"jax {jax.__version__}. Softmax regression, {STEPS} steps of batch {BATCH}; wall time of a `fit` "
        "call including compilation, median of 3.",
        "",
        "| data (MiB) | arrays given to `fit` (s) | a batch function closing over them (s) | ratio |",
        "|---|---|---|---|",
        *(f"| {mib:.0f} | {a:.2f} | {c:.2f} | {c / a:.1f}x |" for mib, a, c in rows),
        "",
        "`fit` passes data arrays (and `shuffled_batches`) to its compiled chunks as arguments; arrays a",
        "batch function closes over are compiled into the program as constants, which costs time in",
        "proportion to their size.",
    ]
    Path(__file__).with_name("large_data.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
