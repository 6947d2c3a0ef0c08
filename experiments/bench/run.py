"""Optimizer step time, compile time and memory: every gradtx optimizer against its optax counterpart.

Everything is measured in one process, interleaved (gradtx step, optax step, gradtx step, ...), so
that load from other processes hits both alike; the results are medians and ratios. Each step is
``params, state = step(params, state, grads)``, jitted with params and state donated, warmed up.
The machine's bandwidth is measured in the same run (donated elementwise kernels), and each step is
also reported against the time it would take to move its bytes at that bandwidth.

    python experiments/bench/run.py            # full sizes (about 15 minutes on 2 cores)
    python experiments/bench/run.py --quick    # small sizes, to check that it runs

Writes ``experiments/bench/results.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import gradtx

LR = 1e-3
Tree = dict[str, jax.Array]

# name, gradtx optimizer, optax optimizer with the same hyperparameters, bytes moved per float32
# parameter at the limit (each array read once and written once: params, grads, and the moments).
OPTIMIZERS: list[tuple[str, Callable, Callable, int]] = [
    ("sgd", lambda: gradtx.sgd(LR), lambda: optax.sgd(LR), 12),
    ("sgd momentum", lambda: gradtx.sgd(LR, 0.9), lambda: optax.sgd(LR, 0.9), 20),
    ("nesterov", lambda: gradtx.sgd(LR, 0.9, True), lambda: optax.sgd(LR, 0.9, nesterov=True), 20),
    (
        "adagrad",
        lambda: gradtx.adagrad(LR),
        lambda: optax.adagrad(LR, initial_accumulator_value=0.1, eps=1e-7),
        20,
    ),
    ("rmsprop", lambda: gradtx.rmsprop(LR), lambda: optax.rmsprop(LR, decay=0.9, eps=1e-7), 20),
    ("adam", lambda: gradtx.adam(LR), lambda: optax.adam(LR, eps=1e-7), 28),
    ("adamax", lambda: gradtx.adamax(LR), lambda: optax.adamax(LR, eps=1e-7), 28),
    ("nadam", lambda: gradtx.nadam(LR), lambda: optax.nadam(LR, eps=1e-7), 28),
    (
        "adamw",
        lambda: gradtx.adamw(LR, 0.004),
        lambda: optax.adamw(LR, eps=1e-7, weight_decay=0.004),
        28,
    ),
]


# --- trees -------------------------------------------------------------------------------------


def one_leaf(n: int) -> dict[str, tuple[int, ...]]:
    return {"w": (n,)}


def transformer(layers: int, d: int, vocab: int, context: int) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a GPT-style decoder (biases, two layer norms per block)."""
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, d), "position": (context, d)}
    for i in range(layers):
        block = {
            "qkv/w": (d, 3 * d), "qkv/b": (3 * d,), "proj/w": (d, d), "proj/b": (d,),
            "ln1/scale": (d,), "ln1/bias": (d,), "ln2/scale": (d,), "ln2/bias": (d,),
            "fc1/w": (d, 4 * d), "fc1/b": (4 * d,), "fc2/w": (4 * d, d), "fc2/b": (d,),
        }  # fmt: skip
        shapes.update({f"block{i:02d}/{k}": s for k, s in block.items()})
    shapes.update({"ln_f/scale": (d,), "ln_f/bias": (d,)})
    return shapes


def many_leaves(n: int, d: int = 64) -> dict[str, tuple[int, ...]]:
    """``n`` small leaves: blocks of an MLP (kernel, bias, two norms), 6 distinct shapes."""
    cycle = [(d, d), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return {f"leaf{i:05d}": cycle[i % len(cycle)] for i in range(n)}


def materialize(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> Tree:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        k: scale * jax.random.normal(key, s, jnp.float32)
        for key, (k, s) in zip(keys, shapes.items(), strict=True)
    }


def size(tree: Tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# --- measuring ---------------------------------------------------------------------------------


def step_fn(tx: gradtx.Transformation) -> Callable:
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def compile_step(tx, params: Tree, grads: Tree) -> tuple[Callable, float, dict]:
    """A fresh jitted, donated step; its lower+compile wall time; its memory analysis."""
    state = tx.init(params)
    start = time.perf_counter()
    compiled = jax.jit(step_fn(tx), donate_argnums=(0, 1)).lower(params, state, grads).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    mem = {
        "temp": memory.temp_size_in_bytes,
        # Live at once: the arguments, the outputs not written in place, the scratch buffers.
        "peak": memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes,
    }
    return compiled, seconds, mem


def time_interleaved(runners: list[Callable[[], None]], reps: int, warmup: int = 3) -> list[float]:
    """Median seconds of each runner, the runners taking turns so that noise hits all alike."""
    for run in runners:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(reps):
        for run, ts in zip(runners, times, strict=True):
            start = time.perf_counter()
            run()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def runner(compiled: Callable, params: Tree, state, grads: Tree) -> Callable[[], None]:
    # Copies, because the compiled step donates (deletes) the buffers it is given.
    box = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state)]

    def run() -> None:
        box[0], box[1] = compiled(box[0], box[1], grads)
        jax.block_until_ready(box[0])

    return run


