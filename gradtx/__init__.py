"""gradtx: functional gradient transformations for JAX.

Optimizers, schedules and regularizers as pure ``(init, update)`` pairs composed with `chain`, with the
update rules of the deep-learning course and numerics that agree with Keras 3.
"""

from gradtx.accumulation import AccumulationState, accumulate_gradients
from gradtx.adadelta import AdadeltaState, adadelta, scale_by_adadelta
from gradtx.adafactor import (
    FactoredRmsState,
    adafactor,
    clip_by_block_rms,
    scale_by_factored_rms,
    scale_by_param_block_rms,
    scale_by_relative_step,
)
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
from gradtx.clipping import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from gradtx.constraints import max_norm, min_max_norm, non_neg, unit_norm
from gradtx.data import ShuffledBatches, shuffled_batches
from gradtx.ema import EmaState, ema_of_params, ema_params
from gradtx.engine import EarlyStopping, History, StepOutputs, TrainResult
from gradtx.ftrl import FtrlState, ftrl
from gradtx.grouping import GroupedState, grouped
from gradtx.halving import hyperband, successive_halving
from gradtx.hyper import Hyperparams, Range, hyperparam_ranges, hyperparams, set_hyperparams
from gradtx.keras_options import KerasOptions, with_keras_options
from gradtx.lamb import CorrectedAdamState, lamb, scale_by_corrected_adam, scale_by_trust_ratio
from gradtx.lion import LionState, lion, scale_by_lion
from gradtx.loss_scaling import (
    ApplyIfFiniteState,
    LossScaleState,
    apply_if_finite,
    current_loss_scale,
    loss_scale_optimizer,
    unscale_gradients,
)
from gradtx.muon import muon, orthogonalize_by_newton_schulz, scale_by_adam_lr_ratio, scale_by_rms_match
from gradtx.optimizers import adagrad, adam, adamax, adamw, nadam, rmsprop, sgd
from gradtx.plateau import PlateauState, current_learning_rate, plateau_scale, reduce_on_plateau
from gradtx.population import population_based_training
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
from gradtx.schedule_free import (
    CorrectedRmsState,
    ScheduleFreeState,
    scale_by_corrected_rms,
    scale_by_linear_warmup,
    schedule_free,
    schedule_free_adamw,
    schedule_free_eval_params,
)
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
from gradtx.search import SearchResult, random_search
from gradtx.shampoo import GraftState, ShampooState, graft, precondition_by_shampoo, shampoo
from gradtx.soap import SoapState, scale_by_soap, soap
from gradtx.spaces import choice, int_uniform, log_uniform, uniform
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
    "AccumulationState",
    "AdadeltaState",
    "ApplyIfFiniteState",
    "ChainState",
    "CorrectedAdamState",
    "CorrectedRmsState",
    "EarlyStopping",
    "EmaState",
    "EmptyState",
    "FactoredRmsState",
    "FtrlState",
    "GraftState",
    "GroupedState",
    "History",
    "Hyperparams",
    "KerasOptions",
    "LionState",
    "LossScaleState",
    "MaskedState",
    "PartitionState",
    "PlateauState",
    "PruningState",
    "Range",
    "RangeTest",
    "Schedule",
    "ScheduleFreeState",
    "SearchResult",
    "ShampooState",
    "ShuffledBatches",
    "SoapState",
    "SparsityReport",
    "SparsitySchedule",
    "StepOutputs",
    "SweepResult",
    "TrainResult",
    "Transformation",
    "accumulate_gradients",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "apply_if_finite",
    "apply_updates",
    "chain",
    "choice",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "compare",
    "constant_schedule",
    "constant_sparsity",
    "cosine_decay_schedule",
    "current_learning_rate",
    "current_loss_scale",
    "decoupled_weight_decay",
    "dropout",
    "ema_of_params",
    "ema_params",
    "exponential_schedule",
    "fit",
    "ftrl",
    "global_norm",
    "graft",
    "grid",
    "grouped",
    "hyperband",
    "hyperparam_ranges",
    "hyperparams",
    "identity",
    "int_uniform",
    "join_schedules",
    "l1",
    "l1_l2",
    "l1_l2_penalty",
    "l1_penalty",
    "l2",
    "l2_penalty",
    "label_by_path",
    "lamb",
    "linear_warmup",
    "lion",
    "log_uniform",
    "loss_scale_optimizer",
    "lr_range_sweep",
    "lr_range_test",
    "magnitude_pruning",
    "masked",
    "max_norm",
    "min_max_norm",
    "momentum",
    "muon",
    "nadam",
    "non_neg",
    "one_cycle_momentum",
    "one_cycle_schedule",
    "orthogonalize_by_newton_schulz",
    "partition",
    "piecewise_constant_schedule",
    "plateau_scale",
    "polynomial_decay_sparsity",
    "population_based_training",
    "power_schedule",
    "precondition_by_shampoo",
    "prune_by_magnitude",
    "random_search",
    "reduce_on_plateau",
    "rmsprop",
    "scale_by_adadelta",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adam_lr_ratio",
    "scale_by_adamax",
    "scale_by_corrected_adam",
    "scale_by_corrected_rms",
    "scale_by_factored_rms",
    "scale_by_learning_rate",
    "scale_by_linear_warmup",
    "scale_by_lion",
    "scale_by_nadam",
    "scale_by_param_block_rms",
    "scale_by_relative_step",
    "scale_by_rms",
    "scale_by_rms_match",
    "scale_by_soap",
    "scale_by_trust_ratio",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "set_hyperparams",
    "sgd",
    "shampoo",
    "shuffled_batches",
    "soap",
    "sparsity",
    "step_count",
    "successive_halving",
    "sweep",
    "uniform",
    "unit_norm",
    "unscale_gradients",
    "weights_only",
    "with_keras_options",
    "with_weight_decay",
]
