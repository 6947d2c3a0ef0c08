"""Step time of Keras's base-optimizer options in gradtx, against plain Adam and against the optax chain
that does the same thing; the gradient-accumulation micro-step against a full step; and the
micro-step of a vmapped sweep (configurations at the same micro-step, and at different ones).

Method (as `run.py`): one process, every step jitted with params and state donated and warmed up;
the variants take turns (gradtx, optax, gradtx, ...) so that load from other processes hits both
alike; medians over the repeats, ratios within the same run.

    python experiments/bench/options.py            # about 5 minutes on 2 cores
    python experiments/bench/options.py --quick    # small sizes, to check that it runs

Writes ``experiments/bench/options.md`` (``--out`` to change) and its raw numbers (``.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from run import machine, materialize, one_leaf, size, transformer

import gradtx

LR, K, EMA = 1e-3, 4, 0.99


def adam_step(tx) -> Callable:
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def optax_ema_step(tx) -> Callable:
    """optax has no EMA of the params among its transformations: it is kept next to the state and
    updated in the training step, ``ema <- EMA*ema + (1 - EMA)*params``."""

    def step(params, state, grads):
        opt_state, ema = state
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, (opt_state, optax.incremental_update(params, ema, 1 - EMA))

    return step


def optax_ema_init(tx) -> Callable:
    return lambda params: (tx.init(params), jax.tree.map(jnp.copy, params))


# name -> (gradtx optimizer, optax counterpart or None, note on the counterpart)
def variants() -> dict[str, tuple]:
    adam = lambda: optax.adam(LR, eps=1e-7)  # noqa: E731
    return {
        "adam, no option": (gradtx.adam(LR), adam(), ""),
        "clipvalue=0.1": (gradtx.adam(LR, clipvalue=0.1), optax.chain(optax.clip(0.1), adam()), "clip"),
        "clipnorm=1 (per tensor)": (
            gradtx.adam(LR, clipnorm=1.0),
            optax.chain(optax.clip_by_block_rms(1.0), adam()),
            "clip_by_block_rms (per-tensor RMS: the same passes; optax has no per-tensor norm clip)",
        ),
        "global_clipnorm=1": (
            gradtx.adam(LR, global_clipnorm=1.0),
            optax.chain(optax.clip_by_global_norm(1.0), adam()),
            "clip_by_global_norm",
        ),
        "weight_decay=0.004": (
            gradtx.adam(LR, weight_decay=0.004),
            optax.adamw(LR, eps=1e-7, weight_decay=0.004),
            "adamw",
        ),
        "loss_scale_factor=1024": (
            gradtx.adam(LR, loss_scale_factor=1024.0),
            optax.chain(optax.scale(1 / 1024), adam()),
            "scale(1/1024)",
        ),
        "use_ema": (gradtx.adam(LR, use_ema=True, ema_momentum=EMA), "ema", "adam + incremental_update"),
        "use_ema, overwrite every 100": (
            gradtx.adam(LR, use_ema=True, ema_momentum=EMA, ema_overwrite_frequency=100),
            None,
            "",
        ),
        "apply_if_finite": (
            gradtx.apply_if_finite(gradtx.adam(LR), 5),
            optax.apply_if_finite(adam(), 5),
            "apply_if_finite",
        ),
        "loss_scale_optimizer": (gradtx.loss_scale_optimizer(gradtx.adam(LR)), None, ""),
    }


def compile_step(fn: Callable, params, state, grads) -> tuple[Callable, float]:
    jitted = jax.jit(fn, donate_argnums=(0, 1))
    compiled = jitted.lower(params, state, grads).compile()
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return compiled, (peak + mem.temp_size_in_bytes) / 2**20


class Runner:
    """One compiled, donated step and its carry; ``()`` runs one step and returns its seconds."""

    def __init__(self, compiled: Callable, params, state, grads):
        self.compiled, self.grads = compiled, grads
        self.box = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state)]

    def __call__(self) -> float:
        start = time.perf_counter()
        self.box[0], self.box[1] = self.compiled(self.box[0], self.box[1], self.grads)
        jax.block_until_ready(self.box[0])
        return time.perf_counter() - start


def time_cycles(runners: list[Runner], period: int, reps: int, warmup: int = 2) -> list[list[float]]:
    """Median seconds of each call position ``0 .. period-1`` of each runner (a runner steps ``period``
    times in a row, then the next one does), over ``reps`` cycles."""
    for run in runners:
        for _ in range(warmup * period):
            run()
    times = [[[] for _ in range(period)] for _ in runners]
    for _ in range(reps):
        for run, per_position in zip(runners, times, strict=True):
            for position in range(period):
                per_position[position].append(run())
    return [[statistics.median(ts) for ts in per_position] for per_position in times]


def bench_options(trees: dict, reps: int, log) -> list[dict]:
    rows = []
    for tree_name, shapes in trees.items():
        params, grads = materialize(shapes, 0), materialize(shapes, 1, 1e-2)
        log(f"## {tree_name}: {len(shapes)} leaves, {size(params) / 1e6:.1f}M params")
        runners, meta = [], []
        for name, (ours, theirs, note) in variants().items():
            compiled, peak = compile_step(adam_step(ours), params, ours.init(params), grads)
            runners.append(Runner(compiled, params, ours.init(params), grads))
            meta.append((name, "gradtx", note, peak))
            if theirs is None:
                continue
            if theirs == "ema":
                base = optax.adam(LR, eps=1e-7)
                fn, state = optax_ema_step(base), optax_ema_init(base)(params)
            else:
                fn, state = adam_step(theirs), theirs.init(params)
            compiled, peak = compile_step(fn, params, state, grads)
            runners.append(Runner(compiled, params, state, grads))
            meta.append((name, "optax", note, peak))
        medians = [m[0] for m in time_cycles(runners, 1, reps)]
        table = {
            (name, lib): (t, peak, note) for (name, lib, note, peak), t in zip(meta, medians, strict=True)
        }
        plain_g, plain_o = table[("adam, no option", "gradtx")][0], table[("adam, no option", "optax")][0]
        for name in variants():
            g, g_peak, _ = table[(name, "gradtx")]
            o, o_peak, note = table.get((name, "optax"), (None, None, ""))
            rows.append({
                "tree": tree_name, "option": name, "gradtx_ms": 1e3 * g, "optax_ms": o and 1e3 * o,
                "gradtx_vs_plain": g / plain_g, "optax_vs_plain": o and o / plain_o,
                "gradtx_vs_optax": o and g / o, "optax_equivalent": note,
                "gradtx_peak_mb": g_peak, "optax_peak_mb": o_peak,
            })  # fmt: skip
            log(f"{name:30s} gradtx {1e3 * g:7.2f} ms" + (f"  optax {1e3 * o:7.2f} ms" if o else ""))
        del runners
    return rows


def bench_accumulation(trees: dict, reps: int, log) -> list[dict]:
    """Each call of a cycle of K: K - 1 micro-steps, then the update; against plain Adam's step."""
    rows = []
    for tree_name, shapes in trees.items():
        params, grads = materialize(shapes, 0), materialize(shapes, 1, 1e-2)
        txs = {
            "gradtx adam": gradtx.adam(LR),
            "gradtx adam(gradient_accumulation_steps=4)": gradtx.adam(LR, gradient_accumulation_steps=K),
            "optax adam": optax.adam(LR, eps=1e-7),
            "optax MultiSteps(adam, 4)": optax.MultiSteps(optax.adam(LR, eps=1e-7), K),
        }
        runners, peaks = [], {}
        for name, tx in txs.items():
            compiled, peaks[name] = compile_step(adam_step(tx), params, tx.init(params), grads)
            runners.append(Runner(compiled, params, tx.init(params), grads))
        positions = dict(zip(txs, time_cycles(runners, K, reps), strict=True))
        for lib in ("gradtx", "optax"):
            full = statistics.median(positions[f"{lib} adam"])
            name = next(n for n in txs if n.startswith(lib) and n != f"{lib} adam")
            micro, update = statistics.median(positions[name][: K - 1]), positions[name][K - 1]
            rows.append({
                "tree": tree_name, "optimizer": name, "micro_ms": 1e3 * micro, "update_ms": 1e3 * update,
                "full_step_ms": 1e3 * full, "micro_vs_full": micro / full, "update_vs_full": update / full,
                "peak_mb": peaks[name], "plain_peak_mb": peaks[f"{lib} adam"],
            })  # fmt: skip
            log(f"{name:45s} micro {1e3 * micro:.2f} ms, update {1e3 * update:.2f}, full {1e3 * full:.2f}")
    return rows


