"""Benchmark ``rules.expm`` against ``jax.scipy.linalg.expm`` in the same process.

Rows:
* batched primal and gradient (``grad`` of ``sum(expm(A) * W)``) over ``vmap``-style batches,
  (n, batch) ∈ {(4, 1000), (8, 1000), (32, 200)}, with ‖A·dt‖₁ log-uniform over 1e-3..10;
* single matrix primal, JVP, VJP pullback (backward pass alone, its residuals passed as
  arguments) and value-and-grad for n ∈ {16, 64, 256};
* numbers stored for reverse mode per matrix (in units of n²).

Run: ``python -m benchmarks.expm [--quick] [--only batched|single] [--n 4 64 ...]``. Times are medians of jitted calls after a warm-up
(compile time, trace + lower + compile from cleared caches, reported separately); compare only ratios from one run. ``speedup`` and
``ours/our_primal`` are ratios of medians; the ``_min`` columns are the same ratios of the
fastest calls, steadier on a shared machine.
"""

from __future__ import annotations

import argparse

import numpy as np

import jax
import jax.numpy as jnp

import rules
from benchmarks._timing import machine_info, markdown_table, time_fn


def _batch(n, batch, seed=0):
    """Random drift-like matrices scaled so that ‖A·dt‖₁ is log-uniform on [1e-3, 10]."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, n, n)) / np.sqrt(n) - 0.5 * np.eye(n)
    target = 10.0 ** rng.uniform(-3, 1, batch)
    a *= (target / np.abs(a).sum(axis=1).max(axis=1))[:, None, None]
    return jnp.asarray(a)


def _stored_per_matrix(fn, a):
    """Numbers reverse mode keeps between the forward and the backward pass, per matrix."""
    _, pullback = jax.vjp(fn, a)
    stored = sum(np.size(x) for x in jax.tree_util.tree_leaves(pullback))
    n = a.shape[-1]
    matrices = int(np.prod(a.shape[:-2])) if a.ndim > 2 else 1
    return stored / matrices / n**2


def _row(case, ours, peer, **extra):
    return {"case": case, **extra, "ours_s": ours["median_s"], "jax_s": peer["median_s"],
            "speedup": peer["median_s"] / ours["median_s"],
            "speedup_min": peer["min_s"] / ours["min_s"],
            "compile_ours_s": ours["compile_s"], "compile_jax_s": peer["compile_s"]}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.expm", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--float32", action="store_true", help="run in float32")
    parser.add_argument("--only", choices=("batched", "single"),
                        help="run only the batched rows or only the single-matrix rows")
    parser.add_argument("--n", type=int, nargs="+",
                        help="restrict to these matrix sizes (batched and single rows)")
    args = parser.parse_args(argv)
    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    repeats = 3 if args.quick else 15
    min_time = 0.0 if args.quick else 0.2
    timer = dict(repeats=repeats, min_time=min_time)
    batched = [(4, 50), (8, 20)] if args.quick else [(4, 1000), (8, 1000), (32, 200)]
    singles = [16] if args.quick else [16, 64, 256]
    if args.only == "single":
        batched = []
    if args.only == "batched":
        singles = []
    if args.n:
        batched = [(n, b) for n, b in batched if n in args.n]
        singles = [n for n in singles if n in args.n]

    print(machine_info())
    rows = []
    peer = jax.scipy.linalg.expm
    # Every array (matrices, weights, tangents, cotangents, a pullback's residuals) is passed as
    # an argument: closed-over arrays become constants that XLA constant-folds (seconds of
    # compile and a timing of the wrong program).
    for n, batch in batched:
        a = _batch(n, batch)
        w = jnp.asarray(np.random.default_rng(1).standard_normal(a.shape))
        primal = {f: time_fn(jax.jit(jax.vmap(f)), a, **timer) for f in (rules.expm, peer)}
        grad = {f: time_fn(jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(jax.vmap(f)(x) * w))),
                           a, w, **timer)
                for f in (rules.expm, peer)}
        for label, timing in (("batched primal", primal), ("batched grad", grad)):
            row = _row(label, timing[rules.expm], timing[peer], n=n, batch=batch)
            row["ours/our_primal"] = timing[rules.expm]["median_s"] / primal[rules.expm]["median_s"]
            rows.append(row)
        rows[-1]["stored_n2_ours"] = _stored_per_matrix(jax.vmap(rules.expm), a)
        rows[-1]["stored_n2_jax"] = _stored_per_matrix(jax.vmap(peer), a)

    apply_pullback = jax.jit(lambda pullback, g: pullback(g))
    for n in singles:
        a = _batch(n, 1, seed=n)[0] * 2.0  # ‖A‖₁ in [2e-3, 20]
        t = jnp.asarray(np.random.default_rng(2).standard_normal((n, n)))
        primal = {f: time_fn(jax.jit(f), a, **timer) for f in (rules.expm, peer)}
        jvp = {f: time_fn(jax.jit(lambda x, t, f=f: jax.jvp(f, (x,), (t,))), a, t, **timer)
               for f in (rules.expm, peer)}
        pullback = {}
        for f in (rules.expm, peer):
            _, vjp_fn = jax.vjp(f, a)  # a Partial: its residuals are pytree leaves, i.e. arguments
            pullback[f] = time_fn(apply_pullback, vjp_fn, t, **timer)
        value_and_grad = {
            f: time_fn(jax.jit(jax.value_and_grad(lambda x, t, f=f: jnp.sum(f(x) * t))), a, t,
                       **timer)
            for f in (rules.expm, peer)
        }
        for label, timing in (("single primal", primal), ("single JVP", jvp),
                              ("single VJP pullback", pullback),
                              ("single value_and_grad", value_and_grad)):
            row = _row(label, timing[rules.expm], timing[peer], n=n, batch=1)
            row["ours/our_primal"] = timing[rules.expm]["median_s"] / primal[rules.expm]["median_s"]
            row["ours/our_primal_min"] = timing[rules.expm]["min_s"] / primal[rules.expm]["min_s"]
            rows.append(row)
        rows[-1]["stored_n2_ours"] = _stored_per_matrix(rules.expm, a)
        rows[-1]["stored_n2_jax"] = _stored_per_matrix(peer, a)

    columns = ["case", "n", "batch", "ours_s", "jax_s", "speedup", "speedup_min",
               "ours/our_primal", "ours/our_primal_min", "stored_n2_ours", "stored_n2_jax", "compile_ours_s", "compile_jax_s"]
    print(markdown_table(rows, columns))
    return rows


if __name__ == "__main__":
    main()
