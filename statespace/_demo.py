"""The main job: a continuous-time model of the weekly Mauna Loa CO2 series.

``python -m statespace demo`` (or the console script ``statespace demo``):

1. loads the bundled weekly series (``statespace/data/co2_weekly.csv``, 2284 weeks from 1958
   to 2001, 59 missing) with time in decimal years; the gaps stay in as missing (NaN) rows;
2. builds ``local_linear_trend + quasi_periodic(period = 1 year, 2 harmonics) + noise``
   (``statespace.models``), a continuous-time linear SDE with a diffuse trend;
3. fits its six positive parameters by maximum likelihood (``statespace.fit`` with L-BFGS on
   the log scale, the exact Kalman log-likelihood at the irregular times) and prints the
   estimates with standard errors from the Hessian (delta method for the natural scale) and
   the log-likelihood;
4. runs a short NUTS chain (NumPyro, ``statespace.numpyro.LinearGaussianStateSpace``) started
   at the maximum-likelihood point and prints its summary (means, intervals, n_eff, r-hat);
5. writes a PNG of the data, the smoothed mean with its 95 % band, and a forecast of the
   next two years (``statespace.predict``); matplotlib is optional: without it the figure is
   skipped with a message.

Every stage shows a progress bar. Sizes are flags (``--help``) so that tests run it tiny.
Compiled programs are kept in JAX's persistent compilation cache in the user's cache folder
(``statespace.enable_compilation_cache``), so a second run loads them instead of compiling;
``--no-cache`` turns that off. XLA:CPU is let compile the filters' small loops into single
functions (``statespace.enable_small_loop_compilation``; unless ``XLA_FLAGS`` already set
backend options).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.diagnostics import summary
from numpyro.distributions import constraints
from numpyro.infer import MCMC, NUTS, init_to_value

import statespace
from statespace import models
from statespace._cache import enable_compilation_cache
from statespace._continuous import ContinuousLinearSSM
from statespace._fit import covariance
from statespace._xla_flags import enable_small_loop_compilation
from statespace.numpyro import LinearGaussianStateSpace
from statespace.transforms import constrain, unconstrain

__all__ = ["load_co2", "build_model", "add_arguments", "run", "PARAMETERS"]

#: the fitted parameters, all positive, estimated on the log scale
PARAMETERS = ("sigma_level", "sigma_slope", "decay_time", "seasonal_var", "noise_sd")
#: rough starting values (ppm, years); also the centres of the NUTS priors (on the log scale)
_START = {
    "sigma_level": 0.3,   # ppm / sqrt(year): level diffusion
    "sigma_slope": 0.1,   # ppm / year / sqrt(year): slope diffusion
    "decay_time": 20.0,   # years: decay of the seasonal pattern's memory
    "seasonal_var": np.array([4.0, 0.5]),  # ppm²: yearly and half-yearly harmonics
    "noise_sd": 0.4,      # ppm: weekly measurement noise
}
_PRIOR_SCALE = 2.0  # sd of the log-normal priors (weakly informative: a factor e² ≈ 7 either way)
_PERIOD = 1.0  # years


def load_co2(path=None):
    """The weekly CO2 series.

    Args:
        path: a CSV file with columns ``decimal_year`` and ``co2_ppm`` (empty = missing);
            default the bundled ``statespace/data/co2_weekly.csv`` (read with
            ``importlib.resources``, so it works from an installed wheel).

    Returns:
        ``(times, y)``: ``times (T,)`` in decimal years (non-decreasing) and ``y (T, 1)`` in ppm
        with NaN for missing weeks.

    Raises:
        ValueError: the file lacks the columns or its times decrease.

    Example:
        >>> import numpy as np
        >>> from statespace._demo import load_co2
        >>> times, y = load_co2()
        >>> times.shape, y.shape, int(np.isnan(y).sum()), round(float(times[0]), 2)
        ((2284,), (2284, 1), 59, 1958.24)
        >>> bool(np.all(np.diff(times) >= 0))
        True
    """
    if path is None:
        text = resources.files("statespace").joinpath("data", "co2_weekly.csv").read_text()
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "decimal_year" not in rows[0] or "co2_ppm" not in rows[0]:
        raise ValueError("the CSV needs columns 'decimal_year' and 'co2_ppm'")
    times = np.array([float(r["decimal_year"]) for r in rows])
    y = np.array([float(r["co2_ppm"]) if r["co2_ppm"].strip() else np.nan for r in rows])
    if np.any(np.diff(times) < 0):
        raise ValueError("decimal_year must be non-decreasing")
    return times, y[:, None]


def _transforms():
    """NumPyro constraints of the parameters: all positive (``biject_to``: ``exp``)."""
    return {name: constraints.positive for name in PARAMETERS}


def build_model(params, offset=0.0):
    """``local_linear_trend + quasi_periodic(1 year, 2 harmonics) + noise`` for the CO2 series.

    Args:
        params: dict with the positive entries of :data:`PARAMETERS` (``seasonal_var`` has
            one variance per harmonic).
        offset: constant observation offset ``d`` (the data's mean), so the diffuse level
            starts near zero.

    Returns:
        A ``statespace.ContinuousLinearSSM`` with 6 states (level, slope, 2 × oscillator),
        diffuse in the trend states and stationary in the seasonal ones.

    Example:
        >>> import numpy as np
        >>> from statespace._demo import PARAMETERS, build_model
        >>> PARAMETERS
        ('sigma_level', 'sigma_slope', 'decay_time', 'seasonal_var', 'noise_sd')
        >>> params = {"sigma_level": 0.1, "sigma_slope": 0.01, "decay_time": 10.0,
        ...           "seasonal_var": np.array([1.0, 0.1]), "noise_sd": 0.3}
        >>> model = build_model(params, offset=350.0)
        >>> model.state_dim, model.obs_dim, model.diffuse
        (6, 1, (True, True, False, False, False, False))
        >>> float(model.d[0]), round(float(model.R[0, 0]), 6)  # offset, noise_sd ** 2
        (350.0, 0.09)
    """
    model = models.sum_of(
        models.local_linear_trend(params["sigma_level"], params["sigma_slope"]),
        models.quasi_periodic(_PERIOD, params["decay_time"], params["seasonal_var"]),
        noise_var=params["noise_sd"] ** 2,
    )
    d = jnp.full((model.obs_dim,), offset, dtype=model.dtype)
    return ContinuousLinearSSM(
        model.A, model.Q, model.H, model.R, model.m0, model.P0, b=model.b, d=d,
        diffuse=model.diffuse,
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser``.

    Example:
        >>> import argparse
        >>> from statespace._demo import add_arguments
        >>> parser = add_arguments(argparse.ArgumentParser())
        >>> args = parser.parse_args(["--num-samples", "0", "--no-plot"])
        >>> args.num_samples, args.num_steps, args.no_plot, args.output
        (0, 200, True, 'co2_demo.png')
    """
    parser.add_argument("--data", metavar="CSV", default=None,
                        help="CSV with columns decimal_year, co2_ppm (default: the bundled "
                             "weekly Mauna Loa series)")
    parser.add_argument("--output", "-o", metavar="PNG", default="co2_demo.png",
                        help="where to write the figure (default: %(default)s)")
    parser.add_argument("--num-steps", type=int, default=200, metavar="N",
                        help="maximum L-BFGS steps of the maximum-likelihood fit (default: %(default)s)")
    parser.add_argument("--num-warmup", type=int, default=60, metavar="N",
                        help="NUTS warm-up iterations (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=100, metavar="N",
                        help="NUTS samples kept; 0 skips NUTS (default: %(default)s)")
    parser.add_argument("--forecast-years", type=float, default=2.0, metavar="Y",
                        help="forecast horizon in years (default: %(default)s)")
    parser.add_argument("--last-weeks", type=int, default=None, metavar="N",
                        help="use only the last N rows of the data (quick runs)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for NUTS")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not keep compiled programs in the persistent compilation cache "
                             "(default: on, in $XDG_CACHE_HOME/statespace/jax or "
                             "~/.cache/statespace/jax, or JAX_COMPILATION_CACHE_DIR if set), "
                             "so every run compiles afresh")
    return parser