def bench_vmapped(n: int, lanes: int, reps: int, log) -> list[dict]:
    """A sweep of ``lanes`` learning rates (vmapped states, one shared gradient) on one leaf of ``n``."""
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (lanes, *x.shape)), materialize(one_leaf(n), 0))
    grads = materialize(one_leaf(n), 1, 1e-2)
    rates = jnp.geomspace(1e-4, 1e-2, lanes)

    def vmapped(make, shared_step: bool = False) -> Runner:
        states = jax.vmap(lambda lr: make(lr).init(jax.tree.map(lambda x: x[0], params)))(rates)
        tx = make(LR)  # the update reads the learning rate from the state
        if shared_step:  # the micro-step count passed unbatched, as a sweep's loop can

            def step(p, s, g):
                n = s.micro_step[0]
                u, s = jax.vmap(lambda p, s: tx.update(g, s, p, step=n))(p, s)
                return optax.apply_updates(p, u), s
        else:
            step = jax.vmap(adam_step(tx), in_axes=(0, 0, None))
        compiled, _ = compile_step(step, params, states, grads)
        return Runner(compiled, params, states, grads)

    accumulate = lambda lr: gradtx.accumulate_gradients(gradtx.adam(lr), K)  # noqa: E731
    runners = {
        "gradtx adam (full step)": vmapped(gradtx.adam),
        "gradtx accumulation, lanes at the same micro-step": vmapped(accumulate),
        "gradtx accumulation, lanes at different micro-steps": vmapped(accumulate),
        "gradtx accumulation, the micro-step passed unbatched": vmapped(accumulate, shared_step=True),
        "optax MultiSteps(adam, 4)": vmapped(lambda lr: optax.MultiSteps(optax.adam(lr, eps=1e-7), K)),
    }
    # Lane i starts at micro-step i % K: at every call some lanes update (the batched-clock fallback).
    shifted = runners["gradtx accumulation, lanes at different micro-steps"]
    shifted.box[1] = shifted.box[1]._replace(micro_step=jnp.arange(lanes, dtype=jnp.int32) % K)
    positions = dict(zip(runners, time_cycles(list(runners.values()), K, reps), strict=True))
    full = statistics.median(positions["gradtx adam (full step)"])
    rows = []
    for name, ts in positions.items():
        every_call = "full" in name or "different" in name
        micro = statistics.median(ts if every_call else ts[: K - 1])
        update = statistics.median(ts) if every_call else ts[K - 1]
        rows.append(
            {"variant": name, "micro_ms": 1e3 * micro, "update_ms": 1e3 * update, "vs_full": micro / full}
        )
        log(f"{name:55s} micro-step {1e3 * micro:7.2f} ms ({micro / full:.2f} x the full step)")
    return rows


