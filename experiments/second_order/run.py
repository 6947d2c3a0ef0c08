"""Shampoo and SOAP measured: the course's elongated bowl, digits (MLP and CNN), and a transformer's step.

Three parts, each writing its section of ``results.md`` (raw numbers in ``results.json``) beside this file:

* ``bowl``: Newton's method (exact Hessian, ``jax.hessian``) against Shampoo, SOAP (their 2 x 2
  statistics: ``precondition_1d=True``) and first-order methods on the course's bowl and on the same bowl
  rotated by 30 degrees; every method at its fastest learning rate from a 1/8-decade grid (``bowl.png``);
* ``mlp`` and ``cnn``: the course's digits MLP (64-100-100-100-10) and a small CNN, steps and
  wall-clock to a training loss of 0.02 and best validation accuracy: Adam, Nadam, Shampoo and SOAP,
  each rate tuned on a 1/8-decade grid by `gradtx.sweep` (seed 0), the chosen rates re-run on five fresh
  seeds (``curves_mlp.png``, ``curves_cnn.png``);
* ``bench``: step time and memory of Adam, Shampoo and SOAP (``precondition_frequency=10``) on
  ``experiments/bench``'s transformer tree.

    python experiments/second_order/run.py                 # everything (about 30 minutes on 2 cores)
    python experiments/second_order/run.py --part bowl     # one part; the others' sections are kept
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import gradtx
from gradtx.shampoo import shampoo
from gradtx.soap import soap

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "bench"))
import run as bench  # noqa: E402  (experiments/bench/run.py: the transformer tree, timing, machine)

PARTS = ("bowl", "mlp", "cnn", "bench")

# --- (a) the elongated bowl ---------------------------------------------------------------------------

CURVATURE = np.array([1.0, 25.0])
START = np.array([-4.0, 1.5])
BOWL_TARGET = 1e-3
BOWL_STEPS = 300
BOWL_RATES = 10.0 ** np.arange(-3, 0.001, 1 / 8)  # 1/8 decade, 1e-3 .. 1

BOWL_METHODS = {
    "Momentum": lambda lr: gradtx.sgd(lr, momentum=0.9),
    "Adam": lambda lr: gradtx.adam(lr),
    "Nadam": lambda lr: gradtx.nadam(lr),
    "Shampoo": lambda lr: shampoo(lr, precondition_frequency=1, precondition_1d=True),
    "SOAP": lambda lr: soap(lr, weight_decay=None, precondition_frequency=1, precondition_1d=True),
    "SOAP, Adam's betas": lambda lr: soap(
        lr, 0.9, 0.999, weight_decay=None, precondition_frequency=1, precondition_1d=True
    ),
}


def bowl_hessian(angle_degrees: float) -> np.ndarray:
    a = math.radians(angle_degrees)
    rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return rotation @ np.diag(CURVATURE) @ rotation.T


def bowl(angle: float):
    hessian = jnp.asarray(bowl_hessian(angle), jnp.float32)

    def loss(theta):
        return 0.5 * theta @ hessian @ theta

    def descend(make, lr):
        tx = make(lr)

        def step(carry, _):
            theta, state = carry
            value, grad = jax.value_and_grad(loss)(theta)
            updates, state = tx.update(grad, state, theta)
            return (gradtx.apply_updates(theta, updates), state), (theta, value)

        start = jnp.asarray(START, jnp.float32)
        return jax.lax.scan(step, (start, tx.init(start)), length=BOWL_STEPS)[1]

    @jax.jit
    def run_all(rates):
        return {
            name: jax.vmap(lambda lr, make=make: descend(make, lr))(rates)
            for name, make in BOWL_METHODS.items()
        }

    def newton():
        theta = jnp.asarray(START, jnp.float32)
        step = jnp.linalg.solve(jax.hessian(loss)(theta), jax.grad(loss)(theta))
        return np.stack([np.asarray(theta), np.asarray(theta - step)]), float(loss(theta - step))

    return run_all, newton


def steps_to_target(losses: np.ndarray) -> np.ndarray:
    """Per rate: the step from which the loss stays within the target (BOWL_STEPS + 1: never)."""
    inside = np.isfinite(losses) & (losses <= BOWL_TARGET)
    stays = np.flip(np.logical_and.accumulate(np.flip(inside, -1), -1), -1)
    return np.where(stays[:, -1], stays.argmax(-1), BOWL_STEPS + 1)


def part_bowl() -> tuple[list[str], dict]:
    lines = [
        "## (a) The elongated bowl: Newton in one step",
        "",
        f"Loss `0.5 * theta^T H theta` with eigenvalues {CURVATURE.tolist()} (condition number 25), from "
        f"{tuple(START.tolist())}: the course's bowl (axes aligned) and the same bowl rotated by 30 "
        f"degrees. Each method at its fastest learning rate from a 1/8-decade grid ({len(BOWL_RATES)} "
        f"rates, 1e-3 to 1, {BOWL_STEPS} steps); Shampoo and SOAP keep a 2 x 2 statistic of the gradient "
        "(`precondition_1d=True`, refreshed every step); their step lengths are Adam's (Shampoo's "
        "grafting, SOAP's Adam), SOAP at its defaults (betas 0.95, 0.95) and with Adam's (0.9, 0.999). "
        "Steps until the loss stays below 1e-3.",
        "",
        "| method | course's bowl: lr | steps | rotated bowl: lr | steps |",
        "|---|---:|---:|---:|---:|",
    ]
    raw, paths = {}, {}
    rows = {"Newton (exact Hessian)": ["-", "1", "-", "1"]}
    for angle in (0.0, 30.0):
        run_all, newton = bowl(angle)
        path, final = newton()
        assert final < 1e-10, final
        results = jax.tree.map(np.asarray, run_all(jnp.asarray(BOWL_RATES, jnp.float32)))
        paths[angle] = {"Newton (exact Hessian)": path}
        for name in BOWL_METHODS:
            thetas, losses = results[name]
            steps = steps_to_target(losses)
            final = np.where(np.isfinite(losses[:, -1]), losses[:, -1], np.inf)
            best = int(np.lexsort((final, steps))[0])
            paths[angle][name] = thetas[best]
            reached = str(steps[best]) if steps[best] <= BOWL_STEPS else f"> {BOWL_STEPS}"
            rows.setdefault(name, []).extend([f"{BOWL_RATES[best]:.3g}", reached])
            raw[f"{name}@{angle:g}"] = {"learning_rate": float(BOWL_RATES[best]), "steps": int(steps[best])}
    lines += [f"| {name} | {' | '.join(r)} |" for name, r in rows.items()]
    plot_bowl(paths, HERE / "bowl.png")
    lines += ["", "![paths](bowl.png)"]
    return lines, raw


def plot_bowl(paths: dict, where: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    x, y = np.meshgrid(np.linspace(-4.5, 1.5, 300), np.linspace(-2, 2, 200))
    for ax, (angle, by_method) in zip(axes, paths.items(), strict=True):
        h = bowl_hessian(angle)
        z = 0.5 * (h[0, 0] * x**2 + 2 * h[0, 1] * x * y + h[1, 1] * y**2)
        ax.contour(x, y, z, levels=np.geomspace(1e-2, 60, 14), colors="0.75", linewidths=0.8)
        for name, path in by_method.items():
            style = "k*-" if name.startswith("Newton") else ".-"
            ax.plot(
                path[:40, 0],
                path[:40, 1],
                style,
                markersize=3,
                linewidth=1.2 if "Newton" in name else 1,
                label=name,
            )
        ax.plot(0, 0, "k*", markersize=12)
        ax.set(xlim=(-4.5, 1.5), ylim=(-2, 2), xlabel=r"$\theta_1$", ylabel=r"$\theta_2$")
        ax.set_title("the course's bowl" if angle == 0 else f"rotated by {angle:g} degrees")
    axes[0].legend(fontsize=8)
    fig.suptitle("First 40 steps at each method's fastest learning rate; Newton's step lands on the minimum")
    fig.tight_layout()
    fig.savefig(where, dpi=110)


# --- (b) digits: the course's MLP and a small CNN -----------------------------------------------------

DIGITS_TARGET = 0.02
DIGITS_RATES = 10.0 ** np.arange(-3.5, -1.499, 1 / 8)  # 1/8 decade, 3.2e-4 .. 3.2e-2 (17 rates)
FRESH_SEEDS = [1, 2, 3, 4, 5]
TIMED_STEPS = 200
BATCH = 32

DIGITS_METHODS = {
    "Adam": lambda learning_rate: gradtx.adam(learning_rate),
    "Nadam": lambda learning_rate: gradtx.nadam(learning_rate),
    "Shampoo": lambda learning_rate: shampoo(learning_rate),
    "SOAP": lambda learning_rate: soap(learning_rate, weight_decay=None),
}


def digits_data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
    order = np.random.default_rng(42).permutation(len(x))  # the split of experiments/optimizer_comparison
    x, y = x[order], y[order]
    return (x[:1440], y[:1440]), (x[1440:], y[1440:])


def mlp_init(key):
    """The course's digits MLP: 64-100-100-100-10, he_normal ReLU layers, a lecun_normal output."""
    sizes, params = [64, 100, 100, 100, 10], {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, k = jax.random.split(key)
        init = jax.nn.initializers.he_normal() if i < 3 else jax.nn.initializers.lecun_normal()
        params[f"dense{i}"] = {"kernel": init(k, (a, b)), "bias": jnp.zeros(b)}
    return params


def mlp_apply(params, x):
    for i in range(4):
        x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
        x = jax.nn.relu(x) if i < 3 else x
    return x


def cnn_init(key):
    """conv 3x3x16, max-pool, conv 3x3x32, max-pool, dense 128 -> 10 (6,042 parameters)."""
    k1, k2, k3 = jax.random.split(key, 3)
    he = jax.nn.initializers.he_normal()
    return {
        "conv1": {"kernel": he(k1, (3, 3, 1, 16)), "bias": jnp.zeros(16)},
        "conv2": {"kernel": he(k2, (3, 3, 16, 32)), "bias": jnp.zeros(32)},
        "dense": {"kernel": jax.nn.initializers.lecun_normal()(k3, (128, 10)), "bias": jnp.zeros(10)},
    }


def cnn_apply(params, x):
    x = x.reshape(-1, 8, 8, 1)
    for name in ("conv1", "conv2"):
        x = jax.lax.conv_general_dilated(
            x, params[name]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + params[name]["bias"])
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return x.reshape(x.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"]


def cross_entropy(logits, labels):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0])


