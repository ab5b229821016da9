"""Gaussian-process models (Matérn-3/2, SHO) against celerite2 and tinygp.

Run ``python -m benchmarks.gp [--quick] [--sizes 1000 10000 ...]``. Same data (irregular,
sorted times; the same observations) and the same process in the three libraries:

* ours: ``statespace.models.matern32`` / ``sho`` and ``statespace.log_likelihood``;
* celerite2 (``celerite2.jax``, C++ behind XLA custom calls): ``terms.Matern32Term`` (an
  approximation of Matérn-3/2 by a complex term with a small frequency ``eps``, here 1e-4, so
  its log-likelihood differs from the exact one by ~1e-6 relative) and ``terms.SHOTerm``
  (``sigma`` = the process standard deviation);
* tinygp: ``kernels.quasisep.Matern32`` / ``SHO`` with its quasiseparable solver.

The hyperparameters are on the log scale: Matérn-3/2 ``(log ℓ, log σ, log σ_noise)``, SHO
``(log ω, log Q, log σ, log σ_noise)``; ``grad`` is ``jax.value_and_grad`` with respect to
all of them. ``rel_diff`` is the largest relative difference of the three log-likelihoods
(and gradients, for ``grad`` rows). Run times are medians of jitted calls timed in alternating
blocks (``_timing.time_interleaved``); the ratios are per-round paired ratios (``< 1``: we are
faster). ``compile_*`` is ``jax.jit(f).lower(...).compile()`` (trace, lower and compile), not a
first call. ``grad/loglik`` is our ``value_and_grad`` time over our log-likelihood time (the
target is ``<= 4``; celerite2's own ratio is beside it). The discrete ``(2, 1, 1000)`` and
``(4, 2, 1000)`` rows give the same ratio for a random discrete model (gradient with respect to
all its parameters). float64.

``malloc``: ``default``, or ``hugetlb`` for rows re-measured in a child process started with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (sizes >= 1e5, where every library's per-call XLA
scratch buffer exceeds glibc's 32 MiB mmap limit: each call maps fresh pages and faults them
in, ~half of our gradient's time at N = 1e5 on the 2-core machine; with transparent huge pages
glibc's mmap'd blocks fault in 2 MiB at a time). The variable must be set when the process
starts, so the child runs the same rows; all three libraries run under it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import compile_time, machine_info, markdown_table, paired_ratio, time_interleaved

SIZES = [1000, 10000, 100000]
QUICK_SIZES = [200]
_MATERN_EPS = 1e-4  # celerite2's Matérn-3/2 approximation parameter (its default is 1e-2)

# log hyperparameters: matern32 (ℓ, σ, σ_noise); sho (ω, Q, σ, σ_noise)
PARAMS = {
    "matern32": np.log([1.3, 1.1, 0.3]),
    "sho": np.log([2.0, 5.0, 1.2, 0.3]),
}


def _data(N, seed=0):
    """Irregular sorted times with mean spacing 0.1 and a smooth signal plus noise."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, 0.1 * N, N))
    y = np.sin(2.0 * t) + 0.5 * np.sin(0.31 * t) + 0.3 * rng.standard_normal(N)
    return jnp.asarray(t), jnp.asarray(y)


def _ours(kind):
    from statespace import log_likelihood, models

    def loglik(p, t, y):
        e = jnp.exp(p)
        if kind == "matern32":
            model = models.matern32(e[0], e[1] ** 2, noise_var=e[2] ** 2)
        else:
            model = models.sho(e[0], e[1], e[2] ** 2, noise_var=e[3] ** 2)
        return log_likelihood(model, y[:, None], t)

    return loglik


def _celerite2(kind):
    try:
        from celerite2.jax import GaussianProcess, terms
    except ImportError:
        return None

    def loglik(p, t, y):
        e = jnp.exp(p)
        if kind == "matern32":
            term, noise = terms.Matern32Term(sigma=e[1], rho=e[0], eps=_MATERN_EPS), e[2]
        else:
            term, noise = terms.SHOTerm(sigma=e[2], w0=e[0], Q=e[1]), e[3]
        gp = GaussianProcess(term, t=t, diag=jnp.full(t.shape, noise**2))
        return gp.log_likelihood(y)

    return loglik


def _tinygp(kind):
    try:
        from tinygp import GaussianProcess
        from tinygp.kernels import quasisep
    except ImportError:
        return None

    def loglik(p, t, y):
        e = jnp.exp(p)
        if kind == "matern32":
            kernel, noise = quasisep.Matern32(scale=e[0], sigma=e[1]), e[2]
        else:
            kernel, noise = quasisep.SHO(omega=e[0], quality=e[1], sigma=e[2]), e[3]
        return GaussianProcess(kernel, t, diag=noise**2).log_probability(y)

    return loglik


def _compiled(fn, *args):
    """``(compiled, seconds to trace + lower + compile)``, by ``_timing.compile_time``."""
    timing = compile_time(fn, *args)
    return timing["compiled"], timing["lower_s"] + timing["compile_s"]


def _rel_diff(values):
    ref = values[0]
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(v) - ref)) / jnp.max(jnp.abs(ref))) for v in values[1:]
    )


