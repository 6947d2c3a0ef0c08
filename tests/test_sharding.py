"""Beyond one device, on 8 simulated CPU devices.

Each test runs in a subprocess started with ``--xla_force_host_platform_device_count=8``, because the
device count is fixed when JAX starts and the rest of the suite runs on one device.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent


def run_on_8_devices(code: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    prelude = "import jax\nassert jax.device_count() == 8, jax.devices()\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_sweep_on_8_devices_equals_the_single_device_sweep():
    run_on_8_devices(
        """
        import numpy as np
        import gradtx
        from test_training import PARAMS, X, Y, loss_fn, valid

        def make(learning_rate, momentum):
            return gradtx.sgd(learning_rate, momentum=momentum)

        # 10 configurations on 8 devices: padded to 16, the padding dropped from the result.
        configs = gradtx.grid(learning_rate=[0.01, 0.03, 0.05, 0.1, 0.2], momentum=[0.0, 0.9])
        kwargs = dict(eval_fn=valid, eval_every=20)
        one = gradtx.sweep(loss_fn, PARAMS, make, configs, (X, Y), 60, mesh=jax.devices()[:1], **kwargs)
        eight = gradtx.sweep(loss_fn, PARAMS, make, configs, (X, Y), 60, mesh=jax.devices(), **kwargs)
        assert eight.history.loss.shape == (10, 60) and len(eight) == 10
        np.testing.assert_allclose(eight.history.loss, one.history.loss, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(eight.params["w"], one.params["w"], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(
            eight.history.metrics["valid_loss"], one.history.metrics["valid_loss"], rtol=2e-5
        )
        np.testing.assert_array_equal(eight.history.steps_trained, 60)

        # No replicated copies: every array the sweep carries (params, momentum, hyperparameters,
        # counters) holds 16 / 8 = 2 configurations per device.
        from gradtx.sweeps import _config_sharding, _member
        from gradtx.training import initial_runs, plan

        member = _member("test", make, configs, PARAMS, _config_sharding(jax.devices()))
        p, arrays = plan("test", loss_fn, (X, Y), 60, None, None, None, None, 1, (member.family,))
        (carry,) = initial_runs(
            "test", p, (member.configs,), (member.params,), (None,), (member.sharding,), arrays
        )
        for leaf in jax.tree.leaves(carry):
            assert leaf.shape[0] == 16 and {s.data.shape[0] for s in leaf.addressable_shards} == {2}
        """
    )


def test_compare_shards_each_family_and_keeps_single_runs_whole():
    run_on_8_devices(
        """
        import numpy as np
        import gradtx
        from test_training import PARAMS, X, Y, loss_fn

        families = {"sgd": gradtx.sgd(0.05), "adam": (gradtx.adam, {"learning_rate": [0.001, 0.01, 0.03]})}
        one = gradtx.compare(loss_fn, PARAMS, families, (X, Y), 40)
        eight = gradtx.compare(loss_fn, PARAMS, families, (X, Y), 40, mesh=jax.make_mesh((2, 4), ("a", "b")))
        for name in families:
            np.testing.assert_allclose(eight[name].history.loss, one[name].history.loss, rtol=2e-5, atol=1e-6)
        """
    )


def test_optimizer_state_is_sharded_like_the_params_and_the_step_needs_no_collectives():
    out = run_on_8_devices(
        """
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        import gradtx

        mesh = jax.make_mesh((2, 4), ("data", "model"))
        spec = {"w": P("data", "model"), "b": P("model"), "count": P()}
        rng = np.random.default_rng(0)
        host = {"w": rng.normal(size=(64, 128)), "b": rng.normal(size=128), "count": np.int32(3)}
        host = {k: jnp.asarray(v) for k, v in host.items()}
        shardings = {k: NamedSharding(mesh, s) for k, s in spec.items()}
        params = jax.device_put(host, shardings)
        grads = jax.device_put({**host, "count": jnp.int32(0)}, shardings)

        for tx in [gradtx.adam(1e-3), gradtx.sgd(0.1, momentum=0.9), gradtx.adagrad(), gradtx.nadam(),
                   gradtx.rmsprop(centered=True), gradtx.adamw(1e-3)]:
            state = tx.init(params)
            mirrors = [x for x in jax.tree.leaves(state) if x.shape == host["w"].shape]
            assert mirrors and all(x.sharding.spec == spec["w"] for x in mirrors)
            step = jax.jit(lambda p, s, g, tx=tx: tx.update(g, s, p))
            hlo = step.lower(params, state, grads).compile().as_text()
            assert "all-gather" not in hlo and "all-reduce" not in hlo and "all-to-all" not in hlo
            u, new_state = step(params, state, grads)
            assert u["w"].sharding.spec == spec["w"]
            for x in jax.tree.leaves(new_state):
                if x.shape == host["w"].shape:
                    assert x.sharding.spec == spec["w"]
            # The same step on one device's unsharded arrays gives the same numbers.
            plain = jax.tree.map(np.asarray, host)
            u_ref, _ = tx.update(jax.tree.map(np.asarray, grads), tx.init(plain), plain)
            np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6, atol=1e-9)

        # Per-device memory: each device holds 1/8 of w and of each of Adam's moments.
        state = gradtx.adam(1e-3).init(params)
        shard = state.inner[0].mu["w"].addressable_shards[0].data
        print("per-device bytes of one moment of w:", shard.nbytes, "of", host["w"].size * 4)
        assert shard.nbytes * 8 == host["w"].size * 4
        """
    )
    assert "per-device bytes" in out


def test_a_jitted_init_keeps_the_params_sharding_under_explicit_axes():
    # jax.jit(tx.init) used to drop the params' sharding from the moments (eager init kept it).
    run_on_8_devices(
        """
        import jax, jax.numpy as jnp
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        import gradtx

        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
        with jax.set_mesh(mesh):
            w = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P(None, "model")))
            for init in (gradtx.adam(1e-3).init, jax.jit(gradtx.adam(1e-3).init)):
                adam = init({"w": w}).inner[0]
                for moment in (adam.mu["w"], adam.nu["w"]):
                    assert moment.sharding.spec == P(None, "model"), moment.sharding
        """
    )