def bandwidth(n: int, reps: int) -> dict[str, float]:
    """Bytes per second of donated elementwise kernels on ``n`` float32 elements: a scale (read 4 B,
    write 4 B per element) and a triad ``a <- b + s*c`` (read 8 B, write 4 B)."""
    scale = jax.jit(lambda x: x * 1.0000001, donate_argnums=0)
    # keep_unused: ``a`` is only the buffer the result is written into; pruned, it would not be donated.
    triad = jax.jit(lambda a, b, c: b + 0.5 * c, donate_argnums=0, keep_unused=True)
    x, a = jnp.ones(n), jnp.zeros(n)
    b, c = jnp.ones(n), jnp.full(n, 2.0)
    box = {"x": x, "a": a}

    def run_scale() -> None:
        box["x"] = scale(box["x"])
        box["x"].block_until_ready()

    def run_triad() -> None:
        box["a"] = triad(box["a"], b, c)
        box["a"].block_until_ready()

    t_scale, t_triad = time_interleaved([run_scale, run_triad], reps)
    return {"scale": 8 * n / t_scale, "triad": 12 * n / t_triad}


# --- the benchmark -----------------------------------------------------------------------------


def bench_steps(trees: dict[str, dict], reps: int, bw: float, log) -> list[dict]:
    rows = []
    for tree_name, shapes in trees.items():
        params, grads = materialize(shapes, 0), materialize(shapes, 1, 1e-2)
        n = size(params)
        log(f"## {tree_name}: {len(shapes)} leaves, {n / 1e6:.1f}M params")
        for name, make_g, make_o, bytes_per in OPTIMIZERS:
            txs = {"gradtx": make_g(), "grouped": gradtx.grouped(make_g()), "optax": make_o()}
            compiled = {k: compile_step(tx, params, grads) for k, tx in txs.items()}
            runs = [runner(compiled[k][0], params, txs[k].init(params), grads) for k in txs]
            t = dict(zip(txs, time_interleaved(runs, reps), strict=True))
            limit = bytes_per * n / bw
            row = {
                "tree": tree_name, "optimizer": name, "limit_ms": 1e3 * limit,
                **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                **{f"{k}_peak_mb": compiled[k][2]["peak"] / 2**20 for k in txs},
                **{f"{k}_temp_mb": compiled[k][2]["temp"] / 2**20 for k in txs},
            }  # fmt: skip
            rows.append(row)
            log(
                f"{name:13s} gradtx {row['gradtx_ms']:8.2f} ms  grouped {row['grouped_ms']:8.2f}  "
                f"optax {row['optax_ms']:8.2f}  ratio {t['gradtx'] / t['optax']:.2f}  "
                f"vs limit {t['gradtx'] / limit:.2f}"
            )
            del compiled, runs
    return rows


def trivial(params, state, grads):
    return jax.tree.map(lambda p, g: p - LR * g, params, grads), state


def bench_compile(leaf_counts: list[int], repeats: int, log) -> list[dict]:
    """Lower+compile wall time of a donated step; the fastest of ``repeats`` (load only adds)."""
    rows = []
    for n in leaf_counts:
        params = materialize(many_leaves(n), 0)
        variants: dict[str, Callable[[Tree], float]] = {
            "trivial p - lr*g": lambda p: _compile_seconds(trivial, p, ()),
            "gradtx adam": lambda p: compile_step(gradtx.adam(LR), p, p)[1],
            "gradtx grouped(adam)": lambda p: compile_step(gradtx.grouped(gradtx.adam(LR)), p, p)[1],
            "optax adam": lambda p: compile_step(optax.adam(LR), p, p)[1],
        }
        best = {k: float("inf") for k in variants}
        for _ in range(repeats):
            for k, measure in variants.items():
                best[k] = min(best[k], measure(params))
                log(f"{n} leaves  {k:22s} {best[k]:6.2f} s")
        rows.append({"leaves": n, **best})
    return rows


def _compile_seconds(fn: Callable, params: Tree, state) -> float:
    # A new function object each time, so that no cache of jax answers instead of XLA.
    fresh = lambda p, s, g: fn(p, s, g)  # noqa: E731
    start = time.perf_counter()
    jax.jit(fresh, donate_argnums=(0, 1)).lower(params, state, params).compile()
    return time.perf_counter() - start


# --- report ------------------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"- device: {jax.devices()[0].device_kind} ({jax.default_backend()})"
        + ("; no GPU was available" if jax.default_backend() == "cpu" else ""),
        f"- python {platform.python_version()}, jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
        f"optax {optax.__version__}, gradtx {gradtx.__version__}",
        f"- load average at the end of the run: {', '.join(f'{x:.2f}' for x in load)}",
    ]


