"""gradtx: functional gradient transformations for JAX.

Optimizers, schedules and regularizers as pure ``(init, update)`` pairs composed with `chain`, with the
update rules of the deep-learning course and numerics that agree with Keras 3.
"""

from gradtx.adadelta import AdadeltaState, adadelta, scale_by_adadelta
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
from gradtx.data import ShuffledBatches, shuffled_batches
from gradtx.engine import EarlyStopping, History, StepOutputs, TrainResult
from gradtx.grouping import GroupedState, grouped
from gradtx.hyper import Hyperparams, Range, hyperparam_ranges, hyperparams, set_hyperparams
from gradtx.lion import LionState, lion, scale_by_lion
from gradtx.optimizers import adagrad, adam, adamax, adamw, nadam, rmsprop, sgd
from gradtx.plateau import PlateauState, current_learning_rate, plateau_scale, reduce_on_plateau
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
from gradtx.range_tests import RangeTest, lr_range_sweep, lr_range_test
from gradtx.regularizers import (
    decoupled_weight_decay,
    dropout,
    l1,
    l1_l2,
    l1_l2_penalty,
    l1_penalty,
    l2,
    l2_penalty,
    with_weight_decay,
)
from gradtx.routing import MaskedState, PartitionState, label_by_path, masked, partition, weights_only
from gradtx.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_schedule,
    join_schedules,
    linear_warmup,
    one_cycle_momentum,
    one_cycle_schedule,
    piecewise_constant_schedule,
    power_schedule,
)
from gradtx.sweeps import SweepResult, compare, grid, sweep
from gradtx.training import fit
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
    "AdadeltaState",
    "ChainState",
    "EarlyStopping",
    "EmptyState",
    "GroupedState",
    "History",
    "Hyperparams",
    "LionState",
    "MaskedState",
    "PartitionState",
    "PlateauState",
    "PruningState",
    "Range",
    "RangeTest",
    "Schedule",
    "ShuffledBatches",
    "SparsityReport",
    "SparsitySchedule",
    "StepOutputs",
    "SweepResult",
    "TrainResult",
    "Transformation",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "compare",
    "constant_schedule",
    "constant_sparsity",
    "cosine_decay_schedule",
    "current_learning_rate",
    "decoupled_weight_decay",
    "dropout",
    "exponential_schedule",
    "fit",
    "grid",
    "grouped",
    "hyperparam_ranges",
    "hyperparams",
    "identity",
    "join_schedules",
    "l1",
    "l1_l2",
    "l1_l2_penalty",
    "l1_penalty",
    "l2",
    "l2_penalty",
    "label_by_path",
    "linear_warmup",
    "lion",
    "lr_range_sweep",
    "lr_range_test",
    "magnitude_pruning",
    "masked",
    "max_norm",
    "min_max_norm",
    "momentum",
    "nadam",
    "non_neg",
    "one_cycle_momentum",
    "one_cycle_schedule",
    "partition",
    "piecewise_constant_schedule",
    "plateau_scale",
    "polynomial_decay_sparsity",
    "power_schedule",
    "prune_by_magnitude",
    "reduce_on_plateau",
    "rmsprop",
    "scale_by_adadelta",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_nadam",
    "scale_by_rms",
    "set_hyperparams",
    "sgd",
    "shuffled_batches",
    "sparsity",
    "step_count",
    "sweep",
    "unit_norm",
    "weights_only",
    "with_weight_decay",
]
