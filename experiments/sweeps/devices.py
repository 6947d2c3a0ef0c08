"""Sweep throughput on 1, 2, 4 and 8 simulated CPU devices (``--xla_force_host_platform_device_count``).

The simulated devices share the machine's cores, so no speed-up is expected: this checks that the
sharded sweep gives the same result, costs no more than the one-device run, and that each device holds
only its share of the configurations (bytes of params + optimizer state per device). Each device count
runs in its own process, because the count is fixed when JAX starts. Writes ``devices.md``.

    python experiments/sweeps/devices.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent

WORKER = """
import json, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from run import init, loss_fn, setup
import gradtx

steps, rates = 500, np.logspace(-3, -0.5, 64)
batches = setup(steps)
params = init(jax.random.PRNGKey(0))

def sweep():
    return gradtx.sweep(
        loss_fn, params, lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9),
        {"learning_rate": rates}, batches, steps, mesh=jax.devices(),
    )

times = []
for _ in range(3):
    start = time.perf_counter()
    result = sweep()
    jax.block_until_ready(result.history.loss)
    times.append(time.perf_counter() - start)
# Bytes of params + optimizer state held by device 0, in the carry the sweep trains.
from gradtx.sweeps import _config_sharding, _member
from gradtx.training import initial_runs, plan
member = _member("devices", lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9),
                 {"learning_rate": rates}, params, _config_sharding(jax.devices()))
p, _ = plan("devices", loss_fn, batches, steps, None, None, None, None, 1, (member.family,))
(carry,) = initial_runs("devices", p, (member.configs,), (member.params,), (None,), (member.sharding,))
per_device = sum(
    s.data.nbytes for leaf in jax.tree.leaves(carry[:2]) for s in leaf.addressable_shards
    if s.device == jax.devices()[0]
)
print(json.dumps({"devices": jax.device_count(), "median_s": statistics.median(times), "times": times,
                  "loss": np.asarray(result.history.loss).tolist(),
                  "bytes_device0": per_device}))
"""


def main():
    rows = []
    for n in (1, 2, 4, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(HERE)], env=env, capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1]["devices"], "devices:", f"{rows[-1]['median_s']:.2f} s", flush=True)
    base = rows[0]
    rates = np.logspace(-3, -0.5, 64)
    lines = [
        "# Sweep on 1, 2, 4, 8 simulated CPU devices",
        "",
        "64 learning rates, digits MLP 64-128-128-10, SGD + momentum 0.9, batch 32, 500 steps; wall time of",
        "`gradtx.sweep(..., mesh=jax.devices())` including compilation, median of 3. Machine: "
        f"{os.cpu_count()} cores shared by all the simulated devices. The wall time can still fall with "
        "more simulated devices: each runs its share of the program on its own thread, which keeps both "
        "cores busy; it says nothing about real devices.",
        "",
        "| devices | wall time (s) | vs 1 device | params + state on device 0 (MiB) "
        "| max loss difference vs 1 device, first 20 steps | runs with final loss within 1e-4 of 1 device "
        "| of those with rate < 0.05 |",
        "|---|---|---|---|---|---|---|",
    ]
    base_loss = np.asarray(base["loss"])
    final = slice(-20, None)
    small = rates < 0.05
    for r in rows:
        loss = np.asarray(r["loss"])
        early = np.abs(loss[:, :20] - base_loss[:, :20]).max()
        agree = np.abs(loss[:, final].mean(1) - base_loss[:, final].mean(1)) <= 1e-4
        lines.append(
            f"| {r['devices']} | {r['median_s']:.2f} | {r['median_s'] / base['median_s']:.2f}x | "
            f"{r['bytes_device0'] / 2**20:.2f} | {early:.1e} | {agree.sum()} / 64 | "
            f"{agree[small].sum()} / {small.sum()} |"
        )
    lines += [
        "",
        "Why some runs differ. A different number of configurations per device changes how XLA's CPU "
        "backend blocks the batched matmuls, so the float32 sums round differently (the first 20 steps "
        "agree to the printed difference). Runs at small rates stay on the same trajectory; at the "
        "largest rates (momentum 0.9, rate above about 0.05) training sits at the edge of stability and "
        "rounding differences grow until the final losses differ, in either direction. "
        "`tests/test_sharding.py` checks equality to rounding on short runs.",
        "",
        "The bytes held per device fall as 1/devices: each device keeps only its configurations' params "
        "and optimizer state. When a GPU or TPU machine is available the same script with real devices "
        "measures the speed-up.",
    ]
    (HERE / "devices.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