def write(out: Path, raw: dict) -> None:
    lines = [
        "# Benchmark: the Keras options' step time (gradtx vs optax)",
        "",
        f"Written by `experiments/bench/options.py{' --quick' if raw['quick'] else ''}` in "
        f"{raw['seconds'] / 60:.1f} min (raw numbers: `{out.with_suffix('.json').name}`).",
        "",
        *raw["machine"],
        "",
        "## Each option on Adam (median step, jitted, donated)",
        "",
        "`vs plain` = the step with the option / the same library's Adam without it (in the same run); "
        "`gradtx / optax` compares the two libraries' steps with the option.",
        "",
        "| tree | option | gradtx ms | optax ms | gradtx vs plain | optax vs plain | gradtx / optax "
        "| optax equivalent | peak MB gradtx / optax |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in raw["options"]:
        o = {
            k: "n/a" if r[k] is None else f"{r[k]:.2f}"
            for k in ("optax_ms", "optax_vs_plain", "gradtx_vs_optax")
        }
        peak = "n/a" if r["optax_peak_mb"] is None else f"{r['optax_peak_mb']:.0f}"
        lines.append(
            f"| {r['tree']} | {r['option']} | {r['gradtx_ms']:.2f} | {o['optax_ms']} "
            f"| {r['gradtx_vs_plain']:.2f} | {o['optax_vs_plain']} | {o['gradtx_vs_optax']} "
            f"| {r['optax_equivalent'] or 'n/a'} | {r['gradtx_peak_mb']:.0f} / {peak} |"
        )
    lines += [
        "",
        f"## Gradient accumulation (K = {K}): the micro-step against a full step",
        "",
        "Each call of a cycle of K timed on its own: K - 1 micro-steps (median), then the update. "
        "`full step` is the same library's plain Adam.",
        "",
        "| tree | optimizer | micro-step ms | update ms | full step ms | micro / full | update / full "
        "| peak MB (plain) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in raw["accumulation"]:
        lines.append(
            f"| {r['tree']} | {r['optimizer']} | {r['micro_ms']:.2f} | {r['update_ms']:.2f} "
            f"| {r['full_step_ms']:.2f} | {r['micro_vs_full']:.2f} | {r['update_vs_full']:.2f} "
            f"| {r['peak_mb']:.0f} ({r['plain_peak_mb']:.0f}) |"
        )
    v = raw["vmapped"]
    lines += [
        "",
        f"## Accumulation in a vmapped sweep ({v['lanes']} learning rates, one leaf of {v['n']:,})",
        "",
        "| variant | micro-step ms | update ms | micro / full vmapped step |",
        "|---|---|---|---|",
    ]
    for r in v["rows"]:
        lines.append(f"| {r['variant']} | {r['micro_ms']:.2f} | {r['update_ms']:.2f} | {r['vs_full']:.2f} |")
    notes = out.with_name("options_notes.md")
    lines += ["", notes.read_text() if notes.exists() else ""]
    out.write_text("\n".join(lines).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("options.md"))
    parser.add_argument("--render", action="store_true", help="rewrite --out from its .json, no run")
    args = parser.parse_args()
    if args.render:
        write(args.out, json.loads(args.out.with_suffix(".json").read_text()))
        return
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True, file=sys.stderr)

    if args.quick:
        trees = {"one 256K leaf": one_leaf(1 << 18), "transformer-2 d=64": transformer(2, 64, 512, 64)}
        reps, n, lanes = 5, 1 << 16, 4
    else:
        trees = {"one 4M leaf": one_leaf(1 << 22), "transformer-6 d=256": transformer(6, 256, 8192, 256)}
        reps, n, lanes = 30, 1 << 19, 8
    raw = {
        "quick": args.quick,
        "options": bench_options(trees, reps, log),
        "accumulation": bench_accumulation(trees, reps, log),
        "vmapped": {"n": n, "lanes": lanes, "rows": bench_vmapped(n, lanes, reps, log)},
    }
    raw["machine"], raw["seconds"] = machine(), time.perf_counter() - start
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    write(args.out, raw)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
