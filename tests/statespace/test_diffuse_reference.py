"""Exact diffuse log-likelihood against references outside this package.

The convention is Durbin & Koopman's diffuse likelihood ``log int p(y | delta) d delta``
(KFAS; statsmodels with ``initialize_diffuse()``): checked against statsmodels on the Nile
series (local level and local linear trend, value and score) and against the closed form of
the local level's integral over its initial level.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import statsmodels.api as sm

import statespace
from statespace import LinearGaussianSSM, models

LL = jax.jit(statespace.log_likelihood, static_argnames=("form",))


def _nile():
    return sm.datasets.nile.load_pandas().data["volume"].to_numpy(dtype=float)


def _statsmodels(y, trend, params):
    """statsmodels' exact diffuse log-likelihood and its (numerical) score."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' start-parameter warnings
        mod = sm.tsa.UnobservedComponents(y, trend)
        mod.ssm.initialize_diffuse()
        return mod.loglike(params), mod.score(params)


def _local_level(var_eps, var_eta):
    return LinearGaussianSSM(jnp.eye(1), jnp.reshape(var_eta, (1, 1)), jnp.eye(1),
                             jnp.reshape(var_eps, (1, 1)), jnp.zeros(1), jnp.zeros((1, 1)),
                             diffuse=True)


@pytest.mark.parametrize("form", ["cov", "sqrt"])
def test_nile_local_level_matches_statsmodels(form):
    y = _nile()[:, None]
    params = np.array([15099.0, 1469.1])
    expected, score = _statsmodels(y[:, 0], "llevel", params)
    np.testing.assert_allclose(expected, -632.5456, atol=5e-5)  # the figure
    value, grad = jax.value_and_grad(lambda p: LL(_local_level(p[0], p[1]), y, form=form))(
        jnp.asarray(params))
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, score, rtol=1e-5)
    # the continuous-time local level at unit spacing is the same model
    cont = models.local_level(math.sqrt(params[1]), params[0])
    np.testing.assert_allclose(
        statespace.log_likelihood(cont, y, np.arange(y.shape[0], dtype=float), form=form),
        expected, rtol=1e-12)


def test_nile_local_linear_trend_matches_statsmodels():
    """q = 2 diffuse states (level and slope)."""
    y = _nile()[:, None]
    var_eps, var_level, var_slope = 15000.0, 1000.0, 10.0
    expected, _ = _statsmodels(y[:, 0], "lltrend", [var_eps, var_level, var_slope])
    model = LinearGaussianSSM(np.array([[1.0, 1.0], [0.0, 1.0]]), np.diag([var_level, var_slope]),
                              np.array([[1.0, 0.0]]), np.array([[var_eps]]), np.zeros(2),
                              np.zeros((2, 2)), diffuse=True)
    for form in ("cov", "sqrt"):
        np.testing.assert_allclose(LL(model, y, form=form), expected, rtol=1e-12)


def test_local_level_closed_form():
    """y = delta 1 + e, e ~ N(0, C), C = var_eta min(i, j) + var_eps I (random walk from the
    level delta): int N(y; delta 1, C) d delta = (2 pi)^{-(T-1)/2} |C|^{-1/2} a^{-1/2}
    exp(-(y' C^-1 y - b^2 / a) / 2), a = 1' C^-1 1, b = 1' C^-1 y; a missing entry drops its
    row and column."""
    rng = np.random.default_rng(3)
    T, var_eps, var_eta = 12, 0.7, 0.2
    y = np.cumsum(rng.standard_normal(T)) + rng.standard_normal(T)
    y[5] = np.nan
    k = np.arange(T)
    C = var_eta * np.minimum.outer(k, k) + var_eps * np.eye(T)
    obs = ~np.isnan(y)
    C, yo = C[np.ix_(obs, obs)], y[obs]
    Ci_1, Ci_y = np.linalg.solve(C, np.ones(obs.sum())), np.linalg.solve(C, yo)
    a, b = Ci_1.sum(), Ci_y.sum()
    expected = -0.5 * ((obs.sum() - 1) * math.log(2 * math.pi) + np.linalg.slogdet(C)[1]
                       + math.log(a) + yo @ Ci_y - b * b / a)
    model = _local_level(var_eps, var_eta)
    for form in ("cov", "sqrt"):
        np.testing.assert_allclose(LL(model, y[:, None], form=form), expected, rtol=1e-12)
