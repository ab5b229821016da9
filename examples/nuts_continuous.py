"""NUTS on a two-dimensional continuous-time (Ornstein–Uhlenbeck) model at irregular times.

The states are integrated out by the Kalman filter (``statespace.numpyro.LinearGaussianStateSpace``),
so NUTS samples only 8 parameters instead of 8 + 2·T:

- a 2×2 drift matrix ``A``, stable by construction: ``A = StableMatrix(2)(u)`` with
  ``u ~ Normal(0, 1.5)`` (``statespace.transforms.StableMatrix``: ``A = -(L Lᵀ) + (S − Sᵀ)``,
  negative-definite symmetric part, so every eigenvalue has negative real part);
- diffusion scales ``σ`` (``Q = diag(σ²)``), ``σ ~ HalfNormal(2)``;
- observation noise scales ``τ`` (``R = diag(τ²)``), ``τ ~ HalfNormal(1)``.

Data: ``--num-times`` (default 300) irregular times (exponential gaps plus two long gaps),
both coordinates observed with noise, a few entries missing (NaN), simulated from known
parameters. The script runs ``MCMC(NUTS(model))``, prints the summary, and checks that every
r-hat is below 1.05 and that the simulating parameters sit inside their 95 % intervals.

Run::

    python examples/nuts_continuous.py                   # 300 times, 500 + 500, 2 chains
    python examples/nuts_continuous.py --num-times 80 --num-warmup 100 --num-samples 100

When run as a script the two chains run in parallel on two CPU devices
(``--xla_force_host_platform_device_count``); imported (e.g. by the tests) they run
sequentially.
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

TRUE_A = np.array([[-0.6, 0.9], [-0.7, -0.4]])  # eigenvalues -0.5 ± 0.79i
TRUE_SIGMA = np.array([0.8, 0.5])
TRUE_NOISE = np.array([0.2, 0.3])
DRIFT = StableMatrix(2)


def build(A, sigma, noise):
    """The continuous-time model: ``dx = A x dt + dW``, ``Cov(dW) = diag(σ²) dt``, ``y = x + v``."""
    return statespace.ContinuousLinearSSM(
        A=A, Q=jnp.diag(sigma**2), H=jnp.eye(2, dtype=A.dtype), R=jnp.diag(noise**2)
    )


def model(times, y=None):
    """NumPyro model; ``times (T,)``, ``y (T, 2)`` with NaN for missing entries."""
    u = numpyro.sample("u_drift", dist.Normal(0.0, 1.5).expand([4]).to_event(1))
    A = numpyro.deterministic("A", DRIFT(u))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    noise = numpyro.sample("noise", dist.HalfNormal(1.0).expand([2]).to_event(1))
    numpyro.sample("y", LinearGaussianStateSpace(build(A, sigma, noise), times), obs=y)


def simulate(num_times, seed=0, missing=0.05):
    """Irregular times with two long gaps and data from the true parameters.

    Returns:
        ``(times (T,), y (T, 2))`` as NumPy arrays; ``y`` has NaN entries.
    """
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(0.1, size=num_times)
    gaps[0] = 0.0
    gaps[num_times // 3] += 3.0  # two long gaps without data
    gaps[2 * num_times // 3] += 2.0
    times = np.cumsum(gaps)
    ssm = build(jnp.asarray(TRUE_A), jnp.asarray(TRUE_SIGMA), jnp.asarray(TRUE_NOISE))
    y = np.array(LinearGaussianStateSpace(ssm, jnp.asarray(times)).sample(jax.random.PRNGKey(seed)))
    y[rng.uniform(size=y.shape) < missing] = np.nan
    return times, y


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-times", type=int, default=300, help="observation times (default 300)")
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=500)
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
    times, y = simulate(args.num_times, seed=args.seed)
    print(f"{len(times)} times over [0, {times[-1]:.1f}], {int(np.isnan(y).sum())} missing entries")

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
    wanted = {k: np.asarray(samples[k]) for k in ("A", "sigma", "noise")}
    print_summary(wanted, prob=0.95)
    stats = summary(wanted, prob=0.95)
    max_rhat = max(float(np.nanmax(stats[k]["r_hat"])) for k in wanted)
    truth = {"A": TRUE_A, "sigma": TRUE_SIGMA, "noise": TRUE_NOISE}
    covered = {}
    for k, value in truth.items():
        flat = wanted[k].reshape(-1, *value.shape)
        lo, hi = np.quantile(flat, 0.025, axis=0), np.quantile(flat, 0.975, axis=0)
        covered[k] = bool(np.all((lo <= value) & (value <= hi)))
    print(f"sampling: {seconds:.1f} s for {chains} chain(s) ({method}); max r-hat {max_rhat:.3f}")
    print("true parameters inside their 95 % intervals:", covered)
    ok = max_rhat < 1.05 and all(covered.values())
    print("checks:", "passed" if ok else "FAILED")
    return {"summary": stats, "max_rhat": max_rhat, "covered": covered, "seconds": seconds,
            "ok": ok, "samples": wanted}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
