"""The engine before and after its rebuild, and the cost of checkpointing, on the digits sweep.

Two measurements, each in fresh processes so that compilation is counted as a user meets it:

1. Before/after: the 64-rate sweep of ``experiments/sweeps/`` (digits MLP 64-128-128-10, SGD with
   momentum 0.9, batch 32, 2,000 steps) and the nine optimizers in one ``compare`` (500 steps), with
   the engine of commit ``BEFORE`` (checked out into a temporary git worktree) and with this checkout,
   alternating between the two, medians over repeats. Reported: the first call (compilation
   included), a second call with the same functions (the program reused) and their difference (about
   the compile time).
2. Checkpoint overhead: the same sweep in 10 chunks with and without ``checkpoint_dir``; the overhead
   per chunk against the time of a chunk (goal: under 5%).

    python experiments/engine/run.py [--repeats 5]

Results go to ``results.md`` next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
BEFORE = "0d61404"  # the last commit of the old engine (training.py + sweeps.py with _Program)

WORKER = r"""
import json, sys, tempfile, time, inspect
import jax, jax.numpy as jnp, numpy as np, optax
from sklearn.datasets import load_digits
import gradtx

mode = sys.argv[1]
x, y = load_digits(return_X_y=True)
x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
steps = 2000 if mode != "compare" else 500
index = np.random.default_rng(0).integers(0, 1500, (steps, 32))
data = (x[:1500][index], y[:1500][index])

def init(key):
    keys = jax.random.split(key, 3)
    sizes = [64, 128, 128, 10]
    params = {}
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        params[f"w{i}"] = jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in)
        params[f"b{i}"] = jnp.zeros(n_out)
    return params

def loss_fn(p, batch):
    h, y = batch
    for i in range(3):
        h = h @ p[f"w{i}"] + p[f"b{i}"]
        h = jax.nn.relu(h) if i < 2 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

params = init(jax.random.PRNGKey(0))
new_order = list(inspect.signature(gradtx.sweep).parameters)[0] == "loss_fn"
make = lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9)
configs = {"learning_rate": np.logspace(-3, -0.5, 64)}

def sweep(**kw):
    if new_order:
        return gradtx.sweep(loss_fn, params, make, configs, data, steps, **kw)
    return gradtx.sweep(make, configs, loss_fn, params, data, steps, **kw)

nine = {"sgd": gradtx.sgd(0.01), "momentum": gradtx.sgd(0.01, momentum=0.9),
        "nag": gradtx.sgd(0.01, momentum=0.9, nesterov=True), "adagrad": gradtx.adagrad(0.01),
        "rmsprop": gradtx.rmsprop(0.001), "adam": gradtx.adam(0.001), "adamax": gradtx.adamax(0.001),
        "nadam": gradtx.nadam(0.001), "adamw": gradtx.adamw(0.001)}

def compare():
    if new_order:
        return gradtx.compare(loss_fn, params, nine, data, steps)
    return gradtx.compare(nine, loss_fn, params, data, steps)

def timed(fn):
    start = time.perf_counter()
    out = fn()
    results = out.values() if isinstance(out, dict) else [out]
    # A SweepResult is not a pytree: wait on its arrays, or the time would stop at the dispatch.
    jax.block_until_ready([(r.params, r.opt_state, r.history.loss) for r in results])
    return time.perf_counter() - start

if mode == "sweep":
    first, second = timed(sweep), timed(sweep)
    print(json.dumps({"first": first, "second": second}))
elif mode == "compare":
    first, second = timed(compare), timed(compare)
    print(json.dumps({"first": first, "second": second}))
elif mode == "checkpoint":
    import gradtx.checkpoints as ckpt

    saves = []
    original = ckpt.Checkpoints.save

    def timed_save(self, *args):  # the time the driver spends in each save, measured directly
        start = time.perf_counter()
        original(self, *args)
        saves.append(time.perf_counter() - start)

    ckpt.Checkpoints.save = timed_save
    timed(lambda: sweep(chunks=10))  # compile once for both
    plain = timed(lambda: sweep(chunks=10))
    with tempfile.TemporaryDirectory() as d:
        saved = timed(lambda: sweep(chunks=10, checkpoint_dir=d))
    print(json.dumps({"plain": plain, "checkpointed": saved, "saves": saves}))
