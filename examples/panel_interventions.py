"""Panel with an intervention and a person-level covariate: ctsem-style inputs, one NUTS fit.

Every subject ``i`` follows a one-dimensional Ornstein–Uhlenbeck process observed with noise
at its own irregular times; a subject-level covariate ``c_i`` (a time-independent predictor)
moves the drift, and one intervention per subject (a time-dependent predictor) makes the
state jump at the observation where it happens::

    dx_i = (a_i x_i + b) dt + σ dW_i,    a_i = −exp(α₀ + α₁ c_i),
    x_i(t_j) += β u_ij   (u_ij = 1 at subject i's intervention, else 0),
    y_i(t_j) = x_i(t_j) + v,   v ~ N(0, τ²),   x_i(t_0) ~ stationary N(−b/a_i, σ²/(2|a_i|)).

The intervention is an impulse input: ``ContinuousLinearSSM(..., B=[[β]],
input_kind="impulse")`` with ``inputs`` ``u_i (T, 1)``; the covariate enters through the
drift of each subject's model (built under ``jax.vmap``). Subjects are padded to a common
length by repeating their last time (``dt = 0``) with NaN observations and zero inputs. The
likelihood is one ``LinearGaussianStateSpace`` with ``batch_shape = (num_subjects,)``.

The script prints the true values against posterior means and 95 % intervals, the wall time
(compile included), the largest r-hat and the number of divergences; it exits with status 1
when an r-hat is >= 1.05 or a true value falls outside its interval.

Run::

    python examples/panel_interventions.py                     # 40 subjects
    python examples/panel_interventions.py --num-subjects 4 --num-warmup 20 --num-samples 20
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
from numpyro.diagnostics import summary
from numpyro.infer import MCMC, NUTS

import statespace
from statespace.numpyro import LinearGaussianStateSpace

TRUTH = {"alpha0": 0.0, "alpha1": 0.6, "b": 0.5, "beta": 1.5, "sigma": 0.8, "noise": 0.3}


def build(a, b, beta, sigma, noise):
    """One subject's model: drift ``a < 0``, offset ``b``, intervention effect ``beta``."""
    one = jnp.ones((1, 1))
    return statespace.ContinuousLinearSSM(A=a * one, Q=sigma**2 * one, H=one, R=noise**2 * one,
                                          b=b * jnp.ones(1), B=beta * one,
                                          input_kind="impulse")


def panel_model(covariate, alpha0, alpha1, b, beta, sigma, noise):
    """The batch of subject models (every parameter gets a leading subject axis)."""
    drifts = -jnp.exp(alpha0 + alpha1 * covariate)
    return jax.vmap(lambda a: build(a, b, beta, sigma, noise))(drifts)


def model(times, inputs, covariate, y=None):
    """NumPyro model: ``times (S, T)``, ``inputs (S, T, 1)``, ``covariate (S,)``, ``y (S, T, 1)``."""
    params = {
        "alpha0": numpyro.sample("alpha0", dist.Normal(0.0, 1.0)),
        "alpha1": numpyro.sample("alpha1", dist.Normal(0.0, 1.0)),
        "b": numpyro.sample("b", dist.Normal(0.0, 2.0)),
        "beta": numpyro.sample("beta", dist.Normal(0.0, 2.0)),
        "sigma": numpyro.sample("sigma", dist.HalfNormal(2.0)),
        "noise": numpyro.sample("noise", dist.HalfNormal(1.0)),
    }
    with numpyro.plate("subject", times.shape[0]):
        ssm = panel_model(covariate, **params)
        numpyro.sample("y", LinearGaussianStateSpace(ssm, times, inputs=inputs), obs=y)


def simulate(num_subjects, min_len, max_len, seed=0):
    """Irregular, padded panel from :data:`TRUTH`.

    Returns:
        ``(times (S, T), inputs (S, T, 1), covariate (S,), y (S, T, 1), lengths (S,))``.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_subjects)
    T = int(lengths.max())
    times = np.zeros((num_subjects, T))
    inputs = np.zeros((num_subjects, T, 1))
    for i, n in enumerate(lengths):
        t = np.cumsum(np.concatenate([[0.0], rng.exponential(0.6, size=n - 1)]))
        times[i, :n], times[i, n:] = t, t[-1]  # padding: dt = 0 and missing observations
        inputs[i, rng.integers(1, n), 0] = 1.0  # the intervention, after the first visit
    covariate = rng.standard_normal(num_subjects)
    ssm = panel_model(jnp.asarray(covariate), **{k: jnp.asarray(v) for k, v in TRUTH.items()})
    dist_ = LinearGaussianStateSpace(ssm, jnp.asarray(times), inputs=jnp.asarray(inputs))
    y = np.array(dist_.sample(jax.random.PRNGKey(seed)))
    for i, n in enumerate(lengths):
        y[i, n:] = np.nan
    return times, inputs, covariate, y, lengths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-subjects", type=int, default=40)
    parser.add_argument("--min-len", type=int, default=10, help="fewest observations per subject")
    parser.add_argument("--max-len", type=int, default=25, help="most observations per subject")
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def report(samples, mcmc, seconds):
    """Print true values against the posterior; returns ``(max_rhat, covered, divergences)``."""
    stats = summary(samples, prob=0.95)
    max_rhat = max(float(np.nanmax(stats[k]["r_hat"])) for k in samples)
    divergences = int(np.sum(mcmc.get_extra_fields()["diverging"]))
    covered = {}
    print("true vs recovered (posterior mean, 95 % interval):")
    for name, value in TRUTH.items():
        flat = samples[name].reshape(-1)
        lo, hi = np.quantile(flat, [0.025, 0.975])
        covered[name] = bool(lo <= value <= hi)
        print(f"  {name:<7} true {value:+.3f}   mean {flat.mean():+.3f}   [{lo:+.3f}, {hi:+.3f}]"
              f"   {'inside' if covered[name] else 'OUTSIDE'}")
    print(f"sampling: {seconds:.1f} s (compile included); max r-hat {max_rhat:.3f}; "
          f"{divergences} divergences")
    return max_rhat, covered, divergences


def main(argv=None):
    """Run the example; returns a dict with ``max_rhat``, ``covered``, ``seconds``, ``ok``."""
    jax.config.update("jax_enable_x64", True)  # a script, not a library import
    args = parse_args(argv)
    times, inputs, covariate, y, lengths = simulate(args.num_subjects, args.min_len,
                                                    args.max_len, seed=args.seed)
    print(f"{args.num_subjects} subjects, {lengths.min()}-{lengths.max()} observations each, "
          f"one intervention each")
    chains = args.num_chains
    method = "parallel" if jax.local_device_count() >= chains else "sequential"
    mcmc = MCMC(NUTS(model, target_accept_prob=0.85), num_warmup=args.num_warmup,
                num_samples=args.num_samples, num_chains=chains, chain_method=method,
                progress_bar=not args.no_progress)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(args.seed + 1), *map(jnp.asarray, (times, inputs, covariate, y)))
    jax.block_until_ready(mcmc.get_samples())  # run() returns before the draws exist
    seconds = time.perf_counter() - start
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    max_rhat, covered, divergences = report(samples, mcmc, seconds)
    ok = max_rhat < 1.05 and all(covered.values())
    print("checks:", "passed" if ok else "FAILED")
    return {"max_rhat": max_rhat, "covered": covered, "seconds": seconds, "ok": ok,
            "divergences": divergences, "samples": samples}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
