"""Continuous-time log-likelihood and gradient: ours vs the naive JAX route, same process.

The naive peer (what users write today): Van Loan's ``2n x 2n`` block exponential
``expm([[−A, Q], [0, Aᵀ]] dt)`` per interval through ``vmap(jax.scipy.linalg.expm)``, the
stationary ``P0`` from the dense ``n² x n²`` Kronecker solve, and a ``lax.scan`` covariance
Kalman filter differentiated by autodiff. Ours: ``statespace.log_likelihood`` on a
``ContinuousLinearSSM`` at the same irregular times. Also our discrete-time gradient at the
same sizes (time-invariant ``F``, ``Q``), the cost the continuous-time model should approach,
and the exact discretisation alone (``(F, Qd)`` for all ``T`` intervals): its forward time and
the time of its VJP with respect to ``(A, Q)`` given random cotangents, so its reverse/forward
ratio stands on its own whatever the filter costs.

A second table times the gradient with inputs held over each step against the same model
without (``benchmarks/_inputs.py``). Run: ``python -m benchmarks.continuous [--quick]``. Ratios are only meaningful inside one run.
Our continuous and discrete gradients are timed in alternating blocks of calls;
``cont/disc_grad`` is the ratio of their medians, ``cont/disc_grad_min`` that of their fastest
calls (the least disturbed by other load), ``cont/disc_grad_paired`` the median over rounds of
the ratio within a round (blocks seconds apart: robust to bursts of load that move the overall
medians). ``tv/disc_grad_paired`` is the floor of that ratio: our discrete-time gradient with the
time-varying ``F_k, Qd_k`` of the continuous model given as data (the filter a continuous model
runs, without the exact discretisation and the stationary start). ``compile_*_grad_s``: trace +
lower + compile of each gradient from cleared caches (``benchmarks._timing.compile_time``; no run
included); ``python -m benchmarks compile`` splits them and adds CPU times and program sizes.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._inputs import input_cost_rows
from benchmarks._timing import machine_info, markdown_table, paired_ratio, time_fn, time_interleaved

SIZES = [(2, 1, 1000), (4, 2, 1000), (8, 4, 1000), (4, 2, 10000)]
QUICK_SIZES = [(2, 1, 100), (4, 2, 200)]


def make_problem(n: int, m: int, T: int, seed: int = 0):
    """A stable drift (negative-definite symmetric part), PD diffusion, irregular times."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n)) / np.sqrt(n)
    Y = rng.normal(size=(n, n)) / np.sqrt(n)
    A = X - X.T - (Y @ Y.T + 0.5 * np.eye(n))
    Z = rng.normal(size=(n, n)) / np.sqrt(n)
    Q = Z @ Z.T + 0.1 * np.eye(n)
    H = rng.normal(size=(m, n))
    R = 0.1 * np.eye(m)
    times = np.cumsum(rng.exponential(0.5, size=T))
    y = rng.normal(size=(T, m))
    return {k: jnp.asarray(v) for k, v in dict(A=A, Q=Q, H=H, R=R, times=times, y=y).items()}


# ---------------------------------------------------------------------------------------------
# The naive peer
# ---------------------------------------------------------------------------------------------


def naive_log_likelihood(A, Q, H, R, times, y):
    n = A.shape[0]
    dt = jnp.diff(times)

    def van_loan(h):
        M = jnp.block([[-A, Q], [jnp.zeros_like(A), A.T]]) * h
        E = jax.scipy.linalg.expm(M)
        F = E[n:, n:].T
        return F, F @ E[:n, n:]

    F, Qd = jax.vmap(van_loan)(dt)
    eye = jnp.eye(n, dtype=A.dtype)
    P0 = jnp.linalg.solve(jnp.kron(A, eye) + jnp.kron(eye, A), -Q.reshape(-1)).reshape(n, n)
    m0 = jnp.zeros(n, A.dtype)

    def update(m, P, yk):
        S = H @ P @ H.T + R
        L = jnp.linalg.cholesky(S)
        e = yk - H @ m
        K = jax.scipy.linalg.cho_solve((L, True), H @ P).T
        ll = -0.5 * (e @ jax.scipy.linalg.cho_solve((L, True), e)) - jnp.sum(jnp.log(jnp.diag(L)))
        ll = ll - 0.5 * yk.shape[0] * jnp.log(2 * jnp.pi)
        return m + K @ e, P - K @ S @ K.T, ll

    m, P, ll0 = update(m0, P0, y[0])

    def step(carry, inputs):
        m, P = carry
        Fk, Qk, yk = inputs
        m, P = Fk @ m, Fk @ P @ Fk.T + Qk
        m, P, ll = update(m, P, yk)
        return (m, P), ll

    _, lls = jax.lax.scan(step, (m, P), (F, Qd, y[1:]))
    return ll0 + jnp.sum(lls)


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def ours_log_likelihood(A, Q, H, R, times, y):
    import statespace

    return statespace.log_likelihood(statespace.ContinuousLinearSSM(A, Q, H, R), y, times)


def ours_discrete_log_likelihood(F, Q, H, R, m0, P0, y):
    import statespace

    return statespace.log_likelihood(statespace.LinearGaussianSSM(F, Q, H, R, m0, P0), y)