def _format_table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _flat_named(tree):
    """``[(name, value)]`` with vector entries split as ``name[j]``."""
    out = []
    for name in PARAMETERS:
        value = np.asarray(tree[name])
        if value.ndim == 0:
            out.append((name, float(value)))
        else:
            out.extend((f"{name}[{j}]", float(v)) for j, v in enumerate(value))
    return out


def fit_mle(times, y, *, num_steps, progress=True, offset=None):
    """Maximum-likelihood fit on the log scale.

    Returns:
        ``(params, standard_errors, loglik, log_cov, result)``: constrained estimates, their
        delta-method standard errors (``se(θ) = θ · se(log θ)``), the maximised
        log-likelihood, the Laplace covariance of the log-parameters (flattened in
        ``ravel_pytree`` order, i.e. sorted parameter names) and the ``FitResult``.
    """
    spec = _transforms()
    if offset is None:
        offset = float(np.nanmean(y))
    times_j, y_j = jnp.asarray(times), jnp.asarray(y)

    def negative_log_likelihood(u, times, y):
        model = build_model(constrain(spec, u), offset)
        return -statespace.log_likelihood(model, y, times)

    u0 = unconstrain(spec, {k: jnp.asarray(v, dtype=jnp.float64) for k, v in _START.items()})
    result = statespace.fit(
        negative_log_likelihood, u0, optimizer=optax.lbfgs(), num_steps=num_steps, tol=1e-7,
        args=(times_j, y_j), progress=progress, chunk_size=10, description="maximum likelihood",
    )
    params = constrain(spec, result.params)
    # one Hessian (forward-over-reverse) serves both the standard errors and NUTS's mass matrix
    log_cov, unravel = covariance(negative_log_likelihood, result.params, times_j, y_j)
    se_log = unravel(jnp.sqrt(jnp.diagonal(log_cov)))
    se = jax.tree_util.tree_map(lambda p, s: np.asarray(p * s), params, se_log)
    return params, se, -result.loss, np.asarray(log_cov), result


