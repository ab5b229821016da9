"""Time to the answer: compile time against the peers, and whole runs from a fresh process.

**Compile** (``--parts compile``): for each case and program, ``jax.jit(f).lower(*args)``
(trace + lower) and ``lowered.compile()`` (XLA) timed separately, from cleared caches
(``benchmarks._timing.compile_time``; no persistent compilation cache), ours and the peer's in
this process one after the other. Programs: ``log_likelihood``, ``value_and_grad`` with respect
to every parameter, and ``jax.hessian`` with respect to the drift parameters (``A``; discrete:
``F``; Matérn-3/2: the lengthscale; SHO: ω and Q; the demo model: all six, as its standard
errors need). Cases: continuous-time (n, m, T) = (2, 1, 1000), (4, 2, 1000), (8, 4, 1000)
against the naive route (``benchmarks.continuous.naive_log_likelihood``); discrete (4, 2, 1000)
against dynamax (``benchmarks.kalman``); Matérn-3/2 and SHO Gaussian processes at N = 1000
(``statespace.models``) against tinygp's quasiseparable kernels and ``celerite2.jax``
(``benchmarks.gp``'s log-likelihoods, same data and log-parameters; celerite2 has no Hessian:
``jax.hessian`` fails, its JVP primitive has no batching rule, n/a);
the demo's 6-state CO2 model on the bundled weekly series (no peer). A check
row: our continuous (4, 2) ``value_and_grad`` at T = 1e5 against T = 1e3 (the program must
not grow with T). Columns ``*_cpu_s`` are process CPU seconds (XLA's compile is mostly
single-threaded: on a shared machine CPU time is steadier than wall time), the ratios are
ours / peer (< 1: ours compiles faster) from CPU time unless named ``_wall``; ``hlo_k`` is
``len(lowered.as_text())`` in thousands of characters; ``rel_diff`` compares the compiled
log-likelihoods' values.

**End to end** (``--parts e2e``): wall clock of a fresh ``python`` process (interpreter start,
imports, compilation, the run), ours against the same job with the naive likelihood: (a)
``statespace.fit`` with ``optax.lbfgs`` to convergence (``tol=1e-7``) of the (4, 2, 1000)
continuous-time model (``A = StableMatrix(4)(u)``, diagonal ``Q`` and ``R`` on the log scale,
``H`` free) on data simulated from it; (b) NUTS 300 warm-up + 300 draws (NumPyro's ``MCMC``)
on ``benchmarks.nuts``'s model. The split: ``import_s`` (the child's imports),
``xla_compile_s`` (the sum of JAX's ``backend_compile_duration`` events; tracing and lowering
stay in ``rest_s``), ``rest_s`` (the remainder: tracing, lowering, running); ``*_cpu_s``: the
child's user + system CPU seconds (steadier than wall time on a shared machine). A third run of
each job, ``floor``, replaces the likelihood by one that costs nothing (the fit: a sum of
squares of the same parameters; NUTS: independent normals on ``y`` with scale ``σ + τ``, same
priors): what imports, the optimiser's or sampler's own programs and loop cost here, whatever
the likelihood. ``naive/floor`` is the most any likelihood could gain on the naive one in that
job.

Run: ``python -m benchmarks.compile [--quick] [--parts compile e2e] [--repeats R]
[--cases continuous discrete matern32 sho demo tcheck]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import compile_time, machine_info, markdown_table

CONT_SIZES = [(2, 1, 1000), (4, 2, 1000), (8, 4, 1000)]
PROGRAMS = ("log_likelihood", "value_and_grad", "hessian")


# ---------------------------------------------------------------------------------------------
# The cases: (loss(params, *data), params, data, hessian keys) per library
# ---------------------------------------------------------------------------------------------


def _continuous(n, m, T):
    from benchmarks.continuous import make_problem, naive_log_likelihood, ours_log_likelihood

    p = make_problem(n, m, T)
    params = {k: p[k] for k in ("A", "Q", "H", "R")}
    data = (p["times"], p["y"])

    def lift(f):
        return lambda q, times, y: f(q["A"], q["Q"], q["H"], q["R"], times, y)

    return {"ours": (lift(ours_log_likelihood), params, data, ("A",)),
            "naive": (lift(naive_log_likelihood), params, data, ("A",))}


def _discrete(n, m, T):
    from benchmarks.kalman import _dynamax, _ours, _problem

    params, y = _problem(n, m, T)
    case = {"ours": (_ours("cov")[0].__wrapped__, params, (y,), ("F",))}
    peer = _dynamax()
    if peer is not None:
        case["dynamax"] = (peer[0].__wrapped__, params, (y,), ("F",))
    return case


def _gp(kind, N):
    """Matérn-3/2 (``kind="matern32"``) or SHO (``"sho"``) on one series: the three libraries'
    log-likelihoods of ``benchmarks.gp`` (same data, same log-parameters), the drift
    parameters (Matérn: the lengthscale; SHO: ω and Q) split off for the Hessian."""
    from benchmarks import gp

    n_drift = 1 if kind == "matern32" else 2
    log_params = jnp.asarray(gp.PARAMS[kind])
    params = {"drift": log_params[:n_drift], "rest": log_params[n_drift:]}
    case = {}
    for lib, build in (("ours", gp._ours), ("tinygp", gp._tinygp), ("celerite2", gp._celerite2)):
        loglik = build(kind)
        if loglik is not None:  # a peer that is not installed is left out
            loss = lambda q, t, y, f=loglik: f(jnp.concatenate([q["drift"], q["rest"]]), t, y)  # noqa: E731
            case[lib] = (loss, params, gp._data(N), ("drift",))
    return case


def _demo(last_weeks=None):
    """The demo's negative log-likelihood of its six log-parameters (``statespace._demo``)."""
    import statespace
    from statespace import _demo
    from statespace.transforms import constrain, unconstrain

    times, y = _demo.load_co2()
    if last_weeks:
        times, y = times[-last_weeks:], y[-last_weeks:]
    offset = float(np.nanmean(y))
    spec = _demo._transforms()

    def loss(u, times, y):
        return -statespace.log_likelihood(_demo.build_model(constrain(spec, u), offset), y, times)

    u0 = unconstrain(spec, {k: jnp.asarray(v, dtype=jnp.float64) for k, v in _demo._START.items()})
    return {"ours": (loss, u0, (jnp.asarray(times), jnp.asarray(y)), tuple(u0))}


