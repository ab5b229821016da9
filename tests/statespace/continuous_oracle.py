"""Dense float64 / mpmath oracles for continuous-time models (tests only; NumPy, SciPy, mpmath).

* :func:`mp_discretize`: ``(F, Qd, bd)`` at 50+ significant digits: for a stable ``A`` from
  ``F = expm(A dt)``, ``Qd = P∞ − F P∞ Fᵀ`` (the cancellation costs a few of the 50 digits, not
  the 16 that matter); otherwise from Van Loan's block ``expm([[−A, Q], [0, Aᵀ]] dt)`` with the
  working precision raised by the digits its ``e^{−A dt}`` block can cost.
* :func:`scipy_van_loan`: the same blocks in float64 through ``scipy.linalg.expm``;
  :func:`discretized_model` the discrete-time model at given times from them (for
  ``dense_oracle``, e.g. its exact diffuse log-likelihood).
* :func:`dense_gp_log_likelihood` / :func:`dense_gp_condition`: Gaussian-process log-likelihood
  and conditioning from a covariance function ``k(s, t)``.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import scipy.linalg


def _mp(M):
    return mpmath.matrix(np.asarray(M, dtype=np.float64).tolist())


def _np(M):
    return np.array(M.tolist(), dtype=np.float64)


def mp_discretize(A, Q, dt, b=None, digits: int = 50):
    """High-precision ``(F, Qd, bd)`` for one step ``dt`` (bd is None without ``b``)."""
    A = np.asarray(A, np.float64)
    Q = np.asarray(Q, np.float64)
    n = A.shape[0]
    eig = np.linalg.eigvals(A)
    stable = np.max(eig.real) < -1e-3 * max(1.0, np.abs(eig).max())
    norm = np.abs(A).sum(0).max() * float(dt)
    with mpmath.workdps(digits + (0 if stable else int(norm * 0.45) + 5)):
        Am, Qm, h = _mp(A), _mp(Q), mpmath.mpf(float(dt))
        if stable:
            F = mpmath.expm(Am * h)
            K = mpmath.zeros(n * n, n * n)
            for i in range(n):
                for j in range(n):
                    for k in range(n):
                        # (A ⊕ A) vec(X) with row-major vec: X[i, j] -> i * n + j
                        K[i * n + j, k * n + j] += Am[i, k]
                        K[i * n + j, i * n + k] += Am[j, k]
            rhs = mpmath.matrix([-Qm[i, j] for i in range(n) for j in range(n)])
            x = mpmath.lu_solve(K, rhs)
            P = mpmath.matrix(n, n)
            for i in range(n):
                for j in range(n):
                    P[i, j] = x[i * n + j]
            Qd = P - F * P * F.T
        else:
            M = mpmath.zeros(2 * n, 2 * n)
            for i in range(n):
                for j in range(n):
                    M[i, j] = -Am[i, j] * h
                    M[i, n + j] = Qm[i, j] * h
                    M[n + i, n + j] = Am[j, i] * h
            E = mpmath.expm(M)
            F = E[n:, n:].T
            Qd = F * E[:n, n:]
        bd = None
        if b is not None:
            Mb = mpmath.zeros(n + 1, n + 1)
            for i in range(n):
                for j in range(n):
                    Mb[i, j] = Am[i, j] * h
                Mb[i, n] = mpmath.mpf(float(b[i])) * h
            Eb = mpmath.expm(Mb)
            bd = np.array([float(Eb[i, n]) for i in range(n)])
        return _np(F), _np(Qd), bd


def scipy_van_loan(A, Q, dt, b=None):
    """``(F, Qd, bd)`` in float64 from Van Loan's block exponentials (scipy.linalg.expm)."""
    A = np.asarray(A, np.float64)
    Q = np.asarray(Q, np.float64)
    n = A.shape[0]
    M = np.block([[-A, Q], [np.zeros((n, n)), A.T]]) * dt
    E = scipy.linalg.expm(M)
    F = E[n:, n:].T
    Qd = F @ E[:n, n:]
    bd = None
    if b is not None:
        Mb = np.zeros((n + 1, n + 1))
        Mb[:n, :n] = A * dt
        Mb[:n, n] = np.asarray(b) * dt
        bd = scipy.linalg.expm(Mb)[:n, n]
    return F, 0.5 * (Qd + Qd.T), bd


