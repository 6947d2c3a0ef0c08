"""Long runs survive: fit/sweep/compare resumed from their checkpoints (after SIGKILL or Ctrl-C) equal
the uninterrupted run bit for bit, and fit continues from a saved optimizer state."""

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import resume_worker as worker
from test_training import PARAMS, STEPS, X, Y, loss_fn, valid

import gradtx

HERE = Path(__file__).parent


def assert_identical(a, b):
    """Every array of two results (params, optimizer state, history) equal bit for bit."""
    a, b = (x if isinstance(x, dict) else {"": x} for x in (a, b))
    assert a.keys() == b.keys()
    for name in a:
        la, ta = jax.tree.flatten(
            jax.tree.map(
                np.asarray,
                tuple(vars(a[name]).values()) if not isinstance(a[name], tuple) else tuple(a[name]),
            )
        )
        lb, tb = jax.tree.flatten(
            jax.tree.map(
                np.asarray,
                tuple(vars(b[name]).values()) if not isinstance(b[name], tuple) else tuple(b[name]),
            )
        )
        assert ta == tb, name
        for x, y in zip(la, lb, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)


def committed(directory: Path) -> list[int]:
    """The periods done of the committed checkpoints in ``directory``."""
    if not directory.exists():
        return []
    return sorted(int(p.stem.split("-")[1]) for p in directory.glob("checkpoint-*.npz"))


def interrupt(
    mode: str, directory: Path, sig: int, after: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Starts the worker, sends ``sig`` once ``after`` chunks are committed, returns its outcome."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "resume_worker.py"), mode, str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE.parent,
    )  # fmt: skip
    start = time.monotonic()
    try:
        per_chunk = worker.STEPS // worker.EVERY // worker.CHUNKS
        while max(committed(directory), default=0) < after * per_chunk and proc.poll() is None:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the worker committed {committed(directory)} in {timeout} s")
            time.sleep(0.02)
        assert proc.poll() is None, f"the worker ended before the signal:\n{proc.communicate()[1][-3000:]}"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fit", "sweep", "compare"])
def test_a_run_killed_mid_chunk_resumes_bit_identical(mode, tmp_path):
    directory = tmp_path / "ckpt"
    outcome = interrupt(mode, directory, signal.SIGKILL)
    assert outcome.returncode == -signal.SIGKILL and "finished" not in outcome.stdout
    saved = committed(directory)
    # Killed before the end. The signal follows a commit closely, so it can land before the previous
    # checkpoint is removed: two committed files, of which the resume reads the last.
    assert saved and max(saved) < worker.STEPS // worker.EVERY and len(saved) <= 2
    resumed = worker.run(mode, str(directory))
    assert not list(directory.glob(".partial-*"))  # a save the kill cut short is removed, never read
    assert committed(directory) == [worker.STEPS // worker.EVERY]  # the older ones removed
    assert_identical(resumed, worker.run(mode, None))


@pytest.mark.slow
def test_ctrl_c_leaves_the_last_checkpoint_intact(tmp_path):
    directory = tmp_path / "ckpt"
    outcome = interrupt("fit", directory, signal.SIGINT)
    assert outcome.returncode != 0 and "KeyboardInterrupt" in outcome.stderr
    assert committed(directory)
    assert_identical(worker.run("fit", str(directory)), worker.run("fit", None))


def test_a_finished_run_returns_the_saved_result_without_training(tmp_path, monkeypatch):
    first = gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS, chunks=3, checkpoint_dir=tmp_path)
    chunks_run = []
    run_chunk = gradtx.training.run_chunk
    monkeypatch.setattr(gradtx.training, "run_chunk", lambda *a: chunks_run.append(1) or run_chunk(*a))
    again = gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS, chunks=3, checkpoint_dir=tmp_path)
    assert chunks_run == []  # no chunk ran
    assert_identical(again, first)


def test_a_checkpoint_of_other_arguments_is_not_resumed(tmp_path):
    gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS, chunks=3, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"holds a run with other arguments \(.*steps: saved 60, now 30\)"):
        gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS // 2, chunks=3, checkpoint_dir=tmp_path)
    other = jax.tree.map(lambda p: p + 1.0, PARAMS)
    with pytest.raises(ValueError, match="params: saved"):
        gradtx.fit(loss_fn, other, gradtx.adam(0.01), (X, Y), STEPS, chunks=3, checkpoint_dir=tmp_path)


