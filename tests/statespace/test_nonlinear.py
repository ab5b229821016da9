"""``statespace.NonlinearSDE`` against independent oracles.

* A linear drift ``A x + b`` and a linear observation: the local-linearisation filter is the
  exact discretisation, so every method, form and number of substeps equals the package's exact
  linear continuous-time filter (``ContinuousLinearSSM``) to rounding: log-likelihoods, filtered
  and predicted moments, the RTS smoother and ``predict`` (new times before, between, on and
  after the observations), with missing entries, irregular times, a singular ``A`` (an
  integrated random walk) and a drift offset.
* A damped pendulum: as ``substeps`` grows the EKF converges to the continuous-discrete EKF,
  whose moment equations ``dm/dt = f(m)``, ``dP/dt = J P + P Jᵀ + Q`` are integrated by SciPy's
  ``solve_ivp`` (DOP853, rtol 1e-11) with the Kalman update written out in NumPy; the error
  is measured (``substeps`` 2 to 32) and its order, two, asserted.
* A bootstrap particle filter in NumPy on a mildly nonlinear scalar SDE (slow).
* One cubature (``"ukf"``) update with a nonlinear observation against the cubature rule
  written out in NumPy, in both forms, with and without a missing entry.

Compilation is the cost (one filter program takes seconds to compile on CPU), so the quick
tests share few programs: the two linear models are one ``vmap``-ed program per method, form
and number of substeps, and half of these eight combinations run in the quick suite; the
other combinations, the smoother and predict checks and the particle filter are marked slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import statespace
from statespace import ContinuousLinearSSM, NonlinearSDE

# ------------------------------------------------------------------------------------------
# 1. Linear drift and observation: the exact continuous-time filter
# ------------------------------------------------------------------------------------------

N, M, T = 3, 2, 7


def _linear_drift(x, t, p):
    return p["A"] @ x + p["b"]


def _linear_observe(x, t, p):
    return p["H"] @ x


@functools.lru_cache(maxsize=None)
def _linear_case():
    """Two models (a stable ``A`` without offset; a singular ``A``, an integrated random walk
    feeding an OU-like block, with an offset ``b``), data with missing entries (one entry,
    one whole row), irregular times, and new times for ``predict``."""
    rng = np.random.default_rng(0)
    A_stable = np.array([[-0.3, 1.0, 0.0], [-0.4, -0.5, 0.6], [0.1, -0.7, -0.9]])
    # x1' = x2, x2' = -0.5 x2 + 0.3 x3 (+ b), x3' = -0.2 x2 - x3: column 0 is zero
    A_singular = np.array([[0.0, 1.0, 0.0], [0.0, -0.5, 0.3], [0.0, -0.2, -1.0]])
    assert np.linalg.matrix_rank(A_singular) == N - 1
    b = np.array([0.2, -0.1, 0.3])
    Q = np.array([[0.2, 0.05, 0.0], [0.05, 0.3, 0.1], [0.0, 0.1, 0.4]])
    H = rng.normal(size=(M, N))
    R = np.array([[0.3, 0.05], [0.05, 0.2]])
    m0 = np.array([0.1, -0.2, 0.3])
    P0 = np.diag([1.0, 0.5, 0.8]) + 0.1
    times = np.cumsum(rng.uniform(0.05, 1.2, size=T)) - 0.3
    y = rng.normal(size=(T, M))
    y[2, 0] = np.nan
    y[4] = np.nan
    # before the data, between (one on an observation time), after; unsorted
    new_times = np.array([times[3] + 0.1, times[0] - 0.7, times[-1] + 1.3, times[2],
                          0.5 * (times[4] + times[5])])
    cases = [(A_stable, np.zeros(N)), (A_singular, b)]
    linear = [ContinuousLinearSSM(A, Q, H, R, m0, P0, b=(bb if bb.any() else None))
              for A, bb in cases]
    nonlinear = [NonlinearSDE(_linear_drift, Q, _linear_observe, R, m0, P0,
                              params=dict(A=A, b=bb, H=H)) for A, bb in cases]
    batched = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *nonlinear)
    return linear, batched, y, times, new_times


@functools.lru_cache(maxsize=None)
def _linear_reference(which):
    """The exact linear filter, smoother and ``predict`` for each of the two models."""
    linear, _, y, times, new_times = _linear_case()
    out = []
    for model in linear:
        if which == "filter":
            out.append(statespace.kalman_filter(model, y, times))
        elif which == "smoother":
            out.append(statespace.rts_smoother(model, y, times))
        else:
            out.append(statespace.predict(model, y, times, new_times))
    return out


@functools.partial(jax.jit, static_argnames=("method", "form", "substeps"))
def _nonlinear_filter(model, y, times, *, method, form, substeps):
    def single(mdl):
        kw = dict(method=method, form=form, substeps=substeps)
        return (statespace.kalman_filter(mdl, y, times, **kw),
                statespace.log_likelihood(mdl, y, times, **kw))
    return jax.vmap(single)(model)


@functools.partial(jax.jit, static_argnames=("method", "form", "substeps"))
def _nonlinear_smoother(model, y, times, new_times, *, method, form, substeps):
    def single(mdl):
        return (statespace.rts_smoother(mdl, y, times, method=method, form=form, substeps=substeps),
                statespace.predict(mdl, y, times, new_times, method=method, substeps=substeps))
    return jax.vmap(single)(model)


def _close(actual, expected, tol=1e-12):
    """Equal to ``tol`` relative to the largest entry of ``expected`` (absolute below it)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=tol,
                               atol=tol * max(1.0, np.max(np.abs(expected))))


