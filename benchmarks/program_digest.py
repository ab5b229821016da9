"""Digests of the compiled benchmark programs: equal digests mean the same XLA program.

A refactor that should not change what runs (a redesign of the Python around the filters)
is checked by running this in a checkout before and one after the change and comparing the
printed digests: ``python -m benchmarks.program_digest`` in each, then ``diff``. Each digest is
of the optimised HLO text of a jitted log-likelihood or gradient (``benchmarks.kalman`` and
``benchmarks.continuous`` problems), with what depends on where the source lives (metadata,
stack frames and the file and function tables) removed: equal digests mean instruction-for-
instruction the same program, so the same run time, whatever the noise of a timing.
"""

from __future__ import annotations

import hashlib
import re

import jax

SIZES = [(2, 1, 1000), (4, 2, 1000), (8, 4, 1000)]


def digest(fn, *args) -> str:
    """12 hex digits of the optimised HLO instructions of ``jax.jit(fn)`` at ``args``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    text = re.sub(r"metadata=\{[^}]*\}", "", text)
    text = "\n".join(line for line in text.splitlines() if not line[:1].isdigit())
    text = re.sub(r",? ?stack_frame_id=[0-9]+", "", text)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def main():
    jax.config.update("jax_enable_x64", True)
    from benchmarks import continuous, kalman

    for n, m, T in SIZES:
        p = continuous.make_problem(n, m, T)
        args = (p["A"], p["Q"], p["H"], p["R"], p["times"], p["y"])
        grad = jax.grad(continuous.ours_log_likelihood, argnums=(0, 1, 2, 3))
        print(f"continuous {n},{m},{T}: loglik {digest(continuous.ours_log_likelihood, *args)} "
              f"grad {digest(grad, *args)}")
        params, y = kalman._problem(n, m, T)
        (ll, g), (_, g_sqrt) = kalman._ours("cov"), kalman._ours("sqrt")
        print(f"discrete {n},{m},{T}: loglik {digest(ll, params, y)} grad {digest(g, params, y)} "
              f"sqrt grad {digest(g_sqrt, params, y)}")


if __name__ == "__main__":
    main()
