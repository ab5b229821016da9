"""Maximum likelihood for a stochastically driven damped harmonic oscillator at irregular times.

``f'' + (ω/Q) f' + ω² f = white noise`` scaled so that ``Var f = S`` (celerite's SHO term,
``statespace.models.sho``), observed with white noise at ``--num-times`` irregular times
(exponential gaps). All four parameters ``ω, Q, S`` and the noise scale are positive and are
fitted on the log scale: ``statespace.fit(..., constraints=SPEC)`` with NumPyro's
``constraints.positive`` (``biject_to`` gives ``exp``) optimises their logarithms.
``statespace.fit`` runs L-BFGS (or Adam) in jitted ``lax.scan`` chunks; standard errors come
from the Hessian at the optimum in the log-parameters (forward-over-reverse through the
package's derivative rules), mapped to the natural scale by the delta method, and the script
prints each estimate's distance from the simulating value in standard errors.

Run::

    python examples/fit_continuous.py
    python examples/fit_continuous.py --optimizer adam --num-steps 3000
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.distributions import constraints

import statespace
from statespace import models
from statespace.numpyro import LinearGaussianStateSpace

TRUE = {"omega": np.array(2.0 * np.pi / 3.0), "quality": np.array(4.0),
        "variance": np.array(1.0), "noise_sd": np.array(0.3)}
SPEC = {name: constraints.positive for name in TRUE}  # fitted on the log scale
START = {"omega": np.array(1.5), "quality": np.array(1.0), "variance": np.array(0.5),
         "noise_sd": np.array(0.5)}


def build(p):
    """The SHO model with observation noise from constrained parameters."""
    return models.sho(p["omega"], p["quality"], p["variance"], noise_var=p["noise_sd"] ** 2)


def negative_log_likelihood(p, times, y):
    return -statespace.log_likelihood(build(p), y, times)


def simulate(num_times, seed=0):
    rng = np.random.default_rng(seed)
    times = np.cumsum(np.concatenate([[0.0], rng.exponential(0.25, size=num_times - 1)]))
    truth = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in TRUE.items()}
    y = LinearGaussianStateSpace(build(truth), jnp.asarray(times)).sample(jax.random.PRNGKey(seed))
    return times, np.asarray(y)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-times", type=int, default=400)
    parser.add_argument("--num-steps", type=int, default=300)
    parser.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile afresh, without the persistent compilation cache "
                             "(statespace.enable_compilation_cache)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the example; returns a dict with ``estimates``, ``standard_errors``, ``z_scores``."""
    jax.config.update("jax_enable_x64", True)  # a script, not a library import
    args = parse_args(argv)
    statespace.enable_small_loop_compilation()  # XLA:CPU: small loops as single functions
    if not args.no_cache:  # a second run loads its compiled programs from disk
        statespace.enable_compilation_cache()
    times, y = simulate(args.num_times, args.seed)
    optimizer = optax.lbfgs() if args.optimizer == "lbfgs" else optax.adam(0.02)
    p0 = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in START.items()}
    start = time.perf_counter()
    result = statespace.fit(negative_log_likelihood, p0, constraints=SPEC, optimizer=optimizer,
                            num_steps=args.num_steps, tol=1e-9,
                            args=(jnp.asarray(times), jnp.asarray(y)),
                            progress=not args.no_progress, description=args.optimizer)
    seconds = time.perf_counter() - start
    estimates = result.params
    se = result.standard_errors()
    print(f"{args.optimizer}: {result.num_steps} steps, {result.status}, {seconds:.1f} s; "
          f"log-likelihood {-result.loss:.3f}")
    print(f"{'parameter':<10} {'true':>8} {'estimate':>10} {'std. err':>9} {'z':>6}")
    z_scores = {}
    for name in TRUE:
        for j, (t, e, s) in enumerate(zip(np.atleast_1d(TRUE[name]),
                                          np.atleast_1d(np.asarray(estimates[name])),
                                          np.atleast_1d(np.asarray(se[name])))):
            label = name if np.ndim(TRUE[name]) == 0 else f"{name}[{j}]"
            z_scores[label] = float((e - t) / s)
            print(f"{label:<10} {t:8.3f} {e:10.4f} {s:9.4f} {z_scores[label]:6.2f}")
    return {"estimates": estimates, "standard_errors": se, "z_scores": z_scores,
            "result": result, "seconds": seconds}


if __name__ == "__main__":
    out = main()
    sys.exit(0 if all(abs(z) < 4 for z in out["z_scores"].values()) else 1)
