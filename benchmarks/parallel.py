"""Sequential (``lax.scan``) vs parallel-in-time (``lax.associative_scan``) Kalman filter.

Run ``python -m benchmarks.parallel [--quick] [--T 100,1000] [--form cov|sqrt]``. For each T the
log-likelihood and its gradient (with respect to all of F, Q, H, R, m0, P0) are timed for the
sequential filter (``statespace.log_likelihood``) and the parallel filter
(``statespace._parallel.parallel_filter``; Särkkä & García-Fernández 2021) in this process:
medians of jitted calls, compile time excluded and reported separately (``*_compile_s``:
trace + lower + XLA compile from cleared caches, ``benchmarks._timing.compile_time``). ``speedup`` is sequential time / parallel
time, so > 1 means the parallel form is faster. n = 4, m = 2, float64.

Compile time: the parallel scan is blocked (``statespace._parallel._prefix_scan``), so its
compiled program has the same size for every T; with ``lax.associative_scan`` (one unrolled
level per doubling of T) the gradient's compile time grew with log T, to minutes at T = 1e5.

On CPU the parallel form is expected to LOSE: it does ~5x the arithmetic of the scan and a CPU
has few cores to spread the O(log T)-deep tree over. It is meant for GPU/TPU, where the scan
leaves the device idle (published figures: 25-30x at T = 1e3-1e5 on one GPU).

XLA:CPU deadlock at T = 1e5 (fixed in ``statespace._parallel``, see ``_cpu_chunk`` there): with
jax/jaxlib 0.10.2 the parallel filter used to hang at T = 1e5 (and could at 1e4), every thread
idle, the main thread in ``BlockUntilReady``. Native stacks (gdb) showed both threads of the
2-thread XLA intra-op pool inside ``jax::ParallelBatchMap`` -> ``BlockingCounter::Wait``, called
from the LAPACK FFI kernels (``lapack_dtrsm_ffi``, also potrf/getrf): jaxlib splits a batched
LAPACK call over that same pool once ``batch x per-matrix flops >= 200 000`` and blocks the
calling pool thread until the pieces are done, so two such calls run side by side by the thunk
executor leave no thread to run the pieces. Not an XLA scheduling option (turning the
concurrency-optimised scheduler off did not help) and not specific to the gradient. jaxlib
0.11 removed that parallel path (the H200 run, jax 0.11.2, never hung). The parallel filter
now maps its per-element functions over chunks small enough for every LAPACK call to run
inline on CPU (plain ``vmap`` on other backends); the cost on CPU is losing LAPACK's own
2-thread batch split. Each T still runs in its own process under a time limit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import machine_info, markdown_table, time_fn
from benchmarks.kalman import _problem

T_VALUES = [100, 1_000, 10_000, 100_000]
QUICK_T_VALUES = [100, 1_000]
N, M = 4, 2
# Each T runs in its own process under this limit, so that a hang (such as the XLA:CPU deadlock
# described above, now avoided) costs one row, not the whole `python -m benchmarks` run.
_PER_T_TIMEOUT_S = 420
_ROWS_MARKER = "PARALLEL_ROWS_JSON "


def _functions(form: str, parallel: bool):
    from statespace import LinearGaussianSSM, log_likelihood
    from statespace._parallel import parallel_filter

    if parallel:
        def loglik(params, y):
            return parallel_filter(LinearGaussianSSM(**params), y, form=form).log_likelihood
    else:
        def loglik(params, y):
            return log_likelihood(LinearGaussianSSM(**params), y, form=form)

    return _compiled(loglik), _compiled(jax.grad(loglik))


def _compiled(fn):
    """``fn`` jitted (``time_fn`` times its trace + lower + compile as ``*_compile_s``)."""
    return jax.jit(fn)


def _measure(T_list, form, repeats) -> list[dict]:
    """Time both filters at every T in this process (the rows of the table)."""
    seq_ll, seq_grad = _functions(form, parallel=False)
    par_ll, par_grad = _functions(form, parallel=True)
    rows = []
    for T in T_list:
        params, y = _problem(N, M, T)
        # Repeats shrink for long series so the whole run stays bounded.
        reps = max(2, repeats if T <= 10_000 else repeats // 3)
        timed = []
        for what, seq_fn, par_fn in (("loglik", seq_ll, par_ll), ("grad", seq_grad, par_grad)):
            seq = time_fn(seq_fn, params, y, repeats=reps, min_time=0.1)
            par = time_fn(par_fn, params, y, repeats=reps, min_time=0.1)
            print(f"T={T} {what}: sequential {seq['median_s']:.4g} s, "
                  f"parallel {par['median_s']:.4g} s "
                  f"(compile {seq['compile_s']:.3g} s / {par['compile_s']:.3g} s)", flush=True)
            timed.append({
                "T": T,
                "quantity": what,
                "sequential_s": seq["median_s"],
                "parallel_s": par["median_s"],
                "speedup": seq["median_s"] / par["median_s"],
                "seq_compile_s": seq["compile_s"],
                "par_compile_s": par["compile_s"],
            })
        # Agreement check after timing, so the first (compiling) call is the timed one.
        seq_value = float(seq_ll(params, y))
        check = abs(float(par_ll(params, y)) - seq_value) / abs(seq_value)
        rows += [dict(row, loglik_rel_diff=check) for row in timed]
    return rows


def main(argv=None) -> list[dict]:
    """Print the sequential-vs-parallel table and return its rows.

    Args:
        argv: command-line arguments (``--quick``, ``--T 100,1000``, ``--form cov|sqrt``,
            ``--repeats N``).

    Returns:
        One dict per (T, quantity) with the medians and compile times in seconds and the
        speed-up (sequential / parallel).
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parallel", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="T in {100, 1000}, few repeats")
    parser.add_argument("--T", default=None, help="comma-separated lengths, e.g. 100,1000")
    parser.add_argument("--form", default="cov", choices=("cov", "sqrt"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--in-process", action="store_true",
                        help="measure here instead of one child process per T")
    args = parser.parse_args(argv)
    if args.T:
        T_list = [int(float(t)) for t in args.T.split(",")]
    else:
        T_list = QUICK_T_VALUES if args.quick else T_VALUES
    repeats = args.repeats or (3 if args.quick else 10)

    jax.config.update("jax_enable_x64", True)
    print(f"# Parallel-in-time vs sequential Kalman filter (n={N}, m={M}, form={args.form}, "
          "float64)\n")
    print(machine_info() + "\n")
    rows = []
    if args.in_process:
        rows = _measure(T_list, args.form, repeats)
        print(_ROWS_MARKER + json.dumps(rows))
        return rows
    for T in T_list:
        command = [sys.executable, "-m", "benchmarks.parallel", "--in-process", "--T", str(T),
                   "--form", args.form, "--repeats", str(repeats)]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=_PER_T_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            print(f"T={T}: no result within {_PER_T_TIMEOUT_S} s (a hang such as the XLA:CPU "
                  "deadlock noted in this script; the row is left out)", flush=True)
            rows.append({"T": T, "quantity": f"timed out after {_PER_T_TIMEOUT_S} s"})
            continue
        found = [line for line in done.stdout.splitlines() if line.startswith(_ROWS_MARKER)]
        if done.returncode != 0 or not found:
            print(f"T={T}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", flush=True)
            rows.append({"T": T, "quantity": f"failed (exit {done.returncode})"})
            continue
        for line in done.stdout.splitlines():
            if line.startswith("T="):
                print(line, flush=True)
        rows += json.loads(found[-1][len(_ROWS_MARKER):])
    columns = ["T", "quantity", "sequential_s", "parallel_s", "speedup", "seq_compile_s",
               "par_compile_s", "loglik_rel_diff"]
    print(markdown_table(rows, columns))
    print("\nspeedup = sequential / parallel (> 1: parallel faster). On CPU the parallel form is "
          "expected to lose; it targets GPU/TPU.")
    return rows


if __name__ == "__main__":
    main()