# one combination of method x form x substeps in the quick run, the rest in the full one
_QUICK = [("ukf", "sqrt", 3)]
_SLOW = [pytest.mark.slow, pytest.mark.timeout(300)]
_GRID = [pytest.param(*combo, marks=[] if combo in _QUICK else _SLOW)
         for combo in [(method, form, substeps) for method in ("ekf", "ukf")
                       for form in ("cov", "sqrt") for substeps in (1, 3)]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method, form, substeps", _GRID)
def test_linear_drift_equals_exact_linear_filter(method, form, substeps):
    _, batched, y, times, _ = _linear_case()
    filtered, total = _nonlinear_filter(batched, y, times, method=method, form=form,
                                        substeps=substeps)
    for i, ref in enumerate(_linear_reference("filter")):
        assert np.isfinite(ref.log_likelihood)
        _close(total[i], ref.log_likelihood)
        _close(filtered.log_likelihood[i], ref.log_likelihood)
        _close(filtered.log_likelihoods[i], ref.log_likelihoods)
        assert filtered.log_likelihoods[i, 4] == 0.0  # the all-NaN row
        for name in ("filtered_means", "filtered_covs", "predicted_means", "predicted_covs"):
            _close(getattr(filtered, name)[i], getattr(ref, name))
        if form == "sqrt":
            L = np.asarray(filtered.filtered_chols[i])
            _close(L @ np.swapaxes(L, -1, -2), ref.filtered_covs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method, form, substeps", [
    pytest.param("ekf", "cov", 1, marks=_SLOW),
    pytest.param("ukf", "sqrt", 3, marks=_SLOW)])
def test_linear_drift_smoother_and_predict_equal_exact_linear(method, form, substeps):
    _, batched, y, times, new_times = _linear_case()
    smoothed, predicted = _nonlinear_smoother(batched, y, times, new_times, method=method,
                                              form=form, substeps=substeps)
    for i, (ref_s, ref_p) in enumerate(zip(_linear_reference("smoother"),
                                           _linear_reference("predict"))):
        for name in ("smoothed_means", "smoothed_covs", "smoothed_cross_covs", "log_likelihood"):
            _close(getattr(smoothed, name)[i], getattr(ref_s, name))
        for name in ("means", "covs", "obs_means", "obs_covs"):
            assert np.all(np.isfinite(getattr(ref_p, name)))
            _close(getattr(predicted, name)[i], getattr(ref_p, name))


# ------------------------------------------------------------------------------------------
# 2. Convergence to the continuous-discrete EKF moment equations (damped pendulum)
# ------------------------------------------------------------------------------------------

T_PENDULUM = 12
Q_PENDULUM = np.array([[0.02, 0.0], [0.0, 0.2]])
R_PENDULUM = np.array([[0.05]])
M0_PENDULUM, P0_PENDULUM = np.array([1.2, 0.0]), np.array([[0.1, 0.02], [0.02, 0.2]])
LEVELS = (2, 4, 8, 16, 32)


def _pendulum_drift(x, t, p):
    return jnp.stack([x[1], -jnp.sin(x[0]) - p * x[1]])


def _first_state(x, t, p):
    return x[:1]