def discretization_fns():
    """Jitted forward ``(A, Q, dt) -> (F, Qd)`` and its VJP ``(A, Q, dt, F̄, Q̄d) -> (Ā, Q̄)``."""
    from statespace._continuous import _discretize_matrices

    def forward(A, Q, dt):
        return _discretize_matrices(A, Q, None, dt)[:2]

    def vjp(A, Q, dt, F_bar, Qd_bar):
        return jax.vjp(lambda A, Q: forward(A, Q, dt), A, Q)[1]((F_bar, Qd_bar))

    return jax.jit(forward), jax.jit(vjp)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.continuous", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--float32", action="store_true", help="run in float32 (default float64)")
    parser.add_argument("--size", action="append", default=None, metavar="n,m,T", help="only these sizes")
    args = parser.parse_args(argv)
    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    import statespace

    print(machine_info())
    repeats = 3 if args.quick else 20
    rows = []
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.size:
        sizes = [tuple(int(v) for v in size.split(",")) for size in args.size]
    for n, m, T in sizes:
        p = make_problem(n, m, T)
        args_c = (p["A"], p["Q"], p["H"], p["R"], p["times"], p["y"])
        diff = (0, 1, 2, 3)
        naive_ll = jax.jit(naive_log_likelihood)
        naive_grad = jax.jit(jax.grad(naive_log_likelihood, argnums=diff))
        ours_ll = jax.jit(ours_log_likelihood)
        ours_grad = jax.jit(jax.grad(ours_log_likelihood, argnums=diff))

        # The discrete model at the same size: the continuous model discretised at dt = 0.5.
        F, Qd = statespace.discretize(statespace.ContinuousLinearSSM(p["A"], p["Q"], p["H"], p["R"]), 0.5)[:2]
        m0 = jnp.zeros(n, F.dtype)
        P0 = statespace.ContinuousLinearSSM(p["A"], p["Q"], p["H"], p["R"]).initial()[1]
        args_d = (F, Qd, p["H"], p["R"], m0, P0, p["y"])
        disc_grad = jax.jit(jax.grad(ours_discrete_log_likelihood, argnums=diff))
        # The floor: the filter the continuous model runs (time-varying F_k, Qd_k, here given as
        # data), without the discretisation and the stationary start.
        exact = statespace.ContinuousLinearSSM(p["A"], p["Q"], p["H"], p["R"]).to_discrete(p["times"])[0]
        args_tv = (exact.F, exact.Q, p["H"], p["R"], m0, P0, p["y"])

        v_naive, v_ours = float(naive_ll(*args_c)), float(ours_ll(*args_c))
        g_naive, g_ours = naive_grad(*args_c), ours_grad(*args_c)
        # Q and R enter only through their symmetric parts in our model (the naive Van Loan
        # block also sees the antisymmetric part), so compare symmetrised gradients.
        sym = lambda g: 0.5 * (g + g.T) if g.shape[0] == g.shape[1] else g  # noqa: E731
        grad_err = max(
            float(jnp.max(jnp.abs(sym(a) - sym(b))) / (jnp.max(jnp.abs(sym(a))) + 1e-300))
            for a, b in zip(g_naive, g_ours)
        )
        # The naive peer is timed on its own: its 30-150 ms calls slow whichever call follows
        # them (cold caches), which would bias the alternation (benchmarks._timing).
        t_nl = time_fn(naive_ll, *args_c, repeats=repeats)
        t_ol = time_fn(ours_ll, *args_c, repeats=repeats)
        t_ng = time_fn(naive_grad, *args_c, repeats=repeats)
        # 1 s of each: enough rounds that a burst of load on this shared machine cannot tip
        # the per-round ratio
        grads = time_interleaved({"ours": (ours_grad, args_c), "disc": (disc_grad, args_d),
                                  "tv": (disc_grad, args_tv)}, repeats=repeats, min_time=1.0)
        t_og, t_dg = grads["ours"], grads["disc"]
        dt = jnp.concatenate([jnp.diff(p["times"]), jnp.zeros(1, p["times"].dtype)])
        cotangents = tuple(jnp.asarray(np.random.default_rng(1).normal(size=(2, T, n, n))).astype(F.dtype))
        disc_fwd, disc_vjp = discretization_fns()
        parts = time_interleaved(
            {"fwd": (disc_fwd, (p["A"], p["Q"], dt)), "vjp": (disc_vjp, (p["A"], p["Q"], dt, *cotangents))},
            repeats=repeats,
        )
        t_xf, t_xb = parts["fwd"], parts["vjp"]
        rows.append(
            {
                "n,m,T": f"{n},{m},{T}",
                "naive_ll_s": t_nl["median_s"],
                "ours_ll_s": t_ol["median_s"],
                "ll_speedup": t_nl["median_s"] / t_ol["median_s"],
                "naive_grad_s": t_ng["median_s"],
                "ours_grad_s": t_og["median_s"],
                "grad_speedup": t_ng["median_s"] / t_og["median_s"],
                "disc_grad_s": t_dg["median_s"],
                "cont/disc_grad": t_og["median_s"] / t_dg["median_s"],
                "cont/disc_grad_min": t_og["min_s"] / t_dg["min_s"],
                "cont/disc_grad_paired": paired_ratio(grads, "ours", "disc"),
                "tv/disc_grad_paired": paired_ratio(grads, "tv", "disc"),
                "discretize_s": t_xf["median_s"],
                "discretize_vjp_s": t_xb["median_s"],
                "vjp/fwd": t_xb["median_s"] / t_xf["median_s"],
                "ll_rel_diff": abs(v_naive - v_ours) / abs(v_naive),
                "grad_rel_diff": grad_err,
                "compile_ours_grad_s": t_og["compile_s"],
                "compile_naive_grad_s": t_ng["compile_s"],
            }
        )
        print(markdown_table(rows[-1:]), file=sys.stderr, flush=True)  # progress
    print()
    print(markdown_table(rows))
    sizes = [tuple(int(v) for v in r["n,m,T"].split(",")) for r in rows]
    print("\nwith inputs held over each step (p = 2) against the same model without "
          "(gradient, alternating blocks; benchmarks/_inputs.py):")
    print(markdown_table(input_cost_rows("continuous", sizes, repeats)))
    return rows


if __name__ == "__main__":
    main()
