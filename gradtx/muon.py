"""Muon (Jordan et al., 2024, github.com/KellerJordan/Muon; Liu et al., 2025, "Muon is Scalable for LLM
Training"): momentum whose step, for each weight matrix, is orthogonalized by a Newton-Schulz iteration,
with AdamW for the parameters that are not hidden matrices. As Keras 3 ``Muon`` computes it.

Routing (Keras's ``_should_use_adamw``, done here with `gradtx.partition` on the parameter path):

* a leaf that is not 2-D (biases, norm scales, scalars, convolution kernels) takes the AdamW step;
* with ``exclude_embeddings`` (default), a leaf whose path matches one of ``embedding_patterns``
  takes the AdamW step. Keras tests ``"embedding" in variable.path.lower()``; the default pattern
  ``"*embedding*"``, matched against the lower-cased path, is the same test on gradtx's paths, and
  catches Flax's ``nn.Embed`` / ``nnx.Embed`` (``"params/Embed_0/embedding"``, ``"embed/embedding"``)
  and Keras's ``Embedding`` (``"embedding/embeddings"``). Give your own globs for other names, e.g.
  ``embedding_patterns=("*embedding*", "*/wte/*")``;
* a leaf whose path contains a match of one of the regular expressions ``exclude_layers``
  (``re.search``, as Keras) takes the AdamW step: typically the output layer, ``exclude_layers=["head"]``;
* every other leaf takes the Muon step.

Paths are the keys joined with ``/`` (``"params/Dense_0/kernel"``, see `gradtx.routing`).

Scaling and decay (Keras's): the orthogonalized step is multiplied by ``rms_rate * sqrt(max(n, m))``
for an ``n x m`` matrix (Moonlight's RMS matching, so that Muon can share AdamW's learning rate and
weight decay; ``rms_rate=None`` skips it). The AdamW step runs at ``learning_rate * adam_lr_ratio``.
Weight decay is decoupled and multiplied by ``learning_rate`` (not by the ratio): ``weight_decay`` on
the Muon leaves, ``adam_weight_decay`` on the AdamW leaves (``None``: no decay), both 0.004 by default.

In the state: one ``learning_rate``; the Muon branch's ``momentum``, ``muon_a``/``muon_b``/``muon_c``,
``rms_rate`` and ``muon/weight_decay``; the AdamW branch's ``beta_1``, ``beta_2`` and ``epsilon``
(Keras's ``adam_beta_1``, ``adam_beta_2``, ``epsilon``), ``adam_lr_ratio`` and ``adamw/weight_decay``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from gradtx import transforms
from gradtx.base import Transformation, chain, is_float, leafwise
from gradtx.hyper import COUNT, NONNEGATIVE, Hyper, Hyperparams, HyperSpec, check_value
from gradtx.keras_options import KerasOptionsWithoutDecay, with_keras_options
from gradtx.routing import partition

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

MUON_A, MUON_B, MUON_C = 3.4445, -4.7750, 2.0315  # Keras's (and Jordan's) quintic coefficients


class MuonScaleState(NamedTuple):
    hyperparams: Hyperparams


def _swap_last_axes(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _require_matrices(owner: str, updates) -> None:
    for path, g in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if is_float(g) and jnp.ndim(g) < 2:
            raise ValueError(
                f"{owner}: the update at {jax.tree_util.keystr(path)} has shape {jnp.shape(g)}; it needs at "
                f"least 2 dimensions (route vectors and scalars elsewhere, as gradtx.muon does)"
            )


def orthogonalize_by_newton_schulz(
    ns_steps: int = 5, muon_a: Hyper = MUON_A, muon_b: Hyper = MUON_B, muon_c: Hyper = MUON_C
) -> Transformation:
    """Approximate orthogonalization (``U V^T`` of ``G = U S V^T``, roughly):  ``X = G / (||G||_F + 1e-7);``
    ``ns_steps`` times ``A = X X^T;  X <- a*X + (b*A + c*A A) X``;  ``u <- X``.

    Over the last two axes of each leaf (of rank >= 2). A tall matrix (more rows than columns) is
    transposed first and back at the end, so that ``A`` is the smaller Gram matrix. The Frobenius
    normalization bounds the spectral norm by 1; the quintic's coefficients maximize its slope at 0,
    so small singular values grow fast, and the result is ``U S' V^T`` with ``S'`` near 1, not exactly
    1. Computed in at least float32. (Keras ``Muon.zeropower_via_newtonschulz5``.)
    """
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool):
        raise ValueError(f"orthogonalize_by_newton_schulz: ns_steps must be an int, got {ns_steps!r}")
    check_value("orthogonalize_by_newton_schulz", "ns_steps", ns_steps, COUNT)
    spec = HyperSpec("orthogonalize_by_newton_schulz", muon_a=muon_a, muon_b=muon_b, muon_c=muon_c)

    def init(params):
        return MuonScaleState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        a, b, c = h["muon_a"], h["muon_b"], h["muon_c"]
        _require_matrices("orthogonalize_by_newton_schulz", updates)

        def leaf(g):
            x = g.astype(jnp.promote_types(g.dtype, jnp.float32))
            tall = x.shape[-2] > x.shape[-1]
            if tall:
                x = _swap_last_axes(x)
            x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-7)
            for _ in range(ns_steps):
                gram = x @ _swap_last_axes(x)
                x = a * x + (b * gram + c * gram @ gram) @ x
            return ((_swap_last_axes(x) if tall else x).astype(g.dtype),)

        (updates,) = leafwise("orthogonalize_by_newton_schulz", leaf, updates)
        return updates, MuonScaleState(hp)

    return Transformation(init, update)


def scale_by_rms_match(rms_rate: Hyper = 0.2) -> Transformation:
    """Moonlight's RMS matching:  ``u <- rms_rate * sqrt(max(n, m)) * g``  for each ``n x m`` matrix (the
    last two axes), so that an orthogonalized step has about AdamW's RMS (0.2 to 0.4) and can share its
    learning rate and weight decay. (Liu et al., 2025, section 2.2; Keras ``Muon.lr_adjust``.)"""
    spec = HyperSpec("scale_by_rms_match", rms_rate=(rms_rate, NONNEGATIVE))

    def init(params):
        return MuonScaleState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        _require_matrices("scale_by_rms_match", updates)

        def leaf(g):
            size = jnp.sqrt(jnp.float32(max(g.shape[-2], g.shape[-1])))
            return ((g.astype(jnp.float32) * size * h["rms_rate"]).astype(g.dtype),)

        (updates,) = leafwise("scale_by_rms_match", leaf, updates)
        return updates, MuonScaleState(hp)

    return Transformation(init, update)


def scale_by_adam_lr_ratio(adam_lr_ratio: Hyper = 1.0) -> Transformation:
    """``u <- adam_lr_ratio * g``: Muon's AdamW branch runs at ``learning_rate * adam_lr_ratio``, with
    the one ``learning_rate`` of the optimizer applied after. (Keras ``Muon``'s ``adam_lr_ratio``.)"""
    spec = HyperSpec("scale_by_adam_lr_ratio", adam_lr_ratio=(adam_lr_ratio, NONNEGATIVE))

    def init(params):
        return MuonScaleState(spec.init())

    def update(updates, state, params=None, *, step=None, **extra):
        h, hp = spec.resolve(state.hyperparams, step, **extra)
        ratio = h["adam_lr_ratio"]
        (updates,) = leafwise("scale_by_adam_lr_ratio", lambda g: ((ratio * g).astype(g.dtype),), updates)
        return updates, MuonScaleState(hp)

    return Transformation(init, update)


def _router(exclude_layers: Sequence[str], exclude_embeddings: bool, embedding_patterns: Sequence[str]):
    layers = [re.compile(pattern) for pattern in exclude_layers]
    embeddings = [pattern.lower() for pattern in embedding_patterns]

    def label(path: str, leaf) -> str:
        if not is_float(leaf) or jnp.ndim(leaf) != 2:
            return "adamw"
        if exclude_embeddings and any(fnmatch.fnmatchcase(path.lower(), p) for p in embeddings):
            return "adamw"
        if any(layer.search(path) for layer in layers):
            return "adamw"
        return "muon"

    return label


def _strings(name: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"muon: {name} must be a list of strings, got {value!r}")
    return list(value)


def muon(
    learning_rate: Hyper = 0.001,
    adam_beta_1: Hyper = 0.9,
    adam_beta_2: Hyper = 0.999,
    adam_weight_decay: Hyper | None = 0.004,
    epsilon: Hyper = 1e-7,
    weight_decay: Hyper | None = 0.004,
    exclude_layers: Sequence[str] | None = None,
    exclude_embeddings: bool = True,
    muon_a: Hyper = MUON_A,
    muon_b: Hyper = MUON_B,
    muon_c: Hyper = MUON_C,
    adam_lr_ratio: Hyper = 1,
    momentum: Hyper = 0.95,
    ns_steps: int = 5,
    nesterov: bool = True,
    rms_rate: Hyper | None = 0.2,
    embedding_patterns: Sequence[str] = ("*embedding*",),
    **options: Unpack[KerasOptionsWithoutDecay],
) -> Transformation:
    """Muon:  2-D leaves  ``m <- mu*m + g;  O = NS(g + mu*m if nesterov else m);
    theta <- theta - eta * (rms_rate * sqrt(max(n, m)) * O + weight_decay * theta)``;
    other leaves (see the module docstring)  ``theta <- theta - eta * (adam_lr_ratio * adam(g) +
    adam_weight_decay * theta)``,  ``adam`` being Keras Adam's step (`gradtx.scale_by_adam`).

    ``NS`` is `orthogonalize_by_newton_schulz` (``ns_steps`` quintic iterations, coefficients
    ``muon_a``, ``muon_b``, ``muon_c``). (Keras ``Muon``.)
    """
    for name, flag in (("exclude_embeddings", exclude_embeddings), ("nesterov", nesterov)):
        if not isinstance(flag, bool):
            raise ValueError(f"muon: {name} must be a bool, got {flag!r}")
    layers, embeddings = (
        _strings("exclude_layers", exclude_layers),
        _strings("embedding_patterns", embedding_patterns),
    )
    for pattern in layers:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"muon: exclude_layers has an invalid regular expression {pattern!r}: {error}"
            ) from None
    muon_branch = [
        transforms.momentum(momentum, nesterov),
        orthogonalize_by_newton_schulz(ns_steps, muon_a, muon_b, muon_c),
    ]
    if rms_rate is not None:
        muon_branch.append(scale_by_rms_match(rms_rate))
    if weight_decay is not None:
        muon_branch.append(transforms.add_decayed_weights(weight_decay))
    adam_branch = [
        transforms.scale_by_adam(adam_beta_1, adam_beta_2, epsilon),
        scale_by_adam_lr_ratio(adam_lr_ratio),
    ]
    if adam_weight_decay is not None:
        adam_branch.append(transforms.add_decayed_weights(adam_weight_decay))
    route = _router(layers, exclude_embeddings, embeddings)
    core = chain(
        partition({"muon": chain(*muon_branch), "adamw": chain(*adam_branch)}, route),
        transforms.scale_by_learning_rate(learning_rate),
    )
    return with_keras_options(core, owner="muon", **options)
