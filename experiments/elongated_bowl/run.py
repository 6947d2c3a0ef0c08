"""The course's elongated bowl: an ill-conditioned quadratic minimized by the nine optimizers.

One jitted program trains every optimizer over a grid of learning rates (vmapped over the rates, a
`lax.scan` over the steps), picks each optimizer's fastest stable rate, prints the table, and writes
`results.md` and the contour plot `paths.png` beside this file.

    python experiments/elongated_bowl/run.py
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gradtx

HERE = Path(__file__).parent
CURVATURE = jnp.array([1.0, 25.0])  # condition number 25: a bowl 5x longer than wide
START = jnp.array([-4.0, 1.5])
TARGET = 1e-3  # "reached the optimum": loss within 1e-3 of the minimum (0)
STEPS = 400
LEARNING_RATES = jnp.logspace(-3, 0, 13)  # the range in use; larger rates win here only by lucky leaps

OPTIMIZERS = {
    "SGD": lambda lr: gradtx.sgd(lr),
    "Momentum": lambda lr: gradtx.sgd(lr, momentum=0.9),
    "NAG": lambda lr: gradtx.sgd(lr, momentum=0.9, nesterov=True),
    "AdaGrad": lambda lr: gradtx.adagrad(lr),
    "RMSProp": lambda lr: gradtx.rmsprop(lr),
    "Adam": lambda lr: gradtx.adam(lr),
    "AdaMax": lambda lr: gradtx.adamax(lr),
    "Nadam": lambda lr: gradtx.nadam(lr),
    "AdamW": lambda lr: gradtx.adamw(lr),
}


def loss(theta):
    return 0.5 * jnp.sum(CURVATURE * theta**2)


def descend(make, learning_rate):
    tx = make(learning_rate)

    def step(carry, _):
        theta, state = carry
        value, grad = jax.value_and_grad(loss)(theta)
        updates, state = tx.update(grad, state, theta)
        return (gradtx.apply_updates(theta, updates), state), (theta, value)

    _, (path, losses) = jax.lax.scan(step, (START, tx.init(START)), length=STEPS)
    return path, losses


@jax.jit
def run_all():
    return {
        name: jax.vmap(lambda lr, make=make: descend(make, lr))(LEARNING_RATES)
        for name, make in OPTIMIZERS.items()
    }


def steps_to_target(losses: np.ndarray) -> np.ndarray:
    """The step from which the loss stays within TARGET of the optimum, per learning rate (STEPS + 1: never).

    "Stays" matters: an oscillating optimizer can pass below the target once and climb out again.
    """
    inside = np.isfinite(losses) & (losses <= TARGET)
    stays = np.flip(np.logical_and.accumulate(np.flip(inside, -1), -1), -1)
    return np.where(stays[:, -1], stays.argmax(-1), STEPS + 1)


def main() -> None:
    start = time.perf_counter()
    results = jax.tree.map(np.asarray, run_all())
    elapsed = time.perf_counter() - start
    rows, best_paths = [], {}
    for name in OPTIMIZERS:  # the results dict comes back with sorted keys
        paths, losses = results[name]
        steps = steps_to_target(losses)
        final = np.where(np.isfinite(losses[:, -1]), losses[:, -1], np.inf)
        best = int(np.lexsort((final, steps))[0])  # fewest steps, then lowest final loss
        best_paths[name] = paths[best]
        reached = str(steps[best]) if steps[best] <= STEPS else f"> {STEPS}"
        rows.append((name, float(LEARNING_RATES[best]), reached, float(final[best])))
    header = (
        f"| optimizer | best learning rate | steps until the loss stays <= {TARGET:g} "
        f"| final loss after {STEPS} steps |"
    )
    table = [header, "|---|---:|---:|---:|"]
    table += [f"| {n} | {lr:.3g} | {s} | {f:.2e} |" for n, lr, s, f in rows]
    print("\n".join(table))
    runs = len(OPTIMIZERS) * len(LEARNING_RATES)
    print(f"\n{runs} runs of {STEPS} steps in one compiled program: {elapsed:.2f} s (compile included)")
    (HERE / "results.md").write_text(
        "# Elongated bowl\n\n"
        f"Loss 0.5*(x^2 + 25*y^2) from {tuple(np.asarray(START).tolist())}; each optimizer (Keras defaults "
        f"besides the learning rate) over {len(LEARNING_RATES)} learning rates from 1e-3 to 1 (the usual "
        "range; AdaGrad and Nadam would take larger ones here), the fastest "
        f"stable one kept. Regenerate with `make demo`.\n\n" + "\n".join(table) + "\n"
    )
    plot(best_paths, HERE / "paths.png")


def plot(paths: dict[str, np.ndarray], where: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = np.meshgrid(np.linspace(-4.5, 1.5, 300), np.linspace(-2, 2, 200))
    z = 0.5 * (float(CURVATURE[0]) * x**2 + float(CURVATURE[1]) * y**2)
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.contour(x, y, z, levels=np.geomspace(1e-2, 60, 14), colors="0.75", linewidths=0.8)
    for name, path in paths.items():
        ax.plot(path[:60, 0], path[:60, 1], ".-", markersize=3, linewidth=1, label=name)
    ax.plot(0, 0, "k*", markersize=12)
    ax.set(xlim=(-4.5, 1.5), ylim=(-2, 2), xlabel=r"$\theta_1$", ylabel=r"$\theta_2$")
    ax.set_title("Elongated bowl: first 60 steps of each optimizer at its fastest learning rate")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(where, dpi=110)
    print(f"wrote {where}")


if __name__ == "__main__":
    main()
