"""What inputs cost: the gradient with inputs against the same model without, same process.

Used by ``benchmarks.kalman`` (discrete time: ``B u[k]`` and ``D u[k]`` folded into the
offsets) and ``benchmarks.continuous`` (zero-order hold: the held inputs' integral
``∫ e^{As} ds B`` as extra columns of the exact discretisation). Both gradients are taken with
respect to every model parameter (with inputs, ``B`` and ``D`` too) and timed in alternating
blocks (``benchmarks._timing.time_interleaved``); ``inputs/plain`` is the median over rounds of
the ratio of their block medians (``paired_ratio``), the figure the "at most 10 % more" target
is read from. ``p = 2`` inputs.

Two more programs in the same blocks put that figure in scale: ``drift/plain``, the same model
with a constant drift offset ``b (n,)`` and no inputs (one offset column through the same
machinery: what any offset costs), and ``copy/plain``, a second compiled copy of the plain
gradient itself (the same program at other addresses: how far apart two copies of one program
time, i.e. the resolution of the ratios in this run).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import statespace
from benchmarks._timing import paired_ratio, time_interleaved

NUM_INPUTS = 2


def _gradients(plain, with_inputs, params, weights, data, u, rng):
    """``{name: (grad_fn, args)}``: the gradients of ``plain(params, *data)`` (two compiled
    copies), of ``with_inputs`` with the input weights and of ``plain`` with a drift ``b``
    drawn from ``rng`` (see the module docstring)."""
    drift = {"b": jnp.asarray(rng.standard_normal(params["Q"].shape[-1]))}
    return {"plain": (jax.jit(jax.grad(plain)), (params, *data)),
            "inputs": (jax.jit(jax.grad(with_inputs)), ({**params, **weights}, *data, u)),
            "drift": (jax.jit(jax.grad(plain)), ({**params, **drift}, *data)),
            "copy": (jax.jit(jax.grad(lambda *args: plain(*args))), (params, *data))}


def _discrete_grads(n, m, T, seed=0):
    """``{name: (grad_fn, args)}`` for the discrete model with and without inputs."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    params = dict(F=0.9 * A / np.max(np.abs(np.linalg.eigvals(A))), Q=np.eye(n),
                  H=rng.standard_normal((m, n)), R=np.eye(m), m0=np.zeros(n), P0=np.eye(n))
    params = {k: jnp.asarray(v) for k, v in params.items()}
    weights = {"B": jnp.asarray(rng.standard_normal((n, NUM_INPUTS))),
               "D": jnp.asarray(rng.standard_normal((m, NUM_INPUTS)))}
    u = jnp.asarray(rng.standard_normal((T, NUM_INPUTS)))
    y = jnp.asarray(rng.standard_normal((T, m)))

    def plain(p, y):
        return statespace.log_likelihood(statespace.LinearGaussianSSM(**p), y)

    def with_inputs(p, y, u):
        return statespace.log_likelihood(statespace.LinearGaussianSSM(**p), y, inputs=u)

    return _gradients(plain, with_inputs, params, weights, (y,), u, rng)


def _continuous_grads(n, m, T, seed=0):
    """``{name: (grad_fn, args)}`` for the continuous model with and without held inputs."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n)) / np.sqrt(n)
    Y = rng.normal(size=(n, n)) / np.sqrt(n)
    params = dict(A=X - X.T - (Y @ Y.T + 0.5 * np.eye(n)), Q=np.eye(n),
                  H=rng.normal(size=(m, n)), R=0.1 * np.eye(m))
    params = {k: jnp.asarray(v) for k, v in params.items()}
    weights = {"B": jnp.asarray(rng.standard_normal((n, NUM_INPUTS))),
               "D": jnp.asarray(rng.standard_normal((m, NUM_INPUTS)))}
    times = jnp.asarray(np.cumsum(rng.exponential(0.5, size=T)))
    u = jnp.asarray(rng.standard_normal((T, NUM_INPUTS)))
    y = jnp.asarray(rng.standard_normal((T, m)))

    def plain(p, y, times):
        return statespace.log_likelihood(statespace.ContinuousLinearSSM(**p), y, times)

    def with_inputs(p, y, times, u):
        model = statespace.ContinuousLinearSSM(**p)
        return statespace.log_likelihood(model, y, times, inputs=u)

    return _gradients(plain, with_inputs, params, weights, (y, times), u, rng)


def input_cost_rows(kind: str, sizes, repeats: int = 20, min_time: float = 0.3) -> list[dict]:
    """One row per ``(n, m, T)``: gradient times with and without inputs, their paired ratio
    (and the drift's and the second copy's, see above) and compile times. ``kind``:
    ``"discrete"`` or ``"continuous"``."""
    build = {"discrete": _discrete_grads, "continuous": _continuous_grads}[kind]
    rows = []
    for n, m, T in sizes:
        timings = time_interleaved(build(n, m, T), repeats=repeats, min_time=min_time)
        rows.append({
            "n,m,T": f"{n},{m},{T}",
            "plain_grad_s": timings["plain"]["median_s"],
            "inputs_grad_s": timings["inputs"]["median_s"],
            "inputs/plain": paired_ratio(timings, "inputs", "plain"),
            "drift/plain": paired_ratio(timings, "drift", "plain"),
            "copy/plain": paired_ratio(timings, "copy", "plain"),
            "compile_plain_s": timings["plain"]["compile_s"],
            "compile_inputs_s": timings["inputs"]["compile_s"],
        })
    return rows
