"""Panel data: many subjects, each with its own irregular times and length, one NUTS fit.

The ctsem-style hierarchical continuous-time model: every subject ``i`` follows a
two-dimensional Ornstein–Uhlenbeck process with its own drift matrix ``A_i``,

    dx_i = A_i x_i dt + dW_i,  Cov(dW_i) = diag(σ²) dt,   y_i(t) = x_i(t) + v,  v ~ N(0, diag(τ²)),

with subject-level random effects on the drift. ``A_i = StableMatrix(2)(u_i)`` (stable for
every subject by construction) with ``u_i = u_pop + (ρ₁ z_i1, 0, ρ₂ z_i2, 0)``,
``z_i ~ N(0, I)`` (non-centred): the random effects move the log-diagonal of the Cholesky
factor of ``−sym(A_i)``, i.e. each subject's damping of the two processes.

Data layout: subject ``i`` has ``T_i`` observations (between ``--min-len`` and ``--max-len``)
at its own times; all subjects are padded to the common ``T = max T_i`` by repeating the
last time (``dt = 0``) with NaN observations, which contribute nothing to the likelihood.
The likelihood is one ``LinearGaussianStateSpace`` with ``batch_shape = (num_subjects,)``
inside ``numpyro.plate``: the per-subject Kalman filters are ``vmap``-ed, not a Python loop.

The script prints NumPyro's summary of the population parameters, a table of true values
against posterior means and 95 % intervals, the wall time (compile included), the largest
r-hat and the number of divergences; it exits with status 1 when an r-hat is >= 1.05 or a
true population value falls outside its interval. Early warm-up (identity mass matrix)
takes long trajectories (up to 1023 leapfrog steps): with ~1300 observations the
population parameters are far more concentrated than the unit-scale ``z``.

Run::

    python examples/panel_continuous.py                     # 50 subjects
    python examples/panel_continuous.py --num-subjects 5 --num-warmup 50 --num-samples 50
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before JAX starts: one CPU device per chain
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.diagnostics import print_summary, summary
from numpyro.infer import MCMC, NUTS

import statespace
from statespace.numpyro import LinearGaussianStateSpace
from statespace.transforms import StableMatrix

DRIFT = StableMatrix(2)
TRUE_A_POP = np.array([[-0.8, 0.6], [-0.5, -0.5]])
TRUE_RHO = np.array([0.3, 0.3])
TRUE_SIGMA = np.array([0.7, 0.5])
TRUE_NOISE = np.array([0.25, 0.25])
EFFECT_INDEX = np.array([0, 2])  # entries of u that carry random effects (log-diagonal of L)
TRUTH = {"A_pop": TRUE_A_POP, "rho": TRUE_RHO, "sigma": TRUE_SIGMA, "noise": TRUE_NOISE}


def build(A, sigma, noise):
    """One subject's model (``A`` is ``(2, 2)``)."""
    return statespace.ContinuousLinearSSM(
        A=A, Q=jnp.diag(sigma**2), H=jnp.eye(2, dtype=A.dtype), R=jnp.diag(noise**2)
    )


def subject_drifts(u_pop, rho, z):
    """``(S, 2, 2)`` drift matrices from the population ``u_pop (4,)``, scales ``rho (2,)``, ``z (S, 2)``."""
    u = jnp.broadcast_to(u_pop, z.shape[:-1] + (4,)).at[..., EFFECT_INDEX].add(rho * z)
    return DRIFT(u)


def batched_model(A_subjects, sigma, noise):
    """A batch of models, one per subject (every parameter gets a leading subject axis)."""
    return jax.vmap(lambda A: build(A, sigma, noise))(A_subjects)