def _gp_rows(kind, N, repeats, min_time):
    t, y = _data(N)
    p = jnp.asarray(PARAMS[kind])
    peers = {"ours": _ours(kind), "celerite2": _celerite2(kind), "tinygp": _tinygp(kind)}
    peers = {k: f for k, f in peers.items() if f is not None}
    rows, times = [], {}
    for what in ("loglik", "grad"):
        calls, compile_s, values = {}, {}, {}
        for name, f in peers.items():
            g = f if what == "loglik" else jax.value_and_grad(f)
            calls[name], compile_s[name] = _compiled(g, p, t, y)
            values[name] = calls[name](p, t, y)
        timing = time_interleaved({k: (c, (p, t, y)) for k, c in calls.items()},
                                  repeats=repeats, min_time=min_time)
        times[what] = timing
        leaves = {k: jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(v)])
                  for k, v in values.items()}
        row = {"model": kind, "N": N, "what": what, "ours_s": timing["ours"]["median_s"],
               "us_per_step": timing["ours"]["median_s"] * 1e6 / N,
               "compile_ours_s": compile_s["ours"],
               "rel_diff": _rel_diff(list(leaves.values()))}
        for name in ("celerite2", "tinygp"):
            if name in timing:
                row[f"{name}_s"] = timing[name]["median_s"]
                row[f"ours/{name}"] = paired_ratio(timing, "ours", name)
                row[f"compile_{name}_s"] = compile_s[name]
        rows.append(row)
    ratio = times["grad"]["ours"]["median_s"] / times["loglik"]["ours"]["median_s"]
    rows[-1]["grad/loglik"] = ratio
    if "celerite2" in times["grad"]:
        rows[-1]["celerite2 grad/loglik"] = (
            times["grad"]["celerite2"]["median_s"] / times["loglik"]["celerite2"]["median_s"])
    return rows


def _discrete_rows(n, m, T, repeats, min_time):
    """Our discrete-time value_and_grad over our log-likelihood (no peer)."""
    from benchmarks.kalman import _problem, _symmetric
    from statespace import LinearGaussianSSM, log_likelihood

    params, y = _problem(n, m, T)

    def loglik(params, y):
        return log_likelihood(LinearGaussianSSM(**_symmetric(params)), y)

    value, c_value = _compiled(loglik, params, y)
    grad, c_grad = _compiled(jax.value_and_grad(loglik), params, y)
    timing = time_interleaved({"loglik": (value, (params, y)), "grad": (grad, (params, y))},
                              repeats=repeats, min_time=min_time)
    return [{
        "model": f"discrete ({n}, {m})", "N": T, "what": "grad",
        "ours_s": timing["grad"]["median_s"],
        "us_per_step": timing["grad"]["median_s"] * 1e6 / T,
        "compile_ours_s": c_grad,
        "grad/loglik": paired_ratio(timing, "grad", "loglik"),
    }]


_HUGETLB = "glibc.malloc.hugetlb=1"
_HUGETLB_MIN_N = 100_000


def _malloc_mode():
    return "hugetlb" if _HUGETLB in os.environ.get("GLIBC_TUNABLES", "") else "default"


def _hugetlb_rows(models, sizes):
    """The rows for ``sizes`` re-measured in a child process with glibc's huge-page tunable."""
    env = dict(os.environ, GLIBC_TUNABLES=":".join(
        t for t in (os.environ.get("GLIBC_TUNABLES", ""), _HUGETLB) if t))
    command = [sys.executable, "-m", "benchmarks.gp", "--no-discrete", "--json",
               "--sizes", *map(str, sizes), "--models", *models]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


COLUMNS = ["model", "N", "malloc", "what", "ours_s", "us_per_step", "celerite2_s", "ours/celerite2",
           "tinygp_s", "ours/tinygp", "grad/loglik", "celerite2 grad/loglik",
           "compile_ours_s", "compile_celerite2_s", "compile_tinygp_s", "rel_diff"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gp", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--sizes", nargs="*", type=int, default=None, help="series lengths N")
    parser.add_argument("--models", nargs="*", default=["matern32", "sho"])
    parser.add_argument("--no-discrete", action="store_true", help="skip the discrete rows")
    parser.add_argument("--no-hugetlb", action="store_true",
                        help="skip re-measuring N >= 1e5 under GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on the last line")
    args = parser.parse_args(argv)
    if not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    repeats = 3 if args.quick else 10
    min_time = 0.0 if args.quick else 0.5
    if not args.json:
        print(machine_info())
    rows = []
    for kind in args.models:
        for N in sizes:
            rows += [dict(r, malloc=_malloc_mode()) for r in _gp_rows(kind, N, repeats, min_time)]
    large = [N for N in sizes if N >= _HUGETLB_MIN_N]
    if large and not args.no_hugetlb and not args.json and _malloc_mode() == "default":
        rows += _hugetlb_rows(args.models, large)
    if not args.no_discrete:
        for n, m in ((2, 1), (4, 2)):
            rows += _discrete_rows(n, m, 200 if args.quick else 1000, repeats, min_time)
    if args.json:
        print(json.dumps([{k: (float(v) if isinstance(v, (np.floating, jnp.ndarray)) else v)
                           for k, v in r.items()} for r in rows]))
    else:
        print(markdown_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
