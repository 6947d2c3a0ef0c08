"""Shared by the tests of the Keras optimizers gradtx added later (Adadelta, Lion, LAMB, FTRL,
Adafactor, Schedule-Free AdamW, Muon): the step-by-step comparison with Keras 3 (JAX backend).

Method (as in test_optimizers.py): every optimizer state here is a function of the gradients and of the
params it was shown, so at each step gradtx starts from Keras's current params and must land on
Keras's next params. A difference cannot accumulate and hide: each step must agree on its own.

Params are a flat dict ``{path: array}``; the Keras variable of ``"dense/kernel"`` is created as
``kernel`` in the name scope ``dense``, so its Keras ``path`` equals gradtx's path (what Muon routes on).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import keras
import numpy as np

import gradtx


def f32(x: float) -> float:
    """``x`` rounded to float32 (what gradtx stores), so both libraries use the same hyperparameter."""
    return float(np.float32(x))


def problem(shapes: dict[str, tuple], steps: int, seed: int = 0, decades=(-3, 2)):
    """Params ``N(0, 1)`` and ``steps`` gradients whose entries' magnitudes are drawn log-uniformly
    from ``10**decades[0]`` to ``10**decades[1]`` (five decades by default)."""
    rng = np.random.default_rng(seed)
    params = {path: rng.normal(size=s).astype(np.float32) for path, s in shapes.items()}
    grads = [
        {
            path: (rng.normal(size=s) * 10 ** rng.uniform(*decades, size=s)).astype(np.float32)
            for path, s in shapes.items()
        }
        for _ in range(steps)
    ]
    return params, grads


def keras_variables(params: dict[str, np.ndarray]) -> list:
    variables = []
    for path, value in params.items():
        *scopes, name = path.split("/")
        variables.append(_in_scopes(scopes, lambda value=value, name=name: keras.Variable(value, name=name)))
    return variables


def _in_scopes(scopes, make):
    if not scopes:
        return make()
    with keras.name_scope(scopes[0]):
        return _in_scopes(scopes[1:], make)


def keras_stepper(keras_opt, variables, jit: bool):
    """``step(grads)``: one Keras update of ``variables``, eagerly (``apply``) or, with ``jit``, as
    ``model.fit`` runs it: ``stateless_apply`` compiled by ``jax.jit``, the results assigned back."""
    if not jit:
        return lambda grads: keras_opt.apply(grads, variables)
    keras_opt.build(variables)
    compiled = jax.jit(keras_opt.stateless_apply)

    def step(grads):
        new_values, new_state = compiled(
            [v.value for v in keras_opt.variables], grads, [v.value for v in variables]
        )
        for v, x in zip([*variables, *keras_opt.variables], [*new_values, *new_state], strict=True):
            v.assign(x)

    return step


def run_step_by_step(
    keras_opt,
    tx,
    params,
    grads,
    *,
    jit: bool,
    rtol: float,
    atol: float = 0.0,
    resolution: float = 100,
    keras_jit: bool | None = None,
) -> dict:
    """Runs both optimizers over ``grads``; at every step checks, leaf by leaf,
    ``|ours - keras| <= rtol * (|theta_old| + |theta_new|) + atol`` (``theta + u`` rounds relative to
    its operands, so a bound relative to the result alone fails where theta crosses zero).

    So that the check can fail, every leaf's largest Keras step must exceed the bound ``resolution``-fold
    (100) at some step (a step the bound would swallow is not compared at all). Returns the largest
    ``|ours - keras| / (|theta_old| + |theta_new|)`` seen, per path.

    ``jit`` compiles both sides' updates (``keras_jit``, if given, chooses Keras's side alone): XLA
    fuses a compiled program's elementwise operations, which may round differently from the same
    operations run one by one."""
    variables = keras_variables(params)
    paths = list(params)
    for v, path in zip(variables, paths, strict=True):
        assert v.path == path, (v.path, path)
    state = tx.init({p: jnp.asarray(x) for p, x in params.items()})
    update = jax.jit(tx.update) if jit else tx.update
    keras_step = keras_stepper(keras_opt, variables, jit if keras_jit is None else keras_jit)
    worst = dict.fromkeys(paths, 0.0)
    resolved = dict.fromkeys(paths, 0.0)
    for step, g in enumerate(grads):
        current = {p: np.asarray(v) for p, v in zip(paths, variables, strict=True)}
        keras_step([jnp.asarray(g[p]) for p in paths])
        grads_j = {p: jnp.asarray(x) for p, x in g.items()}
        updates, state = update(grads_j, state, {p: jnp.asarray(x) for p, x in current.items()})
        ours = gradtx.apply_updates({p: jnp.asarray(x) for p, x in current.items()}, updates)
        for path, v in zip(paths, variables, strict=True):
            a, b = np.asarray(ours[path], np.float64), np.asarray(v, np.float64)
            scale = np.abs(current[path].astype(np.float64)) + np.abs(b)
            bound = rtol * scale + atol
            assert np.all(np.abs(a - b) <= bound), (
                f"step {step}, {path}: max excess {np.max(np.abs(a - b) - bound):.3g}\nours {a}\nkeras {b}"
            )
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(scale > 0, np.abs(a - b) / scale, 0.0)
            worst[path] = max(worst[path], float(np.max(rel, initial=0.0)))
            moved = np.abs(b - current[path])
            resolved[path] = max(resolved[path], float(np.max(moved / np.maximum(bound, 1e-300))))
    assert int(keras_opt.iterations) == len(grads)
    for path, ratio in resolved.items():
        assert ratio > resolution, (
            f"{path}: the steps ({ratio:.3g} x the bound at most) are too small to compare"
        )
    return worst


def run(tx, params, grads, *, jit: bool = True):
    """gradtx alone over ``grads`` from ``params``: the final params and state."""
    params = {p: jnp.asarray(x) for p, x in params.items()}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads:
        updates, state = update({p: jnp.asarray(x) for p, x in g.items()}, state, params)
        params = gradtx.apply_updates(params, updates)
    return params, state


def vmapped_run(make, rates, params, grads):
    """``make(learning_rate)`` run over ``grads`` for every rate in ``rates`` at once: the optimizer is
    built inside the vmapped ``init`` (so its state holds one learning rate per lane) and the update of
    an instance built with the first rate serves every lane (it reads its hyperparameters from the state)."""
    params = {p: jnp.asarray(x) for p, x in params.items()}
    tx = make(float(rates[0]))
    states = jax.vmap(lambda lr: make(lr).init(params))(jnp.asarray(rates, jnp.float32))
    lanes = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(rates), *x.shape)), params)

    @jax.jit
    def step(lanes, states, g):
        def one(p, s):
            u, s = tx.update(g, s, p)
            return gradtx.apply_updates(p, u), s

        return jax.vmap(one)(lanes, states)

    for g in grads:
        lanes, states = step(lanes, states, {p: jnp.asarray(x) for p, x in g.items()})
    return lanes, states


def state_float_dtypes(state) -> set:
    """The dtypes of the array leaves of an optimizer state that have the params' size (not scalars)."""
    return {jnp.result_type(x) for x in jax.tree.leaves(state) if jnp.ndim(x) > 0}


