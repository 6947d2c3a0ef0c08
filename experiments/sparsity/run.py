"""The course's three ways to a sparse model, and FTRL's l1, compared on scikit-learn's digits.

An MLP 64-128-64-10 is trained with SGD + momentum (ways 1 to 3) or FTRL (way 4). At each target
sparsity of its kernels (biases are not pruned, as in TF-MOT), the four ways are compared on test
accuracy:

1. zero the tiny weights: train dense, then `gradtx.prune_by_magnitude` (no retraining);
2. strong l1: train with `gradtx.l1` on the kernels, then zero the tiny weights; the l1 rate is picked
   per sparsity on a validation split, from a grid;
3. gradual magnitude pruning: `gradtx.magnitude_pruning` with TF-MOT's polynomial-decay schedule,
   from 0 to the target between 20% and 70% of training, then training on with the mask fixed;
4. FTRL + l1: train with `gradtx.ftrl`, whose l1 term (on the kernels) sets weights to exactly 0; no
   pruning: at each target, the l1 rate is picked on the validation split among those whose runs
   reach the target with their exact zeros alone.

Every configuration (seed x method x sparsity or l1 rate) is one lane of a single vmapped, jitted
training run. Prints the table and writes ``results.md`` and ``accuracy_vs_sparsity.png`` here.

    python experiments/sparsity/run.py
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import gradtx
from gradtx.ftrl import ftrl

HERE = Path(__file__).parent
SIZES = (64, 128, 64, 10)
SEEDS = (0, 1, 2)
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
L1_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
STEPS, BATCH, LEARNING_RATE, MOMENTUM = 1500, 64, 0.05, 0.9
BEGIN, END, FREQUENCY = 300, 1050, 25  # pruning from 20% to 70% of training, every 25 steps
# FTRL: learning rate and initial accumulator picked in a preliminary run (seed 0). Keras's default
# initial_accumulator_value=0.1 forgets the random initialization (the first weights are
# (1 - sqrt(n_0 / n_1)) * w_0 - ...), and the MLP then trains poorly.
FTRL_LEARNING_RATE, FTRL_INITIAL_ACCUMULATOR = 0.05, 1e-6
FTRL_L1 = (0.01, 0.05, 0.1, 0.2, 0.25)  # l1_regularization_strength: |z| <= l1 gives a weight of exactly 0


def data():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = jnp.asarray(x[order] / 16.0, jnp.float32), jnp.asarray(y[order])
    # 1000 to train, 297 to pick the l1 rate, 500 to test
    return (x[:1000], y[:1000]), (x[1000:1297], y[1000:1297]), (x[1297:], y[1297:])


def init_mlp(key):
    params = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(SIZES)):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(sub, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
            "bias": jnp.zeros(n_out),
        }
    return params


def logits(params, x):
    layers = list(params.values())
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def loss(params, x, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(params, x)), y[:, None], axis=1))


def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(logits(params, x), -1) == y)


def optimizer(l1_rate, target_sparsity, prune):
    """SGD + momentum, with an l1 penalty on the kernels and (if ``prune``) gradual magnitude pruning.

    The rates are arrays, so one ``tx.update`` serves every lane; ``prune`` is a Python bool.
    """
    parts = [gradtx.masked(gradtx.l1(l1_rate), gradtx.weights_only), gradtx.sgd(LEARNING_RATE, MOMENTUM)]
    if prune:
        schedule = gradtx.polynomial_decay_sparsity(0.0, target_sparsity, BEGIN, END, frequency=FREQUENCY)
        parts.append(gradtx.masked(gradtx.magnitude_pruning(schedule), gradtx.weights_only))
    return gradtx.chain(*parts)


def ftrl_optimizer(l1_rate):
    """FTRL with the l1 term on the kernels only (the biases get FTRL without it)."""
    kernels = ftrl(
        FTRL_LEARNING_RATE,
        initial_accumulator_value=FTRL_INITIAL_ACCUMULATOR,
        l1_regularization_strength=l1_rate,
    )
    biases = ftrl(FTRL_LEARNING_RATE, initial_accumulator_value=FTRL_INITIAL_ACCUMULATOR)
    label = lambda path, leaf: "kernel" if gradtx.weights_only(path, leaf) else "bias"  # noqa: E731
    return gradtx.partition({"kernel": kernels, "bias": biases}, label)


def train(train_set, seed, tx):
    x, y = train_set
    params = init_mlp(jax.random.key(seed))
    batches = jax.random.randint(jax.random.key(1000 + seed), (STEPS, BATCH), 0, len(y))

    def step(carry, idx):
        params, state = carry
        u, state = tx.update(jax.grad(loss)(params, x[idx], y[idx]), state, params)
        return (gradtx.apply_updates(params, u), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
    return params


def kernel_sparsity(params):
    return gradtx.sparsity(params, mask=gradtx.weights_only).total


def main():
    start = time.perf_counter()
    train_set, val_set, test_set = data()
    seeds = jnp.asarray(SEEDS)
    levels = jnp.asarray(SPARSITIES)
    rates = jnp.asarray(L1_RATES)

    # One jitted program per method; inside it, lanes for seeds x (l1 rates | target sparsities).
    def lanes(fn, values):
        return jax.vmap(lambda s: jax.vmap(lambda v: fn(s, v))(values))(seeds)

    dense = jax.jit(
        lambda: lanes(lambda s, v: train(train_set, s, optimizer(0.0, 0.0, False)), jnp.zeros(1))
    )()
    l1_runs = jax.jit(lambda: lanes(lambda s, r: train(train_set, s, optimizer(r, 0.0, False)), rates))()
    gradual = jax.jit(lambda: lanes(lambda s, t: train(train_set, s, optimizer(0.0, t, True)), levels))()
    ftrl_rates = jnp.asarray(FTRL_L1)
    ftrl_runs = jax.jit(lambda: lanes(lambda s, r: train(train_set, s, ftrl_optimizer(r)), ftrl_rates))()

    def prune_all(params):  # the trained models pruned to every level: seeds x models x levels
        prune = lambda p, t: gradtx.prune_by_magnitude(p, t, mask=gradtx.weights_only)  # noqa: E731
        return jax.vmap(jax.vmap(lambda p: jax.vmap(lambda t: prune(p, t))(levels)))(params)

    def evaluate(params, split):
        fn = lambda p: accuracy(p, *split)  # noqa: E731
        for _ in range(params["layer0"]["kernel"].ndim - 2):  # one vmap per lane axis
            fn = jax.vmap(fn)
        return np.asarray(fn(params))

    dense_acc = evaluate(dense, test_set)[:, 0]
    zero_tiny = evaluate(prune_all(dense), test_set)[:, 0]  # seeds x levels
    l1_pruned = prune_all(l1_runs)  # seeds x rates x levels
    l1_val, l1_test = evaluate(l1_pruned, val_set), evaluate(l1_pruned, test_set)
    best = l1_val.mean(0).argmax(0)  # per level, the rate with the best mean validation accuracy
    l1_acc = np.stack([l1_test[:, r, i] for i, r in enumerate(best)], axis=1)
    ftrl_exact = np.asarray(jax.vmap(jax.vmap(kernel_sparsity))(ftrl_runs))  # seeds x rates
    ftrl_val, ftrl_test = evaluate(ftrl_runs, val_set), evaluate(ftrl_runs, test_set)  # seeds x rates
    ftrl_choice = []  # per level: the rate (reaching the level in every seed) best on validation, or None
    for level in SPARSITIES:
        reaching = [j for j in range(len(FTRL_L1)) if ftrl_exact[:, j].min() >= level]
        ftrl_choice.append(max(reaching, key=lambda j: ftrl_val[:, j].mean()) if reaching else None)
    gradual_acc = evaluate(gradual, test_set)  # seeds x levels
    reached = np.asarray(jax.vmap(jax.vmap(kernel_sparsity))(gradual))
    tiny = lambda p: jax.tree.map(lambda w: jnp.where(jnp.abs(w) < 1e-3, 0, w), p)  # noqa: E731
    l1_tiny = np.asarray(jax.vmap(jax.vmap(lambda p: kernel_sparsity(tiny(p))))(l1_runs))
    l1_exact = np.asarray(jax.vmap(jax.vmap(kernel_sparsity))(l1_runs))
    seconds = time.perf_counter() - start

    def cell(a):
        return f"{100 * a.mean():.1f} ± {100 * a.std():.1f}"

    def ftrl_cell(j):
        if j is None:
            return "not reached"
        return f"{cell(ftrl_test[:, j])} (l1 = {FTRL_L1[j]:g}: {100 * ftrl_exact[:, j].mean():.1f}% zeros)"

    rows = [
        f"| {s:.0%} | {cell(zero_tiny[:, i])} | {cell(l1_acc[:, i])} (l1 = {L1_RATES[best[i]]:g}) "
        f"| {cell(gradual_acc[:, i])} | {ftrl_cell(ftrl_choice[i])} |"
        for i, s in enumerate(SPARSITIES)
    ]
    natural = "; ".join(
        f"l1 = {r:g}: {100 * l1_exact[:, j].mean():.1f}% exactly 0, "
        f"{100 * l1_tiny[:, j].mean():.0f}% below 1e-3"
        for j, r in enumerate(L1_RATES)
    )
    ftrl_natural = "; ".join(
        f"l1 = {r:g}: {100 * ftrl_exact[:, j].mean():.1f}% exactly 0 at {cell(ftrl_test[:, j])}% accuracy"
        for j, r in enumerate(FTRL_L1)
    )
    table = "\n".join(
        [
            "| kernel sparsity | zero tiny weights | strong l1, then zero tiny weights "
            "| gradual magnitude pruning | FTRL + l1, no pruning |",
            "|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    n_kernel = sum(a * b for a, b in itertools.pairwise(SIZES))
    report = f"""# Three ways to a sparse model, and FTRL's l1 (digits)

