"""Hyperparameter search on the device (issue 15), measured: successive halving, Hyperband and
population-based training against random search at equal compute, the full search of the same
configurations, and Optuna (TPE with its Hyperband and successive-halving pruners), over 5 search seeds,
each quality figure with its noise floor. Settings: see ``settings.py``. Writes ``results.md``,
``results.json`` and the plots next to this script.

* full search: 81 configurations drawn from the space, each trained to the budget (``random_search``);
* random search at equal compute: the best of ``k`` of those 81 configurations, ``k`` = a method's compute
  / the budget, its median over all ``k``-subsets computed exactly from the order statistics (a random
  search of ``k`` draws, without the noise of one draw);
* successive halving: 81 configurations, eta 3 (rungs of 81, 27, 9, 3, 1 trials), each rung statistic;
* Hyperband: eta 3, five brackets (143 trials); each rung statistic;
* PBT: 20 members (about a quarter of the full search's compute), ready every 3 evaluations;
* Optuna: 81 trials, TPE (seeded), Hyperband or successive-halving pruner (reduction factor 3, resource
  = evaluations), each trial one jitted training loop (compiled once) reporting after every evaluation.

Noise floor: the same search, same seed, re-run with another float summation order (gradtx: another
``group_size``; Optuna: the batch loss as the mean of its two halves' means), the relative change of its
result. Wall-clock times include compilation: a search's time in a seed after the first is its run time
plus the compile time its first call measured (programs are compiled once per process).

    python experiments/search/run.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from settings import DATA, PARAMS, SETTINGS, evaluate, loss_fn  # noqa: E402

import gradtx  # noqa: E402
from gradtx.search import Clock  # noqa: E402
from gradtx.spaces import LogUniform, Uniform  # noqa: E402

FULL = 81
STATISTICS = ("current", "best", "ema")


# --- the searches ------------------------------------------------------------------------------------------


def gradtx_searches(setting, seed: int, quick: bool) -> dict:
    """Every gradtx search of one setting and seed: {name: (result, result with another summation order)}."""
    key = jax.random.PRNGKey(seed)
    common = dict(key=key, eval_fn=evaluate)
    args = (loss_fn, PARAMS, setting.make_tx, setting.space, DATA, setting.steps)
    out = {}
    out["full search"] = [
        gradtx.random_search(*args, num_configs=FULL, eval_every=setting.period, group_size=g, **common)
        for g in (None, 3)
    ]
    for statistic in STATISTICS if not quick else ("current",):
        orders = (1, 3) if statistic == "current" else (1,)  # the noise floor: measured for "current"
        out[f"successive halving ({statistic})"] = [
            gradtx.successive_halving(*args, num_configs=FULL, rung_metric=statistic, group_size=g, **common)
            for g in orders
        ]
        out[f"Hyperband ({statistic})"] = [
            gradtx.hyperband(*args, rung_metric=statistic, group_size=g, **common) for g in orders
        ]
    out["PBT"] = [
        gradtx.population_based_training(
            *args, population=20, ready_every=3 * setting.period, group_size=g, **common
        )
        for g in (None, 4)
    ]
    # Fewer, longer generations: is PBT's result a matter of greed (selection on short-term progress)?
    out["PBT (ready every 9 evaluations)"] = [
        gradtx.population_based_training(*args, population=20, ready_every=9 * setting.period, **common)
    ]
    return out


def suggest(trial, name: str, dim):
    if isinstance(dim, LogUniform):
        return trial.suggest_float(name, dim.low, dim.high, log=True)
    if isinstance(dim, Uniform):
        return trial.suggest_float(name, dim.low, dim.high)
    return dim  # a fixed value


_TRAINERS: dict = {}


def halves_loss(p, batch):
    """The batch loss as the mean of its two halves' means: equal in exact arithmetic, another float
    summation order (Optuna's noise floor)."""
    half = batch[0].shape[0] // 2
    first, second = jax.tree.map(lambda x: x[:half], batch), jax.tree.map(lambda x: x[half:], batch)
    return (loss_fn(p, first) + loss_fn(p, second)) / 2


def trainer(setting, reordered: bool):
    """One jitted period of one Optuna trial (compiled once per setting): ``period`` steps on the same
    shuffled batches as the gradtx searches, then the validation loss."""
    if (setting.name, reordered) in _TRAINERS:
        return _TRAINERS[setting.name, reordered]
    template = setting.make_tx(**{k: getattr(d, "low", d) for k, d in setting.space.items()})
    loss = halves_loss if reordered else loss_fn

    def one_step(carry, step, batch_at):
        p, s = carry
        u, s = template.update(jax.grad(loss)(p, batch_at(step)), s, p)
        return (gradtx.apply_updates(p, u), s), None

    @jax.jit
    def period(params, state, first, key, arrays):
        batch_at = DATA.prepare(first, setting.period, key, arrays)
        steps = first + jnp.arange(setting.period)
        carry, _ = jax.lax.scan(lambda c, t: one_step(c, t, batch_at), (params, state), steps)
        return (*carry, evaluate(carry[0])["valid_loss"])

    _TRAINERS[setting.name, reordered] = (template, period)
    return template, period


def optuna_study(setting, seed: int, pruner: str, reordered: bool = False) -> dict:
    """An Optuna study; its record: per trial (seconds since the start, compute so far, final value or
    None when pruned), and the compile seconds of the call."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    periods = setting.steps // setting.period
    pruners = {
        "Hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=periods, reduction_factor=3),
        "successive halving": optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
    }
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruners[pruner])
    clock = Clock()
    template, period = trainer(setting, reordered)
    data_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # the gradtx searches' data order
    record, spent = [], [0]

    def objective(trial):
        config = {k: suggest(trial, k, d) for k, d in setting.space.items()}
        params, state = PARAMS, gradtx.set_hyperparams(template.init(PARAMS), **config)
        value = float("nan")
        for t in range(periods):
            params, state, value = period(params, state, t * setting.period, data_key, DATA.data)
            value = float(value)
            spent[0] += setting.period
            if not math.isfinite(value):  # diverged: stopped, like a pruned trial
                record.append((clock.read()[0], spent[0], None))
                raise optuna.TrialPruned()
            trial.report(value, t + 1)
            if trial.should_prune():
                record.append((clock.read()[0], spent[0], None))
                raise optuna.TrialPruned()
        record.append((clock.read()[0], spent[0], value))
        return value

    study.optimize(objective, n_trials=FULL)
    seconds, compiling = clock.read()
    done = [v for _, _, v in record if v is not None]
    return {"record": record, "seconds": seconds, "compile_seconds": compiling,
            "best": min(done) if done else float("nan"), "compute": spent[0]}  # fmt: skip


# --- measures ----------------------------------------------------------------------------------------------


def random_median(finals: np.ndarray, k: int) -> float:
    """Median of the best of ``k`` configurations drawn without replacement from ``finals``: with the
    values sorted, the best is the ``i``-th smallest with P(best rank > i) = C(n - i - 1, k) / C(n, k)."""
    v = np.sort(np.where(np.isfinite(finals), finals, np.inf))
    n, k = len(v), max(1, min(len(v), k))
    cdf = [1 - math.comb(n - i - 1, k) / math.comb(n, k) for i in range(n)]
    return float(v[next(i for i, c in enumerate(cdf) if c >= 0.5)])


def time_to(record: list, quality: float) -> float | None:
    """Seconds until a finished trial reached ``quality`` (None: never)."""
    for seconds, _, value in record:
        if value is not None and value <= quality:
            return seconds
    return None


def _program_of(method: str) -> str:
    """The compiled program a search runs: the rung statistics share one; Optuna's studies one trainer."""
    if method.startswith("Optuna"):
        return "Optuna"
    return method.split(" (")[0] if method.startswith(("successive halving", "Hyperband")) else method


def summarize(name: str, runs: dict) -> tuple[list[str], dict]:
    """The setting's tables and goals, and its numbers for results.json."""
    seeds = sorted(runs)
    full = np.array([runs[s]["full search"][0].best_metric for s in seeds])
    full_compute = runs[seeds[0]]["full search"][0].compute
    finals = [runs[s]["full search"][0].metric_history[:, -1] for s in seeds]
    first = {}  # compile seconds of each program's first call (cold), by family of searches

    def times(method: str, run) -> tuple[float, float]:
        """(seconds with compilation, seconds without): this call's run time plus (or without) the compile
        time of its program's first call (the rung statistics share one program, Optuna's studies of a
        setting one trainer)."""
        seconds, compiling = (
            (run["seconds"], run["compile_seconds"])
            if isinstance(run, dict)
            else (run.seconds, run.compile_seconds)
        )
        family = _program_of(method)
        first.setdefault(family, compiling)
        return seconds - compiling + first[family], seconds - compiling

    times("Optuna", runs[seeds[0]]["optuna"]["Hyperband"][0])  # the first study compiled the trainer
    searches = [m for m in runs[seeds[0]] if m not in ("full search", "optuna")]
    optunas = {"Optuna TPE + Hyperband": "Hyperband", "Optuna TPE + successive halving": "successive halving"}
    lines = [
        f"| method | compute (share of the full search) | best valid loss (median of {len(seeds)} seeds) | "
        "noise floor (median change, other summation order) | gap to the full search's best (median) | "
        "random search at equal compute (median) | beats random | wall-clock s, compilation included "
        "(median) | of which compilation (first call) | s without compilation (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {}
    for method in ["full search", *searches, *optunas]:
        if method in optunas:
            pairs = [(st[0], st[1]) for st in (runs[s]["optuna"][optunas[method]] for s in seeds)]
            best = np.array([a["best"] for a, _ in pairs])
            other = np.array([b["best"] for _, b in pairs])
            compute = np.array([a["compute"] for a, _ in pairs])
            timed = np.array([times(method, a) for a, _ in pairs])
            rerun = True
        else:
            results = [runs[s][method] for s in seeds]
            best = np.array([r[0].best_metric for r in results])
            other = np.array([r[-1].best_metric for r in results])
            compute = np.array([r[0].compute for r in results])
            timed = np.array([times(method, r[0]) for r in results])
            rerun = len(results[0]) > 1
        random = np.array(
            [random_median(f, round(c / SETTINGS[name].steps)) for f, c in zip(finals, compute, strict=True)]
        )
        gap = (best - full) / full
        rows[method] = {
            "best": best.tolist(),
            "other_order": other.tolist() if rerun else None,
            "compute": compute.tolist(),
            "seconds": timed[:, 0].tolist(),
            "seconds_without_compilation": timed[:, 1].tolist(),
            "random_equal_compute": random.tolist(),
            "gap_to_full": gap.tolist(),
        }
        noise = f"{np.median(np.abs(other - best) / best):.1%}" if rerun else "-"
        beats = "" if method == "full search" else ("yes" if np.median(best) < np.median(random) else "no")
        family = _program_of(method)
        lines.append(
            f"| {method} | {np.median(compute):,.0f} ({np.median(compute) / full_compute:.1%}) | "
            f"{np.median(best):.5f} | {noise} | {np.median(gap):+.1%} | {np.median(random):.5f} | {beats} | "
            f"{np.median(timed[:, 0]):.1f} | {first[family]:.1f} | {np.median(timed[:, 1]):.1f} |"
        )

    # Wall-clock against Optuna at equal quality: Optuna's time until a finished trial was as good.
    lines += [
        "",
        "Wall-clock against Optuna at equal quality. Per seed: Optuna's time until one of its finished "
        "trials was as good as the gradtx search's result, divided by the gradtx search's time (`>`: "
        "Optuna never got as good; its whole study's time). Above 1: gradtx is faster. With compilation: "
        "both sides pay their first call's compile; without: both reuse compiled programs (a warm "
        "persistent cache).",
        "",
        "| gradtx search | vs Optuna TPE + Hyperband, with compilation (median; each seed) | without "
        "(median) | vs Optuna TPE + successive halving, with compilation | without |",
        "|---|---|---|---|---|",
    ]
    ratios = {}
    for method in [m for m in searches if "current" in m or m == "PBT"]:
        cells = []
        for optuna_name, pruner in optunas.items():
            cold, warm = [], []
            for i, s in enumerate(seeds):
                study = runs[s]["optuna"][pruner][0]
                reached = time_to(study["record"], rows[method]["best"][i])
                mark = ">" if reached is None else ""
                optuna_warm = (study["seconds"] if reached is None else reached) - study["compile_seconds"]
                cold.append((mark, (optuna_warm + first["Optuna"]) / rows[method]["seconds"][i]))
                warm.append((mark, optuna_warm / rows[method]["seconds_without_compilation"][i]))
            ratios[f"{method} vs {optuna_name}"] = {"with_compilation": cold, "without": warm}
            cells.append(
                f"{np.median([v for _, v in cold]):.2f}x; " + ", ".join(f"{m}{v:.2f}" for m, v in cold)
            )
            cells.append(f"{np.median([v for _, v in warm]):.2f}x")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")

    # The goals.
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    median = {m: float(np.median(rows[m]["best"])) for m in rows}
    lines += ["", "Goals of the issue (medians over the seeds):", ""]
    for method in ("successive halving (current)", "Hyperband (current)", "PBT"):
        random = float(np.median(rows[method]["random_equal_compute"]))
        floor = float(
            np.median(
                np.abs(np.subtract(rows[method]["other_order"], rows[method]["best"])) / rows[method]["best"]
            )
        )
        tie = (
            " (by less than its noise floor: a tie)" if abs(median[method] - random) / random < floor else ""
        )
        lines.append(
            f"- {method} beats random search at equal compute: {median[method]:.5f} against {random:.5f}: "
            f"{verdict(median[method] < random)}{tie}."
        )
    gap, share = (
        float(np.median(rows["Hyperband (current)"]["gap_to_full"])),
        np.median(rows["Hyperband (current)"]["compute"]) / full_compute,
    )
    lines.append(
        f"- Hyperband within 5% of the full search's best at a quarter of its compute: {gap:+.1%} at "
        f"{share:.1%}: {verdict(gap <= 0.05 and share <= 0.26)}."
    )
    wins = int(np.sum(np.asarray(rows["PBT"]["best"]) <= full))
    lines.append(
        f"- PBT at least as good as the full search's best in 3 of 5 seeds, at "
        f"{np.median(rows['PBT']['compute']) / full_compute:.1%} of its compute: {wins} of {len(seeds)}: "
        f"{verdict(wins >= 3)}."
    )
    fastest = max(
        float(np.median([v for _, v in ratios[f"{m} vs {o}"]["with_compilation"]]))
        for m in ("successive halving (current)", "Hyperband (current)", "PBT")
        for o in optunas
    )
    lines.append(
        f"- At least 2x faster than Optuna at equal quality, compilation included: the best median ratio "
        f"here is {fastest:.2f}x: {verdict(fastest >= 2)}."
    )
    return lines, {"methods": rows, "full": full.tolist(), "optuna_ratios": ratios}


# --- the compilation cache ----------------------------------------------------------------------------------

PROBE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
start = time.perf_counter()
import gradtx
from settings import DATA, PARAMS, SETTINGS, evaluate, loss_fn
s = SETTINGS["sgd"]
r = gradtx.successive_halving(loss_fn, PARAMS, s.make_tx, s.space, DATA, s.steps, num_configs=81,
                              key=jax.random.PRNGKey(0), eval_fn=evaluate)
print(json.dumps({"seconds": r.seconds, "compile_seconds": r.compile_seconds, "best": r.best_metric,
                  "process_seconds": time.perf_counter() - start}))
"""


def cache_probe() -> list[dict]:
    """Successive halving in two fresh processes sharing a persistent compilation cache."""
    out = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):
            done = subprocess.run(
                [sys.executable, "-c", PROBE, str(Path(__file__).parent), cache],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, JAX_PLATFORMS="cpu"),
            )
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


# --- plots -------------------------------------------------------------------------------------------------


def plots(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradtx import plotting

    a = runs["adamw"][0]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, x in zip(axes, ["compute", "seconds"], strict=True):
        curves = {
            m: a[m][0]
            for m in ["full search", "successive halving (current)", "Hyperband (current)", "PBT"]
            if m in a
        }
        for pruner in ("Hyperband", "successive halving"):
            record = a["optuna"][pruner][0]["record"]
            best, xs, ys = np.inf, [], []
            for seconds, compute, value in record:
                if value is not None:
                    best = min(best, value)
                if np.isfinite(best):
                    xs.append(compute if x == "compute" else seconds)
                    ys.append(best)
            curves[f"Optuna TPE + {pruner}"] = (xs, ys)
        plotting.plot_best_so_far(curves, x=x, ax=ax)
        ax.set_title(f"AdamW, seed 0: best validation loss so far ({x})")
    fig.savefig(HERE / "best_so_far.png", dpi=100, bbox_inches="tight")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    plotting.plot_rungs(a["successive halving (current)"][0], ax=axes[0])
    plotting.plot_rungs(a["Hyperband (current)"][0], ax=axes[1])
    fig.savefig(HERE / "rungs.png", dpi=100, bbox_inches="tight")

    s = runs["sgd"][0]["PBT"][0]
    total = SETTINGS["sgd"].steps
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    plotting.plot_lineage(s, ax=axes[0])
    plotting.plot_schedules(
        s, schedules={"1cycle (peak 0.1)": gradtx.one_cycle_schedule(total, 0.1),
                      "exponential (0.1, 100x down)": gradtx.exponential_schedule(0.1, total, 0.01)},
        ax=axes[1],
    )  # fmt: skip
    axes[1].set_title("SGD + momentum: PBT's learning rate and the course's schedules")
    fig.savefig(HERE / "pbt_schedule.png", dpi=100, bbox_inches="tight")


# --- main --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one seed, one rung statistic: a smoke test")
    parser.add_argument("--save", help="also pickle the searches to this file")
    parser.add_argument("--saved", help="summarize the searches an earlier run pickled with --save")
    options = parser.parse_args()
    quick, seeds = options.quick, [0] if options.quick else [0, 1, 2, 3, 4]
    started, load = time.perf_counter(), os.getloadavg()
    if options.saved:
        with open(options.saved, "rb") as f:
            runs, cache, minutes, load = pickle.load(f)
        seeds = sorted(runs["adamw"])
    else:
        runs: dict = {}
        for name, setting in SETTINGS.items():
            runs[name] = {}
            for seed in seeds:
                t = time.perf_counter()
                runs[name][seed] = gradtx_searches(setting, seed, quick)
                runs[name][seed]["optuna"] = {
                    pruner: [optuna_study(setting, seed, pruner), optuna_study(setting, seed, pruner, True)]
                    for pruner in ("Hyperband", "successive halving")
                }
                print(f"{name} seed {seed}: {time.perf_counter() - t:.0f} s", flush=True)
        cache = cache_probe()
        minutes = (time.perf_counter() - started) / 60
        if options.save:
            with open(options.save, "wb") as f:
                pickle.dump((runs, cache, minutes, load), f)
    plots(runs)

    import optuna

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())  # fmt: skip
    lines = [
        "# Hyperparameter search on the device, measured (issue 15)",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), shared with other jobs: load average {load[0]:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end; jax {jax.__version__}, optuna {optuna.__version__}, "
        f"{jax.devices()[0].platform}. No GPU was available: the GPU goal is unmeasured. Run time "
        f"{minutes:.0f} min. Written by `python experiments/search/run.py`; "
        "the method and the reading are in `notes.md`.",
        "",
    ]
    numbers = {"seeds": seeds, "cache": cache}
    for name, setting in SETTINGS.items():
        table, numbers[name] = summarize(name, runs[name])
        lines += [f"## {name}: {setting.steps} steps, evaluated every {setting.period}", "", *table, ""]
    lines += [
        "## Persistent compilation cache",
        "",
        "Successive halving (sgd setting, 81 configurations) in two fresh processes sharing "
        "`jax_compilation_cache_dir` (`jax_persistent_cache_min_compile_time_secs = 0`):",
        "",
        "| process | search wall-clock (s) | XLA compile inside it (s) | process, import to result (s) |",
        "|---|---|---|---|",
        *[f"| {'first (cold cache)' if i == 0 else 'second (warm cache)'} | {c['seconds']:.2f} | "
          f"{c['compile_seconds']:.2f} | {c['process_seconds']:.2f} |" for i, c in enumerate(cache)],
    ]  # fmt: skip
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    (HERE / "results.json").write_text(json.dumps(numbers, indent=1, default=float) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
