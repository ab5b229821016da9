"""Nonlinear SDEs at irregular times: our local-linearisation EKF vs cd-dynamax's CD-EKF.

Run ``python -m benchmarks.nonlinear [--quick]`` (the peer needs ``cd-dynamax``, in the
``bench`` extra: ``pip install -e ".[bench]"``; without it only our columns are printed).

Two models, the same model and the same data for both libraries in one process:

* ``n = 2``: a stochastic Van der Pol oscillator, ``dx1 = x2 dt``,
  ``dx2 = (mu (1 − x1²) x2 − omega² x1) dt + dW``, observed ``y = x1 + v``;
* ``n = 6``: three coupled damped Duffing oscillators, ``x = (q1, q2, q3, p1, p2, p3)``,
  ``dq_i = p_i dt``, ``dp_i = (−omega_i² q_i − gamma p_i − eps q_i³
  + kappa (q_{i−1} − 2 q_i + q_{i+1})) dt + dW`` (``q_0 = q_4 = 0``), observed
  ``y = q + v`` (the three positions);

constant diffusion ``Q``, Gaussian noise ``R``, ``x(t_0) ~ N(m0, P0)`` at the first observation
time, ``T = 1000`` irregular times (exponential gaps, mean 0.1); the data are simulated by
Euler–Maruyama with step ``<= 1e-3`` (seeded).

* ours: ``statespace.log_likelihood(NonlinearSDE(...), y, times, method="ekf", substeps=k)``
  (local linearisation with the Jacobian at each substep's midpoint, ``k`` relinearisations
  per interval; autodiff gradient) for ``k = 1`` and ``k = 4``; ``ours_k16``, ``ours_k64``
  (values only) show where the substeps converge (computed as ``substeps=1`` on a grid with
  ``k − 1`` NaN observations added inside each gap: the same numbers, ``refined``);
  ``ours_ms``: one substep per part after every gap longer than ``MAX_STEP`` = 0.2 is split
  into equal parts (``max_step=0.2``: 1151 steps instead of 1000 at ``n = 2``). The error of
  ``k = 1`` sits after the longest gaps (Van der Pol: 26 of its 37 nats in the six steps
  after the two gaps of 0.8, whose predictions are off); splitting them costs 15 % more
  steps;
* peer: cd-dynamax 0.5 ``ContDiscreteNonlinearGaussianSSM.marginal_log_prob``, its
  continuous-discrete EKF: the first-order moment ODEs ``dm/dt = f(m)``,
  ``dP/dt = J P + P Jᵀ + Q`` integrated between observations by diffrax (``Dopri5``, constant
  ``dt0 = 0.01`` -- the defaults of its ``build_filter_hyperparams`` -- ``max_steps`` raised to
  cover the longest gap, gradients by ``RecursiveCheckpointAdjoint`` through the RK steps).
  Its value is the limit of ours as ``k`` grows (its own solver error is negligible:
  ``dt0 = 1e-3`` moved the Van der Pol value at ``T = 200`` by 5e-12), so
  ``ours_k-peer`` is our discretisation error (second order in ``1/k``).
  ``peer_dt0.1``: the same peer with ``dt0 = 0.1``, still more accurate than our ``k = 4``
  (``peer_dt0.1-peer``), i.e. the peer at a step chosen for the accuracy we reach rather
  than at its default;
* reference: ``ll_pf``, a bootstrap particle filter's estimate of the SDE's own
  log-likelihood (``PARTICLES`` = 20 000 particles, Heun steps of at most 0.005, mean and
  standard error over ``PF_RUNS`` = 4 runs; skipped with ``--quick`` or ``--no-truth``):
  both EKFs close the moments at a Gaussian, and ``*-pf`` shows how far that closure alone
  puts the converged value (``peer-pf``) against our discretisation error on top of it.

``grad``: ``jax.value_and_grad`` with respect to the drift parameters (``mu, omega`` at
``n = 2``; ``omega (3,), gamma, eps, kappa`` at ``n = 6``), jitted, in both libraries;
``grad_rel_diff_k*``: the largest difference of the two gradients relative to the peer's
largest entry. Timing: the competitors' costs differ up to 10-40 fold, too unlike for
``_timing.time_interleaved`` (a cheap call slows down for a whole 4-call block after an
expensive one), so each competitor is timed in its own long block -- one untimed call, then
calls until ``block_s`` have passed (at least 2) -- and the blocks alternate over several
rounds (``time_blocks``). ``*_s`` are medians over all timed calls; ``peer/ours_k*`` is the
median over rounds of the peer's block median over ours in the same round
(``_timing.paired_ratio``: > 1 means we are faster; the issue's target is >= 5 at ``n = 2`` and
``n = 6``, ``T = 1000``), ``_min`` the ratio of the fastest calls; ``k4/k1`` the same paired
ratio of our two substep counts. ``compile_*``: trace + lower, and XLA compile, of each jitted
``value_and_grad`` from cleared caches (``_timing.compile_time``; no run included), wall
seconds with the process's CPU seconds beside them (steadier on a shared machine). float64.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks._timing import compile_time, machine_info, markdown_table, paired_ratio

T_FULL, T_QUICK = 1000, 200
MEAN_GAP = 0.1
SUBSTEPS = 4  # the substep count whose value is compared with the peer's
MAX_STEP = 0.2  # ours with one substep per part of at most this length (``max_step``)
PARTICLES, PF_RUNS, PF_STEP = 20_000, 4, 0.005  # the particle filter's reference value
CONVERGENCE = (16, 64)  # value only, on a refined grid (``refined``)
COARSE_DT0 = 0.1  # the peer's step in its second configuration


# ---------------------------------------------------------------------------------------------
# The two models: drift(x, params) shared by ours (wrapped to drift(x, t, params)), the peer
# and the simulation
# ---------------------------------------------------------------------------------------------


def van_der_pol(x, p):
    return jnp.stack([x[1], p["mu"] * (1.0 - x[0] ** 2) * x[1] - p["omega"] ** 2 * x[0]])


def duffing_chain(x, p):
    q, v = x[:3], x[3:]
    padded = jnp.concatenate([jnp.zeros(1, x.dtype), q, jnp.zeros(1, x.dtype)])
    laplacian = padded[:-2] - 2.0 * q + padded[2:]
    dv = -(p["omega"] ** 2) * q - p["gamma"] * v - p["eps"] * q**3 + p["kappa"] * laplacian
    return jnp.concatenate([v, dv])


def _problems():
    """``{name: dict(drift, params, Q, H, R, m0, P0, seed)}`` (numpy arrays, jnp parameters)."""
    f64 = lambda v: jnp.asarray(v, jnp.float64)  # noqa: E731
    return {
        "Van der Pol n=2": dict(
            drift=van_der_pol, params={"mu": f64(1.0), "omega": f64(1.0)},
            Q=np.diag([0.01, 0.1]), H=np.array([[1.0, 0.0]]), R=np.array([[0.05]]),
            m0=np.array([1.0, 0.0]), P0=0.5 * np.eye(2), seed=0),
        "Duffing chain n=6": dict(
            drift=duffing_chain,
            params={"omega": f64([1.0, 1.3, 0.8]), "gamma": f64(0.3), "eps": f64(0.1),
                    "kappa": f64(0.2)},
            Q=0.1 * np.eye(6), H=np.hstack([np.eye(3), np.zeros((3, 3))]), R=0.05 * np.eye(3),
            m0=np.zeros(6), P0=np.eye(6), seed=1),
    }


def simulate(problem, T, h=1e-3):
    """``(times (T,), y (T, m))``: exponential gaps (mean ``MEAN_GAP``), the path by
    Euler–Maruyama with each gap split into ``ceil(gap / h)`` equal steps, seeded."""
    rng = np.random.default_rng(problem["seed"])
    times = np.cumsum(rng.exponential(MEAN_GAP, size=T))
    gaps = np.diff(times)
    steps = np.maximum(1, np.ceil(gaps / h)).astype(int)
    dts = np.repeat(gaps / steps, steps)
    n = problem["Q"].shape[0]
    x0 = rng.multivariate_normal(problem["m0"], problem["P0"])
    noise = (rng.standard_normal((dts.size, n)) @ np.linalg.cholesky(problem["Q"]).T
             * np.sqrt(dts)[:, None])
    drift, params = problem["drift"], problem["params"]

    @jax.jit
    def path(x0, dts, noise):
        def step(x, inputs):
            dt, w = inputs
            x = x + drift(x, params) * dt + w
            return x, x

        return jax.lax.scan(step, x0, (dts, noise))[1]

    states = np.asarray(path(jnp.asarray(x0), jnp.asarray(dts), jnp.asarray(noise)))
    states = np.concatenate([x0[None], states[np.cumsum(steps) - 1]])
    m = problem["H"].shape[0]
    y = states @ problem["H"].T + rng.multivariate_normal(np.zeros(m), problem["R"], size=T)
    return jnp.asarray(times), jnp.asarray(y)


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def ours_log_likelihood_fn(problem, substeps, max_step=None, fixed_times=None):
    """``loglik(params, y, times)`` of our EKF with ``substeps`` relinearisations; with
    ``max_step`` (gaps longer than it split first) the grid is built from ``fixed_times``,
    closed over (concrete), and the ``times`` argument is not used."""
    import statespace

    drift = problem["drift"]
    H = jnp.asarray(problem["H"])
    model = statespace.NonlinearSDE(
        lambda x, t, p: drift(x, p), problem["Q"], lambda x, t, p: H @ x, problem["R"],
        problem["m0"], problem["P0"], params=problem["params"])

    def loglik(params, y, times):
        times = times if max_step is None else fixed_times
        return statespace.log_likelihood(model.replace(params=params), y, times, method="ekf",
                                         substeps=substeps, max_step=max_step)

    return loglik


# ---------------------------------------------------------------------------------------------
# The reference: a bootstrap particle filter's log-likelihood of the SDE itself
# ---------------------------------------------------------------------------------------------


def particle_log_likelihood(problem, times, y, key, particles=PARTICLES, step=PF_STEP):
    """A bootstrap particle filter's estimate of ``log p(y)`` under the SDE (no Gaussian
    closure): systematic resampling at every observation, each gap propagated by the Heun
    scheme (weak order 2 for additive noise) in ``ceil(gap / step)`` equal steps."""
    drift, params = problem["drift"], problem["params"]
    chol_q = jnp.linalg.cholesky(jnp.asarray(problem["Q"]))
    H, R = jnp.asarray(problem["H"]), jnp.asarray(problem["R"])
    R_inv, log_det_R = jnp.linalg.inv(R), jnp.linalg.slogdet(R)[1]
    f = jax.vmap(lambda x: drift(x, params))
    gaps = jnp.diff(times)
    steps = jnp.maximum(1, jnp.ceil(gaps / step)).astype(jnp.int32)

    def weigh(x, yk):
        v = yk - x @ H.T
        log_w = -0.5 * (jnp.einsum("pi,ij,pj->p", v, R_inv, v) + log_det_R
                        + H.shape[0] * jnp.log(2 * jnp.pi))
        top = jnp.max(log_w)
        w = jnp.exp(log_w - top)
        return top + jnp.log(jnp.mean(w)), w / jnp.sum(w)

    def interval(carry, xs):
        x, w, key = carry
        gap, count, yk = xs
        key, k_resample, k_noise = jax.random.split(key, 3)
        u = (jax.random.uniform(k_resample) + jnp.arange(particles)) / particles
        x = x[jnp.clip(jnp.searchsorted(jnp.cumsum(w), u), 0, particles - 1)]
        h = gap / count

        def heun(i, x):
            dw = jax.random.normal(jax.random.fold_in(k_noise, i), x.shape) @ chol_q.T * jnp.sqrt(h)
            fx = f(x)
            return x + 0.5 * (fx + f(x + fx * h + dw)) * h + dw

        x = lax.fori_loop(0, count, heun, x)
        ll, w = weigh(x, yk)
        return (x, w, key), ll

    k0, key = jax.random.split(key)
    x = (jnp.asarray(problem["m0"]) + jax.random.normal(k0, (particles, chol_q.shape[0]))
         @ jnp.linalg.cholesky(jnp.asarray(problem["P0"])).T)
    ll0, w = weigh(x, y[0])
    return ll0 + jnp.sum(lax.scan(interval, (x, w, key), (gaps, steps, y[1:]))[1])


def particle_reference(problem, times, y, runs=PF_RUNS):
    """``(mean, standard error)`` of :func:`particle_log_likelihood` over independent runs."""
    run = jax.jit(lambda key: particle_log_likelihood(problem, times, y, key))
    values = np.array([float(run(jax.random.PRNGKey(r))) for r in range(runs)])
    return values.mean(), values.std(ddof=1) / np.sqrt(runs)


# ---------------------------------------------------------------------------------------------
# The peer: cd-dynamax's continuous-discrete EKF
# ---------------------------------------------------------------------------------------------


def peer_log_likelihood_fn(problem, times, dt0=1e-2):
    """``loglik(params, y, times)`` of cd-dynamax's CD-EKF, or None without cd-dynamax.

    cd-dynamax writes the SDE as ``dz = f(z) dt + L dB``, ``Cov(dB) = Qc dt``: we pass
    ``L = I``, ``Qc = Q``, the emission ``H x + 0`` (its ``LearnableLinear``), the prior at
    ``t_emissions[0]``, everything but the drift fixed (non-trainable). The filter: update at
    ``t_k``, then the moment ODEs to ``t_{k+1}`` with diffrax (and once more to
    ``t_T + 1e-4`` after the last observation, not in the value). A NaN observation gives a NaN
    log-likelihood (no missing-data masking), so the data here have none. ``max_steps`` (100 by
    default, i.e. gaps up to 1.0 at ``dt0 = 0.01``) is raised to cover the longest gap of
    ``times``, else diffrax fails on it.
    """
    try:
        from cd_dynamax import ContDiscreteNonlinearGaussianSSM
        from cd_dynamax.dynamax.parameters import ParameterProperties
        from cd_dynamax.src.continuous_discrete_nonlinear_gaussian_ssm.cdnlgssm_utils import (
            LearnableLinear,
            LearnableMatrix,
            LearnableVector,
        )
        from cd_dynamax.src.continuous_discrete_nonlinear_gaussian_ssm.models import (
            build_filter_hyperparams,
        )
    except ImportError:
        return None

    Q, H, R, m0, P0 = (jnp.asarray(problem[k]) for k in ("Q", "H", "R", "m0", "P0"))
    n, m = Q.shape[0], H.shape[0]
    max_gap = float(np.max(np.diff(np.asarray(times)), initial=0.0))
    hyper = build_filter_hyperparams(
        filter_type="EKF", filter_state_order="first", diffeqsolve_dt0=dt0,
        diffeqsolve_max_steps=max(100, math.ceil(max_gap / dt0) + 2), diffeqsolve_kwargs={})
    ssm = ContDiscreteNonlinearGaussianSSM(state_dim=n, emission_dim=m)
    fixed = ParameterProperties(trainable=False)

    def entry(value, kind, props=None):
        return {"params": kind(params=value), "props": props or kind(params=fixed)}

    base, _ = ssm.initialize(
        initial_mean=entry(m0, LearnableVector),
        initial_cov=entry(P0, LearnableMatrix),
        dynamics_diffusion_coefficient=entry(jnp.eye(n), LearnableMatrix),
        dynamics_diffusion_cov=entry(Q, LearnableMatrix),
        emission_function={"params": LearnableLinear(weights=H, bias=jnp.zeros(m)),
                           "props": LearnableLinear(weights=fixed, bias=fixed)},
        emission_cov=entry(R, LearnableMatrix),
    )
    drift = problem["drift"]

    class Drift(NamedTuple):
        """cd-dynamax's learnable function ``f(x, u, t)``, a pytree of the drift parameters."""

        params: Any

        def f(self, x, u=None, t=None):
            return drift(x, self.params)

    def loglik(params, y, times):
        p = base._replace(dynamics=base.dynamics._replace(drift=Drift(params)))
        return ssm.marginal_log_prob(p, y, t_emissions=times[:, None], filter_hyperparams=hyper,
                                     warn=False)

    return loglik


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_blocks(calls: dict, rounds: int, block_s: float, min_calls: int = 2) -> dict:
    """Competitors of very different cost, in alternating long blocks.

    Each round runs every competitor in turn: one untimed call (the warm-up after the
    others), then timed calls until ``block_s`` seconds and ``min_calls`` calls. Returns
    ``{name: {"median_s", "min_s", "n", "block_medians"}}`` (for ``paired_ratio``).
    """
    times = {name: [] for name in calls}
    blocks = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            jax.block_until_ready(fn(*args))
            block, spent = [], 0.0
            while len(block) < min_calls or spent < block_s:
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                block.append(time.perf_counter() - start)
                spent += block[-1]
            times[name] += block
            blocks[name].append(statistics.median(block))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "n": len(t),
                   "block_medians": blocks[name]} for name, t in times.items()}