MLP {"-".join(map(str, SIZES))} ({n_kernel} kernel weights), SGD with momentum (learning rate
{LEARNING_RATE}, momentum {MOMENTUM}) or FTRL (last column), {STEPS} steps of batches of {BATCH}
from 1000 training images;
test accuracy (%) on 500 held-out images, mean ± std over seeds {list(SEEDS)}. Sparsity is that of
the kernels (biases are kept). Dense accuracy: {cell(dense_acc)}.

* zero tiny weights: the dense model with its smallest-magnitude weights set to 0, no retraining.
* strong l1: trained with `l1(rate)` on the kernels, then its smallest weights set to 0; the rate
  (from {list(L1_RATES)}) is picked per sparsity on 297 validation images. By itself l1 makes
  weights tiny, not zero (SGD steps make them oscillate around 0); per rate, of the kernel weights:
  {natural}.
* gradual magnitude pruning: `magnitude_pruning(polynomial_decay_sparsity(0, target, {BEGIN}, {END},
  frequency={FREQUENCY}))` on the kernels; the sparsity reached equals the target in every run
  (largest gap {np.abs(reached - np.asarray(SPARSITIES)[None]).max():.4f}).
* FTRL + l1: `ftrl({FTRL_LEARNING_RATE}, initial_accumulator_value={FTRL_INITIAL_ACCUMULATOR:g},
  l1_regularization_strength=rate)` on the kernels (FTRL without l1 on the biases), nothing pruned:
  unlike SGD + l1, FTRL's l1 term makes weights exactly 0 (a weight is 0 whenever its accumulated
  gradient |z| is at most l1). Per rate: {ftrl_natural}. At each target the rate is picked on the
  validation images among those that reach it in every seed (the cell gives the sparsity reached,
  which may exceed the target); "not reached": no rate of {list(FTRL_L1)} does. The learning rate
  and initial accumulator were picked in a preliminary run on seed 0; with Keras's default
  `initial_accumulator_value=0.1` FTRL forgets most of the random initialization in its first step
  (the weights become (1 - sqrt(n_0 / n_1)) w_0 - ...) and this MLP trains poorly.

