"""The course's optimizer comparison, measured: the nine optimizers on digits, side by side in one program.

Mirrors Hands-On ML 3, notebook 11 (three Dense(100, relu, he_normal) layers and a softmax output,
batch 32, every optimizer at learning_rate=0.001 with Keras's defaults, AdamW with weight_decay=1e-5) on
scikit-learn's digits instead of Fashion MNIST, in two settings:

* ``course``: those hyperparameters as they are;
* ``tuned``: each optimizer at the learning rate (from a small grid, trained in the same program) with
  the best mean validation accuracy.

Each configuration runs with several seeds (vmapped). The table gives the convergence speed (steps until
the training loss, averaged over an epoch, first falls below a target) and quality (best validation
accuracy, mean +- std over seeds) next to the course's stars.

    python experiments/optimizer_comparison/run.py            # the demo (make demo), < 2 minutes
    python experiments/optimizer_comparison/run.py --large    # more epochs and seeds: writes results.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import gradtx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent
TARGET_LOSS = 0.1

# name: (factory of the learning rate, the course's stars for speed and quality)
OPTIMIZERS = {
    "SGD": (lambda learning_rate: gradtx.sgd(learning_rate), "*", "***"),
    "Momentum": (lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9), "**", "***"),
    "NAG": (lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9, nesterov=True), "**", "***"),
    "AdaGrad": (lambda learning_rate: gradtx.adagrad(learning_rate), "***", "* (stops too early)"),
    "RMSProp": (lambda learning_rate: gradtx.rmsprop(learning_rate), "***", "** or ***"),
    "Adam": (lambda learning_rate: gradtx.adam(learning_rate), "***", "** or ***"),
    "AdaMax": (lambda learning_rate: gradtx.adamax(learning_rate), "***", "** or ***"),
    "Nadam": (lambda learning_rate: gradtx.nadam(learning_rate), "***", "** or ***"),
    "AdamW": (lambda learning_rate: gradtx.adamw(learning_rate, weight_decay=1e-5), "***", "** or ***"),
}


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.he_normal()
        sizes = [64, 100, 100, 100]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, kernel_init=init, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )
        self.out = nnx.Linear(100, 10, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = nnx.relu(layer(x))
        return self.out(x)


def load():
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
    order = np.random.default_rng(42).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:1440], y[:1440]), (x[1440:], y[1440:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action="store_true", help="more epochs and seeds; writes results.md")
    args = parser.parse_args()
    epochs, seeds = (40, 5) if args.large else (15, 3)
    (x_train, y_train), (x_valid, y_valid) = load()
    batch = 32
    per_epoch = len(x_train) // batch
    steps = epochs * per_epoch
    graphdef, _ = nnx.split(MLP(nnx.Rngs(0)))

    def init(key):
        return nnx.split(MLP(nnx.Rngs(key)))[1]

    def loss_fn(state, b):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, state)(b[0]), b[1]).mean()

    def evaluate(state):
        logits = nnx.merge(graphdef, state)(x_valid)
        return {"valid_accuracy": (logits.argmax(-1) == y_valid).mean()}

    # The course's setting, lr = 0.001, is the first rate of each optimizer's grid.
    rates = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    configs = gradtx.grid(learning_rate=rates, seed=list(range(seeds)))
    families = {name: (make, configs) for name, (make, _, _) in OPTIMIZERS.items()}
    n_runs = len(families) * len(configs["seed"])
    print(
        f"Training {n_runs} runs ({len(OPTIMIZERS)} optimizers x {len(rates)} rates x {seeds} seeds), "
        f"{steps} steps each, in one compiled program",
        flush=True,
    )
    started = time.perf_counter()
    results = gradtx.compare(
        loss_fn, init, families,
        gradtx.shuffled_batches((x_train, y_train), batch),
        steps,
        eval_fn=evaluate,
        eval_every=per_epoch,
        chunks=10,
        progress=True,
    )
    seconds = time.perf_counter() - started

    def summarize(result, learning_rate):
        pick = np.isclose(result.configs["learning_rate"], learning_rate)
        loss = np.asarray(result.history.loss)[pick]
        # Training loss averaged over each epoch: one number per epoch, less noisy than one batch.
        epoch_loss = loss[:, : epochs * per_epoch].reshape(len(loss), epochs, per_epoch).mean(-1)
        reached = [(np.flatnonzero(e <= TARGET_LOSS)[:1] + 1) * per_epoch for e in epoch_loss]
        speed = [int(r[0]) if r.size else None for r in reached]
        accuracy = np.asarray(result.history.metrics["valid_accuracy"])[pick].max(axis=1)
        return speed, accuracy, epoch_loss.mean(0)

    lines = [
        f"Digits, MLP 64-100-100-100-10 (he_normal, ReLU), batch 32, {epochs} epochs ({steps} steps), "
        f"{seeds} seeds; target training loss {TARGET_LOSS} (epoch average). {n_runs} runs in "
        f"{seconds:.0f} s on {jax.devices()[0].platform} ({os.cpu_count()} cores); jax {jax.__version__}, "
        f"flax {flax.__version__}.",
        "",
        "| optimizer | course: speed | course: quality | lr=0.001: steps to target | best valid acc. | "
        "tuned lr | tuned: steps to target | best valid acc. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    curves = {}
    for name, (_, speed_stars, quality_stars) in OPTIMIZERS.items():
        tuned = results[name]
        course = summarize(tuned, 1e-3)
        mean_acc = {lr: summarize(tuned, lr)[1].mean() for lr in rates}
        best_lr = max(mean_acc, key=mean_acc.get)
        best = summarize(tuned, best_lr)
        curves[name] = (course[2], best[2], best_lr)

        def fmt_speed(s):
            hits = [x for x in s if x is not None]
            if not hits:
                return "not reached"
            text = f"{np.median(hits):.0f}"
            return text if len(hits) == len(s) else f"{text} ({len(hits)}/{len(s)} seeds)"

        def fmt_acc(a):
            return f"{a.mean():.3f} +- {a.std():.3f}"

        lines.append(
            f"| {name} | {speed_stars} | {quality_stars} | {fmt_speed(course[0])} | {fmt_acc(course[1])} | "
            f"{best_lr:g} | {fmt_speed(best[0])} | {fmt_acc(best[1])} |"
        )
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for name, (course_curve, tuned_curve, lr) in curves.items():
        axes[0].plot(np.arange(1, epochs + 1), course_curve, label=name)
        axes[1].plot(np.arange(1, epochs + 1), tuned_curve, label=f"{name} (lr={lr:g})")
    axes[0].set(
        title="course hyperparameters (lr = 0.001)", xlabel="epoch", ylabel="training loss", yscale="log"
    )
    axes[1].set(title="tuned learning rate", xlabel="epoch", yscale="log")
    for ax in axes:
        ax.axhline(TARGET_LOSS, color="gray", linestyle=":")
        ax.legend(fontsize="small")
    out = HERE / ("learning_curves.png" if args.large else "demo_learning_curves.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"learning curves: {out}")
    if args.large:
        (HERE / "results.md").write_text("# Optimizer comparison (measured)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
