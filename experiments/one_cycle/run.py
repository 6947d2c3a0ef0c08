"""1cycle against constant, exponential and performance scheduling on digits, at equal step budgets.

SGD with momentum 0.9 (1cycle also cycles the momentum, 0.95 -> 0.85 -> 0.95) trains a 64-100-100-10
MLP on scikit-learn's digits. Each schedule gets the same budget and its own best learning rate from a
small grid (its peak rate for 1cycle, its initial rate otherwise), chosen by mean validation loss; all
schedules, rates and seeds train in one compiled program per budget.

    python experiments/one_cycle/run.py
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits

import gradtx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent
RATES = [0.01, 0.03, 0.1, 0.3]
SEEDS = 5
BATCH = 32


def schedules(total: int) -> dict:
    return {
        "constant": lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9),
        # The rate falls 100-fold over the budget.
        "exponential": lambda learning_rate: gradtx.sgd(
            gradtx.exponential_schedule(learning_rate, total, 0.01), momentum=0.9
        ),
        "performance": lambda learning_rate: gradtx.chain(
            gradtx.sgd(learning_rate, momentum=0.9), gradtx.reduce_on_plateau(factor=0.5, patience=2)
        ),
        "1cycle": lambda learning_rate: gradtx.sgd(
            gradtx.one_cycle_schedule(total, learning_rate), momentum=gradtx.one_cycle_momentum(total)
        ),
    }


def main():
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
    order = np.random.default_rng(3).permutation(len(x))
    x, y = x[order], y[order]
    (xt, yt), (xv, yv) = (x[:1440], y[:1440]), (x[1440:], y[1440:])
    per_epoch = len(xt) // BATCH

    def init(key):
        keys = jax.random.split(key, 3)
        sizes = [64, 100, 100, 10]
        return {
            f"w{i}": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a)
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
        } | {f"b{i}": jnp.zeros(b) for i, b in enumerate(sizes[1:])}

    def logits(p, xb):
        for i in range(3):
            xb = xb @ p[f"w{i}"] + p[f"b{i}"]
            xb = jax.nn.relu(xb) if i < 2 else xb
        return xb

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, batch[0]), batch[1]).mean()

    def evaluate(p):
        return {"valid_loss": loss_fn(p, (xv, yv)), "valid_accuracy": (logits(p, xv).argmax(-1) == yv).mean()}

    lines = [
        "# 1cycle vs constant, exponential and performance scheduling (measured)",
        "",
        f"Digits, MLP 64-100-100-10, SGD + momentum 0.9, batch {BATCH}, {SEEDS} seeds; learning rate per "
        f"schedule picked from {RATES} by mean final validation loss. Validation: {len(xv)} examples.",
        "",
    ]
    started = time.perf_counter()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, epochs in zip(axes, [5, 20], strict=True):
        total = epochs * per_epoch
        families = {
            name: (make, gradtx.grid(learning_rate=RATES, seed=list(range(SEEDS))))
            for name, make in schedules(total).items()
        }
        results = gradtx.compare(
            loss_fn, init, families,
            gradtx.shuffled_batches((xt, yt), BATCH),
            total,
            eval_fn=evaluate,
            eval_every=per_epoch,
            plateau_metric="valid_loss",
        )
        lines += [
            f"## Budget: {epochs} epochs ({total} steps)",
            "",
            "| schedule | best rate | final valid loss | final valid accuracy | final training loss |",
            "|---|---|---|---|---|",
        ]
        for name, result in results.items():
            rows = result.rows()
            lr = min(
                RATES,
                key=lambda r: np.mean(
                    [w["final_valid_loss"] for w in rows if np.isclose(w["learning_rate"], r)]
                ),
            )
            group = [w for w in rows if np.isclose(w["learning_rate"], lr)]
            pick = np.isclose(result.configs["learning_rate"], lr)

            def stat(key, group=group):
                v = np.array([w[key] for w in group])
                return f"{v.mean():.4f} +- {v.std():.4f}"

            lines.append(
                f"| {name} | {lr:g} | {stat('final_valid_loss')} | {stat('final_valid_accuracy')} | "
                f"{stat('final_loss')} |"
            )
            curve = np.asarray(result.history.metrics["valid_loss"])[pick].mean(0)
            ax.plot(np.arange(1, epochs + 1), curve, label=f"{name} (lr={lr:g})")
        lines.append("")
        ax.set(
            title=f"{epochs} epochs", xlabel="epoch", ylabel="validation loss (mean of seeds)", yscale="log"
        )
        ax.legend()
    fig.savefig(HERE / "validation_loss.png", dpi=110, bbox_inches="tight")
    lines.append(f"Run time {time.perf_counter() - started:.0f} s; jax {jax.__version__}.")
    print("\n".join(lines))
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