{table}

Regenerate with `python experiments/sparsity/run.py` ({seconds:.0f} s on 2 CPU cores, all runs
vmapped).
"""
    (HERE / "results.md").write_text(report)
    print(report)
    plot(dense_acc, zero_tiny, l1_acc, gradual_acc, ftrl_exact, ftrl_test)


def plot(dense_acc, zero_tiny, l1_acc, gradual_acc, ftrl_exact, ftrl_test):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.asarray(SPARSITIES)
    for acc, label, marker in (
        (zero_tiny, "zero tiny weights", "o"),
        (l1_acc, "strong l1, then zero tiny weights", "s"),
        (gradual_acc, "gradual magnitude pruning", "^"),
    ):
        ax.errorbar(x, 100 * acc.mean(0), yerr=100 * acc.std(0), marker=marker, capsize=3, label=label)
    # FTRL's points sit at the sparsity each l1 rate reached (its exact zeros), not at a target.
    ax.errorbar(
        ftrl_exact.mean(0),
        100 * ftrl_test.mean(0),
        yerr=100 * ftrl_test.std(0),
        marker="D",
        capsize=3,
        label="FTRL + l1 (exact zeros, no pruning)",
    )
    ax.axhline(100 * dense_acc.mean(), color="gray", linestyle="--", label="dense")
    ax.set_xlabel("kernel sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Digits MLP: accuracy against sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "accuracy_vs_sparsity.png", dpi=120)


if __name__ == "__main__":
    main()