@pytest.mark.parametrize(
    "tx, loss, message",
    [
        (gradtx.adamax(0.01), loss_fn, "optimizer: saved"),  # another optimizer of the same shapes
        (gradtx.adam(0.02), loss_fn, "optimizer: saved"),  # another learning rate
        (
            gradtx.adam(0.01),
            lambda p, batch: 2.0 * loss_fn(p, batch),
            "loss_fn: saved 'loss_fn:.*now '<lambda>",
        ),
    ],
)
def test_a_checkpoint_of_another_optimizer_or_loss_is_not_resumed(tmp_path, tx, loss, message):
    # Before, only names and shapes were compared: adamax resumed Adam's moments, a lambda any lambda.
    gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS, chunks=3, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=message):
        gradtx.fit(loss, PARAMS, tx, (X, Y), STEPS, chunks=3, checkpoint_dir=tmp_path)


def scaled_loss(p, batch, scale):
    return scale * loss_fn(p, batch)


def closing_over(scale):
    return lambda p, batch: scale * loss_fn(p, batch)


@pytest.mark.parametrize("make", [lambda s: functools.partial(scaled_loss, scale=s), closing_over])
def test_a_loss_that_binds_another_value_is_not_resumed(tmp_path, make):
    # Same bytecode, another bound scale (a partial's keyword, a closure's cell): another run.
    args = (gradtx.adam(0.01), (X, Y), STEPS)
    first = gradtx.fit(make(1.0), PARAMS, *args, chunks=3, checkpoint_dir=tmp_path)
    assert_identical(gradtx.fit(make(1.0), PARAMS, *args, chunks=3, checkpoint_dir=tmp_path), first)
    with pytest.raises(ValueError, match="loss_fn: saved"):
        gradtx.fit(make(2.0), PARAMS, *args, chunks=3, checkpoint_dir=tmp_path)


def test_typed_prng_keys_in_the_params_and_the_data_key_are_checkpointed(tmp_path):
    # Flax NNX states hold typed keys (nnx.Rngs); they are saved as their key data and restored typed.
    params = {**PARAMS, "rng": jax.random.key(3)}
    args = (loss_fn, params, gradtx.adam(0.01), (X, Y), STEPS)
    options = dict(chunks=3, key=jax.random.key(0), checkpoint_dir=tmp_path)
    first = gradtx.fit(*args, **options)
    again = gradtx.fit(*args, **options)  # reads the finished run back
    assert jax.dtypes.issubdtype(again.params["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(again.params["rng"]), jax.random.key_data(params["rng"])
    )
    np.testing.assert_array_equal(again.params["w"], first.params["w"])


def test_a_checkpoint_dir_that_is_a_file_or_empty_fails_before_training(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    with pytest.raises(ValueError, match="checkpoint_dir .*a_file is a file, not a directory"):
        gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS, checkpoint_dir=str(path))
    with pytest.raises(ValueError, match="checkpoint_dir must name a directory, got ''"):
        gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS, checkpoint_dir="")


def test_a_damaged_checkpoint_is_named(tmp_path):
    gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS, chunks=3, checkpoint_dir=tmp_path)
    (saved,) = tmp_path.glob("checkpoint-*.npz")
    saved.write_bytes(saved.read_bytes()[:100])  # truncated after its commit (a disk fault)
    with pytest.raises(ValueError, match=f"{saved.name} cannot be read .*delete it to start again"):
        gradtx.fit(loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS, chunks=3, checkpoint_dir=tmp_path)


def test_fit_continues_from_an_optimizer_state():
    # The example: 60 + 40 steps of a cosine schedule must end where 100 steps end.
    schedule = gradtx.cosine_decay_schedule(0.5, 100)
    tx = gradtx.chain(gradtx.adam(schedule), gradtx.reduce_on_plateau(patience=1, factor=0.5))
    kwargs = dict(eval_fn=valid, eval_every=10, plateau_metric="valid_loss")
    straight = gradtx.fit(loss_fn, PARAMS, tx, (X, Y), 100, **kwargs)
    first = gradtx.fit(loss_fn, PARAMS, tx, (X, Y), 60, **kwargs)
    second = gradtx.fit(loss_fn, first.params, tx, (X, Y), 40, opt_state=first.opt_state, **kwargs)
    np.testing.assert_allclose(gradtx.hyperparams(second.opt_state)["learning_rate"], schedule(99), rtol=1e-6)
    assert int(gradtx.step_count(second.opt_state)) == 100
    np.testing.assert_array_equal(second.history.eval_step, np.arange(70, 101, 10))
    np.testing.assert_allclose(
        np.concatenate([first.history.loss, second.history.loss]), straight.history.loss, rtol=1e-6
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), second.params, straight.params)
    np.testing.assert_allclose(
        gradtx.plateau_scale(second.opt_state), gradtx.plateau_scale(straight.opt_state)
    )


