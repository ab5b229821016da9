"""Checks of the dense test oracle against independent computations.

* ``dense_joint`` against the sample mean/covariance of the recursion simulated step by step.
* ``dense_log_likelihood`` against ``scipy.stats.multivariate_normal`` written out by hand for
  T = 1 and T = 2, and against the prediction-error decomposition of a textbook NumPy Kalman
  filter (written here, row-selection for missing entries).
* ``dense_filtered``/``dense_predicted``/``dense_smoothed`` against the same textbook
  filter and a textbook RTS smoother (with the lag-one covariance ``P_{k+1|T} G_k^T``).
* The law of total covariance: ``Cov(x) = E[Cov(x | y)] + Cov(E[x | y])``.
"""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from tests.statespace.dense_oracle import (
    dense_filtered,
    dense_joint,
    dense_log_likelihood,
    dense_predicted,
    dense_sample,
    dense_smoothed,
    random_model,
    random_observations,
)


def _at(p, name, k, default=None):
    v = p.get(name)
    if v is None:
        return default
    base = 1 if name in ("b", "d") else 2
    return v[k] if v.ndim == base + 1 else v


def _simulate(rng, p, T, num):
    n = p["m0"].shape[0]
    m = p["H"].shape[-2]
    x = np.zeros((num, T, n))
    y = np.zeros((num, T, m))
    x[:, 0] = rng.multivariate_normal(p["m0"], p["P0"], size=num)
    for k in range(T):
        if k > 0:
            F, Q, b = _at(p, "F", k - 1), _at(p, "Q", k - 1), _at(p, "b", k - 1, np.zeros(n))
            x[:, k] = x[:, k - 1] @ F.T + b + rng.multivariate_normal(np.zeros(n), Q, size=num)
        H, R, d = _at(p, "H", k), _at(p, "R", k), _at(p, "d", k, np.zeros(m))
        y[:, k] = x[:, k] @ H.T + d + rng.multivariate_normal(np.zeros(m), R, size=num)
    return x, y


def _textbook_filter_smoother(p, y):
    """Plain Kalman filter + RTS smoother with inverses and row selection for NaNs."""
    T, m = y.shape
    n = p["m0"].shape[0]
    mp, Pp = p["m0"].copy(), p["P0"].copy()
    pm, pP, fm, fP = [], [], [], []
    loglik = 0.0
    for k in range(T):
        pm.append(mp)
        pP.append(Pp)
        obs = ~np.isnan(y[k])
        if obs.any():
            H = _at(p, "H", k)[obs]
            R = _at(p, "R", k)[np.ix_(obs, obs)]
            d = _at(p, "d", k, np.zeros(m))[obs]
            S = H @ Pp @ H.T + R
            e = y[k][obs] - H @ mp - d
            loglik += scipy.stats.multivariate_normal(np.zeros(obs.sum()), S).logpdf(e)
            K = Pp @ H.T @ np.linalg.inv(S)
            mf = mp + K @ e
            Pf = Pp - K @ S @ K.T
        else:
            mf, Pf = mp, Pp
        fm.append(mf)
        fP.append(Pf)
        if k < T - 1:
            F, Q, b = _at(p, "F", k), _at(p, "Q", k), _at(p, "b", k, np.zeros(n))
            mp = F @ mf + b
            Pp = F @ Pf @ F.T + Q
    sm, sP, cross = [fm[-1]], [fP[-1]], []
    for k in range(T - 2, -1, -1):
        F = _at(p, "F", k)
        G = fP[k] @ F.T @ np.linalg.inv(pP[k + 1])
        m_next, P_next = sm[0], sP[0]
        sm.insert(0, fm[k] + G @ (m_next - pm[k + 1]))
        sP.insert(0, fP[k] + G @ (P_next - pP[k + 1]) @ G.T)
        cross.insert(0, P_next @ G.T)  # Cov(x[k+1], x[k] | y)
    return dict(
        loglik=loglik,
        predicted=(np.array(pm), np.array(pP)),
        filtered=(np.array(fm), np.array(fP)),
        smoothed=(np.array(sm), np.array(sP), np.array(cross).reshape(T - 1, n, n)),
    )


