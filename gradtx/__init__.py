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
from gradtx.hyperparams import Hyperparams, hyperparams, set_hyperparams
from gradtx.optimizers import adagrad, adam, adamax, adamw, nadam, rmsprop, sgd
from gradtx.plateau import PlateauState, current_learning_rate, plateau_scale, reduce_on_plateau
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
from gradtx.sweeps import RangeTest, SweepResult, compare, grid, lr_range_sweep, lr_range_test, sweep
from gradtx.training import EarlyStopping, History, ShuffledBatches, TrainResult, fit, shuffled_batches
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
    "EarlyStopping",
    "EmptyState",
    "History",
    "Hyperparams",
    "PlateauState",
    "RangeTest",
    "Schedule",
    "ShuffledBatches",
    "SweepResult",
    "TrainResult",
    "Transformation",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "compare",
    "constant_schedule",
    "cosine_decay_schedule",
    "current_learning_rate",
    "exponential_schedule",
    "fit",
    "grid",
    "hyperparams",
    "identity",
    "join_schedules",
    "linear_warmup",
    "lr_range_sweep",
    "lr_range_test",
    "momentum",
    "nadam",
    "one_cycle_momentum",
    "one_cycle_schedule",
    "piecewise_constant_schedule",
    "plateau_scale",
    "power_schedule",
    "reduce_on_plateau",
    "rmsprop",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_learning_rate",
    "scale_by_nadam",
    "scale_by_rms",
    "set_hyperparams",
    "sgd",
    "shuffled_batches",
    "step_count",
    "sweep",
]