def test_initial_step_sets_the_data_position():
    data = gradtx.shuffled_batches((X.reshape(-1, 5), Y.reshape(-1, 3)), 16)
    straight = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.05), data, 30)
    first = gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.05), data, 10)
    second = gradtx.fit(loss_fn, first.params, gradtx.sgd(0.05), data, 20, initial_step=10)
    np.testing.assert_allclose(second.history.loss, straight.history.loss[10:], rtol=1e-6)
    with pytest.raises(ValueError, match="initial_step must be an int >= 0, got -1"):
        gradtx.fit(loss_fn, PARAMS, gradtx.sgd(0.05), data, 10, initial_step=-1)


def test_an_interruption_between_chunks_resumes_and_a_save_cut_short_is_ignored(tmp_path):
    def stop_at_40(done, total):  # a progress function may stop the run (Ctrl-C between chunks)
        if done == 40:
            raise KeyboardInterrupt

    args = (loss_fn, PARAMS, gradtx.adam(0.01), (X, Y), STEPS)
    with pytest.raises(KeyboardInterrupt):
        gradtx.fit(*args, chunks=3, checkpoint_dir=tmp_path, progress=stop_at_40)
    assert committed(tmp_path) == [2]  # 2 periods of 20 steps: the chunk before the interruption
    (tmp_path / ".partial-99999-00000003.npz").write_bytes(b"a save killed halfway")
    resumed = gradtx.fit(*args, chunks=3, checkpoint_dir=tmp_path)
    assert_identical(resumed, gradtx.fit(*args, chunks=3))
    assert committed(tmp_path) == [3] and not list(tmp_path.glob(".partial-*"))


def test_a_search_with_a_population_step_resumes_with_its_records(tmp_path):
    from gradtx.sweeps import _member, train_members

    def exploit(runs, metrics, key, period):
        best, worst = jnp.argmin(metrics["valid_loss"]), jnp.argmax(metrics["valid_loss"])
        copied = jax.tree.map(lambda x: x.at[worst].set(x[best]), runs)
        return copied, {"parent": jnp.arange(3).at[worst].set(best)}

    def search(**kwargs):
        member = _member("test", gradtx.sgd, {"learning_rate": [0.001, 0.05, 0.2]}, PARAMS)
        (result,) = train_members(
            "test", [member], loss_fn, (X, Y), STEPS, key=None, eval_fn=valid, eval_every=10,
            plateau_metric=None, early_stopping=None, chunks=3, population=exploit, **kwargs,
        )  # fmt: skip
        return result

    def stop_at_20(done, total):
        if done == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(checkpoint_dir=tmp_path, progress=stop_at_20)
    resumed, straight = (
        search(checkpoint_dir=tmp_path, progress=False),
        search(checkpoint_dir=None, progress=False),
    )
    assert resumed.history.records["parent"].shape == (6, 3)
    assert_identical(
        (resumed.params, resumed.opt_state, resumed.history),
        (straight.params, straight.opt_state, straight.history),
    )


def test_a_resumed_sweep_reuses_the_compiled_chunks():
    # The restored carry used to be committed to a device where a fresh one is not: jax.jit saw
    # another signature and compiled every chunk again.
    from gradtx.engine import run_chunk

    def stop_at_20(done, total):
        if done == 20:
            raise KeyboardInterrupt

    args = (loss_fn, PARAMS, gradtx.sgd, {"learning_rate": [0.01, 0.05]}, (X, Y), STEPS)
    gradtx.sweep(*args, chunks=3)  # compiles the chunk
    compiled = run_chunk._cache_size()
    with tempfile.TemporaryDirectory() as directory:
        with pytest.raises(KeyboardInterrupt):
            gradtx.sweep(*args, chunks=3, checkpoint_dir=directory, progress=stop_at_20)
        gradtx.sweep(*args, chunks=3, checkpoint_dir=directory)
    assert run_chunk._cache_size() == compiled
