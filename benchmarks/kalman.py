"""Discrete Kalman filter vs dynamax ``lgssm_filter``: log-likelihood and its gradient.

Run ``python -m benchmarks.kalman [--quick] [--sizes 4,2,1000 ...]``. Every figure is a median
of jitted calls in this process (compile excluded and reported separately); the ratio column
is dynamax time / our time, so > 1 means we are faster (``_min``: the same ratio of the fastest
calls); ``autodiff`` is our gradient by plain autodiff through the scan (``gradient="autodiff"``)
against the default adjoint pass; ``--unfused`` adds the adjoint gradient with an unfused
reverse step (plain ``@`` and LAPACK per small operation); a second table times the
gradient with inputs against the same model without (``benchmarks/_inputs.py``); ``rel_diff`` is the largest difference
between our value (or gradient) and dynamax's, relative to the largest entry. The gradient is taken with respect to
all model parameters (F, Q, H, R, m0, P0) in both libraries. float64.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._inputs import input_cost_rows
from benchmarks._timing import machine_info, markdown_table, time_fn

SIZES = [(2, 1, 1000), (4, 2, 1000), (8, 4, 1000), (4, 2, 10000)]
QUICK_SIZES = [(2, 1, 100), (4, 2, 200)]


def _problem(n, m, T, seed=0):
    from statespace import LinearGaussianSSM

    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    F = 0.9 * A / np.max(np.abs(np.linalg.eigvals(A)))
    B = rng.standard_normal((n, n))
    Q = B @ B.T / n + 0.1 * np.eye(n)
    H = rng.standard_normal((m, n))
    C = rng.standard_normal((m, m))
    R = C @ C.T / m + 0.1 * np.eye(m)
    params = dict(F=F, Q=Q, H=H, R=R, m0=rng.standard_normal(n), P0=np.eye(n))
    params = {k: jnp.asarray(v) for k, v in params.items()}
    model = LinearGaussianSSM(**params)
    _, y = model.simulate(jax.random.key(seed), T)
    return params, y


def _symmetric(params):
    """Q, R, P0 enter through their symmetric part, so both libraries' gradients with respect
    to them are defined the same way (a Cholesky reads one triangle only)."""
    return {k: (v + v.T) / 2 if k in ("Q", "R", "P0") else v for k, v in params.items()}


def _ours(form, gradient="adjoint"):
    from statespace import LinearGaussianSSM, log_likelihood

    def loglik(params, y):
        model = LinearGaussianSSM(**_symmetric(params))
        return log_likelihood(model, y, form=form, gradient=gradient)

    return jax.jit(loglik), jax.jit(jax.grad(loglik))


def _unfused_adjoint_grad():
    """The adjoint gradient with the products and solves inside its loops replaced by ``@``,
    LAPACK Cholesky and triangular solves (one XLA kernel per small operation): shows what the
    fused reverse step buys. Returns a function of ``(params, y)`` giving the compiled gradient."""
    from statespace import LinearGaussianSSM
    from statespace._adjoint import LoopOps, adjoint_log_likelihood

    plain = LoopOps(
        mm=lambda A, B: A @ B,
        mm_fused=lambda A, B: A @ B,
        mmm=lambda A, B, C: A @ B @ C,
        spd_solve_small=lambda S, B: (
            jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(S, lower=True), B), None, None
        ),
        inverse_cholesky=lambda S: jax.lax.linalg.triangular_solve(
            jnp.linalg.cholesky(S), jnp.eye(S.shape[-1], dtype=S.dtype), left_side=True,
            lower=True),
    )

    def loglik(params, y):
        return adjoint_log_likelihood(LinearGaussianSSM(**_symmetric(params)), y, "cov", plain)

    grad = jax.jit(jax.grad(loglik))
    return lambda params, y: grad.lower(params, y).compile()


def _dynamax():
    try:
        from dynamax.linear_gaussian_ssm import lgssm_filter
        from dynamax.linear_gaussian_ssm.inference import (
            ParamsLGSSM,
            ParamsLGSSMDynamics,
            ParamsLGSSMEmissions,
            ParamsLGSSMInitial,
        )
    except ImportError:
        return None

    def loglik(params, y):
        params = _symmetric(params)
        n, m = params["F"].shape[0], params["H"].shape[0]
        dx = ParamsLGSSM(
            initial=ParamsLGSSMInitial(mean=params["m0"], cov=params["P0"]),
            dynamics=ParamsLGSSMDynamics(
                weights=params["F"], bias=jnp.zeros(n), input_weights=jnp.zeros((n, 0)),
                cov=params["Q"]),
            emissions=ParamsLGSSMEmissions(
                weights=params["H"], bias=jnp.zeros(m), input_weights=jnp.zeros((m, 0)),
                cov=params["R"]),
        )
        return lgssm_filter(dx, y).marginal_loglik

    return jax.jit(loglik), jax.jit(jax.grad(loglik))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kalman", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--sizes", nargs="*", default=None, help="n,m,T triples")
    parser.add_argument("--unfused", action="store_true",
                        help="also time the adjoint gradient with an unfused reverse step")
    args = parser.parse_args(argv)
    if not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    repeats = 3 if args.quick else 20
    min_time = 0.0 if args.quick else 0.3
    print(machine_info())
    ours = {form: _ours(form) for form in ("cov", "sqrt")}
    autodiff = _ours("cov", gradient="autodiff")
    unfused = _unfused_adjoint_grad() if args.unfused else None
    peer = _dynamax()
    if peer is None:
        print("dynamax is not installed: peer columns are n/a (pip install dynamax)")
    rows = []
    for n, m, T in sizes:
        params, y = _problem(n, m, T)
        for what, idx in (("loglik", 0), ("grad", 1)):
            t_cov = time_fn(ours["cov"][idx], params, y, repeats=repeats, min_time=min_time)
            t_sqrt = time_fn(ours["sqrt"][idx], params, y, repeats=repeats, min_time=min_time)
            row = {
                "n,m,T": f"{n},{m},{T}",
                "what": what,
                "ours_cov_s": t_cov["median_s"],
                "us_per_step": t_cov["median_s"] * 1e6 / T,
                "ours_sqrt_s": t_sqrt["median_s"],
                "sqrt/cov": t_sqrt["median_s"] / t_cov["median_s"],
                "dynamax_s": float("nan"),
                "dynamax/ours": float("nan"),
                "compile_ours_s": t_cov["compile_s"],
            }
            if what == "grad":
                # the same gradient by plain autodiff through the scan (no adjoint pass)
                t_ad = time_fn(autodiff[1], params, y, repeats=repeats, min_time=min_time)
                row["autodiff_s"] = t_ad["median_s"]
                row["autodiff/adjoint"] = t_ad["median_s"] / t_cov["median_s"]
                if unfused is not None:
                    t_un = time_fn(unfused(params, y), params, y, repeats=repeats,
                                   min_time=min_time)
                    row["unfused_s"] = t_un["median_s"]
                    row["unfused/fused"] = t_un["median_s"] / t_cov["median_s"]
            if peer is not None:
                t_peer = time_fn(peer[idx], params, y, repeats=repeats, min_time=min_time)
                row["dynamax_s"] = t_peer["median_s"]
                row["dynamax/ours"] = t_peer["median_s"] / t_cov["median_s"]
                # fastest calls: less sensitive to other processes on a shared machine
                row["dynamax/ours_min"] = t_peer["min_s"] / t_cov["min_s"]
                row["compile_dynamax_s"] = t_peer["compile_s"]
                a, b_ = ours["cov"][idx](params, y), peer[idx](params, y)
                row["rel_diff"] = max(
                    float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
                    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b_))
                )
            rows.append(row)
    print(markdown_table(rows, [
        "n,m,T", "what", "ours_cov_s", "us_per_step", "dynamax_s", "dynamax/ours",
        "dynamax/ours_min", "autodiff_s", "autodiff/adjoint",
        *(["unfused_s", "unfused/fused"] if args.unfused else []),
        "ours_sqrt_s", "sqrt/cov", "compile_ours_s", "rel_diff",
    ]))
    print("\nwith inputs (B u[k], D u[k], p = 2) against the same model without "
          "(gradient, alternating blocks; benchmarks/_inputs.py):")
    print(markdown_table(input_cost_rows("discrete", sizes, repeats, min_time)))
    return rows


if __name__ == "__main__":
    main()