def discretized_model(A, Q, H, R, times, m0, P0):
    """The discrete-time model at ``times`` (dense-oracle dict, time-varying ``F, Q``) from
    SciPy's Van Loan blocks; entry ``T − 1`` of ``F, Q`` is unused by the dense oracle."""
    dts = np.append(np.diff(np.asarray(times, np.float64)), 0.0)
    blocks = [scipy_van_loan(A, Q, dt)[:2] for dt in dts]
    return dict(F=np.stack([b[0] for b in blocks]), Q=np.stack([b[1] for b in blocks]),
                H=np.asarray(H, np.float64), R=np.asarray(R, np.float64),
                m0=np.asarray(m0, np.float64), P0=np.asarray(P0, np.float64))


def stationary_cov(A, Q):
    return scipy.linalg.solve_continuous_lyapunov(np.asarray(A, np.float64), -np.asarray(Q, np.float64))


def state_space_cross_cov(A, P, s, t):
    """``Cov(x(s), x(t)) = e^{A (s − t)} P`` for ``s >= t`` (stationary), else its transpose."""
    if s >= t:
        return scipy.linalg.expm(A * (s - t)) @ P
    return (scipy.linalg.expm(A * (t - s)) @ P).T


def dense_gp_log_likelihood(K, y, mean=None):
    """``log N(y | mean, K)`` over the observed (non-NaN) entries of the flat vector ``y``."""
    y = np.asarray(y, np.float64).reshape(-1)
    mean = np.zeros_like(y) if mean is None else np.asarray(mean, np.float64).reshape(-1)
    obs = ~np.isnan(y)
    K = K[np.ix_(obs, obs)]
    r = (y - mean)[obs]
    L = np.linalg.cholesky(K)
    a = scipy.linalg.solve_triangular(L, r, lower=True)
    return float(-0.5 * a @ a - np.log(np.diag(L)).sum() - 0.5 * obs.sum() * math.log(2 * math.pi))


def dense_gp_condition(K_oo, K_no, K_nn, y, mean_o=None, mean_n=None):
    """Mean and covariance of the targets given the observed vector ``y`` (NaN entries dropped)."""
    y = np.asarray(y, np.float64).reshape(-1)
    mean_o = np.zeros_like(y) if mean_o is None else mean_o
    obs = ~np.isnan(y)
    K_oo = K_oo[np.ix_(obs, obs)]
    K_no = K_no[:, obs]
    c = scipy.linalg.cho_factor(K_oo, lower=True)
    mu = K_no @ scipy.linalg.cho_solve(c, (y - mean_o)[obs])
    if mean_n is not None:
        mu = mu + mean_n
    cov = K_nn - K_no @ scipy.linalg.cho_solve(c, K_no.T)
    return mu, 0.5 * (cov + cov.T)


def stationary_model_joint(A, Q, H, R, times, b=None, d=None):
    """Mean and covariance of the stacked observations ``y(t_0..t_{T-1})`` (flat, time-major)
    of the stationary model, from ``Cov(x(s), x(t)) = e^{A(s−t)} P∞``."""
    A, Q, H, R = (np.asarray(v, np.float64) for v in (A, Q, H, R))
    P = stationary_cov(A, Q)
    T, m = len(times), H.shape[0]
    K = np.zeros((T * m, T * m))
    for i in range(T):
        for j in range(T):
            K[i * m : (i + 1) * m, j * m : (j + 1) * m] = H @ state_space_cross_cov(A, P, times[i], times[j]) @ H.T
    K += np.kron(np.eye(T), R)
    mx = np.zeros(A.shape[0]) if b is None else -np.linalg.solve(A, b)
    my = H @ mx + (0 if d is None else np.asarray(d))
    return np.tile(my, T), 0.5 * (K + K.T)
