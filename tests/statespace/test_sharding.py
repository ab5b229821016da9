"""Many series across devices: the log-likelihood of a batch of series sharded over a 4-device
CPU mesh (``jax.sharding.NamedSharding``) equals the unsharded batch, and each series' value,
sequential and parallel, equals the dense joint-Gaussian oracle.

The host-device count must be set before JAX initialises, so the check runs in its own
Python process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.statespace.dense_oracle import dense_log_likelihood

# A subprocess with 4 virtual CPU devices compiles sharded programs (~20 s): full suite only.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    r"""
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import statespace
    from statespace._model import LinearGaussianSSM
    from statespace._parallel import parallel_filter

    devices = jax.devices()
    assert len(devices) == 4, devices
    mesh = Mesh(np.array(devices), ("series",))
    by_series = NamedSharding(mesh, P("series"))

    rng = np.random.default_rng(0)
    num_series, T, n, m = 8, 32, 2, 1
    F = jnp.array([[0.9, 0.2], [-0.1, 0.7]])
    H = jnp.array([[1.0, 0.5]])
    # Per-series parameters (a panel): each series has its own observation noise.
    R = jnp.asarray(0.2 + rng.uniform(size=(num_series, 1, 1)))
    y = rng.standard_normal((num_series, T, m))
    y[rng.uniform(size=y.shape) < 0.15] = np.nan
    y = jnp.asarray(y)

    def make(R_one):
        return LinearGaussianSSM(F=F, Q=0.3 * jnp.eye(n), H=H, R=R_one,
                                 m0=jnp.zeros(n), P0=jnp.eye(n), b=jnp.array([0.1, 0.0]))

    def public(parallel):
        def one(R_one, y_one):
            return statespace.log_likelihood(make(R_one), y_one, parallel=parallel)
        return one

    def ours(R_one, y_one):
        return parallel_filter(make(R_one), y_one).log_likelihood

    functions = {"parallel_filter": ours, "log_likelihood": public(False),
                 "log_likelihood_parallel": public(True)}
    out = {"data": {"R": np.asarray(R).tolist(), "y": np.asarray(y).tolist()}}
    for name, fn in functions.items():
        batched = jax.jit(jax.vmap(fn))
        plain = np.asarray(batched(R, y))
        R_sh = jax.device_put(R, by_series)
        y_sh = jax.device_put(y, by_series)
        sharded = batched(R_sh, y_sh)
        out[name] = {
            "plain": plain.tolist(),
            "sharded": np.asarray(sharded).tolist(),
            "input_devices": len(y_sh.sharding.device_set),
            "output_devices": len(sharded.sharding.device_set),
            "shard_shapes": [list(s.data.shape) for s in y_sh.addressable_shards],
        }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sharded_run():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _functions(run):
    return {k: v for k, v in run.items() if k != "data"}


def test_sharded_batch_equals_unsharded(sharded_run):
    assert set(_functions(sharded_run)) == {"parallel_filter", "log_likelihood", "log_likelihood_parallel"}
    for name, res in _functions(sharded_run).items():
        plain, sharded = res["plain"], res["sharded"]
        assert len(plain) == 8 and all(abs(v) < 1e6 for v in plain), name
        for a, b in zip(plain, sharded):
            assert abs(a - b) <= 1e-12 * max(1.0, abs(a)), (name, plain, sharded)
        # The batch really was split: 4 devices, 2 series each, and the result stays sharded.
        assert res["input_devices"] == 4, name
        assert res["shard_shapes"] == [[2, 32, 1]] * 4, name
        assert res["output_devices"] == 4, name


def test_sharded_sequential_and_parallel_match_dense_oracle(sharded_run):
    """Every series' sharded log-likelihood, sequential and parallel, equals the dense
    joint-Gaussian density of its observed entries (NumPy/SciPy, float64)."""
    R = np.asarray(sharded_run["data"]["R"])
    y = np.asarray(sharded_run["data"]["y"], dtype=np.float64)
    model = dict(F=np.array([[0.9, 0.2], [-0.1, 0.7]]), Q=0.3 * np.eye(2), H=np.array([[1.0, 0.5]]),
                 m0=np.zeros(2), P0=np.eye(2), b=np.array([0.1, 0.0]))
    reference = [dense_log_likelihood(dict(model, R=R[i]), y[i]) for i in range(len(R))]
    assert np.isnan(y).any() and len(reference) == 8
    for name, res in _functions(sharded_run).items():
        np.testing.assert_allclose(res["sharded"], reference, rtol=1e-10, err_msg=name)
