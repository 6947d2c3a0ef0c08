"""gradtx: functional gradient transformations for JAX.

Optimizers, schedules and regularizers as pure ``(init, update)`` pairs composed with `chain`, with the
update rules of the deep-learning course and numerics that agree with Keras 3.
"""

from gradtx.base import (
    ChainState,
    EmptyState,
    Schedule,
    Transformation,
    apply_updates,
    chain,
    identity,
    step_count,
)
from gradtx.grouping import GroupedState, grouped
from gradtx.hyperparams import Hyperparams, hyperparams, set_hyperparams
from gradtx.optimizers import adagrad, adam, adamax, adamw, nadam, rmsprop, sgd
from gradtx.transforms import (
    add_decayed_weights,
    momentum,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_nadam,
    scale_by_rms,
)

__version__ = "0.1.0"

__all__ = [
    "ChainState",
    "EmptyState",
    "GroupedState",
    "Hyperparams",
    "Schedule",
    "Transformation",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "grouped",
    "hyperparams",
    "identity",
    "momentum",
    "nadam",
    "rmsprop",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_learning_rate",
    "scale_by_nadam",
    "scale_by_rms",
    "set_hyperparams",
    "sgd",
    "step_count",
]
