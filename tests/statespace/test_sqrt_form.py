"""Square-root form at every model size and at the edges of its rank tolerance.

Against the dense joint-Gaussian oracle (and the covariance form): singular ``Q`` and ``P0``
at sizes on both sides of the unrolled/looped switch (n = 1 ... 64), continuous-time models
with more than 8 states (whose padded last step has ``Q = 0``) and a zero-length last
interval, the RTS smoother, a valid 1e-12 variance beside 1e6, and non-finite ``Q``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statespace
from statespace import LinearGaussianSSM, models
from tests.statespace.dense_oracle import dense_log_likelihood, dense_smoothed

LL = jax.jit(statespace.log_likelihood, static_argnames=("form",))


def _low_rank(rng, n, rank, scale=1.0):
    B = rng.standard_normal((n, rank))
    return scale * B @ B.T / max(rank, 1)


def _singular_case(n, seed, T=4, m=2):
    """A stable discrete model whose Q and P0 have rank about n/2 (no Cholesky in LAPACK's
    sense exists), with a missing entry."""
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, n))
    F *= 0.8 / np.max(np.abs(np.linalg.eigvals(F)))
    p = dict(F=F, Q=_low_rank(rng, n, max(1, n // 2), 0.5), H=rng.standard_normal((m, n)),
             R=0.3 * np.eye(m), m0=rng.standard_normal(n), P0=_low_rank(rng, n, max(1, n - 2)))
    y = rng.standard_normal((T, m))
    y[1, 0] = np.nan
    return p, y


@pytest.mark.parametrize("n", [1, 2, 8, 9, 17, 64])
def test_discrete_singular_noise_every_size(n):
    p, y = _singular_case(n, seed=n)
    expected = dense_log_likelihood(p, y)
    model = LinearGaussianSSM(**p)
    np.testing.assert_allclose(LL(model, y, form="sqrt"), expected, rtol=1e-9)
    np.testing.assert_allclose(LL(model, y, form="cov"), expected, rtol=1e-9)


def _continuous(harmonics):
    """Matérn-5/2 + quasi-periodic with ``harmonics`` SHOs: n = 3 + 2 * harmonics."""
    variances = list(0.5 ** np.arange(harmonics))
    return models.sum_of(models.matern52(1.0, 1.0), models.quasi_periodic(1.0, 10.0, variances),
                         noise_var=0.1)


# n = 5, 9 (the model), 23; the quick run keeps n = 9 (each case compiles for 10-16 s)
@pytest.mark.parametrize("harmonics", [
    pytest.param(1, marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
    pytest.param(3, marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
    pytest.param(10, marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
])
@pytest.mark.parametrize("equal_last", [False, True], ids=["distinct", "equal_last_times"])
def test_continuous_more_than_eight_states(harmonics, equal_last):
    t = np.linspace(0.0, 5.0, 10)
    if equal_last:
        t[-1] = t[-2]  # a zero-length last interval: Q_d = 0 inside the series
    y = np.sin(t)[:, None] + 0.1 * np.cos(3 * t)[:, None]
    model = _continuous(harmonics)
    disc, ok = model.to_discrete(jnp.asarray(t))
    assert bool(ok)
    expected = dense_log_likelihood(disc, y)
    assert np.isfinite(expected)
    np.testing.assert_allclose(LL(model, y, t, form="sqrt"), expected, rtol=1e-9)
    np.testing.assert_allclose(LL(model, y, t, form="cov"), expected, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rts_smoother_sqrt_more_than_eight_states():
    t = np.linspace(0.0, 5.0, 8)
    t[-1] = t[-2]
    y = np.sin(t)[:, None]
    model = _continuous(3)
    out = statespace.rts_smoother(model, y, t, form="sqrt")
    disc, _ = model.to_discrete(jnp.asarray(t))
    means, covs = dense_smoothed(disc, y)[:2]
    assert np.all(np.isfinite(out.smoothed_means))
    np.testing.assert_allclose(out.smoothed_means, means, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(out.smoothed_covs, covs, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(out.log_likelihood, dense_log_likelihood(disc, y), rtol=1e-9)


def test_small_valid_variance_beside_a_large_one():
    """diag(1e6, 1e-12): y observes only the 1e-12 state. A tolerance scaled by the largest
    variance (8 m eps 1e6 = 3.6e-9) read 1e-12 as zero (sqrt form 62.337 against 61.357)."""
    yt = np.array([[1e-6], [2e-6], [1.5e-6], [0.5e-6], [1e-6]])
    p = dict(F=np.eye(2), Q=np.diag([1e6, 1e-12]), H=np.array([[0.0, 1.0]]),
             R=1e-12 * np.eye(1), m0=np.zeros(2), P0=np.diag([1.0, 1e-12]))
    expected = dense_log_likelihood(p, yt)
    model = LinearGaussianSSM(**p)
    np.testing.assert_allclose(LL(model, yt, form="cov"), expected, rtol=1e-10)
    np.testing.assert_allclose(LL(model, yt, form="sqrt"), expected, rtol=1e-10)
    # the same above the unrolled size (the looped factorisation): pad with unit states
    n = 10
    big = dict(F=np.eye(n), Q=np.diag([1e6, 1e-12] + [1.0] * (n - 2)),
               H=np.eye(n)[1:2], R=1e-12 * np.eye(1), m0=np.zeros(n),
               P0=np.diag([1.0, 1e-12] + [1.0] * (n - 2)))
    np.testing.assert_allclose(LL(LinearGaussianSSM(**big), yt, form="sqrt"), expected, rtol=1e-10)


@pytest.mark.parametrize("n", [2, 10])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_noise_is_nan_not_zero(n, bad):
    """An inf variance in Q was read as 0 by the square root (a finite, wrong value)."""
    F, H = 0.5 * np.eye(n), np.ones((1, n))
    Q = np.eye(n)
    Q[-1, -1] = bad
    model = LinearGaussianSSM(F, Q, H, 0.5 * np.eye(1), np.zeros(n), np.eye(n))
    y = np.sin(np.arange(5.0))[:, None]
    assert np.isnan(LL(model, y, form="sqrt"))