def _pendulum():
    return NonlinearSDE(_pendulum_drift, Q_PENDULUM, _first_state, R_PENDULUM, M0_PENDULUM,
                        P0_PENDULUM, params=0.3)


@functools.lru_cache(maxsize=None)
def _pendulum_case():
    """Irregular times on ``[0, ~8]``, data from an Euler–Maruyama path (NumPy, step 1e-3), one
    missing observation, and the reference continuous-discrete EKF: ``(y, times, log-likelihood,
    filtered means, filtered covariances)``."""
    rng = np.random.default_rng(1)
    times = np.concatenate([[0.0], np.cumsum(rng.uniform(0.3, 1.1, T_PENDULUM - 1))])
    x = M0_PENDULUM + np.linalg.cholesky(P0_PENDULUM) @ rng.normal(size=2)
    states = [x]
    for k in range(T_PENDULUM - 1):
        steps = int(np.ceil((times[k + 1] - times[k]) / 1e-3))
        h = (times[k + 1] - times[k]) / steps
        for _ in range(steps):
            x = x + np.array([x[1], -np.sin(x[0]) - 0.3 * x[1]]) * h \
                + np.sqrt(np.diag(Q_PENDULUM) * h) * rng.normal(size=2)
        states.append(x)
    y = np.array(states)[:, :1] + np.sqrt(R_PENDULUM[0, 0]) * rng.normal(size=(T_PENDULUM, 1))
    y[5] = np.nan

    def rhs(t, z):
        m, P = z[:2], z[2:].reshape(2, 2)
        J = np.array([[0.0, 1.0], [-np.cos(m[0]), -0.3]])
        return np.concatenate([[m[1], -np.sin(m[0]) - 0.3 * m[1]],
                               (J @ P + P @ J.T + Q_PENDULUM).ravel()])

    H = np.array([[1.0, 0.0]])  # the Jacobian of h(x) = x[:1]
    m, P, ll, means, covs = M0_PENDULUM, P0_PENDULUM, 0.0, [], []
    for k in range(T_PENDULUM):
        if not np.isnan(y[k, 0]):
            S = H @ P @ H.T + R_PENDULUM
            v = y[k] - m[:1]
            K = P @ H.T @ np.linalg.inv(S)
            ll += -0.5 * (np.log(np.linalg.det(2 * np.pi * S)) + v @ np.linalg.solve(S, v))
            m, P = m + K @ v, P - K @ S @ K.T
        means.append(m)
        covs.append(P)
        if k < T_PENDULUM - 1:
            sol = solve_ivp(rhs, (times[k], times[k + 1]), np.concatenate([m, P.ravel()]),
                            method="DOP853", rtol=1e-11, atol=1e-12)
            assert sol.success
            m, P = sol.y[:2, -1], sol.y[2:, -1].reshape(2, 2)
            P = 0.5 * (P + P.T)
    return y, times, ll, np.array(means), np.array(covs)


@functools.partial(jax.jit, static_argnames=("substeps",))
def _ekf(model, y, times, substeps=1):
    return statespace.kalman_filter(model, y, times, method="ekf", substeps=substeps)


def _errors(out, ref_ll, ref_means, ref_covs):
    """Relative errors: log-likelihood, filtered means and covariances (each against the
    largest entry of the reference)."""
    return np.array([
        abs(float(out.log_likelihood) - ref_ll) / abs(ref_ll),
        np.max(np.abs(np.asarray(out.filtered_means) - ref_means)) / np.max(np.abs(ref_means)),
        np.max(np.abs(np.asarray(out.filtered_covs) - ref_covs)) / np.max(np.abs(ref_covs)),
    ])


def _check_convergence(errors):
    """``errors (levels, 3)``: decreasing at second order (the Jacobian is taken at the
    substep's Euler midpoint; measured orders 1.90–2.18 from 2 to 4 substeps, 1.99–2.05 beyond)
    and small at 32 substeps (measured 4e-6 to 9e-6). Returns the orders."""
    errors = np.asarray(errors)
    assert np.all(np.diff(errors, axis=0) < 0), errors
    orders = np.log2(errors[:-1] / errors[1:])
    assert np.all(orders >= 1.7), orders
    assert np.all(orders[1:] >= 1.9), orders
    assert np.all(errors[-1] < 5e-5), errors[-1]
    return orders