def run_nuts(times, y, init_params, *, num_warmup, num_samples, seed=0, progress=True,
             offset=None, inverse_mass_matrix=None):
    """A short NUTS chain on the log-parameters; returns ``(samples, mcmc)``.

    Started at ``init_params`` (the maximum-likelihood point) with ``inverse_mass_matrix``
    (the Laplace covariance of the log-parameters) as the dense mass matrix, kept fixed, so
    the warm-up only tunes the step size and a short chain mixes.
    """
    spec = _transforms()
    if offset is None:
        offset = float(np.nanmean(y))

    def model(times, y):
        u = {}
        for name in PARAMETERS:
            loc = jnp.log(jnp.asarray(_START[name], dtype=jnp.float64))
            prior = dist.Normal(loc, _PRIOR_SCALE)
            if loc.ndim:
                prior = prior.to_event(1)
            u[name] = numpyro.sample(f"log_{name}", prior)
        params = constrain(spec, u)
        for name in PARAMETERS:
            numpyro.deterministic(name, params[name])
        numpyro.sample("y", LinearGaussianStateSpace(build_model(params, offset), times), obs=y)

    init = {f"log_{k}": jnp.log(jnp.asarray(v)) for k, v in init_params.items()}
    mass = None
    if inverse_mass_matrix is not None and np.all(np.isfinite(inverse_mass_matrix)):
        # NumPyro orders the dense matrix like ravel_pytree of the sites (sorted names), the
        # same order as the fitted parameters ("log_" prefixes keep the sort order)
        mass = jnp.asarray(inverse_mass_matrix)
    # with the Laplace mass matrix the warm-up only tunes the step size (a full-data gradient
    # is the expensive part, so no warm-up windows are spent re-estimating the matrix)
    kernel = NUTS(model, init_strategy=init_to_value(values=init), dense_mass=True,
                  inverse_mass_matrix=mass, adapt_mass_matrix=mass is None,
                  target_accept_prob=0.85, max_tree_depth=6)
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=1,
                progress_bar=progress)
    mcmc.run(jax.random.PRNGKey(seed), jnp.asarray(times), jnp.asarray(y))
    return mcmc.get_samples(), mcmc