def _program(name, loss, params, data, drift):
    """``(fn, args)`` of one program."""
    if name == "log_likelihood":
        return loss, (params, *data)
    if name == "value_and_grad":
        return jax.value_and_grad(loss), (params, *data)

    def hessian(sub, rest, *data):
        return jax.hessian(lambda s: loss({**rest, **s}, *data))(sub)

    sub = {k: params[k] for k in drift}
    return hessian, (sub, {k: v for k, v in params.items() if k not in drift}, *data)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _measure(fn, args, repeats, label):
    """Median over ``repeats`` of each figure of :func:`compile_time` (``None`` if it fails,
    with a line naming ``label`` and the error in the results)."""
    runs = []
    for _ in range(repeats):
        try:
            runs.append(compile_time(fn, *args))
        except Exception as err:  # a peer without a rule for this transformation
            print(f"  {label} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}",
                  flush=True)
            return None
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "compiled"}
    out["compiled"] = runs[-1]["compiled"]
    return out


def _row(case, program, peer, ours, other):
    nan = math.nan
    o, p = ours or {}, other or {}
    g = lambda d, k: d.get(k, nan)  # noqa: E731
    ratio = lambda a, b: a / b if b and b == b else nan  # noqa: E731
    return {
        "case": case, "program": program, "peer": peer,
        "ours_lower_cpu_s": g(o, "lower_cpu_s"), "ours_compile_cpu_s": g(o, "compile_cpu_s"),
        "peer_lower_cpu_s": g(p, "lower_cpu_s"), "peer_compile_cpu_s": g(p, "compile_cpu_s"),
        "lower_ratio": ratio(g(o, "lower_cpu_s"), g(p, "lower_cpu_s")),
        "compile_ratio": ratio(g(o, "compile_cpu_s"), g(p, "compile_cpu_s")),
        "total_ratio": ratio(g(o, "lower_cpu_s") + g(o, "compile_cpu_s"),
                             g(p, "lower_cpu_s") + g(p, "compile_cpu_s")),
        "ours_lower_s": g(o, "lower_s"), "ours_compile_s": g(o, "compile_s"),
        "peer_lower_s": g(p, "lower_s"), "peer_compile_s": g(p, "compile_s"),
        "compile_ratio_wall": ratio(g(o, "compile_s"), g(p, "compile_s")),
        "ours_hlo_k": g(o, "hlo_chars") / 1e3, "peer_hlo_k": g(p, "hlo_chars") / 1e3,
        "rel_diff": nan,
    }


def _value(result, args):
    return float(result["compiled"](*args)) if result else math.nan


