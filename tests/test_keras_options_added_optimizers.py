"""Keras's base-optimizer options on the seven optimizers added after the nine (Adadelta, Adafactor, FTRL,
Lion, LAMB, Muon, Schedule-Free AdamW): every option at once, with a learning-rate schedule, step by
step against Keras 3 (see option_steps.py), and the EMA weights against finalize_variable_values.

Weight decay is the case to watch: Keras decays the variable *before* the optimizer's step, and
FTRL, LAMB (trust ratio), Adafactor (parameter scale) and Schedule-Free (averaging) read the variable
in their step; `gradtx.with_weight_decay` hands them the decayed params, as Keras does.

Tolerance: 2e-6 of ``|theta_old| + |theta_new|`` (Muon's own tests' bound: its quintic iteration
amplifies one rounding in the momentum), plus, for FTRL only, 1e-7 absolute: FTRL's new weight
``(clip(z) - z) / q`` carries the rounding of ``z`` (``|z| * 2^-24 / q``), 5.9e-8 measured for FTRL
alone at these settings, which the EMA overwrite can place on a weight near 0.
"""

import keras
import numpy as np
import pytest
from option_steps import ADAM, COMBINED, f32, follow_keras, problem
from test_muon import DEFAULTS as MUON_DEFAULTS  # Keras Muon's defaults, rounded to float32

import gradtx
from gradtx.adadelta import adadelta
from gradtx.adafactor import adafactor
from gradtx.ftrl import ftrl
from gradtx.lamb import lamb
from gradtx.lion import lion
from gradtx.muon import muon
from gradtx.schedule_free import schedule_free_adamw

K = keras.optimizers

# name -> (Keras class, gradtx factory, float32-exact arguments, learning rate, absolute tolerance)
CASES = {
    "adadelta": (K.Adadelta, adadelta, {"rho": f32(0.95), "epsilon": f32(1e-7)}, 1.0, 0.0),
    "adafactor": (
        K.Adafactor,
        adafactor,
        {"beta_2_decay": f32(-0.8), "epsilon_1": f32(1e-30), "epsilon_2": f32(1e-3), "clip_threshold": 1.0},
        0.3,
        0.0,
    ),
    "ftrl": (
        K.Ftrl,
        ftrl,
        {
            "l1_regularization_strength": f32(0.01),
            "l2_regularization_strength": f32(0.01),
            "l2_shrinkage_regularization_strength": f32(0.01),
            "beta": f32(0.1),
        },
        0.1,
        1e-7,
    ),
    "lion": (K.Lion, lion, {"beta_1": f32(0.9), "beta_2": f32(0.99)}, 0.001, 0.0),
    "lamb": (K.Lamb, lamb, ADAM, 0.01, 0.0),
    "muon": (K.Muon, muon, MUON_DEFAULTS, 0.01, 0.0),
    "schedule_free_adamw": (
        K.ScheduleFreeAdamW,
        schedule_free_adamw,
        {"beta_1": f32(0.9), "beta_2": f32(0.999), "epsilon": f32(1e-8)},
        0.01,
        0.0,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_option_and_a_schedule_match_keras(name):
    keras_class, factory, kwargs, lr, atol = CASES[name]
    options = dict(COMBINED)
    if name == "muon":
        del options["weight_decay"]  # Muon's weight_decay is its own argument (in kwargs)
    params, grads = problem(24)
    grads = [[g * np.float32(COMBINED["loss_scale_factor"]) for g in step] for step in grads]
    keras_schedule = K.schedules.ExponentialDecay(f32(lr), decay_steps=5, decay_rate=0.5)
    keras_opt = keras_class(learning_rate=keras_schedule, **kwargs, **options)
    tx = factory(learning_rate=lambda step: f32(lr) * 0.5 ** (step / 5), **kwargs, **options)
    state, variables = follow_keras(
        keras_opt, tx, params, grads, jit=True, rtol=2e-6, atol=atol, moving_steps=6
    )
    keras_opt.finalize_variable_values(variables)
    for a, v in zip(gradtx.ema_params(state), variables, strict=True):
        np.testing.assert_allclose(a, np.asarray(v), rtol=4e-6, atol=atol + 1e-7)