def write(out: Path, notes: Path | None, raw: dict) -> None:
    quick, bw, steps, compiles, seconds = (
        raw[k] for k in ("quick", "bandwidth", "steps", "compiles", "seconds")
    )
    lines = [
        "# Benchmark: gradtx vs optax, step time, compile time, memory",
        "",
        f"Written by `experiments/bench/run.py{' --quick' if quick else ''}` in {seconds / 60:.1f} min "
        f"(raw numbers: `{out.with_suffix('.json').name}`).",
        "",
        *raw["machine"],
        "",
        "## Bandwidth (same run)",
        "",
        f"- donated scale `x <- c*x`: {bw['scale'] / 1e9:.1f} GB/s (8 B per element)",
        f"- donated triad `a <- b + s*c`: {bw['triad'] / 1e9:.1f} GB/s (12 B per element)",
        "- the limit below uses the faster of the two (the machine can at least do that)",
        "",
        "## Step time (median of interleaved steps, jitted, donated)",
        "",
        "`gradtx` is the default (per-leaf) mode, `grouped` is `gradtx.grouped(optimizer)`. "
        "`vs optax` = gradtx / optax; `vs limit` = gradtx / (bytes moved at the measured bandwidth: "
        "12 B per parameter for SGD, 20 with one moment, 28 with two).",
        "",
        "| tree | optimizer | gradtx ms | grouped ms | optax ms | gradtx vs optax | grouped vs optax "
        "| gradtx vs limit | peak MB gradtx / grouped / optax |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        lines.append(
            f"| {r['tree']} | {r['optimizer']} | {r['gradtx_ms']:.2f} | {r['grouped_ms']:.2f} "
            f"| {r['optax_ms']:.2f} | {r['gradtx_ms'] / r['optax_ms']:.2f} "
            f"| {r['grouped_ms'] / r['optax_ms']:.2f} | {r['gradtx_ms'] / r['limit_ms']:.2f} "
            f"| {r['gradtx_peak_mb']:.0f} / {r['grouped_peak_mb']:.0f} / {r['optax_peak_mb']:.0f} |"
        )
    lines += [
        "",
        "## Compile time (lower + compile, donated step, fastest of the repeats)",
        "",
        "| leaves | trivial p - lr*g s | gradtx adam s | gradtx grouped(adam) s | optax adam s "
        "| grouped / optax | grouped / trivial | gradtx / optax |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in compiles:
        g, o, t, f = r["gradtx grouped(adam)"], r["optax adam"], r["trivial p - lr*g"], r["gradtx adam"]
        lines.append(
            f"| {r['leaves']} | {t:.2f} | {f:.2f} | {g:.2f} | {o:.2f} | {g / o:.2f} | {g / t:.2f} "
            f"| {f / o:.2f} |"
        )
    lines += ["", notes.read_text() if notes and notes.exists() else ""]
    out.write_text("\n".join(lines).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    parser.add_argument("--notes", type=Path, default=Path(__file__).with_name("notes.md"))
    parser.add_argument("--reps", type=int, default=None, help="timed steps per optimizer")
    parser.add_argument("--skip-steps", action="store_true", help="only the compile times")
    parser.add_argument("--render", action="store_true", help="rewrite --out from its .json, no run")
    args = parser.parse_args()
    if args.render:
        write(args.out, args.notes, json.loads(args.out.with_suffix(".json").read_text()))
        return
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True, file=sys.stderr)

    if args.quick:
        trees = {
            "one 1M leaf": one_leaf(1 << 20),
            "transformer d=128": transformer(12, 128, 1024, 128),
            "256 small leaves": many_leaves(256),
        }
        reps, leaf_counts, repeats, bw_n = args.reps or 20, [256], 1, 1 << 22
    else:
        trees = {
            "one 16M leaf": one_leaf(1 << 24),
            "transformer-12 d=384": transformer(12, 384, 8192, 512),
            "2,048 small leaves": many_leaves(2048),
        }
        reps, leaf_counts, repeats, bw_n = args.reps or 25, [1024, 2048], 2, 1 << 25
    bw = bandwidth(bw_n, reps)
    log(f"bandwidth: scale {bw['scale'] / 1e9:.1f} GB/s, triad {bw['triad'] / 1e9:.1f} GB/s")
    steps = [] if args.skip_steps else bench_steps(trees, reps, max(bw.values()), log)
    compiles = bench_compile(leaf_counts, repeats, log)
    raw = {
        "quick": args.quick, "machine": machine(), "bandwidth": bw, "steps": steps,
        "compiles": compiles, "seconds": time.perf_counter() - start,
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    write(args.out, args.notes, raw)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
