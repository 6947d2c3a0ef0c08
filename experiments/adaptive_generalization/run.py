"""Adaptive methods can generalize worse: Wilson et al. (2017), section 3.3, and a check on digits.

1. The constructed problem. Least-squares binary classification with more features than examples. For
   example ``i`` with label ``y_i`` (+1 with probability ``p > 1/2``): feature 1 is ``y_i``, features 2
   and 3 are 1, and the example has its own block of unique features (1 of them when ``y_i = +1``, 5
   when ``y_i = -1``). Gradient descent from 0 finds the minimum-norm solution, which leans on feature 1
   and classifies new examples correctly. AdaGrad, RMSProp and Adam find a solution proportional to
   ``sign(X^T y)``, which leans on the always-on features 2 and 3 as much as on feature 1, so on new
   examples (whose unique features are unseen, i.e. zero) they predict the majority class: test error
   ``1 - p``. All optimizers and data draws train side by side in one compiled program.

2. Digits. The nine-optimizer MLP at a good learning rate each, many epochs, several seeds: final
   training and validation accuracy and loss, to see whether adaptive methods show a larger gap here.

    python experiments/adaptive_generalization/run.py
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
N_TRAIN, N_TEST, P_POSITIVE, DRAWS, STEPS = 50, 1000, 0.7, 8, 3000


def constructed(key, n, index_offset=0, dims=3 + 5 * N_TRAIN):
    """``n`` examples of the construction; the unique blocks of test examples (offset past the
    training blocks) fall outside the ``dims`` features, so they are zero, as unseen features are."""
    y = jnp.where(jax.random.uniform(key, (n,)) < P_POSITIVE, 1.0, -1.0)
    x = jnp.zeros((n, dims)).at[:, 0].set(y).at[:, 1:3].set(1.0)
    start = 3 + 5 * (index_offset + jnp.arange(n))
    width = jnp.where(y > 0, 1, 5)
    columns = jnp.arange(dims)
    block = (columns >= start[:, None]) & (columns < (start + width)[:, None])
    return x + block, y


def part_one(lines):
    # Each run draws its own data from its seed: the params carry the key (an integer leaf, which the
    # optimizers pass through), and the loss rebuilds that draw's examples from it.
    def init(key):
        return {"w": jnp.zeros(3 + 5 * N_TRAIN), "key": key}

    def loss_fn(p, batch):
        x, y = constructed(p["key"], N_TRAIN)
        return 0.5 * jnp.mean((x @ p["w"] - y) ** 2)

    optimizers = {
        "GD": lambda: gradtx.sgd(0.05),
        "Momentum": lambda: gradtx.sgd(0.02, momentum=0.9),
        "AdaGrad": lambda: gradtx.adagrad(0.05, initial_accumulator_value=0.0),
        "RMSProp": lambda: gradtx.rmsprop(0.001),
        "Adam": lambda: gradtx.adam(0.001),
    }
    families = {name: (make, {"seed": list(range(DRAWS))}) for name, make in optimizers.items()}
    runs = gradtx.compare(loss_fn, init, families, jnp.zeros((1, 1)), STEPS)
    results = {}
    for name, run in runs.items():
        per_draw = []
        for d in range(DRAWS):
            w, key = run.params["w"][d], run.params["key"][d]
            x_train, y_train = constructed(key, N_TRAIN)
            x_test, y_test = constructed(jax.random.fold_in(key, 1), N_TEST, index_offset=N_TRAIN)
            per_draw.append(
                (
                    float(run.history.loss[d, -1]),
                    float(jnp.mean(jnp.sign(x_train @ w) != y_train)),
                    float(jnp.mean(jnp.sign(x_test @ w) != y_test)),
                    float(w[0]),
                    float(w[1]),
                    np.asarray(run.history.loss[d]),
                )
            )
        results[name] = per_draw
    test_labels = [
        constructed(jax.random.fold_in(jax.random.PRNGKey(d), 1), N_TEST, N_TRAIN)[1] for d in range(DRAWS)
    ]

    lines += [
        "## 1. Wilson et al. (2017), section 3.3",
        "",
        f"{N_TRAIN} training examples, {3 + 5 * N_TRAIN} features, p = {P_POSITIVE}, full-batch least "
        f"squares from w = 0, {STEPS} steps, {DRAWS} data draws (mean +- std). "
        f"Test examples: {N_TEST} new ones.",
        "",
        "| optimizer | final training loss | training error | test error | w[feature 1] | w[feature 2] |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        a = np.array([r[:5] for r in rows])
        m, s = a.mean(0), a.std(0)
        lines.append(
            f"| {name} | {m[0]:.1e} | {m[1]:.3f} | {m[2]:.3f} +- {s[2]:.3f} | {m[3]:.3f} | {m[4]:.3f} |"
        )
    negatives = float(np.mean([np.mean(np.asarray(t) < 0) for t in test_labels]))
    lines += [
        "",
        f"The fraction of negative test examples (the error of always answering +1) is {negatives:.3f}.",
        "",
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        ax.semilogy(np.mean([r[5] for r in rows], axis=0), label=name)
    ax.set(xlabel="step", ylabel="training loss (mean of draws)", title="Wilson et al. construction")
    ax.legend()
    fig.savefig(HERE / "constructed.png", dpi=110, bbox_inches="tight")


def part_two(lines):
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
    order = np.random.default_rng(7).permutation(len(x))
    x, y = x[order], y[order]
    # A small training set makes overfitting, and so a generalization gap, visible.
    (xt, yt), (xv, yv) = (x[:500], y[:500]), (x[500:], y[500:])

    def init(key):
        keys = jax.random.split(key, 2)
        return {
            "w0": jax.random.normal(keys[0], (64, 256)) * jnp.sqrt(2 / 64),
            "b0": jnp.zeros(256),
            "w1": jax.random.normal(keys[1], (256, 10)) * jnp.sqrt(2 / 256),
            "b1": jnp.zeros(10),
        }

    def logits(p, xb):
        return jax.nn.relu(xb @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, batch[0]), batch[1]).mean()

    def evaluate(p):
        return {
            "train_accuracy": (logits(p, xt).argmax(-1) == yt).mean(),
            "valid_accuracy": (logits(p, xv).argmax(-1) == yv).mean(),
            "train_loss": loss_fn(p, (xt, yt)),
            "valid_loss": loss_fn(p, (xv, yv)),
        }

    rates = {
        "SGD": (lambda learning_rate: gradtx.sgd(learning_rate), [0.03, 0.1, 0.3]),
        "Momentum": (lambda learning_rate: gradtx.sgd(learning_rate, momentum=0.9), [0.003, 0.01, 0.03]),
        "AdaGrad": (gradtx.adagrad, [0.01, 0.03, 0.1]),
        "RMSProp": (gradtx.rmsprop, [3e-4, 1e-3, 3e-3]),
        "Adam": (gradtx.adam, [3e-4, 1e-3, 3e-3]),
    }
    seeds = 4
    families = {
        n: (make, gradtx.grid(learning_rate=lrs, seed=list(range(seeds)))) for n, (make, lrs) in rates.items()
    }
    steps, every = 3000, 150
    results = gradtx.compare(
        loss_fn, init, families,
        gradtx.shuffled_batches((xt, yt), 32),
        steps,
        eval_fn=evaluate,
        eval_every=every,
    )
    lines += [
        "## 2. Digits: train/validation gap",
        "",
        f"MLP 64-256-10, 500 training examples, {len(xv)} validation examples, batch 32, {steps} steps; "
        f"each optimizer at the rate of its grid with the best mean final validation accuracy, "
        f"{seeds} seeds.",
        "",
        "| optimizer | lr | train acc. | valid acc. | gap | train loss | valid loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        rows = result.rows()
        by_lr = {}
        for r in rows:
            by_lr.setdefault(r["learning_rate"], []).append(r)
        lr, group = max(by_lr.items(), key=lambda kv: np.mean([r["final_valid_accuracy"] for r in kv[1]]))
        mean = {
            k: np.mean([r[f"final_{k}"] for r in group])
            for k in ["train_accuracy", "valid_accuracy", "train_loss", "valid_loss"]
        }
        std = np.std([r["final_valid_accuracy"] for r in group])
        lines.append(
            f"| {name} | {lr:.3g} | {mean['train_accuracy']:.3f} | "
            f"{mean['valid_accuracy']:.3f} +- {std:.3f} | "
            f"{mean['train_accuracy'] - mean['valid_accuracy']:.3f} | {mean['train_loss']:.4f} | "
            f"{mean['valid_loss']:.3f} |"
        )


def main():
    started = time.perf_counter()
    lines = ["# Adaptive methods and generalization (measured)", ""]
    part_one(lines)
    part_two(lines)
    lines += ["", f"Run time {time.perf_counter() - started:.0f} s; jax {jax.__version__}."]
    print("\n".join(lines))
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
