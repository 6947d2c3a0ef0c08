"""Keras 3's base-optimizer options, for every gradtx optimizer: one function assembles them.

Every optimizer factory takes them as keyword arguments, with Keras's names, defaults and checks::

    gradtx.adam(1e-3, global_clipnorm=1.0, weight_decay=1e-4, use_ema=True, gradient_accumulation_steps=4)

Each option is a primitive that can also be chained on its own:

| Keras option | gradtx primitive (its hyperparameter in the state) |
|---|---|
| ``loss_scale_factor`` | `unscale_gradients` (``loss_scale_factor``) |
| ``gradient_accumulation_steps`` | `accumulate_gradients` (structural: an int) |
| ``clipvalue`` | `clip_by_value` (``clipvalue``) |
| ``clipnorm`` | `clip_by_norm` (``clipnorm``) |
| ``global_clipnorm`` | `clip_by_global_norm` (``global_clipnorm``) |
| ``weight_decay`` | `with_weight_decay` (``weight_decay``) |
| ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency`` | `ema_of_params` (``ema_momentum``) |

`with_keras_options` puts them in Keras's order inside one step: unscale by the loss scale factor ->
accumulate -> clip -> weight decay -> the optimizer's update -> EMA -> EMA overwrite.
"""

from __future__ import annotations

import numbers
import sys
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from gradtx.accumulation import accumulate_gradients
from gradtx.base import Transformation, chain
from gradtx.clipping import clip_by_global_norm, clip_by_norm, clip_by_value
from gradtx.ema import ema_of_params
from gradtx.hyper import CLOSED_UNIT_INTERVAL, NONNEGATIVE, POSITIVE, Hyper, check_value, is_concrete
from gradtx.loss_scaling import unscale_gradients
from gradtx.regularizers import with_weight_decay

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack


class KerasOptionsWithoutDecay(TypedDict, total=False):
    """The options of an optimizer that has its own ``weight_decay`` argument (``adamw``)."""

    clipnorm: Hyper | None
    clipvalue: Hyper | None
    global_clipnorm: Hyper | None
    use_ema: bool
    ema_momentum: Hyper
    ema_overwrite_frequency: int | None
    loss_scale_factor: Hyper | None
    gradient_accumulation_steps: int | None


class KerasOptions(KerasOptionsWithoutDecay, total=False):
    """Keras 3's base-optimizer options (``keras.optimizers.Optimizer``'s keyword arguments but ``name``)."""

    weight_decay: Hyper | None


DEFAULTS: dict[str, Any] = {
    "weight_decay": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}

_CLIPS = {"clipnorm": clip_by_norm, "clipvalue": clip_by_value, "global_clipnorm": clip_by_global_norm}


def _whole(owner: str, name: str, value: Any, low: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low} or None, got {value!r}")
    return int(value)


def _check(owner: str, name: str, value: Any, rule) -> None:
    if value is not None and not callable(value):
        check_value(owner, name, value, rule)


def _differs(value: Any, default: Any) -> bool:
    if value is None or default is None:
        return value is not default
    return callable(value) or not is_concrete(value) or float(value) != default


def validate(owner: str, options: dict[str, Any]) -> dict[str, Any]:
    """All nine options (defaults filled in), checked as Keras checks them, with errors that name
    ``owner``, the argument and the value. Stricter than Keras where Keras ignores a value silently: a
    threshold <= 0 (Keras skips the clip), ``gradient_accumulation_steps=0`` (``1`` Keras refuses too),
    and EMA settings without ``use_ema=True`` are errors."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"{owner}: unknown argument(s) {unknown}; the Keras options are {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    clips = [name for name in _CLIPS if o[name] is not None]
    if len(clips) > 1:
        given = ", ".join(f"{name}={o[name]}" for name in _CLIPS)
        raise ValueError(
            f"{owner}: only one of clipnorm, clipvalue and global_clipnorm may be set, got {given}"
        )
    for name in clips:
        _check(owner, name, o[name], POSITIVE)
    _check(owner, "weight_decay", o["weight_decay"], NONNEGATIVE)
    _check(owner, "loss_scale_factor", o["loss_scale_factor"], POSITIVE)
    o["gradient_accumulation_steps"] = _whole(
        owner, "gradient_accumulation_steps", o["gradient_accumulation_steps"], 2
    )
    if not isinstance(o["use_ema"], bool | np.bool_):  # numpy's bools come from config files and arrays
        raise ValueError(f"{owner}: use_ema must be True or False, got {o['use_ema']!r}")
    o["use_ema"] = bool(o["use_ema"])
    if o["use_ema"]:
        _check(owner, "ema_momentum", o["ema_momentum"], CLOSED_UNIT_INTERVAL)
        frequency = o["ema_overwrite_frequency"]
        o["ema_overwrite_frequency"] = _whole(owner, "ema_overwrite_frequency", frequency, 1)
    else:
        for name in ("ema_momentum", "ema_overwrite_frequency"):
            if _differs(o[name], DEFAULTS[name]):
                raise ValueError(f"{owner}: {name}={o[name]!r} has no effect without use_ema=True")
    return o


def with_keras_options(
    optimizer: Transformation, *, owner: str = "with_keras_options", **options: Unpack[KerasOptions]
) -> Transformation:
    """``optimizer`` with Keras's base-optimizer options, applied in Keras's order:

    ``g <- g / loss_scale_factor;  g <- mean of gradient_accumulation_steps micro-batches;
    g <- clip(g);  u <- optimizer(g) - eta * weight_decay * theta;  a <- EMA of theta + u``
    (``theta <- a`` every ``ema_overwrite_frequency`` updates).

    With no option given it returns ``optimizer`` itself. ``optimizer`` must hold one
    ``learning_rate`` hyperparameter when ``weight_decay`` is given (the decay follows it, see
    `gradtx.with_weight_decay`). ``owner`` names the factory in error messages. Keras's
    ``iterations`` (real updates) is the inner optimizer's step count under accumulation;
    `gradtx.step_count` reads the outermost count, which is the micro-steps.
    """
    o = validate(owner, options)
    inner = optimizer
    if o["weight_decay"] is not None:
        inner = with_weight_decay(inner, o["weight_decay"])
    clips = [_CLIPS[name](o[name]) for name in _CLIPS if o[name] is not None]
    members = [*clips, inner]
    k = o["gradient_accumulation_steps"]
    if k is not None:
        members = [accumulate_gradients(chain(*members) if len(members) > 1 else inner, k)]
    if o["loss_scale_factor"] is not None:
        members.insert(0, unscale_gradients(o["loss_scale_factor"]))
    if o["use_ema"]:
        members.append(ema_of_params(o["ema_momentum"], o["ema_overwrite_frequency"], k or 1))
    return members[0] if len(members) == 1 else chain(*members)
