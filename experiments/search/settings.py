"""The two settings of the search experiment: scikit-learn's digits, the course's MLP (64-100-100-10),
shuffled batches of 32, the validation loss on 357 held-out digits as the metric.

* ``adamw``: AdamW over learning rate, beta_1 and weight decay, 810 steps (18 epochs), evaluated every
  10 steps (half the issue's 1,620 steps, so that the experiment fits in about half an hour on 2 shared
  cores);
* ``sgd``: SGD with momentum over learning rate and momentum, 810 steps (18 epochs), evaluated every 10
  steps: the 1cycle experiment's model and optimizer (``experiments/one_cycle/``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import gradtx


class Setting(NamedTuple):
    name: str
    make_tx: Any  # config -> optimizer
    space: dict
    steps: int
    period: int  # evaluations every `period` steps: successive halving's min_steps


def adamw(learning_rate, beta_1, weight_decay):
    return gradtx.adamw(learning_rate, beta_1=beta_1, weight_decay=weight_decay)


def sgd(learning_rate, momentum):
    return gradtx.sgd(learning_rate, momentum=momentum)


SETTINGS = {
    "adamw": Setting(
        "adamw",
        adamw,
        {
            "learning_rate": gradtx.log_uniform(1e-4, 0.1),
            "beta_1": gradtx.uniform(0.8, 0.99),
            "weight_decay": gradtx.log_uniform(1e-5, 0.1),
        },
        810,
        10,
    ),
    "sgd": Setting(
        "sgd",
        sgd,
        {"learning_rate": gradtx.log_uniform(1e-3, 1.0), "momentum": gradtx.uniform(0.5, 0.99)},
        810,
        10,
    ),
}

BATCH = 32


def digits():
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
    order = np.random.default_rng(3).permutation(len(x))  # the split of experiments/one_cycle
    x, y = x[order], y[order]
    return (x[:1440], y[:1440]), (x[1440:], y[1440:])


(TRAIN, VALID) = digits()
DATA = gradtx.shuffled_batches(TRAIN, BATCH)


def init(key):
    keys = jax.random.split(key, 3)
    sizes = [64, 100, 100, 10]
    return {
        f"w{i}": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a)
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    } | {f"b{i}": jnp.zeros(b) for i, b in enumerate(sizes[1:])}


PARAMS = init(jax.random.PRNGKey(0))


def logits(p, x):
    for i in range(3):
        x = x @ p[f"w{i}"] + p[f"b{i}"]
        x = jax.nn.relu(x) if i < 2 else x
    return x


def loss_fn(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, batch[0]), batch[1]).mean()


def evaluate(p):
    return {"valid_loss": loss_fn(p, VALID)}
