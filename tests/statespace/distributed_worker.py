"""One process of the 2-process panel check in ``test_distributed.py`` (tests only).

Run as ``python -m tests.statespace.distributed_worker PROCESS_ID NUM_PROCESSES PORT OUT``:
joins the ``jax.distributed`` group whose coordinator listens on ``127.0.0.1:PORT`` (CPU
collectives: gloo), holds only its own contiguous share of the panel's series
(``jax.make_array_from_process_local_data``), and computes the panel log-likelihood and its
gradient with the README's code (``vmap`` over series, ``jit`` over a mesh of every process's
device). Process 0 writes the value and the gathered gradients to ``OUT`` as JSON.

Importing this module starts nothing: :func:`panel_data` and :func:`panel_loglik` are what
the test recomputes in a single process as the reference.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import statespace

NUM_SERIES, T, N, M = 4, 16, 2, 1


def panel_data():
    """Shared parameters (dict of float64 arrays), per-series ``R (S, 1, 1)``, ``y (S, T, 1)``."""
    rng = np.random.default_rng(21)
    shared = dict(F=np.array([[0.9, 0.2], [-0.1, 0.7]]), Q=0.3 * np.eye(N), H=np.array([[1.0, 0.5]]),
                  m0=np.zeros(N), P0=np.eye(N))
    R = 0.2 + rng.uniform(size=(NUM_SERIES, M, M))
    y = rng.standard_normal((NUM_SERIES, T, M))
    y[rng.uniform(size=y.shape) < 0.15] = np.nan
    return shared, R, y


def _series_loglik(shared, R_one, y_one):
    model = statespace.LinearGaussianSSM(F=shared["F"], Q=shared["Q"], H=shared["H"], R=R_one,
                                         m0=shared["m0"], P0=shared["P0"])
    return statespace.log_likelihood(model, y_one)


def panel_loglik(shared, R, y):
    """Sum over the series of their log-likelihoods (the README's ``panel_loglik``)."""
    return jax.vmap(_series_loglik, in_axes=(None, 0, 0))(shared, R, y).sum()


def _run(process_id: int, num_processes: int, port: int, out: str) -> None:
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=60)
    assert jax.process_count() == num_processes and len(jax.local_devices()) == 1
    mesh = Mesh(np.array(jax.devices()), ("series",))
    by_series, replicated = NamedSharding(mesh, P("series")), NamedSharding(mesh, P())

    shared, R, y = panel_data()
    per = NUM_SERIES // num_processes
    mine = slice(process_id * per, (process_id + 1) * per)  # this process holds only these series
    R_g = jax.make_array_from_process_local_data(by_series, R[mine], R.shape)
    y_g = jax.make_array_from_process_local_data(by_series, y[mine], y.shape)
    shared_g = {k: jax.make_array_from_process_local_data(replicated, v, v.shape) for k, v in shared.items()}

    value, (g_shared, g_R) = jax.jit(jax.value_and_grad(panel_loglik, argnums=(0, 1)))(shared_g, R_g, y_g)
    result = {
        "value": float(np.asarray(multihost_utils.process_allgather(value, tiled=True))),
        "grad_shared": {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist() for k, v in g_shared.items()},
        "grad_R": np.asarray(multihost_utils.process_allgather(g_R, tiled=True)).tolist(),
        "local_series": [list(s.data.shape) for s in y_g.addressable_shards],
        "global_devices": len(jax.devices()),
    }
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    _run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
