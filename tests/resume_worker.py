"""Training calls that tests/test_resume.py interrupts (SIGKILL, SIGINT) in a subprocess and resumes.

``python tests/resume_worker.py MODE DIR`` runs ``MODE`` (fit, sweep or compare) with ``checkpoint_dir=DIR``.
Each call is long enough (many small chunks) for a signal to land in the middle of it.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import gradtx

RNG = np.random.default_rng(3)
X = jnp.asarray(RNG.normal(size=(512, 8)), jnp.float32)
Y = jnp.asarray(np.tanh(np.asarray(X) @ RNG.normal(size=(8, 4))), jnp.float32)
DATA = gradtx.shuffled_batches((X, Y), 32)
STEPS, CHUNKS, EVERY = 1200, 12, 50


def init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": 0.3 * jax.random.normal(k1, (8, 64)), "w2": 0.3 * jax.random.normal(k2, (64, 4))}


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)


def valid(p):
    return {"valid_loss": loss_fn(p, (X[:128], Y[:128]))}


def make(learning_rate, momentum):
    schedule = gradtx.cosine_decay_schedule(learning_rate, STEPS)
    return gradtx.chain(gradtx.sgd(schedule, momentum=momentum), gradtx.reduce_on_plateau(patience=2))


COMMON = dict(eval_fn=valid, eval_every=EVERY, plateau_metric="valid_loss", chunks=CHUNKS)
# Built once, so that the test's resumed and uninterrupted calls share one compiled program.
FIT_TX = make(0.05, 0.9)
STOPPING = gradtx.EarlyStopping("valid_loss", patience=2, min_delta=1e-3, restore_best_weights=True)
FAMILIES = {
    "adam": gradtx.chain(gradtx.adam(0.01), gradtx.reduce_on_plateau(patience=2)),
    "sgd": (make, {"learning_rate": [0.02, 0.1], "momentum": [0.9, 0.9]}),
}


def run(mode: str, directory: str | None):
    if mode == "fit":
        params = init(jax.random.PRNGKey(0))
        return gradtx.fit(loss_fn, params, FIT_TX, DATA, STEPS, checkpoint_dir=directory, **COMMON)
    if mode == "sweep":
        configs = gradtx.grid(learning_rate=[0.01, 0.05, 0.3], momentum=[0.0, 0.9])
        return gradtx.sweep(loss_fn, init, make, configs, DATA, STEPS, early_stopping=STOPPING,
                            checkpoint_dir=directory, **COMMON)  # fmt: skip
    if mode == "compare":
        return gradtx.compare(loss_fn, init, FAMILIES, DATA, STEPS, checkpoint_dir=directory, **COMMON)
    raise ValueError(mode)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
    print("finished", flush=True)
