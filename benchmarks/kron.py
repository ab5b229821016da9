"""Lazy Kronecker matvec and its gradient against dense ``jnp.kron``, in the same process.

``python -m benchmarks.kron [--quick] [--dense-128]``

For factor sizes n (A, B both n×n, so K = A ⊗ B is n²×n²), times the jitted

* ``matvec``: ``K @ x`` from the factors (ours: ``rules.kron(A, B) @ x``; dense:
  ``jnp.kron(A, B) @ x``, which forms the product inside the call), and
* ``grad``: ``jax.grad`` of ``½‖K x − y‖²`` with respect to (A, B),

and reports the median (compile excluded; ``compile_s`` is trace + lower + compile from
cleared caches, ``benchmarks._timing.compile_time``),
the ratio dense / ours, and the peak memory XLA plans for each compiled program
(``compiled.memory_analysis()``: arguments + outputs + temporaries, in MiB). A matvec with a
dense K built beforehand (``K_dense @ x``, the best the dense route can do once K exists)
is reported as a further peer for the matvec.

The dense K at n = 128 is 128⁴·8 B = 2 GiB (its gradient needs at least twice that), so the
dense runs at 128 are skipped unless ``--dense-128`` is given; their memory is still
reported, from compilation alone (nothing is allocated to compile).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import machine_info, markdown_table, time_fn
from rules import kron


def _memory_mib(fn, *args) -> float:
    """Peak bytes XLA plans for the compiled program: arguments + outputs + temporaries."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return float("nan")
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - getattr(analysis, "alias_size_in_bytes", 0)
    )
    return total / 2**20


def _programs():
    def ours_matvec(A, B, x):
        return kron(A, B) @ x

    def dense_matvec(A, B, x):
        return jnp.kron(A, B) @ x

    def prebuilt_matvec(K, x):
        return K @ x

    def ours_loss(A, B, x, y):
        return 0.5 * jnp.sum((kron(A, B) @ x - y) ** 2)

    def dense_loss(A, B, x, y):
        return 0.5 * jnp.sum((jnp.kron(A, B) @ x - y) ** 2)

    return {
        "matvec": (ours_matvec, dense_matvec),
        "grad": (jax.grad(ours_loss, (0, 1)), jax.grad(dense_loss, (0, 1))),
        "prebuilt": prebuilt_matvec,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kron", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="sizes 8 and 16 only")
    parser.add_argument(
        "--dense-128", action="store_true", help="also time the dense peer at n = 128 (≥ 4 GiB)"
    )
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # float64, as every other benchmark
    sizes = [8, 16] if args.quick else [32, 64, 128]
    repeats = 5 if args.quick else 20
    print(machine_info())
    print("float64" if jax.config.read("jax_enable_x64") else "float32")

    programs = _programs()
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        dtype = jnp.result_type(float)
        A = jnp.asarray(rng.normal(size=(n, n)), dtype)
        B = jnp.asarray(rng.normal(size=(n, n)), dtype)
        x = jnp.asarray(rng.normal(size=n * n), dtype)
        y = jnp.asarray(rng.normal(size=n * n), dtype)
        run_dense = n < 128 or args.dense_128
        for op in ("matvec", "grad"):
            ours_fn, dense_fn = programs[op]
            op_args = (A, B, x) if op == "matvec" else (A, B, x, y)
            ours = time_fn(jax.jit(ours_fn), *op_args, repeats=repeats)
            row = {
                "n": n,
                "K shape": f"{n * n}×{n * n}",
                "op": op,
                "ours_s": ours["median_s"],
                "dense_s": float("nan"),
                "dense/ours": float("nan"),
                "ours MiB": _memory_mib(ours_fn, *op_args),
                "dense MiB": float("nan"),
                "ours compile_s": ours["compile_s"],
                "dense compile_s": float("nan"),
                "note": "",
            }
            if run_dense:
                dense = time_fn(jax.jit(dense_fn), *op_args, repeats=max(3, repeats // 4))
                row["dense_s"] = dense["median_s"]
                row["dense/ours"] = dense["median_s"] / ours["median_s"]
                row["dense compile_s"] = dense["compile_s"]
            else:
                row["note"] = "dense skipped: K alone is 2 GiB (use --dense-128)"
            # After timing, so the dense compile time above is not a cache hit.
            row["dense MiB"] = _memory_mib(dense_fn, *op_args)
            rows.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)
        if run_dense:
            K = jax.block_until_ready(jnp.kron(A, B))
            prebuilt = time_fn(jax.jit(programs["prebuilt"]), K, x, repeats=repeats)
            ours_mv = next(r for r in rows if r["n"] == n and r["op"] == "matvec")
            rows.append({
                "n": n,
                "K shape": f"{n * n}×{n * n}",
                "op": "matvec, dense K prebuilt",
                "ours_s": ours_mv["ours_s"],
                "dense_s": prebuilt["median_s"],
                "dense/ours": prebuilt["median_s"] / ours_mv["ours_s"],
                "ours MiB": ours_mv["ours MiB"],
                "dense MiB": _memory_mib(programs["prebuilt"], K, x),
                "ours compile_s": ours_mv["ours compile_s"],
                "dense compile_s": prebuilt["compile_s"],
                "note": "K built outside the timed call",
            })
            del K

    print()
    print(markdown_table(rows))
    print(
        "\nTimes: medians of jitted calls (compile excluded, reported separately). "
        "Memory: XLA's compiled.memory_analysis(), arguments + outputs + temporaries."
    )
    return rows


if __name__ == "__main__":
    main()