def _summary_rows(samples):
    stats = summary({k: np.asarray(samples[k])[None] for k in PARAMETERS}, prob=0.95,
                    group_by_chain=True)
    rows = []
    for name in PARAMETERS:
        s = stats[name]
        for j in range(np.size(s["mean"])):
            label = name if np.ndim(s["mean"]) == 0 else f"{name}[{j}]"
            pick = (lambda a: float(np.ravel(a)[j]))  # noqa: E731
            rows.append((label, f"{pick(s['mean']):.4g}", f"{pick(s['std']):.3g}",
                         f"{pick(s['2.5%']):.4g}", f"{pick(s['97.5%']):.4g}",
                         f"{pick(s['n_eff']):.0f}", f"{pick(s['r_hat']):.3f}"))
    return rows


def make_figure(path, times, y, params, *, forecast_years=2.0, offset=None):
    """Write the PNG; returns the path, or ``None`` (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the figure "
              "(pip install matplotlib, or pass --no-plot)", file=sys.stderr)
        return None
    if offset is None:
        offset = float(np.nanmean(y))
    model = build_model({k: jnp.asarray(v) for k, v in params.items()}, offset)
    step = float(np.median(np.diff(times)))
    future = np.arange(times[-1] + step, times[-1] + forecast_years + 1e-9, step)
    new_times = np.concatenate([times, future])
    # one compiled program (called eagerly, each of its primitives compiles on its own: 321
    # compilations, 22 s on 2 cores; jitted: 2 compilations, 6 s)
    pred = jax.jit(statespace.predict)(model, jnp.asarray(y), jnp.asarray(times),
                                       jnp.asarray(new_times))
    noise_var = float(np.asarray(model.R)[0, 0])
    latent_sd = np.sqrt(np.maximum(np.asarray(pred.obs_covs)[:, 0, 0] - noise_var, 0.0))
    total_sd = np.sqrt(np.asarray(pred.obs_covs)[:, 0, 0])
    mean = np.asarray(pred.obs_means)[:, 0]
    T = times.shape[0]

    fig, axes = plt.subplots(2, 1, figsize=(11, 8), constrained_layout=True)
    zoom_from = max(times[0], times[-1] - 6.0)
    for ax, lo in zip(axes, (times[0], zoom_from)):
        sel = times >= lo
        ax.plot(times[sel], y[sel, 0], ".", ms=2.5, color="0.35", label="weekly data")
        ax.plot(times[sel], mean[:T][sel], color="C0", lw=1.2, label="smoothed mean")
        ax.fill_between(times[sel], mean[:T][sel] - 1.96 * latent_sd[:T][sel],
                        mean[:T][sel] + 1.96 * latent_sd[:T][sel], color="C0", alpha=0.3,
                        label="95 % band (smoothed signal)")
        ax.plot(future, mean[T:], color="C3", lw=1.2, label=f"{forecast_years:g}-year forecast")
        ax.fill_between(future, mean[T:] - 1.96 * total_sd[T:], mean[T:] + 1.96 * total_sd[T:],
                        color="C3", alpha=0.25, label="95 % forecast band (new observation)")
        ax.set_xlabel("year")
        ax.set_ylabel("CO$_2$ (ppm)")
        ax.grid(alpha=0.3)
    axes[0].set_title("Mauna Loa weekly CO$_2$: local linear trend + yearly quasi-periodic "
                      "component + noise (continuous time)")
    axes[1].set_title("last six years and the forecast")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _Stopwatch:
    """Wall and CPU seconds since the previous call (CPU time is what a quiet machine pays)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __call__(self):
        wall, cpu = time.perf_counter(), time.process_time()
        text = f"{wall - self.wall:.1f} s wall, {cpu - self.cpu:.1f} s CPU"
        self.wall, self.cpu = wall, cpu
        return text


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed arguments; returns the exit status.

    Example:
        >>> # the arguments are checked before anything is fitted (a complete run, even a tiny
        >>> # one, compiles for tens of seconds: tests/test_demo.py runs those)
        >>> import argparse
        >>> from statespace._demo import add_arguments, run
        >>> args = add_arguments(argparse.ArgumentParser()).parse_args(
        ...     ["--last-weeks", "5", "--no-cache", "--no-plot", "--no-progress"])
        >>> run(args)
        Traceback (most recent call last):
            ...
        SystemExit: --last-weeks must be at least 10
    """
    # an application entry point (not a library import): the demo needs float64 (the diffuse
    # trend sits at ~300 ppm and the likelihood sums 2000+ terms)
    jax.config.update("jax_enable_x64", True)
    enable_small_loop_compilation()  # before the first computation; see statespace._xla_flags
    if not args.no_cache:  # a second run loads its programs instead of compiling them
        enable_compilation_cache()
    progress = not args.no_progress
    t_start, cpu_start = time.perf_counter(), time.process_time()
    times, y = load_co2(args.data)
    if args.last_weeks is not None:
        if args.last_weeks < 10:
            raise SystemExit("--last-weeks must be at least 10")
        times, y = times[-args.last_weeks:], y[-args.last_weeks:]
    offset = float(np.nanmean(y))
    n_missing = int(np.isnan(y).sum())
    print(f"data: {y.shape[0]} weeks from {times[0]:.2f} to {times[-1]:.2f}, "
          f"{n_missing} missing; time unit = years")
    print("model: local linear trend (diffuse) + quasi-periodic (period 1 y, 2 harmonics) "
          "+ white noise, 6 states")

    stage = _Stopwatch()
    params, se, loglik, log_cov, result = fit_mle(times, y, num_steps=args.num_steps,
                                                  progress=progress, offset=offset)
    print(f"\nmaximum likelihood ({result.num_steps} L-BFGS steps, {result.status}; {stage()})")
    rows = [(name, f"{value:.5g}", f"{err:.3g}")
            for (name, value), (_, err) in zip(_flat_named(params), _flat_named(se))]
    print(_format_table(rows, ("parameter", "estimate", "std. error")))
    print(f"log-likelihood: {loglik:.3f}")

    if args.num_samples > 0:
        print(f"\nNUTS: {args.num_warmup} warm-up + {args.num_samples} samples, one chain, "
              "started at the estimate with the Laplace covariance as mass matrix")
        samples, _ = run_nuts(times, y, {k: np.asarray(v) for k, v in params.items()},
                              num_warmup=args.num_warmup, num_samples=args.num_samples,
                              seed=args.seed, progress=progress, offset=offset,
                              inverse_mass_matrix=log_cov)
        print(_format_table(_summary_rows(samples),
                            ("parameter", "mean", "sd", "2.5%", "97.5%", "n_eff", "r_hat")))
        print(f"({stage()})")

    if not args.no_plot:
        path = make_figure(args.output, times, y, {k: np.asarray(v) for k, v in params.items()},
                           forecast_years=args.forecast_years, offset=offset)
        if path is not None:
            print(f"\nfigure: {path} ({stage()})")
    print(f"total time: {time.perf_counter() - t_start:.1f} s wall, "
          f"{time.process_time() - cpu_start:.1f} s CPU")
    return 0
