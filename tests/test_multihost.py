"""Beyond one host: 2 processes on this machine, 4 CPU devices each, joined by `jax.distributed.initialize`
(gloo collectives over localhost), run the same code as one process and get its numbers.

The workers (tests/multihost_worker.py) are started once for the module and run every scenario; each
test reads its scenario's results, which each process gathered and saved, and compares them with the
same computation done here, in this one-device process.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import multihost_worker as worker
import numpy as np
import pytest

import gradtx

# Two JAX processes start, initialize and compile: 10-15 s on 2 idle cores, 40 s or more when shared.
pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
PROCESSES, DEVICES_EACH = 2, 4
TIMEOUT_S = 240  # for the whole run of all scenarios


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [line for line in text.splitlines() if not line.startswith("[Gloo]")]  # connection chatter
    return "\n".join(lines)[-chars:]


def run_processes(out: Path, scenarios: list[str], attempts: int = 3) -> None:
    """Starts the workers and waits for all of them; kills them all when one fails or time runs out.
    Retried (with another port) only when the coordinator's port was taken in the meantime."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES_EACH}"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    for attempt in range(attempts):
        port, logs = _free_port(), out / f"logs{attempt}"
        logs.mkdir(parents=True)
        procs = []
        for i in range(PROCESSES):
            args = [sys.executable, str(TESTS / "multihost_worker.py"), str(i), str(PROCESSES), str(port)]
            with open(logs / f"{i}.out", "w") as stdout, open(logs / f"{i}.err", "w") as stderr:
                procs.append(
                    subprocess.Popen([*args, str(out), *scenarios], env=env, stdout=stdout, stderr=stderr)
                )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while any(p.poll() is None for p in procs):
                failed = any(p.returncode not in (None, 0) for p in procs)
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:  # a survivor would wait for the failed process: end it
                    p.kill()
                    p.wait()
        codes = [p.returncode for p in procs]
        if codes == [0] * PROCESSES:
            return
        report = "\n".join(
            f"--- process {i}: exit code {code}\n{_tail(logs / f'{i}.err')}" for i, code in enumerate(codes)
        )
        if "Failed to start RPC server" not in report or attempt == attempts - 1:
            timed_out = f" (killed after {TIMEOUT_S} s)" if time.monotonic() > deadline else ""
            pytest.fail(f"the {PROCESSES} worker processes failed{timed_out}:\n{report}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(scenario)``: a list with each process's arrays, by name."""
    out = tmp_path_factory.mktemp("multihost")
    run_processes(out, sorted(worker.SCENARIOS))

    def read(scenario: str) -> list[dict[str, np.ndarray]]:
        per_process = []
        for i in range(PROCESSES):
            error = out / f"p{i}" / f"{scenario}.error"
            if error.exists():
                pytest.fail(f"process {i} of {PROCESSES} raised in {scenario!r}:\n{error.read_text()}")
            files = sorted((out / f"p{i}" / scenario).glob("*.npy"))
            per_process.append({f.stem: np.load(f) for f in files})
        return per_process

    return read


def test_model_sharded_adam_across_2_processes_equals_one_device(results):
    # The reference: the same steps on this process's one device, on unsharded host arrays.
    params, adam, losses = worker.train_layer(worker.LAYER_PARAMS, worker.LAYER_X, worker.LAYER_Y)
    expected = {"params.w": params["w"], "params.b": params["b"], "mu.w": adam.mu["w"]}
    expected.update({"nu.w": adam.nu["w"], "mu.b": adam.mu["b"], "nu.b": adam.nu["b"], "loss": losses})
    for i, got in enumerate(results("sharded_adam")):
        assert sorted(got) == sorted(expected), f"process {i}"
        for name, value in expected.items():
            # float32; the sharded gradient sums the batch in another order (per data shard, then
            # across the processes). Measured: 2e-7 relative to each array's largest entry after 10
            # steps (entries near a cancellation differ more relative to themselves, hence the atol).
            atol = 1e-5 * np.abs(value).max()
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=atol, err_msg=f"process {i}: {name}")


def test_a_sweep_across_2_processes_equals_the_one_device_sweep(results):
    configs = gradtx.grid(**worker.SWEEP)
    reference = worker.run_sweep(configs)  # this process, one device, no mesh
    for i, got in enumerate(results("padded_sweep")):
        assert got["loss"].shape == (len(reference), worker.STEPS), f"process {i}"
        # float32; the sharded program computes the same matmuls in another order (see test_sharding);
        # measured: 3.5e-7 relative.
        tolerance = dict(rtol=2e-5, atol=1e-6, err_msg=f"process {i}")
        np.testing.assert_allclose(got["loss"], reference.history.loss, **tolerance)
        np.testing.assert_allclose(
            got["metrics.valid_loss"], reference.history.metrics["valid_loss"], **tolerance
        )
        np.testing.assert_allclose(got["params.w"], reference.params["w"], **tolerance)
        np.testing.assert_allclose(got["params.b"], reference.params["b"], **tolerance)
        rows = [row["final_loss"] for row in reference.rows()]
        np.testing.assert_allclose(got["final_loss"], rows, **tolerance)


def test_an_unpadded_sweep_stays_split_and_its_history_is_read_on_every_process(results):
    reference = worker.run_sweep(worker.UNPADDED)
    rows = reference.rows()
    for i, got in enumerate(results("unpadded_sweep")):
        tolerance = dict(rtol=2e-5, atol=1e-6, err_msg=f"process {i}")  # as above
        np.testing.assert_allclose(got["loss"], reference.history.loss, **tolerance)
        np.testing.assert_allclose(got["params.w"], reference.params["w"], **tolerance)
        np.testing.assert_allclose(got["final_loss"], [r["final_loss"] for r in rows], **tolerance)
        np.testing.assert_array_equal(got["steps_trained"], worker.STEPS)
        assert got["best"] == reference.best()["learning_rate"], f"process {i}"


def test_fit_of_a_model_sharded_over_2_processes_equals_one_device(results):
    reference = worker.fit_layer(worker.LAYER_PARAMS, (worker.LAYER_X, worker.LAYER_Y))  # one device
    adam = reference.opt_state.inner[0]
    expected = {"params.w": reference.params["w"], "params.b": reference.params["b"], "mu.w": adam.mu["w"]}
    expected.update({"nu.w": adam.nu["w"], "mu.b": adam.mu["b"], "nu.b": adam.nu["b"]})
    expected["loss"] = reference.history.loss
    for i, got in enumerate(results("sharded_fit")):
        assert sorted(got) == sorted(expected), f"process {i}"
        for name, value in expected.items():
            atol = 1e-5 * np.abs(value).max()  # as for the hand-written steps above
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=atol, err_msg=f"process {i}: {name}")