@pytest.mark.timeout(300)
def test_ekf_converges_to_moment_equations():
    y, times, ll, means, covs = _pendulum_case()
    model = _pendulum()
    _check_convergence([_errors(_ekf(model, y, times, substeps=k), ll, means, covs)
                        for k in LEVELS])


# ------------------------------------------------------------------------------------------
# 3. A bootstrap particle filter (slow)
# ------------------------------------------------------------------------------------------

def _cubic_drift(x, t, p):
    return -(x + p * x ** 3)


def _identity(x, t, p):
    return x


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ekf_log_likelihood_matches_particle_filter():
    """``dx = -(x + c x³) dt + √q dW``, ``y = x + N(0, r)`` at 20 irregular times.

    The particle filter: 6 independent runs of 20 000 particles (systematic resampling), the
    Heun scheme (weak order 2 for additive noise; with 100 steps per unit time its bias,
    ``O(h²)``, is left out); its standard error from the spread of the runs. Small noise
    (``q = r = 0.02``, ``c P ≈ 0.005``) keeps the EKF's own error near the Monte-Carlo error
    (at ``c = 0.1``, ``q = 1``, ``r = 0.2`` the EKF is 0.23, 22 standard errors, below the
    particle filter). Allowance beyond 4 standard errors, each part estimated here, not fitted:

    * the EKF's Gaussian closure (the true moments obey ``dm/dt = E f(x)``, not ``f(m)``): for a
      Gaussian state the neglected rates are exactly ``-3 c m P`` in the mean and ``-6 c P²``
      in the variance; carried over each interval (decaying as ``e^{-J s}``, ``e^{-2 J s}``)
      into the next term ``log N(y; m, S)`` they change it by ``δm |v| / S`` and
      ``δP |v² / S² - 1 / S| / 2``: their sum of absolute values (the error itself is a signed
      sum; measured: EKF - PF = 0.009 ± 0.009 against an estimate of 0.076);
    * the local linearisation's own error at 8 substeps, less than ``|ℓ(8) - ℓ(4)|`` (second
      order: about a third of it);
    * the particle estimate of a log-likelihood is biased low by about half its variance.
    """
    c, q, r, m0, P0, T = 0.5, 0.02, 0.02, 1.0, 0.02, 20
    rng = np.random.default_rng(7)
    times = np.concatenate([[0.0], np.cumsum(rng.uniform(0.3, 1.2, T - 1))])

    def f(x):
        return -(x + c * x ** 3)

    data_rng = np.random.default_rng(11)  # Euler–Maruyama, step 1e-3
    x = m0 + np.sqrt(P0) * data_rng.normal()
    states = [x]
    for k in range(T - 1):
        steps = int(np.ceil((times[k + 1] - times[k]) / 1e-3))
        h = (times[k + 1] - times[k]) / steps
        for _ in range(steps):
            x = x + f(x) * h + np.sqrt(q * h) * data_rng.normal()
        states.append(x)
    y = np.array(states) + np.sqrt(r) * data_rng.normal(size=T)

    runs, particles, per_unit = 6, 20_000, 100
    pf_rng = np.random.default_rng(5)
    x = m0 + np.sqrt(P0) * pf_rng.normal(size=(runs, particles))
    pf = np.zeros(runs)
    offsets = np.arange(runs)[:, None]
    for k in range(T):
        logw = -0.5 * (np.log(2 * np.pi * r) + (y[k] - x) ** 2 / r)
        top = logw.max(axis=1, keepdims=True)
        w = np.exp(logw - top)
        pf += top[:, 0] + np.log(w.mean(axis=1))
        if k == T - 1:
            break
        cdf = np.cumsum(w, axis=1)
        cdf /= cdf[:, -1:]
        u = (pf_rng.uniform(size=(runs, 1)) + np.arange(particles)) / particles
        idx = np.searchsorted((cdf + offsets).ravel(), (u + offsets).ravel())
        idx = idx.reshape(runs, particles)
        x = np.take_along_axis(x, np.minimum(idx - offsets * particles, particles - 1), axis=1)
        steps = int(np.ceil(per_unit * (times[k + 1] - times[k])))
        h = (times[k + 1] - times[k]) / steps
        for _ in range(steps):
            dw = np.sqrt(q * h) * pf_rng.normal(size=x.shape)
            fx = f(x)
            x = x + 0.5 * (fx + f(x + fx * h + dw)) * h + dw
    se = pf.std(ddof=1) / np.sqrt(runs)

    model = NonlinearSDE(_cubic_drift, q * np.eye(1), _identity, r * np.eye(1), np.array([m0]),
                         np.array([[P0]]), params=c)
    out = _ekf(model, y[:, None], times, substeps=8)
    coarse = _ekf(model, y[:, None], times, substeps=4)
    fm, fP = np.asarray(out.filtered_means[:, 0]), np.asarray(out.filtered_covs[:, 0, 0])
    pm, pP = np.asarray(out.predicted_means[:, 0]), np.asarray(out.predicted_covs[:, 0, 0])
    S, v, dt = pP[1:] + r, y[1:] - pm[1:], np.diff(times)
    P = np.maximum(fP[:-1], pP[1:])
    J = 1 + 3 * c * fm[:-1] ** 2
    dm = 3 * c * np.abs(fm[:-1]) * P * (1 - np.exp(-J * dt)) / J
    dP = 6 * c * P ** 2 * (1 - np.exp(-2 * J * dt)) / (2 * J)
    closure = np.sum(dm * np.abs(v) / S + 0.5 * dP * np.abs(v ** 2 / S ** 2 - 1 / S))
    substeps_error = abs(float(out.log_likelihood - coarse.log_likelihood))
    allowance = closure + substeps_error + 0.5 * pf.var(ddof=1)
    gap = float(out.log_likelihood) - pf.mean()
    print(f"EKF {float(out.log_likelihood):.4f}, particle filter {pf.mean():.4f} ± {se:.4f}; "
          f"closure estimate {closure:.4f}, |l(8) - l(4)| {substeps_error:.4f}")
    assert abs(gap) <= 4 * se + allowance, (gap, se, allowance)
    assert allowance < 0.12 and se < 0.02  # the check has teeth: ~0.1 on a log-likelihood ~6


