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
from gradtx.constraints import max_norm, min_max_norm, non_neg, unit_norm
from gradtx.hyperparams import Hyperparams, hyperparams, set_hyperparams
from gradtx.optimizers import adagrad, adam, adamax, adamw, nadam, rmsprop, sgd
from gradtx.pruning import (
    PruningState,
    SparsityReport,
    SparsitySchedule,
    constant_sparsity,
    magnitude_pruning,
    polynomial_decay_sparsity,
    prune_by_magnitude,
    sparsity,
)
from gradtx.regularizers import (
    decoupled_weight_decay,
    dropout,
    l1,
    l1_l2,
    l1_l2_penalty,
    l1_penalty,
    l2,
    l2_penalty,
)
from gradtx.routing import MaskedState, PartitionState, label_by_path, masked, partition, weights_only
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
    "Hyperparams",
    "MaskedState",
    "PartitionState",
    "PruningState",
    "Schedule",
    "SparsityReport",
    "SparsitySchedule",
    "Transformation",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "constant_sparsity",
    "decoupled_weight_decay",
    "dropout",
    "hyperparams",
    "identity",
    "l1",
    "l1_l2",
    "l1_l2_penalty",
    "l1_penalty",
    "l2",
    "l2_penalty",
    "label_by_path",
    "magnitude_pruning",
    "masked",
    "max_norm",
    "min_max_norm",
    "momentum",
    "nadam",
    "non_neg",
    "partition",
    "polynomial_decay_sparsity",
    "prune_by_magnitude",
    "rmsprop",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_learning_rate",
    "scale_by_nadam",
    "scale_by_rms",
    "set_hyperparams",
    "sgd",
    "sparsity",
    "step_count",
    "unit_norm",
    "weights_only",
]
