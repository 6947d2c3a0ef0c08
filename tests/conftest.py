"""Keras 3 is the numerics oracle; it must run on its JAX backend, chosen before keras is imported."""

import os

from hypothesis import settings

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Property tests draw the same examples on every run, so that CI cannot fail on a draw it never made
# before; HYPOTHESIS_PROFILE=explore draws new ones (run it locally when changing a property).
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