def _rel_diff(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    scale = max(float(jnp.max(jnp.abs(v))) for v in leaves_b)
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(leaves_a, leaves_b)) / scale


def refined(times, y, k):
    """``(times, y)`` with ``k − 1`` equally spaced NaN observations added inside each gap:
    ``substeps=1`` on them is ``substeps=k`` on the original data (a NaN update changes
    nothing; equal to 4e-14 at ``k = 4``), with the compile of ``substeps=1``."""
    t = np.asarray(times)
    inner = (t[:-1, None] + np.diff(t)[:, None] / k * np.arange(k)).ravel()
    fine = np.full((inner.size + 1, y.shape[1]), np.nan)
    fine[::k] = np.asarray(y)
    return jnp.asarray(np.append(inner, t[-1])), jnp.asarray(fine)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nonlinear", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="T = 200, short blocks (smoke test)")
    parser.add_argument("--no-truth", action="store_true",
                        help="skip the particle filter's reference value (~1-2 min a model)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    T = T_QUICK if args.quick else T_FULL
    rounds, block_s = (2, 0.1) if args.quick else (5, 0.5)
    print(machine_info())
    value_rows, time_rows, compile_rows = [], [], []
    peer_missing = False
    K = SUBSTEPS
    for name, problem in _problems().items():
        times, y = simulate(problem, T)
        params = problem["params"]
        data = (params, y, times)
        label = f"{name}, T={T}"
        fns = {f"ours_k{k}": ours_log_likelihood_fn(problem, k) for k in (1, K)}
        fns["ours_ms"] = ours_log_likelihood_fn(problem, 1, MAX_STEP, times)
        for key, dt0 in (("peer", 1e-2), (f"peer_dt{COARSE_DT0}", COARSE_DT0)):
            peer = peer_log_likelihood_fn(problem, times, dt0=dt0)
            if peer is None:
                peer_missing = True
            else:
                fns[key] = peer
        has_peer = "peer" in fns
        compiled, results, compiles = {}, {}, {}
        for key, fn in fns.items():
            timing = compile_time(jax.jit(jax.value_and_grad(fn)), *data)
            compiled[key] = timing["compiled"]
            compiles[key] = timing
            results[key] = jax.block_until_ready(compiled[key](*data))
        ll = {key: float(value) for key, (value, _) in results.items()}
        ours_ll = jax.jit(ours_log_likelihood_fn(problem, 1))
        for k in CONVERGENCE:
            fine_times, fine_y = refined(times, y, k)
            ll[f"ours_k{k}"] = float(ours_ll(params, fine_y, fine_times))
        calls = {key: (fn, data) for key, fn in compiled.items()}
        timed = time_blocks(calls, rounds, block_s)

        value_row = {"model": label}
        for key in ("ours_k1", f"ours_k{K}", "ours_ms", "peer"):
            if key in ll:
                value_row[f"ll_{key}"] = f"{ll[key]:.6f}"
        if not (args.no_truth or args.quick):
            truth, se = particle_reference(problem, times, y)
            value_row["ll_pf"] = f"{truth:.3f} ± {se:.3f}"
            for key in ("ours_k1", f"ours_k{K}", "ours_ms", "peer"):
                if key in ll:
                    value_row[f"{key}-pf"] = f"{ll[key] - truth:+.3f}"
        if has_peer:
            for key in ("ours_k1", f"ours_k{K}", "ours_ms") + tuple(f"ours_k{k}" for k in CONVERGENCE):
                value_row[f"{key}-peer"] = f"{ll[key] - ll['peer']:+.2e}"
            coarse = ll[f"peer_dt{COARSE_DT0}"] - ll["peer"]
            value_row[f"peer_dt{COARSE_DT0}-peer"] = f"{coarse:+.1e}"
            for key in ("ours_k1", f"ours_k{K}", "ours_ms"):
                value_row[f"grad_rel_diff_{key}"] = _rel_diff(results[key][1], results["peer"][1])
        else:
            for k in CONVERGENCE:
                value_row[f"ll_ours_k{k}"] = f"{ll[f'ours_k{k}']:.6f}"
        value_rows.append(value_row)

        time_row = {"model": label}
        for key in fns:
            time_row[f"{key}_grad_s"] = timed[key]["median_s"]
        if has_peer:
            for peer in ("peer", f"peer_dt{COARSE_DT0}"):
                for ours in ("ours_k1", f"ours_k{K}", "ours_ms"):
                    time_row[f"{peer}/{ours}"] = paired_ratio(timed, peer, ours)
                    if peer == "peer":
                        fastest = timed[peer]["min_s"] / timed[ours]["min_s"]
                        time_row[f"{peer}/{ours}_min"] = fastest
        time_row[f"k{K}/k1"] = paired_ratio(timed, f"ours_k{K}", "ours_k1")
        time_row["calls"] = ", ".join(str(timed[key]["n"]) for key in fns)
        time_rows.append(time_row)

        compile_row = {"model": label}
        for key in fns:
            c = compiles[key]
            compile_row[f"compile_{key}"] = (
                f"{c['lower_s']:.1f} + {c['compile_s']:.1f} s "
                f"(cpu {c['lower_cpu_s']:.1f} + {c['compile_cpu_s']:.1f} s)")
        compile_rows.append(compile_row)
        print(markdown_table(value_rows[-1:]), "", markdown_table(time_rows[-1:]), "",
              markdown_table(compile_rows[-1:]), "", sep="\n", file=sys.stderr, flush=True)

    print("\nlog-likelihood (ours: ekf with k substeps; peer: cd-dynamax CD-EKF) and "
          "gradient agreement:\n")
    print(markdown_table(value_rows))
    print(f"\nvalue_and_grad w.r.t. the drift parameters ({rounds} rounds of alternating "
          "blocks; peer/ours: paired ratio, > 1 = we are faster; _min: ratio of the fastest "
          f"calls; calls: timed calls of {', '.join(fns)}):\n")
    print(markdown_table(time_rows))
    print("\ncompile time of value_and_grad: trace + lower + XLA compile, wall (process CPU), "
          "from cleared caches:\n")
    print(markdown_table(compile_rows))
    if peer_missing:
        print('\ncd-dynamax is not installed: peer columns left out (pip install -e ".[bench]" '
              "installs it)")
    return value_rows, time_rows, compile_rows


if __name__ == "__main__":
    main()