class Model(NamedTuple):
    name: str
    init: Any
    apply: Any
    steps: int  # per run: tuning and fresh seeds
    eval_every: int  # the full training set's loss is evaluated every this many steps


MODELS = {
    "mlp": Model("MLP 64-100-100-100-10", mlp_init, mlp_apply, 1000, 10),
    # An evaluation on all 1,797 images costs ~19 CNN training steps: every 20 steps, over 600 steps.
    "cnn": Model("CNN (6k parameters)", cnn_init, cnn_apply, 600, 20),
}


def steps_to_loss(history) -> np.ndarray:
    """Per run: the first evaluated step with a full-training-set loss <= DIGITS_TARGET (nan: never)."""
    loss = np.asarray(history.metrics["train_loss"])
    hit = loss <= DIGITS_TARGET
    first = np.where(hit.any(-1), hit.argmax(-1), -1)
    steps = np.asarray(history.eval_step)[first].astype(float)
    return np.where(first >= 0, steps, np.nan)


def part_digits(model: Model) -> tuple[list[str], dict]:
    (x_train, y_train), (x_valid, y_valid) = digits_data()
    data = gradtx.shuffled_batches((x_train, y_train), BATCH, per_seed=True)
    lines = [
        f"## (b) Digits, {model.name}: steps and wall-clock to a training loss of 0.02",
        "",
        f"scikit-learn's digits (1,440 training and 357 validation images, the split of "
        f"`experiments/optimizer_comparison`), batch {BATCH}, {model.steps} steps; the training loss is "
        f"the full training set's, evaluated every {model.eval_every} steps. Each method's learning rate is "
        f"tuned on a 1/8-decade grid ({len(DIGITS_RATES)} rates, {DIGITS_RATES[0]:.2g} to "
        f"{DIGITS_RATES[-1]:.2g}) by one `gradtx.sweep` per method on seed 0 (fewest steps to the target, "
        f"then lowest final loss); the chosen rate is re-run on fresh seeds {FRESH_SEEDS} (initialization "
        "and batch order), whose medians are reported. Shampoo and SOAP run at their defaults "
        "(`precondition_frequency=10`; Shampoo grafted from Adam, SOAP's betas 0.95/0.95; no weight decay "
        f"for any method). Time per step: one run at the chosen rate, {TIMED_STEPS} compiled steps without "
        "evaluation, median of 3 interleaved timings; wall-clock to target = median steps x time per step.",
        "",
    ]

    def loss_fn(params, batch):
        return cross_entropy(model.apply(params, batch[0]), batch[1])

    def eval_fn(params):
        return {
            "train_loss": cross_entropy(model.apply(params, x_train), y_train),
            "valid_accuracy": jnp.mean(jnp.argmax(model.apply(params, x_valid), -1) == y_valid),
        }

    rows, curves, timing_txs = {}, {}, {}
    for name, make in DIGITS_METHODS.items():
        started = time.perf_counter()
        options = {"eval_fn": eval_fn, "eval_every": model.eval_every}
        configs = gradtx.grid(learning_rate=DIGITS_RATES, seed=[0])
        tuning = gradtx.sweep(loss_fn, model.init, make, configs, data, model.steps, **options)
        steps = steps_to_loss(tuning.history)
        final = np.asarray(tuning.history.metrics["train_loss"])[:, -1]
        final = np.where(np.isfinite(final), final, np.inf)
        best = int(np.lexsort((final, np.where(np.isnan(steps), np.inf, steps)))[0])
        lr = float(DIGITS_RATES[best])
        configs = gradtx.grid(learning_rate=[lr], seed=FRESH_SEEDS)
        fresh = gradtx.sweep(loss_fn, model.init, make, configs, data, model.steps, **options)
        seconds = time.perf_counter() - started
        fresh_steps = steps_to_loss(fresh.history)
        accuracy = np.asarray(fresh.history.metrics["valid_accuracy"]).max(-1)
        curves[name] = (
            np.asarray(fresh.history.eval_step),
            np.median(fresh.history.metrics["train_loss"], 0),
        )
        rows[name] = {
            "learning_rate": lr,
            "tuning_steps": float(steps[best]),
            "steps": fresh_steps.tolist(),
            "median_steps": float(np.median(fresh_steps)) if not np.isnan(fresh_steps).any() else None,
            "reached": int(np.sum(~np.isnan(fresh_steps))),
            "best_valid_accuracy": accuracy.tolist(),
            "sweep_seconds": seconds,
        }
        timing_txs[name] = make(lr)
        print(f"{model.name} {name}: lr {lr:.3g}, steps {fresh_steps}, {seconds:.0f} s", flush=True)
    for name, seconds in time_steps(loss_fn, model.init, timing_txs, data).items():
        rows[name]["seconds_per_step"] = seconds
    lines += digits_table(rows)
    figure = f"curves_{model.name.split()[0].lower()}.png"
    plot_curves(model.name, curves, HERE / figure)
    return [*lines, f"![{model.name}]({figure})", ""], rows


