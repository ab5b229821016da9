"""What bad and edge inputs get: a catalogue (README, "Reliability").

One parametrised test per family; each case names its input and carries its own expectation:

* ``RIGHT_NUMBER``: edge inputs that are valid and get the right number (a dense
  multivariate-normal or dense-GP oracle, NumPy, or a closed form), never a crash;
* ``RAISES``: problems visible from shapes or static values raise ``ValueError``;
* ``MINUS_INF``: data-dependent invalid models give a ``-inf`` log-likelihood under ``jit``
  with a NaN gradient (so samplers reject them and optimisers see no direction);
* ``NAN``: non-finite input and the sampling functions of a model without a density give NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import rules
import statespace
from statespace import LinearGaussianSSM as LG
from statespace import models
from statespace.numpyro import LinearGaussianStateSpace
from tests.statespace.continuous_oracle import dense_gp_condition, dense_gp_log_likelihood
from tests.statespace.dense_oracle import dense_log_likelihood

F2 = np.array([[0.9, 0.1], [0.0, 0.8]])
H2 = np.array([[1.0, 0.5]])
R1 = 0.5 * np.eye(1)
Y5 = np.sin(np.linspace(0.0, 5.0, 10))[:5, None]
T5 = np.arange(5.0)


def _lg(F=F2, Q=np.eye(2), H=H2, R=R1, m0=np.zeros(2), P0=np.eye(2), **kw):
    return dict(F=F, Q=Q, H=H, R=R, m0=m0, P0=P0, **kw)


def _matern32_kernel(tau, ell=1.0, var=1.0):
    r = math.sqrt(3.0) * np.abs(tau) / ell
    return var * (1.0 + r) * np.exp(-r)


# ------------------------------------------------------------------------------------------
# Valid edge inputs: the right number
# ------------------------------------------------------------------------------------------
def _ll(p, y, **kw):
    return float(jax.jit(lambda mdl, yy: statespace.log_likelihood(mdl, yy, **kw))(LG(**p), y))


def _valid_singular_Q(form):
    p = _lg(Q=np.diag([0.0, 1.0]))  # a state without noise (local-linear-trend-like)
    return _ll(p, Y5, form=form), dense_log_likelihood(p, Y5)


def _valid_zero_Q():
    p = _lg(Q=np.zeros((2, 2)))
    return _ll(p, Y5), dense_log_likelihood(p, Y5)


def _valid_wide_variances():
    # a 1e-12 variance next to 1e6: valid, must not be taken for an indefinite matrix
    p = _lg(F=np.eye(2), Q=np.diag([1e6, 1e-12]), H=np.array([[0.0, 1.0]]), R=1e-12 * np.eye(1),
            P0=np.diag([1.0, 1e-12]))
    y = np.array([[1e-6], [2e-6], [1.5e-6], [0.5e-6], [1e-6]])
    return _ll(p, y), dense_log_likelihood(p, y)


def _valid_exact_observation():
    p = _lg(R=np.zeros((1, 1)))  # R = 0 is PSD: y observes H x exactly
    return _ll(p, Y5), dense_log_likelihood(p, Y5)


def _valid_repeated_times():
    t = np.array([0.0, 1.0, 1.0, 2.5, 3.0])  # dt = 0 is allowed (non-decreasing)
    model = models.matern32(1.0, 1.0, 0.1)
    K = _matern32_kernel(t[:, None] - t[None, :]) + 0.1 * np.eye(5)
    return float(statespace.log_likelihood(model, Y5, t)), dense_gp_log_likelihood(K, Y5)


def _empty_series_discrete():
    # T = 0: log p(nothing) = 0, through the adjoint gradient path too
    p = _lg()
    y0 = np.zeros((0, 1))
    value, grad = jax.value_and_grad(lambda F: statespace.log_likelihood(LG(**{**p, "F": F}), y0))(
        jnp.asarray(F2))
    return (float(value), np.asarray(grad)), (0.0, np.zeros((2, 2)))


def _empty_series_continuous_diffuse():
    return float(statespace.log_likelihood(models.local_level(0.3, 0.05), np.zeros((0, 1)),
                                           np.zeros(0))), 0.0


def _empty_series_diffuse_discrete():
    p = _lg(diffuse=True)
    return float(statespace.log_likelihood(LG(**p), np.zeros((0, 1)))), 0.0


def _no_observed_series():
    # m = 0: nothing observed at any step, so log p = 0 and the filter's moments are the prior's
    p = _lg(H=np.zeros((0, 2)), R=np.zeros((0, 0)))
    y = np.zeros((3, 0))
    out = statespace.kalman_filter(LG(**p), y)
    prior_cov2 = F2 @ F2.T + np.eye(2)  # Cov x[1] = F P0 F^T + Q
    return (float(out.log_likelihood), np.asarray(out.predicted_covs[1])), (0.0, prior_cov2)


def _diffuse_all_missing_series():
    # a padding series in a panel: README promises 0, whatever the start
    p = _lg(diffuse=True)
    y = np.full((5, 1), np.nan)
    return _ll(p, y), dense_log_likelihood(_lg(), y)


def _diffuse_continuous_all_missing():
    return float(statespace.log_likelihood(models.local_level(0.3, 0.05), np.full((5, 1), np.nan),
                                           T5)), 0.0


def _predict_with_a_nan_new_time():
    model = models.matern32(1.0, 1.0, 0.1)
    new = np.array([0.5, np.nan, 2.5, 7.0])
    pred = statespace.predict(model, Y5, T5, jnp.asarray(new))
    ok = np.isfinite(new)
    K = _matern32_kernel(T5[:, None] - T5[None, :]) + 0.1 * np.eye(5)
    K_no = _matern32_kernel(new[ok][:, None] - T5[None, :])
    K_nn = _matern32_kernel(new[ok][:, None] - new[ok][None, :])
    mu, cov = dense_gp_condition(K, K_no, K_nn, Y5)
    got = np.asarray(pred.obs_means[:, 0])
    expected = np.full(4, np.nan)
    expected[ok] = mu
    assert np.all(np.isnan(np.asarray(pred.obs_covs[~ok])))
    np.testing.assert_allclose(np.asarray(pred.obs_covs[ok, 0, 0]), np.diag(cov) + 0.1, rtol=1e-9)
    return got, expected


def _expm_overflow_diagonal():
    return np.asarray(rules.expm(1e3 * jnp.eye(3))), np.where(np.eye(3, dtype=bool), np.inf, 0.0)


def _expm_overflow_triangular():
    # e^A = e^1000 [[1, 1], [0, 1]]: the exact zero below the diagonal stays 0
    a = jnp.array([[1e3, 1.0], [0.0, 1e3]])
    return (np.asarray(rules.expm(a)), np.asarray(rules.expm(a.T))), (
        np.array([[np.inf, np.inf], [0.0, np.inf]]), np.array([[np.inf, 0.0], [np.inf, np.inf]]))


def _fit_float32_params_under_x64():
    loss = lambda p: jnp.sum(p**2)  # noqa: E731
    res = statespace.fit(loss, jnp.ones(2, jnp.float32), optimizer=optax.adam(0.1), num_steps=2,
                         progress=False)
    opt = optax.adam(0.1)  # the plain optax loop, float32 throughout
    p = jnp.ones(2, jnp.float32)
    state = opt.init(p)
    for _ in range(2):
        updates, state = opt.update(jax.grad(loss)(p), state, p)
        p = optax.apply_updates(p, updates)
    assert res.params.dtype == jnp.float32
    return np.asarray(res.params), np.asarray(p)


RIGHT_NUMBER = {
    "singular Q (cov form)": lambda: _valid_singular_Q("cov"),
    "singular Q (sqrt form)": lambda: _valid_singular_Q("sqrt"),
    "Q = 0": _valid_zero_Q,
    "variances 1e6 and 1e-12": _valid_wide_variances,
    "R = 0": _valid_exact_observation,
    "repeated times (dt = 0)": _valid_repeated_times,
    "T = 0, value and gradient": _empty_series_discrete,
    "T = 0, continuous diffuse": _empty_series_continuous_diffuse,
    "T = 0, discrete diffuse": _empty_series_diffuse_discrete,
    "m = 0": _no_observed_series,
    "diffuse, all entries missing": _diffuse_all_missing_series,
    "continuous diffuse, all missing": _diffuse_continuous_all_missing,
    "predict, one NaN new time": _predict_with_a_nan_new_time,
    "expm overflow, diagonal": _expm_overflow_diagonal,
    "expm overflow, triangular": _expm_overflow_triangular,
    "fit, float32 params under x64": _fit_float32_params_under_x64,
}


@pytest.mark.parametrize("case", list(RIGHT_NUMBER))
def test_right_number(case):
    got, expected = RIGHT_NUMBER[case]()
    for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        rtol = 1e-6 if np.asarray(g).dtype == np.float32 else 1e-9
        np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Visible from shapes or static values: ValueError
# ------------------------------------------------------------------------------------------
def _unstable_ou():
    return models.ou(jnp.array([[0.1]]), jnp.eye(1), noise_var=0.1)


RAISES = {
    "times shorter than y (log_likelihood)":
        lambda: statespace.log_likelihood(models.matern32(1.0, 1.0, 0.1), Y5, jnp.array([0.0])),
    "times longer than y (kalman_filter)":
        lambda: statespace.kalman_filter(models.matern32(1.0, 1.0, 0.1), Y5, jnp.arange(6.0)),
    "times shorter than y (rts_smoother)":
        lambda: statespace.rts_smoother(models.matern32(1.0, 1.0, 0.1), Y5, jnp.arange(4.0)),
    "times shorter than y (sample_posterior)":
        lambda: statespace.sample_posterior(jax.random.key(0), models.matern32(1.0, 1.0, 0.1),
                                            Y5, 1, jnp.arange(4.0)),
    "negative variance (Python number)": lambda: models.matern32(1.0, -0.05, 1.0),
    "zero lengthscale": lambda: models.matern12(0.0, 1.0),
    "negative omega": lambda: models.sho(-1.0, 2.0, 1.0),
    "zero period": lambda: models.quasi_periodic(0.0, 10.0, [1.0]),
    "one negative harmonic variance": lambda: models.quasi_periodic(1.0, 10.0, [1.0, -0.5]),
    "negative noise_var": lambda: models.matern52(1.0, 1.0, noise_var=-0.1),
    "product_of a component with an explicit P0":
        lambda: models.product_of(models.local_level(1.0, P0=jnp.eye(1), m0=jnp.zeros(1)),
                                  models.matern32(1.0, 1.0)),
    "check(): negative variance as a JAX array":
        lambda: models.matern32(1.0, jnp.asarray(-0.05), 1.0).check(),
    "check(): indefinite Q (discrete)":
        lambda: LG(**_lg(Q=np.array([[1.0, 2.0], [2.0, 1.0]]))).check(),
    "check(): stationary P0 of an unstable F":
        lambda: LG(np.array([[1.5]]), np.eye(1), np.eye(1), np.eye(1), np.zeros(1),
                   "stationary").check(),
    "check(): unstable A, stationary start": lambda: _unstable_ou().check(),
    "NumPyro validate_args: unstable A":
        lambda: LinearGaussianStateSpace(_unstable_ou(), jnp.asarray(T5), validate_args=True),
}


@pytest.mark.parametrize("case", list(RAISES))
def test_raises_value_error(case):
    with pytest.raises(ValueError):
        RAISES[case]()


# ------------------------------------------------------------------------------------------
# Data-dependent invalid models under jit: -inf with a NaN gradient
# ------------------------------------------------------------------------------------------
def _discrete_case(gradient, form, parallel=False, **changes):
    """``(loss of F's entries, F's entries)`` for the base model with ``changes``."""
    p = _lg(**changes)

    def loss(theta):
        return statespace.log_likelihood(LG(**{**p, "F": theta.reshape(2, 2)}), Y5, form=form,
                                         gradient=gradient, parallel=parallel)

    return loss, jnp.asarray(F2).reshape(-1)


def _continuous_case(gradient, builder, theta, times=T5):
    def loss(th):
        return statespace.log_likelihood(builder(th), Y5, jnp.asarray(times), gradient=gradient)

    return loss, jnp.asarray(theta)


def _stationary_unstable_F(gradient):
    def loss(th):
        model = LG(th.reshape(1, 1), jnp.eye(1), jnp.eye(1), 10 * jnp.eye(1), jnp.zeros(1),
                   "stationary")
        return statespace.log_likelihood(model, Y5[:4], gradient=gradient)

    return loss, jnp.array([1.5])


INDEFINITE = np.array([[1.0, 2.0], [2.0, 1.0]])
MINUS_INF = {
    "indefinite Q (cov)": lambda g: _discrete_case(g, "cov", Q=INDEFINITE),
    "indefinite Q (sqrt)": lambda g: _discrete_case(g, "sqrt", Q=INDEFINITE),
    "indefinite P0 (cov)": lambda g: _discrete_case(g, "cov", P0=INDEFINITE),
    "indefinite P0 (sqrt)": lambda g: _discrete_case(g, "sqrt", P0=INDEFINITE),
    "indefinite Q (parallel, cov)": lambda g: _discrete_case(g, "cov", parallel=True, Q=INDEFINITE),
    "indefinite Q (parallel, sqrt)": lambda g: _discrete_case(g, "sqrt", parallel=True, Q=INDEFINITE),
    "indefinite P0 (parallel)": lambda g: _discrete_case(g, "cov", parallel=True, P0=INDEFINITE),
    "negative R (parallel)": lambda g: _discrete_case(g, "cov", parallel=True, R=-0.1 * R1),
    # H P H^T + R stays positive at every step: only the test of R itself sees the problem
    "negative R, positive innovation variances": lambda g: _discrete_case(g, "cov", R=-0.1 * R1),
    "stationary P0 of an unstable F": _stationary_unstable_F,
    "decreasing times": lambda g: _continuous_case(
        g, lambda th: models.matern32(th[0], th[1], 0.1), [1.0, 1.0], [0.0, 1.0, 0.5, 2.0, 3.0]),
    "negative variance (traced)":
        lambda g: _continuous_case(g, lambda th: models.matern32(th[0], th[1], 1.0), [1.0, -0.05]),
    "negative lengthscale (traced)":
        lambda g: _continuous_case(g, lambda th: models.matern32(th[0], th[1], 1.0), [-1.0, 1.0]),
    "unstable A, stationary start": lambda g: _continuous_case(
        g, lambda th: models.ou(th.reshape(1, 1), jnp.eye(1), noise_var=0.1), [0.1]),
    # a NaN that a validity test meets before the filter does: -inf, not NaN (README table)
    "NaN in A, stationary start": lambda g: _continuous_case(
        g, lambda th: statespace.ContinuousLinearSSM(th.reshape(2, 2), jnp.eye(2), H2, R1),
        [np.nan, 0.1, 0.0, -1.0]),
    "NaN in Q, stationary start": lambda g: _continuous_case(
        g, lambda th: statespace.ContinuousLinearSSM(-jnp.eye(2), th.reshape(2, 2), H2, R1),
        [np.nan, 0.0, 0.0, 1.0]),
    "indefinite explicit P0 (continuous)": lambda g: _continuous_case(
        g, lambda th: statespace.ContinuousLinearSSM(-jnp.eye(2), jnp.eye(2), H2, R1, jnp.zeros(2),
                                                     th.reshape(2, 2)), INDEFINITE.reshape(-1)),
}


@pytest.mark.parametrize("gradient", ["adjoint", "autodiff"])
@pytest.mark.parametrize("case", list(MINUS_INF))
def test_minus_inf_with_nan_gradient(case, gradient):
    loss, theta = MINUS_INF[case](gradient)
    value, grad = jax.jit(jax.value_and_grad(loss))(theta)
    assert float(value) == -np.inf
    assert np.all(np.isnan(np.asarray(grad)))


def test_minus_inf_from_the_step_of_an_indefinite_Q():
    """Per-step terms: an indefinite Q[2] (maps step 2 to 3) leaves steps 0..2 as they were
    (dense oracle on the prefix) and makes 3.. -inf."""
    Q = np.stack([np.eye(2)] * 5)
    Q[2] = np.array([[1.0, 2.0], [2.0, 1.0]])
    p = _lg(Q=Q)
    steps = np.asarray(jax.jit(statespace.kalman_filter)(LG(**p), Y5).log_likelihoods)
    assert np.all(steps[3:] == -np.inf)
    np.testing.assert_allclose(steps[:3].sum(), dense_log_likelihood({**p, "Q": Q[:3]}, Y5[:3]),
                               rtol=1e-10)


# ------------------------------------------------------------------------------------------
# NaN: non-finite input, and no draws from a model without a density
# ------------------------------------------------------------------------------------------
def _nan_parameter(name):
    p = _lg()
    value = np.array(p[name], dtype=float)
    value.reshape(-1)[0] = np.nan
    return jax.jit(statespace.log_likelihood)(LG(**{**p, name: value}), Y5)


NAN = {
    **{f"NaN in {name}": (lambda name=name: _nan_parameter(name))
       for name in ("F", "Q", "H", "R", "m0", "P0")},
    "NaN time": lambda: statespace.log_likelihood(models.matern32(1.0, 1.0, 0.1), Y5,
                                                  jnp.array([0.0, 1.0, np.nan, 3.0, 4.0])),
    "discretize, negative step":
        lambda: statespace.discretize(models.matern32(1.0, 1.0), jnp.array([-0.5])).Qd,
    "sample_posterior, unstable A":
        lambda: statespace.sample_posterior(jax.random.key(0), _unstable_ou(), Y5, 3, T5),
    "sample_posterior, indefinite Q":
        lambda: statespace.sample_posterior(jax.random.key(0),
                                            LG(**_lg(Q=INDEFINITE)), Y5, 3),
    "NumPyro sample, unstable A":
        lambda: LinearGaussianStateSpace(_unstable_ou(), jnp.asarray(T5),
                                         validate_args=False).sample(jax.random.key(0)),
    "NumPyro sample, indefinite R":
        lambda: LinearGaussianStateSpace(LG(**_lg(R=-R1)), num_steps=5,
                                         validate_args=False).sample(jax.random.key(0)),
    "simulate, indefinite P0":
        lambda: LG(**_lg(P0=INDEFINITE)).simulate(jax.random.key(0), 5)[1],
}


@pytest.mark.parametrize("case", list(NAN))
def test_nan(case):
    out = np.asarray(NAN[case]())
    assert out.size and np.all(np.isnan(out))


def test_valid_models_still_sample():
    """The NaN guards above must not touch a valid model's draws: the continuous sampler's
    draws of an OU process have the dense GP posterior's mean (5-sigma Monte Carlo bound)."""
    model = models.ou(jnp.array([[-0.5]]), jnp.eye(1), noise_var=0.1)
    draws = np.asarray(statespace.sample_posterior(jax.random.key(1), model, Y5, 4000, T5))[..., 0]
    P = 1.0  # stationary variance of dx = -x/2 dt + dW: 1 / (2 * 0.5)
    K = P * np.exp(-0.5 * np.abs(T5[:, None] - T5[None, :]))
    mu, cov = dense_gp_condition(K + 0.1 * np.eye(5), K, K, Y5)
    se = np.sqrt(np.diag(cov) / draws.shape[0])
    assert np.all(np.abs(draws.mean(axis=0) - mu) < 5 * se)
    assert scipy.linalg.norm(draws.std(axis=0) - np.sqrt(np.diag(cov))) < 0.1
