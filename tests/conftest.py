"""Keras 3 is the numerics oracle; it must run on its JAX backend, chosen before keras is imported."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