def time_steps(loss_fn, init, txs: dict, data) -> dict[str, float]:
    params = init(jax.random.PRNGKey(0))
    for tx in txs.values():  # compile (the same tx object: fit's compiled program is reused)
        gradtx.fit(loss_fn, params, tx, data, TIMED_STEPS)
    times: dict[str, list[float]] = {name: [] for name in txs}
    for _ in range(3):
        for name, tx in txs.items():
            started = time.perf_counter()
            jax.block_until_ready(gradtx.fit(loss_fn, params, tx, data, TIMED_STEPS).params)
            times[name].append((time.perf_counter() - started) / TIMED_STEPS)
    return {name: statistics.median(ts) for name, ts in times.items()}


def digits_table(rows: dict) -> list[str]:
    lines = [
        "| method | tuned lr | steps to 0.02 (median of 5; per seed) | vs Adam | vs Nadam | ms per step "
        "| wall-clock to 0.02 | vs Adam | vs Nadam | best valid acc. (median) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        steps, wall = r["median_steps"], None
        if steps is not None:
            wall = steps * r["seconds_per_step"]
        ratios = []
        for base in ("Adam", "Nadam"):
            b = rows[base]
            ok = steps is not None and b["median_steps"] is not None
            ratios.append(f"{steps / b['median_steps']:.2f}" if ok else "-")
        walls = []
        for base in ("Adam", "Nadam"):
            b = rows[base]
            ok = wall is not None and b["median_steps"] is not None
            walls.append(f"{wall / (b['median_steps'] * b['seconds_per_step']):.2f}" if ok else "-")
        per_seed = ", ".join("-" if np.isnan(s) else f"{s:.0f}" for s in r["steps"])
        median = f"{steps:.0f}" if steps is not None else f"not reached ({r['reached']}/5 seeds)"
        lines.append(
            f"| {name} | {r['learning_rate']:.3g} | {median} ({per_seed}) | {ratios[0]} | {ratios[1]} "
            f"| {1e3 * r['seconds_per_step']:.2f} | {'-' if wall is None else f'{wall:.2f} s'} | {walls[0]} "
            f"| {walls[1]} | {np.median(r['best_valid_accuracy']):.3f} |"
        )
    return [*lines, ""]


def plot_curves(title: str, curves: dict, where: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (steps, curve) in curves.items():
        ax.plot(steps, curve, label=name)
    ax.axhline(DIGITS_TARGET, color="gray", linestyle=":")
    ax.set(title=title, xlabel="step", ylabel="training loss (median of 5 fresh seeds)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(where, dpi=110)


# --- (c) a transformer's optimizer step ---------------------------------------------------------------


def part_bench() -> tuple[list[str], dict]:
    shapes = bench.transformer(12, 384, 8192, 512)
    params, grads = bench.materialize(shapes, 0), bench.materialize(shapes, 1, 1e-2)
    n = bench.size(params)
    txs = {
        "Adam": gradtx.adam(1e-3),
        "Shampoo (block_size 1024)": shampoo(1e-3, precondition_frequency=10),
        "SOAP (max_precond_dim 1024)": soap(
            1e-3, weight_decay=None, precondition_frequency=10, max_precond_dim=1024
        ),
    }
    raw = {}
    for name, tx in txs.items():
        compiled, compile_seconds, memory = bench.compile_step(tx, params, grads)
        state = tx.init(params)
        state_mb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20
        run = bench.runner(compiled, params, state, grads)
        for _ in range(10):  # warm-up: SOAP's first eigh (s = 0), Shampoo's first roots (t = 10)
            run()
        windows = []
        for _ in range(20 if name == "Adam" else 1):  # ten steps: exactly one refresh in each window
            started = time.perf_counter()
            for _ in range(10):
                run()
            windows.append((time.perf_counter() - started) / 10)
        raw[name] = {
            "seconds_per_step": statistics.median(windows), "windows": windows,
            "compile_seconds": compile_seconds, "peak_mb": memory["peak"] / 2**20, "state_mb": state_mb,
        }  # fmt: skip
        print(f"{name}: {1e3 * raw[name]['seconds_per_step']:.1f} ms per step", flush=True)
        del compiled, run
    adam = raw["Adam"]["seconds_per_step"]
    lines = [
        "## (c) A transformer's optimizer step at `precondition_frequency=10`",
        "",
        f"`experiments/bench`'s tree `transformer(12, 384, 8192, 512)`: {len(shapes)} leaves, "
        f"{n / 1e6:.1f}M parameters (embeddings 8192 x 384 and 512 x 384; per block 384 x 1152, 384 x 384, "
        "384 x 1536, 1536 x 384 and vectors). One jitted, donated update of the whole tree; amortized time = "
        "mean of 10 consecutive steps holding exactly one refresh, after 10 warm-up steps (Adam: median of "
        "20 such windows). SOAP's `max_precond_dim=1024` leaves the vocabulary axis unpreconditioned (the "
        "reference's default 10,000 would give the embedding an 8192 x 8192 statistic).",
        "",
        "| optimizer | ms per step (amortized) | vs Adam | compile s | optimizer state MB "
        "| peak MB of the step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in raw.items():
        lines.append(
            f"| {name} | {1e3 * r['seconds_per_step']:.1f} | {r['seconds_per_step'] / adam:.1f} "
            f"| {r['compile_seconds']:.1f} | {r['state_mb']:.0f} | {r['peak_mb']:.0f} |"
        )
    return [*lines, ""], raw


# --- driver ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    args = parser.parse_args()
    parts = PARTS if args.part == "all" else (args.part,)
    raw_path = HERE / "results.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    for part in parts:
        started = time.perf_counter()
        run = {"bowl": part_bowl, "bench": part_bench}.get(part) or (
            lambda part=part: part_digits(MODELS[part])
        )
        lines, numbers = run()
        raw[part] = {"lines": lines, "numbers": numbers, "seconds": time.perf_counter() - started,
                     "machine": bench.machine()}  # fmt: skip
        raw_path.write_text(json.dumps(raw, indent=1, default=float) + "\n")
        print("\n".join(lines), flush=True)
    write(raw)


def write(raw: dict) -> None:
    notes = HERE / "notes.md"
    out = [
        "# Shampoo and SOAP, measured",
        "",
        "Written by `experiments/second_order/run.py` (raw numbers: `results.json`); each part records the "
        "machine it ran on and how long it took.",
        "",
    ]
    for part in PARTS:
        if part in raw:
            out += raw[part]["lines"]
            out += ["", f"*{part}: {raw[part]['seconds'] / 60:.1f} min*", *raw[part]["machine"], ""]
    if notes.exists():
        out += [notes.read_text()]
    (HERE / "results.md").write_text("\n".join(out).rstrip() + "\n")


if __name__ == "__main__":
    main()