CASES = [
    dict(n=2, m=1, T=6, time_varying=False, offsets=False, missing=0.0),
    dict(n=3, m=2, T=8, time_varying=False, offsets=True, missing=0.3),
    dict(n=2, m=2, T=7, time_varying=True, offsets=True, missing=0.25),
    dict(n=3, m=2, T=5, time_varying=("F", "R", "d"), offsets=True, missing=0.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c['n']}m{c['m']}T{c['T']}tv{bool(c['time_varying'])}off{c['offsets']}miss{c['missing']}")
def test_oracle_matches_textbook_filter_and_smoother(case):
    rng = np.random.default_rng(11)
    p = random_model(rng, case["n"], case["m"], case["T"], case["time_varying"], case["offsets"])
    y = random_observations(rng, p, case["T"], missing=case["missing"], missing_rows=(2,))
    ref = _textbook_filter_smoother(p, y)
    np.testing.assert_allclose(dense_log_likelihood(p, y), ref["loglik"], rtol=1e-11)
    for got, want in zip(dense_filtered(p, y), ref["filtered"]):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    for got, want in zip(dense_predicted(p, y), ref["predicted"]):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    for got, want in zip(dense_smoothed(p, y), ref["smoothed"]):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


def test_joint_matches_simulated_recursion():
    rng = np.random.default_rng(3)
    T, n, m = 4, 2, 2
    p = random_model(rng, n, m, T, time_varying=("F", "H", "b"), offsets=True)
    mean, cov = dense_joint(p, T)
    num = 200_000
    x, y = _simulate(rng, p, T, num)
    z = np.concatenate([x.reshape(num, -1), y.reshape(num, -1)], axis=1)
    std = np.sqrt(np.diag(cov))
    # mean within 5 standard errors, covariance (as correlation-scaled) within 0.02
    assert np.all(np.abs(z.mean(0) - mean) < 5 * std / np.sqrt(num))
    emp = np.cov(z, rowvar=False)
    assert np.max(np.abs(emp - cov) / np.outer(std, std)) < 0.02


def test_log_likelihood_small_cases_by_hand():
    rng = np.random.default_rng(5)
    p = random_model(rng, 2, 2, offsets=True)
    H, R, d, F, Q, b = p["H"], p["R"], p["d"], p["F"], p["Q"], p["b"]
    m0, P0 = p["m0"], p["P0"]
    y1 = rng.standard_normal((1, 2))
    want = scipy.stats.multivariate_normal(H @ m0 + d, H @ P0 @ H.T + R).logpdf(y1[0])
    np.testing.assert_allclose(dense_log_likelihood(p, y1), want, rtol=1e-12)
    # T = 2, first entry of y[1] missing: joint of (y0, y1[1]) written out.
    y2 = rng.standard_normal((2, 2))
    y2[1, 0] = np.nan
    P1 = F @ P0 @ F.T + Q
    m1 = F @ m0 + b
    C01 = H @ P0 @ F.T @ H.T  # Cov(y0, y1)
    S = np.block([[H @ P0 @ H.T + R, C01[:, 1:]], [C01[:, 1:].T, (H @ P1 @ H.T + R)[1:, 1:]]])
    mu = np.concatenate([H @ m0 + d, (H @ m1 + d)[1:]])
    want = scipy.stats.multivariate_normal(mu, S).logpdf(np.concatenate([y2[0], y2[1, 1:]]))
    np.testing.assert_allclose(dense_log_likelihood(p, y2), want, rtol=1e-12)
    assert dense_log_likelihood(p, np.full((3, 2), np.nan)) == 0.0


def test_law_of_total_covariance():
    rng = np.random.default_rng(8)
    T, n, m = 5, 2, 1
    p = random_model(rng, n, m, T, time_varying=True, offsets=True)
    mean, cov = dense_joint(p, T)
    _, ys = dense_sample(rng, p, T, 4000)
    smoothed_means = np.stack([dense_smoothed(p, yy)[0] for yy in ys[:400]])
    _, post_covs, _ = dense_smoothed(p, ys[0])  # Gaussian: Cov(x | y) does not depend on y
    x_cov = cov[: T * n, : T * n]
    for k in range(T):
        total = post_covs[k] + np.cov(smoothed_means[:, k], rowvar=False)
        block = x_cov[k * n : (k + 1) * n, k * n : (k + 1) * n]
        np.testing.assert_allclose(total, block, atol=0.2 * np.max(np.abs(block)))
    # tower rule: E[E[x | y]] = E[x]
    std = np.sqrt(np.diag(x_cov)).reshape(T, n)
    assert np.all(np.abs(smoothed_means.mean(0) - mean[: T * n].reshape(T, n)) < 5 * std / np.sqrt(400))


def test_stationary_P0():
    rng = np.random.default_rng(2)
    p = random_model(rng, 3, 1)
    p["P0"] = "stationary"
    _, cov = dense_joint(p, 4)
    P = scipy.linalg.solve_discrete_lyapunov(p["F"], p["Q"])
    for k in range(4):
        np.testing.assert_allclose(cov[3 * k : 3 * k + 3, 3 * k : 3 * k + 3], P, rtol=1e-10)