# ------------------------------------------------------------------------------------------
# 4. One cubature ("ukf") update with a nonlinear observation
# ------------------------------------------------------------------------------------------

def _curved_observe(x, t, p):
    return jnp.stack([x[0] ** 2 + x[1], jnp.sin(x[1])])


def _cubature_update(m, P, R, y):
    """The third-degree cubature rule (sigma points ``m ± √n L e_j``, weights ``1/2n``) and the
    UKF update on the observed entries of ``y``: ``(m_f, P_f, log N(y; ŷ, S))``."""
    n = m.size
    L = np.linalg.cholesky(P)
    points = np.concatenate([m + np.sqrt(n) * L.T, m - np.sqrt(n) * L.T])  # rows: m ± √n L e_j
    Y = np.stack([[p[0] ** 2 + p[1], np.sin(p[1])] for p in points])
    keep = ~np.isnan(y)
    Y, R, y = Y[:, keep], R[np.ix_(keep, keep)], y[keep]
    y_hat = Y.mean(axis=0)
    S = (Y - y_hat).T @ (Y - y_hat) / (2 * n) + R
    C = (points - m).T @ (Y - y_hat) / (2 * n)
    K = C @ np.linalg.inv(S)
    v = y - y_hat
    ll = -0.5 * (np.log(np.linalg.det(2 * np.pi * S)) + v @ np.linalg.solve(S, v))
    return m + K @ v, P - K @ S @ K.T, ll


@pytest.mark.timeout(120)
@pytest.mark.parametrize("form", ["cov", pytest.param("sqrt", marks=_SLOW)])
def test_cubature_update_matches_numpy(form):
    m0 = np.array([0.7, -0.4])
    P0 = np.array([[0.5, 0.2], [0.2, 0.3]])
    R = np.array([[0.1, 0.02], [0.02, 0.05]])
    model = NonlinearSDE(lambda x, t, p: -x, np.eye(2), _curved_observe, R, m0, P0)
    y = np.array([[[0.9, -0.2]], [[np.nan, -0.5]]])  # (series, T = 1, m): batched
    out = statespace.kalman_filter(model, y, np.array([0.0]), method="ukf", form=form)
    for i in range(2):
        mean, cov, ll = _cubature_update(m0, P0, R, y[i, 0])
        _close(out.filtered_means[i, 0], mean)
        _close(out.filtered_covs[i, 0], cov)
        _close(out.log_likelihoods[i, 0], ll)
        _close(out.log_likelihood[i], ll)
        _close(out.predicted_means[i, 0], m0)
        _close(out.predicted_covs[i, 0], P0)