def run_case(name, case, programs, repeats):
    """Rows of one case: each program, ours then every peer, one row per peer."""
    rows = []
    for program in programs:
        timed = {}
        for lib, (loss, params, data, drift) in case.items():
            print(f"  {name} {program} {lib}", file=sys.stderr, flush=True)
            fn, args = _program(program, loss, params, data, drift)
            timed[lib] = (_measure(fn, args, repeats, f"{name} {program} {lib}"), args)
        ours, ours_args = timed.pop("ours")
        for peer, (other, args) in (timed or {"-": (None, None)}).items():
            row = _row(name, program, peer, ours, other)
            if program == "log_likelihood" and other:
                a, b = _value(ours, ours_args), _value(other, args)
                row["rel_diff"] = abs(a - b) / abs(b)
            rows.append(row)
            print(markdown_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def t_check(repeats, T_small=1000, T_large=100_000):
    """Our continuous (4, 2) ``value_and_grad`` compile at ``T_large`` against ``T_small``."""
    small, large = (_continuous(4, 2, T)["ours"] for T in (T_small, T_large))
    ours = _measure(*_program("value_and_grad", *large), repeats, f"T={T_large:.0e}")
    ref = _measure(*_program("value_and_grad", *small), repeats, f"T={T_small:.0e}")
    row = _row(f"continuous 4,2 T={T_large:.0e}", "value_and_grad", f"ours at T={T_small:.0e}", ours, ref)
    print(markdown_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    return row


def compile_rows(quick, repeats, only=None):
    if quick:
        cases = [("continuous 2,1,100", lambda: _continuous(2, 1, 100)),
                 ("discrete 2,1,100", lambda: _discrete(2, 1, 100)),
                 ("matern32 N=100", lambda: _gp("matern32", 100))]
        programs = PROGRAMS[:1]
    else:
        cases = [(f"continuous {n},{m},{T}", lambda n=n, m=m, T=T: _continuous(n, m, T))
                 for n, m, T in CONT_SIZES]
        cases += [("discrete 4,2,1000", lambda: _discrete(4, 2, 1000)),
                  ("matern32 N=1000", lambda: _gp("matern32", 1000)),
                  ("sho N=1000", lambda: _gp("sho", 1000)),
                  ("demo co2 6-state T=2284", _demo)]
        programs = PROGRAMS
    rows = []
    for name, build in cases:
        if not only or name.split()[0] in only:
            rows += run_case(name, build(), programs, repeats)
    if not quick and (not only or "tcheck" in only):
        rows.append(t_check(repeats))
    return rows


# ---------------------------------------------------------------------------------------------
# End to end, each job in a fresh process
# ---------------------------------------------------------------------------------------------


def _fit_child(method, path, num_steps):
    """The L-BFGS fit in this (fresh) process; returns the figures the parent prints."""
    import optax

    import statespace
    from benchmarks.continuous import naive_log_likelihood
    from statespace.transforms import StableMatrix

    saved = np.load(path)
    times, y, n = jnp.asarray(saved["times"]), jnp.asarray(saved["y"]), int(saved["n"])
    stable = StableMatrix(n)

    def loss(p, times, y):
        A, Q, R = stable(p["u"]), jnp.diag(jnp.exp(2 * p["log_q"])), jnp.diag(jnp.exp(2 * p["log_r"]))
        if method == "naive":
            return -naive_log_likelihood(A, Q, p["H"], R, times, y)
        if method == "floor":  # no likelihood: a sum of squares of the same parameters
            return sum(jnp.sum((x - 0.5) ** 2) for x in (A, Q, p["H"], R))
        return -statespace.log_likelihood(statespace.ContinuousLinearSSM(A, Q, p["H"], R), y, times)

    m = y.shape[1]
    p0 = {"u": jnp.zeros(n * n), "log_q": jnp.zeros(n), "H": jnp.asarray(saved["H0"]),
          "log_r": jnp.zeros(m)}
    result = statespace.fit(loss, p0, optimizer=optax.lbfgs(), num_steps=num_steps, tol=1e-7,
                            args=(times, y), progress=False)
    return {"steps": result.num_steps, "loss": result.loss, "converged": result.converged}


def _nuts_child(method, path, num_warmup):
    from numpyro.infer import MCMC, NUTS

    from benchmarks import nuts

    saved = np.load(path)
    data = (jnp.asarray(saved["times"]), jnp.asarray(saved["y"]))
    model = _floor_model if method == "floor" else nuts.MODELS[method]
    mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_warmup,
                progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), *data, extra_fields=("num_steps",))
    sigma = np.asarray(mcmc.get_samples()["sigma"])
    return {"steps": float(np.mean(mcmc.get_extra_fields()["num_steps"])),
            "loss": float(sigma.mean()), "converged": True}


def _floor_model(times, y):
    """``benchmarks.nuts``' priors with a likelihood that costs nothing: independent normals on
    ``y`` with scale ``σ + τ`` (``A`` enters with weight zero, so every site stays in the
    model)."""
    import numpyro
    import numpyro.distributions as dist

    from benchmarks import nuts

    A, sigma, noise = nuts._priors()
    scale = sigma + noise + 0.0 * jnp.sum(A)
    numpyro.sample("y", dist.Normal(jnp.zeros(2, y.dtype), scale).to_event(1), obs=y)


