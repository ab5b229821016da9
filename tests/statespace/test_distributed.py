"""Scale-out across processes: a panel log-likelihood and its gradient computed by 2 JAX
processes (``jax.distributed`` on localhost, CPU collectives through gloo), each holding half
the series, equal the single-process values to 1e-12.

The test starts the two processes itself (``tests/statespace/distributed_worker.py``) with a
free localhost port for the coordinator; every wait has a timeout, and on failure both
processes are killed, so it cannot hang. This is the README's multi-host recipe
("Many series across GPUs") run for real, with processes standing in for hosts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.statespace import distributed_worker as worker
from tests.statespace.dense_oracle import dense_log_likelihood

ROOT = Path(__file__).resolve().parents[2]
NUM_PROCESSES = 2

# two JAX processes start and compile (the setup alone ~8 s): full suite only
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(out: Path) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # one CPU device per process (a forced device count would give each process several)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # no multi-process programs in the shared cache
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.statespace.distributed_worker", str(i), str(NUM_PROCESSES),
             str(port), str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return _run_processes(tmp_path_factory.mktemp("distributed") / "result.json")


def test_two_process_panel_equals_single_process(two_processes):
    got = two_processes
    # the work really was split: 2 processes' devices, each holding 2 of the 4 series
    assert got["global_devices"] == NUM_PROCESSES
    assert got["local_series"] == [[worker.NUM_SERIES // NUM_PROCESSES, worker.T, worker.M]]

    shared, R, y = worker.panel_data()
    value, (g_shared, g_R) = jax.jit(jax.value_and_grad(worker.panel_loglik, argnums=(0, 1)))(shared, R, y)
    np.testing.assert_allclose(got["value"], value, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["grad_R"], g_R, rtol=1e-12, atol=1e-12)
    assert set(got["grad_shared"]) == set(g_shared)
    for name, g in g_shared.items():
        np.testing.assert_allclose(got["grad_shared"][name], g, rtol=1e-12, atol=1e-12, err_msg=name)

    # and the value is the panel's density: the sum of each series' dense oracle
    assert np.isnan(y).any()
    dense = sum(dense_log_likelihood(dict(shared, R=R[i]), y[i]) for i in range(worker.NUM_SERIES))
    np.testing.assert_allclose(got["value"], dense, rtol=1e-10)