def model(times, y=None):
    """NumPyro model: ``times (S, T)``, ``y (S, T, 2)`` NaN-padded."""
    num_subjects = times.shape[0]
    u_pop = numpyro.sample("u_pop", dist.Normal(0.0, 1.5).expand([4]).to_event(1))
    numpyro.deterministic("A_pop", DRIFT(u_pop))
    rho = numpyro.sample("rho", dist.HalfNormal(0.5).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    noise = numpyro.sample("noise", dist.HalfNormal(1.0).expand([2]).to_event(1))
    with numpyro.plate("subject", num_subjects):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ssm = batched_model(subject_drifts(u_pop, rho, z), sigma, noise)
        numpyro.sample("y", LinearGaussianStateSpace(ssm, times), obs=y)


def simulate(num_subjects, min_len, max_len, seed=0):
    """Irregular, NaN-padded panel from the true parameters.

    Returns:
        ``(times (S, T), y (S, T, 2), lengths (S,))`` as NumPy arrays.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_subjects)
    T = int(lengths.max())
    times = np.zeros((num_subjects, T))
    for i, n in enumerate(lengths):
        t = np.cumsum(np.concatenate([[0.0], rng.exponential(0.5, size=n - 1)]))
        times[i, :n] = t
        times[i, n:] = t[-1]  # padding: dt = 0 and missing observations
    z = rng.standard_normal((num_subjects, 2))
    A = subject_drifts(jnp.asarray(DRIFT.inv(TRUE_A_POP)), jnp.asarray(TRUE_RHO), jnp.asarray(z))
    ssm = batched_model(A, jnp.asarray(TRUE_SIGMA), jnp.asarray(TRUE_NOISE))
    y = np.array(LinearGaussianStateSpace(ssm, jnp.asarray(times)).sample(jax.random.PRNGKey(seed)))
    for i, n in enumerate(lengths):
        y[i, n:] = np.nan
    return times, y, lengths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-subjects", type=int, default=50)
    parser.add_argument("--min-len", type=int, default=15, help="fewest observations per subject")
    parser.add_argument("--max-len", type=int, default=40, help="most observations per subject")
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile afresh, without the persistent compilation cache "
                             "(statespace.enable_compilation_cache)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the example; returns a dict with the summary, ``max_rhat``, ``covered``, ``seconds``."""
    jax.config.update("jax_enable_x64", True)  # a script, not a library import
    args = parse_args(argv)
    statespace.enable_small_loop_compilation()  # XLA:CPU: small loops as single functions
    if not args.no_cache:  # a second run loads its compiled programs from disk
        statespace.enable_compilation_cache()
    times, y, lengths = simulate(args.num_subjects, args.min_len, args.max_len, seed=args.seed)
    print(f"{args.num_subjects} subjects, {lengths.min()}-{lengths.max()} observations each "
          f"(padded to T = {times.shape[1]}), {int(lengths.sum())} observation times in total")
    chains = args.num_chains
    method = "parallel" if jax.local_device_count() >= chains else "sequential"
    mcmc = MCMC(NUTS(model, target_accept_prob=0.85), num_warmup=args.num_warmup,
                num_samples=args.num_samples, num_chains=chains, chain_method=method,
                progress_bar=not args.no_progress)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(args.seed + 1), jnp.asarray(times), jnp.asarray(y))
    jax.block_until_ready(mcmc.get_samples())  # run() returns before the draws exist
    seconds = time.perf_counter() - start
    samples = mcmc.get_samples(group_by_chain=True)
    wanted = {k: np.asarray(samples[k]) for k in ("A_pop", "rho", "sigma", "noise")}
    print_summary(wanted, prob=0.95)
    stats = summary(wanted, prob=0.95)
    max_rhat = max(float(np.nanmax(stats[k]["r_hat"])) for k in wanted)
    divergences = int(np.sum(mcmc.get_extra_fields()["diverging"]))
    covered = {}
    print("population parameters, true vs recovered (posterior mean, 95 % interval):")
    for k, value in TRUTH.items():
        flat = wanted[k].reshape(-1, *value.shape)
        lo, hi = np.quantile(flat, 0.025, axis=0), np.quantile(flat, 0.975, axis=0)
        inside = (lo <= value) & (value <= hi)
        covered[k] = bool(np.all(inside))
        for idx in np.ndindex(value.shape):
            name = k + ("[" + ", ".join(map(str, idx)) + "]" if idx else "")
            print(f"  {name:<12} true {value[idx]:+.3f}   mean {flat.mean(0)[idx]:+.3f}   "
                  f"[{lo[idx]:+.3f}, {hi[idx]:+.3f}]   {'inside' if inside[idx] else 'OUTSIDE'}")
    print(f"sampling: {seconds:.1f} s (compile included) for {chains} chain(s) ({method}), "
          f"{args.num_warmup} warm-up + {args.num_samples} draws each; max r-hat {max_rhat:.3f}; "
          f"{divergences} divergences")
    print("true population parameters inside their 95 % intervals:", covered)
    ok = max_rhat < 1.05 and all(covered.values())
    print("checks:", "passed" if ok else "FAILED")
    return {"summary": stats, "max_rhat": max_rhat, "covered": covered, "seconds": seconds,
            "divergences": divergences, "ok": ok, "samples": wanted}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