BASE_OPTIONS = {
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "name",
    "kwargs",
}


def keras_own_arguments(keras_class, own: set = frozenset()) -> dict:
    """The constructor arguments of ``keras_class`` that are not the base Optimizer's options (plus
    ``own``: base names the class redefines, as Muon's weight_decay), with their defaults."""
    parameters = inspect.signature(keras_class.__init__).parameters
    return {
        n: p.default for n, p in parameters.items() if n != "self" and (n not in BASE_OPTIONS or n in own)
    }


def assert_same_arguments(factory, keras_class, own: set = frozenset(), extra: set = frozenset()):
    """``factory`` has Keras's own arguments, in Keras's order, with Keras's defaults (and ``extra``).
    Its ``**options`` (Keras's base-optimizer options) are checked in test_keras_options.py."""
    parameters = inspect.signature(factory).parameters.values()
    ours = {p.name: p.default for p in parameters if p.name not in extra and p.kind is not p.VAR_KEYWORD}
    keras_args = keras_own_arguments(keras_class, own)
    assert list(ours) == list(keras_args), (list(ours), list(keras_args))
    assert ours == keras_args


def assert_vmap_matches_separate_runs(make, rates, shapes, steps=10, rtol=1e-6, atol=1e-7):
    """The lanes of a run vmapped over the learning rate equal separate runs with each rate. Not bit
    for bit: a vmapped reduction (a norm, a mean, a matmul) may sum in another order.

    The separate runs share one compiled update (of ``make(rates[0])``), each with the state of
    ``make(lr).init``: the update reads the learning rate from the state, so that is each rate's run."""
    params, grads = problem(shapes, steps, seed=3)
    lanes, states = vmapped_run(make, rates, params, grads)
    np.testing.assert_array_equal(gradtx.hyperparams(states)["learning_rate"], np.float32(rates))
    tx = make(float(rates[0]))

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return gradtx.apply_updates(p, u), s

    for i, lr in enumerate(rates):
        alone = {p: jnp.asarray(x) for p, x in params.items()}
        state = make(lr).init(alone)
        for g in grads:
            alone, state = step(alone, state, {p: jnp.asarray(x) for p, x in g.items()})
        for path in params:
            np.testing.assert_allclose(lanes[path][i], alone[path], rtol=rtol, atol=atol, err_msg=path)


def assert_bfloat16_params_keep_float32_state(tx, shapes=(("w", (4, 3)), ("b", (3,)))):
    """With bfloat16 params the moments are float32 and the updates bfloat16."""
    params = {path: jnp.ones(s, jnp.bfloat16) for path, s in shapes}
    grads = {path: jnp.full(s, -0.5, jnp.bfloat16) for path, s in shapes}
    state = tx.init(params)
    assert state_float_dtypes(state) <= {jnp.dtype(jnp.float32)}, state_float_dtypes(state)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert state_float_dtypes(state) <= {jnp.dtype(jnp.float32)}, state_float_dtypes(state)
    assert {u.dtype for u in updates.values()} == {jnp.dtype(jnp.bfloat16)}
    assert all(np.all(np.isfinite(np.asarray(u, np.float32))) for u in updates.values())
    return state