def child(job, method, path, size, start):
    """Entry of the fresh process (``start``: its clock before its first import)."""
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_enable_compilation_cache", False)
    import numpyro  # noqa: F401
    import optax  # noqa: F401

    import benchmarks.continuous  # noqa: F401
    import benchmarks.nuts  # noqa: F401
    import statespace  # noqa: F401

    import_s = time.perf_counter() - start
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiled.append(seconds)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    out = (_fit_child if job == "fit" else _nuts_child)(method, path, size)
    out.update(import_s=import_s, xla_compile_s=sum(compiled))
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(job, method, path, size):
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = ("import time; t = time.perf_counter(); import benchmarks.compile as c; "
            f"c.child({job!r}, {method!r}, {str(path)!r}, {size}, t)")
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    total_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{job} {method} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["total_s"], out["cpu_s"] = total_s, cpu_s
    out["rest_s"] = total_s - out["import_s"] - out["xla_compile_s"]
    return out


def _fit_data(path, n, m, T):
    import statespace
    from benchmarks.continuous import make_problem
    from statespace.numpyro import LinearGaussianStateSpace

    p = make_problem(n, m, T)
    ssm = statespace.ContinuousLinearSSM(p["A"], p["Q"], p["H"], p["R"])
    y = LinearGaussianStateSpace(ssm, p["times"]).sample(jax.random.PRNGKey(0))
    H0 = np.random.default_rng(1).normal(size=(m, n))
    np.savez(path, times=np.asarray(p["times"]), y=np.asarray(y), n=n, H0=H0)


def e2e_rows(quick):
    from benchmarks import nuts

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fit_path, nuts_path = pathlib.Path(tmp, "fit.npz"), pathlib.Path(tmp, "nuts.npz")
        n, m, T = (2, 1, 50) if quick else (4, 2, 1000)
        _fit_data(fit_path, n, m, T)
        times, y = nuts.simulate(30 if quick else 300)
        np.savez(nuts_path, times=np.asarray(times), y=np.asarray(y))
        jobs = [(f"L-BFGS fit ({n},{m},{T}), tol 1e-7", "fit", fit_path, 10 if quick else 1000),
                (f"NUTS {'10 + 10' if quick else '300 + 300'}, T={30 if quick else 300}",
                 "nuts", nuts_path, 10 if quick else 300)]
        for label, job, path, size in jobs:
            res = {}
            for method in ("ours", "naive", "floor"):
                res[method] = _spawn(job, method, path, size)
                print(f"  {label} {method}: {res[method]}", file=sys.stderr, flush=True)
            o, v, f = res["ours"], res["naive"], res["floor"]
            rows.append({
                "job": label, "ours_total_s": o["total_s"], "naive_total_s": v["total_s"],
                "naive/ours": v["total_s"] / o["total_s"], "floor_total_s": f["total_s"],
                "naive/floor": v["total_s"] / f["total_s"], "ours_cpu_s": o["cpu_s"],
                "naive_cpu_s": v["cpu_s"], "naive/ours_cpu": v["cpu_s"] / o["cpu_s"],
                "ours_import_s": o["import_s"], "ours_xla_compile_s": o["xla_compile_s"],
                "ours_rest_s": o["rest_s"], "naive_import_s": v["import_s"],
                "naive_xla_compile_s": v["xla_compile_s"], "naive_rest_s": v["rest_s"],
                "ours_steps": o["steps"], "naive_steps": v["steps"],
                "result_ours": o["loss"], "result_naive": v["loss"],
            })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--parts", nargs="+", default=["compile", "e2e"], choices=["compile", "e2e"])
    parser.add_argument("--repeats", type=int, default=1, help="compiles per program (median)")
    parser.add_argument("--cases", nargs="+", default=None,
                        choices=["continuous", "discrete", "matern32", "sho", "demo", "tcheck"],
                        help="only these compile cases (default all)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_enable_compilation_cache", False)
    print(machine_info())
    rows = {}
    if "compile" in args.parts:
        rows["compile"] = compile_rows(args.quick, args.repeats, args.cases)
        print("\nCompile: CPU seconds (process_time), ratios ours / peer from CPU time "
              "(< 1: ours faster); wall seconds beside.\n")
        print(markdown_table(rows["compile"]))
    if "e2e" in args.parts:
        rows["e2e"] = e2e_rows(args.quick)
        print("\nEnd to end, fresh process each, wall clock (naive/ours > 1: ours faster). "
              "result_*: the fit's final loss, NUTS's posterior mean of sigma[0:2] averaged; "
              "floor: the same job with a likelihood that costs nothing.\n")
        print(markdown_table(rows["e2e"]))
    return rows


if __name__ == "__main__":
    main()