"""


def run(mode: str, package: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(package)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode], env=env, cwd=tempfile.gettempdir(),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only-checkpoint", action="store_true", help="rerun the checkpoint part only")
    args = parser.parse_args()
    if args.only_checkpoint:
        previous = (HERE / "results.md").read_text().split("\n## Checkpoint overhead")[0]
        checkpoint = [run("checkpoint", ROOT) for _ in range(args.repeats)]
        (HERE / "results.md").write_text(previous + checkpoint_section(checkpoint))
        print(checkpoint_section(checkpoint))
        return
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "-q", str(before), BEFORE], cwd=ROOT, check=True)
        try:
            samples = {(m, v): [] for m in ("sweep", "compare") for v in ("before", "after")}
            for _ in range(args.repeats):
                for mode in ("sweep", "compare"):
                    for version, package in (("before", before), ("after", ROOT)):
                        samples[mode, version].append(run(mode, package))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=True)
    checkpoint = [run("checkpoint", ROOT) for _ in range(args.repeats)]
    write(samples, checkpoint, args.repeats)


def write(samples: dict, checkpoint: list, repeats: int) -> None:
    import jax

    med = lambda xs: statistics.median(xs)  # noqa: E731
    lines = [
        "# The engine before and after its rebuild; the cost of checkpointing",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}. Each number is the "
        f"median of {repeats} fresh processes, the two engines alternating (commit `{BEFORE}` before).",
        "",
        "| workload | engine | first call, compile included (s) | second call (s) | difference (s) |",
        "|---|---|---|---|---|",
    ]
    names = {"sweep": "64-rate sweep, 2,000 steps", "compare": "nine optimizers, `compare`, 500 steps"}
    for mode in ("sweep", "compare"):
        for version in ("before", "after"):
            first = med([s["first"] for s in samples[mode, version]])
            second = med([s["second"] for s in samples[mode, version]])
            lines.append(f"| {names[mode]} | {version} | {first:.2f} | {second:.2f} | {first - second:.2f} |")
    for mode in ("sweep", "compare"):
        pairs = list(zip(samples[mode, "after"], samples[mode, "before"], strict=True))
        ratio = med([a["first"] / b["first"] for a, b in pairs])
        ratio2 = med([a["second"] / b["second"] for a, b in pairs])
        lines.append("")
        lines.append(f"{names[mode]}: after / before = {ratio:.2f} (first call), {ratio2:.2f} (second call).")
    (HERE / "results.md").write_text("\n".join(lines) + "\n" + checkpoint_section(checkpoint))
    print("\n".join(lines))


def checkpoint_section(checkpoint: list) -> str:
    med = statistics.median
    plain = med([c["plain"] for c in checkpoint])
    saved = med([c["checkpointed"] for c in checkpoint])
    per_save = med([s for c in checkpoint for s in c["saves"]])
    share = med([sum(c["saves"]) / c["plain"] for c in checkpoint])
    lines = [
        "",
        "## Checkpoint overhead (the 64-rate sweep in 10 chunks, program compiled beforehand)",
        "",
        "| | wall time (s), median |",
        "|---|---|",
        f"| without `checkpoint_dir` | {plain:.2f} |",
        f"| with `checkpoint_dir` (one .npz written, fsynced and renamed after each chunk) | {saved:.2f} |",
        "",
        f"Time spent saving, measured inside the driver: {per_save * 1000:.0f} ms per save (median), "
        f"{share * 100:.1f}% of the training time without checkpoints (median over runs), against "
        f"{plain / 10 * 1000:.0f} ms of training per chunk. Goal: under 5%. The wall times of whole runs "
        "move by more than that between runs on this shared machine, so the saves are timed directly. "
        f"Raw: {json.dumps(checkpoint)}",
        "",
    ]
    return "\n".join(lines)
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
