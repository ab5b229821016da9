"""NUTS effective samples per second on a continuous-time model: three ways to write the likelihood.

One data set, one prior, one NUTS configuration (NumPyro defaults: target acceptance 0.8,
maximum tree depth 10, diagonal mass matrix adapted in warm-up), one chain per method, the same
random key; only the way the model's density is written differs:

- **ours**: ``statespace.numpyro.LinearGaussianStateSpace`` (states integrated out by our
  Kalman filter; exact discretisation and stationary covariance through ``rules``);
- **naive**: the same marginal likelihood written the way users write it today
  (``benchmarks.continuous.naive_log_likelihood``: Van Loan's block ``jax.scipy.linalg.expm``
  per interval, Kronecker-solve stationary covariance, ``lax.scan`` covariance filter, autodiff)
  added with ``numpyro.factor``;
- **latent**: the states sampled explicitly, as NumPyro's own time-series examples do
  (``numpyro.contrib.control_flow.scan`` over ``x[k] ~ N(F_k x[k-1], Qd_k)`` with the exact
  transition densities from ``statespace.discretize``, ``x[0] ~ N(0, P∞)``, and conditionally
  independent observations ``y[k] ~ N(x[k], diag(τ²))``). NUTS then samples ``8 + 2 T``
  numbers instead of 8.

The model (as ``examples/nuts_continuous.py``): a two-dimensional Ornstein–Uhlenbeck process
``dx = A x dt + dW``, ``Cov(dW) = diag(σ²) dt``, observed with noise ``diag(τ²)`` at irregular
times (exponential gaps of mean 0.1 and two long gaps), no missing entries (the naive filter
has no missing-data handling). ``A = StableMatrix(2)(u)``, ``u ~ N(0, 1.5²)``,
``σ ~ HalfNormal(2)``, ``τ ~ HalfNormal(1)``.

Figures per method: the minimum over the 8 model parameters (``u``, ``σ``, ``τ``; the latent
states of the third method are left out) of ``numpyro.diagnostics.effective_sample_size``;
the sampling wall time (post-warm-up draws only, compile excluded: warm-up and sampling run
as calls of one program compiled ahead of time with ``jax.jit(...).lower(...).compile()``,
its compile time reported separately); ESS per second of sampling; the warm-up time; mean leapfrog steps per
draw; divergences; and ``max |mean - mean_ours| / sd_ours`` over the parameters, a check that
the three write-ups sample the same posterior (a few tenths is Monte Carlo noise).

Sizes: the default is 300 times, 300 warm-up + 300 draws, one chain per method. Its cost is
dominated by the naive method (its gradient is 15-40x ours at this size) and the latent method
(a few hundred leapfrog steps per draw), plus about three compiles; on the shared, heavily
loaded 2-core machine 150 + 150 took ~3 minutes for ours + naive alone, so expect a few
minutes on an idle 2-core machine. ``--quick`` (60 times, 60 + 60) is a smoke run.
ESS from one chain of a few hundred draws is itself noisy (±20-30 %): read the ratios as
orders of magnitude, not to the percent.

Run: ``python -m benchmarks.nuts [--quick] [--num-times T] [--num-warmup W] [--num-samples S]``.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import machine_info, markdown_table

TRUE_A = np.array([[-0.6, 0.9], [-0.7, -0.4]])  # eigenvalues -0.5 ± 0.79i
TRUE_SIGMA = np.array([0.8, 0.5])
TRUE_NOISE = np.array([0.2, 0.3])
PARAMETERS = ("u_drift", "sigma", "noise")
METHODS = ("ours", "naive", "latent")


def _build(A, sigma, noise):
    import statespace

    return statespace.ContinuousLinearSSM(
        A=A, Q=jnp.diag(sigma**2), H=jnp.eye(2, dtype=A.dtype), R=jnp.diag(noise**2)
    )


def simulate(num_times: int, seed: int = 0):
    """``(times (T,), y (T, 2))``: irregular times with two long gaps, fully observed."""
    from statespace.numpyro import LinearGaussianStateSpace

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(0.1, size=num_times)
    gaps[0] = 0.0
    gaps[num_times // 3] += 3.0
    gaps[2 * num_times // 3] += 2.0
    times = jnp.asarray(np.cumsum(gaps))
    ssm = _build(jnp.asarray(TRUE_A), jnp.asarray(TRUE_SIGMA), jnp.asarray(TRUE_NOISE))
    y = LinearGaussianStateSpace(ssm, times).sample(jax.random.PRNGKey(seed))
    return times, y


def _priors():
    """The shared prior: ``(A, σ, τ)``."""
    import numpyro
    import numpyro.distributions as dist

    from statespace.transforms import StableMatrix

    u = numpyro.sample("u_drift", dist.Normal(0.0, 1.5).expand([4]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    noise = numpyro.sample("noise", dist.HalfNormal(1.0).expand([2]).to_event(1))
    return StableMatrix(2)(u), sigma, noise


def model_ours(times, y):
    """States integrated out by ``LinearGaussianStateSpace``."""
    import numpyro

    from statespace.numpyro import LinearGaussianStateSpace

    A, sigma, noise = _priors()
    numpyro.sample("y", LinearGaussianStateSpace(_build(A, sigma, noise), times), obs=y)


def model_naive(times, y):
    """The same marginal likelihood through the naive route (``benchmarks.continuous``)."""
    import numpyro

    from benchmarks.continuous import naive_log_likelihood

    A, sigma, noise = _priors()
    Q, R, H = jnp.diag(sigma**2), jnp.diag(noise**2), jnp.eye(2, dtype=A.dtype)
    numpyro.factor("y", naive_log_likelihood(A, Q, H, R, times, y))


def model_latent(times, y):
    """States as sample sites with exact transition densities (NumPyro's ``scan`` idiom)."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.control_flow import scan

    import statespace

    A, sigma, noise = _priors()
    ssm = _build(A, sigma, noise)
    F, Qd = statespace.discretize(ssm, jnp.diff(times))[:2]
    scale_tril = jnp.linalg.cholesky(Qd)
    P_inf = ssm.initial()[1]
    x0 = numpyro.sample("x_0", dist.MultivariateNormal(jnp.zeros(2, A.dtype), P_inf))
    numpyro.sample("y_0", dist.Normal(x0, noise).to_event(1), obs=y[0])

    def transition(x_prev, inputs):
        F_k, L_k, y_k = inputs
        x = numpyro.sample("x", dist.MultivariateNormal(F_k @ x_prev, scale_tril=L_k))
        numpyro.sample("y", dist.Normal(x, noise).to_event(1), obs=y_k)
        return x, None

    scan(transition, x0, (F, scale_tril, y[1:]))


MODELS = {"ours": model_ours, "naive": model_naive, "latent": model_latent}


def run_nuts(model, data, *, num_warmup: int, num_samples: int, seed: int = 0) -> dict:
    """One NUTS chain; its iterations run in chunks of one program compiled ahead of time.

    Both phases are whole numbers of chunks of ``gcd(num_warmup, num_samples)`` iterations;
    the chunk program is compiled once (``compile_s``) and not counted in the phase times.

    Returns:
        dict with the constrained draws of :data:`PARAMETERS` (``(1, S, ...)``, chain axis
        first), ``init_s``, ``compile_s``, ``warmup_s``, ``sample_s``, ``steps`` (leapfrog
        steps per draw) and ``divergences``.
    """
    from numpyro.infer import NUTS

    kernel = NUTS(model)
    chunk = math.gcd(num_warmup, num_samples)
    start = time.perf_counter()
    state = kernel.init(jax.random.PRNGKey(seed), num_warmup, model_args=data)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start

    # One compiled program, a scan over `chunk` NUTS iterations, serves both phases (the
    # kernel adapts while its iteration counter is below num_warmup): one compile, not two.
    def run_chunk(s):
        def body(s, _):
            s = kernel.sample(s, data, {})
            return s, (s.z, s.num_steps, s.diverging)

        return jax.lax.scan(body, s, None, length=chunk)

    start = time.perf_counter()
    compiled = jax.jit(run_chunk).lower(state).compile()
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(num_warmup // chunk):
        state, _ = compiled(state)
    jax.block_until_ready(state)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = []
    for _ in range(num_samples // chunk):
        state, out = compiled(state)
        outputs.append(out)
    jax.block_until_ready(outputs)
    sample_s = time.perf_counter() - start
    z, num_steps, diverging = jax.tree.map(lambda *xs: jnp.concatenate(xs), *outputs)

    constrain = jax.jit(jax.vmap(kernel.postprocess_fn(data, {})))
    values = constrain(z)
    draws = {k: np.asarray(values[k])[None] for k in PARAMETERS}
    return {
        "draws": draws,
        "init_s": init_s,
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "sample_s": sample_s,
        "steps": float(np.mean(num_steps)),
        "divergences": int(np.sum(diverging)),
    }


def _min_ess(draws: dict) -> float:
    from numpyro.diagnostics import effective_sample_size

    return float(min(np.min(effective_sample_size(v)) for v in draws.values()))


def _flat(draws: dict) -> np.ndarray:
    """``(S, 8)``: every parameter's draws side by side (chain axis dropped)."""
    return np.concatenate([v.reshape(v.shape[1], -1) for v in draws.values()], axis=1)


def main(argv=None):
    """Run the three methods on one data set and print the markdown table.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        One dict per method: ``min_ess``, ``sample_s``, ``ess_per_sec``,
        ``ours_ess_per_sec_ratio`` (ours' ESS/s over the method's), ``warmup_s``, ``compile_s``,
        ``steps_per_draw``, ``divergences``, ``max_mean_shift_sd``.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nuts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--num-times", type=int, default=None, help="observation times (default 300)")
    parser.add_argument("--num-warmup", type=int, default=None, help="warm-up iterations (default 300)")
    parser.add_argument("--num-samples", type=int, default=None, help="draws (default 300)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    num_times = args.num_times or (60 if args.quick else 300)
    num_warmup = args.num_warmup or (60 if args.quick else 300)
    num_samples = args.num_samples or (60 if args.quick else 300)

    print(machine_info())
    print(f"T = {num_times} irregular times, {num_warmup} warm-up + {num_samples} draws, 1 chain per method")
    data = simulate(num_times, seed=args.seed)
    results = {}
    for name in args.methods:
        results[name] = run_nuts(MODELS[name], data, num_warmup=num_warmup,
                                 num_samples=num_samples, seed=args.seed + 1)
        r = results[name]
        print(f"  {name}: sampling {r['sample_s']:.2f} s, warm-up {r['warmup_s']:.2f} s, "
              f"compile {r['compile_s']:.2f} s, min ESS {_min_ess(r['draws']):.0f}", flush=True)

    reference = results.get("ours")
    ref_ess_rate = None
    if reference is not None:
        ref_flat = _flat(reference["draws"])
        ref_mean, ref_sd = ref_flat.mean(0), ref_flat.std(0)
        ref_ess_rate = _min_ess(reference["draws"]) / reference["sample_s"]
    rows = []
    for name, r in results.items():
        ess = _min_ess(r["draws"])
        rate = ess / r["sample_s"]
        row = {
            "method": name,
            "T": num_times,
            "min_ess": ess,
            "sample_s": r["sample_s"],
            "ess_per_sec": rate,
            "ours_ess_per_sec_ratio": ref_ess_rate / rate if ref_ess_rate else float("nan"),
            "warmup_s": r["warmup_s"],
            "compile_s": r["compile_s"],
            "steps_per_draw": r["steps"],
            "divergences": r["divergences"],
            "max_mean_shift_sd": (float(np.max(np.abs(_flat(r["draws"]).mean(0) - ref_mean) / ref_sd))
                                  if reference is not None else float("nan")),
        }
        rows.append(row)
    print()
    print(markdown_table(rows))
    print("\nours_ess_per_sec_ratio = (ESS/s of ours) / (ESS/s of the method); "
          "ESS/s uses the sampling time only (warm-up and compile shown separately).")
    return rows


if __name__ == "__main__":
    main()
