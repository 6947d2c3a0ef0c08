"""How fast can a 64-rate sweep be on this CPU? A floor for the sweep of ``run.py``, measured.

The sweep's work is 64 x 2,000 gradient steps of the digits MLP. This script times the part no
sweep implementation can skip, the forward and backward pass, vmapped over 64 configurations (each
with its own params) and scanned over 200 steps, with no optimizer and no data gathering, and
compares it with the same pass for one configuration, with XLA's matmul rates, and with the budget
the issue's goal sets (a quarter of the optax Python-loop time per configuration, from
``results.md``). Writes ``floor.md``.

    python experiments/sweeps/floor.py
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from run import init, loss_fn, setup  # the same model and data as the benchmark

HERE = Path(__file__).parent
CONFIGS, STEPS = 64, 200


def seconds(fn, *args, reps: int) -> float:
    """Median wall time of a compiled call (compiled and warmed up first)."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gradient_scan(params, batches):
    """STEPS forward+backward passes; the gradients are summed so that none is dead code."""

    def body(total, batch):
        grads = jax.grad(loss_fn)(params, batch)
        return jax.tree.map(jnp.add, total, grads), None

    return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), batches)[0]


def main() -> None:
    batches = setup(STEPS)
    one = init(jax.random.key(0))
    many = jax.vmap(init)(jax.random.split(jax.random.key(0), CONFIGS))
    step_flops = jax.jit(jax.grad(loss_fn)).lower(one, jax.tree.map(lambda b: b[0], batches))
    flops = step_flops.compile().cost_analysis()["flops"]  # XLA's count for one step, one config

    t_one = seconds(gradient_scan, one, batches, reps=5) / STEPS
    t_many = seconds(jax.vmap(gradient_scan, in_axes=(0, None)), many, batches, reps=3) / STEPS
    n = 2048
    a = jnp.ones((n, n))
    big = 2 * n**3 / seconds(lambda a: a @ a, a, reps=10)
    x, w = jnp.ones((CONFIGS, 32, 128)), jnp.ones((CONFIGS, 128, 128))
    batched = (
        2 * CONFIGS * 32 * 128 * 128 / seconds(lambda x, w: jnp.einsum("cbi,cio->cbo", x, w), x, w, reps=200)
    )

    text = (HERE / "results.md").read_text()
    loop = float(re.search(r"Python loop, 64 runs in sequence \| [\d.]+ \| ([\d.]+)", text).group(1))
    budget = loop / 4 / 2000  # seconds per configuration and step for the 4x goal
    per_config = t_many / CONFIGS
    rows = [
        ("forward+backward, one configuration (scan)", t_one, flops / t_one),
        (f"forward+backward, {CONFIGS} configurations vmapped (scan), per configuration",
         per_config, flops / per_config),
        ("the 4x goal's budget for a whole step (a quarter of optax's Python loop, `results.md`)",
         budget, flops / budget),
    ]  # fmt: skip
    cpuinfo = Path("/proc/cpuinfo")
    models = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    lines = [
        "# A floor for the 64-rate sweep on this CPU",
        "",
        f"Written by `experiments/sweeps/floor.py`. Machine: {models[0] if models else '?'}, "
        f"{os.cpu_count()} cores, "
        f"{jax.devices()[0].platform}; jax {jax.__version__}. One step of one configuration is "
        f"{flops / 1e6:.2f} MFLOP (XLA's cost analysis of the gradient, batch 32).",
        "",
        "| what | microseconds per configuration and step | GFLOP/s |",
        "|---|---|---|",
        *(f"| {name} | {1e6 * t:.1f} | {rate / 1e9:.0f} |" for name, t, rate in rows),
        "",
        f"XLA's matmul on this machine: {big / 1e9:.0f} GFLOP/s for one 2048x2048 product, "
        f"{batched / 1e9:.0f} GFLOP/s for {CONFIGS} products of (32, 128) x (128, 128) "
        "(the hidden layer's shape, vmapped).",
        "",
        f"The gradient alone, vmapped, takes {per_config / budget:.2f}x the goal's budget for the "
        "whole step (gradient, optimizer, data, history).",
    ]
    (HERE / "floor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
