"""Lyapunov solves: ``rules.lyap`` / ``rules.dlyap`` against SciPy, JAX and the Kronecker solve.

``python -m benchmarks.lyap [--quick] [--sizes 4 16 64 128]``

For each n, on a random stable non-normal A (float64) and Q ≻ 0, times

* ``fwd``: the jitted forward solve, ours per method (``schur``: Bartels–Stewart, the CPU
  default; ``sign`` / ``doubling``: the GPU/TPU methods, timed here on CPU too);
* the peers: ``scipy.linalg.solve_continuous_lyapunov`` / ``solve_discrete_lyapunov`` (host
  NumPy, no jit), ``jax.scipy.linalg.solve_sylvester(A, Aᵀ, −Q)`` (continuous only; not
  differentiable in A), and the dense n²×n² Kronecker solve in JAX (skipped for n > 16:
  its matrix is n⁴ numbers and its LU (2/3)n⁶ flops);
* ``grad``: ``jax.grad`` with respect to (A, Q) of ``Σ W ⊙ X`` (forward + one adjoint solve
  with the same factors), reported as ``grad / fwd`` of the same method.

Medians over repeats, compile excluded (``compile_s``: trace + lower + compile of the
forward, from cleared caches, ``benchmarks._timing.compile_time``); the
ratios ``fwd / scipy`` compare figures taken in this one process.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg as sl

from benchmarks._timing import machine_info, markdown_table, time_fn
from rules import dlyap, lyap

KRONECKER_MAX_N = 16


def _problem(n, seed=0, *, discrete=False):
    rng = np.random.default_rng(seed)
    rates = np.logspace(-2, 0, n)
    V = np.eye(n) + 0.5 * rng.standard_normal((n, n)) / np.sqrt(n)
    D = np.diag(1 - 0.9 * rates if discrete else -rates)
    A = V @ D @ np.linalg.inv(V)
    G = rng.standard_normal((n, n))
    Q = G @ G.T / n + np.eye(n)
    W = rng.standard_normal((n, n))
    return A, Q, W


def _kron_lyap(A, Q):
    n = A.shape[-1]
    eye = jnp.eye(n, dtype=A.dtype)
    return jnp.linalg.solve(jnp.kron(A, eye) + jnp.kron(eye, A), -Q.reshape(-1)).reshape(n, n)


def _kron_dlyap(A, Q):
    n = A.shape[-1]
    return jnp.linalg.solve(jnp.eye(n * n, dtype=A.dtype) - jnp.kron(A, A), Q.reshape(-1)).reshape(
        n, n
    )


def _sylvester_lyap(A, Q):
    return jax.scipy.linalg.solve_sylvester(A, A.T, -Q)


def _rows_for(n, *, discrete, repeats):
    A, Q, W = _problem(n, discrete=discrete)
    A, Q, W = (jnp.asarray(x) for x in (A, Q, W))
    name, func = ("dlyap", dlyap) if discrete else ("lyap", lyap)
    methods = ("schur", "doubling") if discrete else ("schur", "sign")
    A_np, Q_np = np.asarray(A), np.asarray(Q)
    if discrete:
        scipy_t = time_fn(lambda: sl.solve_discrete_lyapunov(A_np, Q_np), repeats=repeats)
    else:
        scipy_t = time_fn(lambda: sl.solve_continuous_lyapunov(A_np, -Q_np), repeats=repeats)
    peers = {}
    if not discrete:
        peers["jax_sylvester"] = time_fn(jax.jit(_sylvester_lyap), A, Q, repeats=repeats)
    if n <= KRONECKER_MAX_N:
        kron = _kron_dlyap if discrete else _kron_lyap
        peers["kronecker"] = time_fn(jax.jit(kron), A, Q, repeats=repeats)
    rows = []
    for method in methods:
        forward = jax.jit(lambda a, q, m=method: func(a, q, method=m))
        gradient = jax.jit(
            jax.grad(lambda a, q, m=method: jnp.sum(W * func(a, q, method=m)), argnums=(0, 1))
        )
        fwd = time_fn(forward, A, Q, repeats=repeats)
        grad = time_fn(gradient, A, Q, repeats=repeats)
        row = {
            "solve": name,
            "n": n,
            "method": method,
            "fwd_s": fwd["median_s"],
            "scipy_s": scipy_t["median_s"],
            "fwd/scipy": fwd["median_s"] / scipy_t["median_s"],
            "fwd/scipy_min": fwd["min_s"] / scipy_t["min_s"],
        }
        for peer, t in peers.items():
            row[f"{peer}_s"] = t["median_s"]
        row["grad_s"] = grad["median_s"]
        row["grad/fwd"] = grad["median_s"] / fwd["median_s"]
        row["grad/fwd_min"] = grad["min_s"] / fwd["min_s"]
        row["compile_s"] = fwd["compile_s"]
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lyap", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="n = 4 and 16, few repeats")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    sizes = args.sizes or ([4, 16] if args.quick else [4, 16, 64, 128])
    repeats = 5 if args.quick else 20
    print(f"Machine: {machine_info()}\n")
    rows = []
    for discrete in (False, True):
        for n in sizes:
            rows += _rows_for(n, discrete=discrete, repeats=repeats)
    columns = [
        "solve", "n", "method", "fwd_s", "scipy_s", "fwd/scipy", "fwd/scipy_min",
        "jax_sylvester_s", "kronecker_s", "grad_s", "grad/fwd", "grad/fwd_min", "compile_s",
    ]
    print(markdown_table(rows, columns))
    print(
        "\nfwd/scipy: our jitted forward over SciPy's (same process); grad/fwd: gradient "
        "w.r.t. (A, Q) over the forward of the same method; *_min: the same ratio of the "
        "fastest calls (steadier on a shared machine). Empty cells: peer not run "
        f"(Kronecker only for n ≤ {KRONECKER_MAX_N}; solve_sylvester only for lyap)."
    )
    return rows


if __name__ == "__main__":
    main()
