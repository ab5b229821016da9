"""``statespace.numpyro.LinearGaussianStateSpace`` against NumPyro's distribution contract.

Written the way NumPyro's own ``test/test_distributions.py`` checks a distribution: shapes of
samples and log-densities for several sample/batch shapes, ``log_prob`` under ``jit``, the
distribution as a pytree through ``jit``/``vmap``, gradients of ``log_prob`` against central
finite differences, sample moments against the exact ones, argument validation, and use inside
a NumPyro model. Independent references: the dense joint-Gaussian oracle
(``tests/statespace/dense_oracle.py``) and ``scipy.stats.multivariate_normal``.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.stats
from numpyro.distributions import constraints

import statespace
from statespace.numpyro import LinearGaussianStateSpace
from tests.statespace.dense_oracle import (
    dense_joint,
    dense_log_likelihood,
    random_model,
    random_observations,
)

N, M, T = 2, 2, 6


@pytest.fixture(scope="module")
def params():
    return random_model(np.random.default_rng(0), N, M)


def ssm(p, **changes):
    return statespace.LinearGaussianSSM(**{**p, **changes})


def batched_F(p):
    """Three models differing in F: F.shape = (3, 1, n, n) (batch axis, then a length-1 time axis)."""
    return np.stack([p["F"], 0.5 * p["F"], -0.8 * p["F"]])[:, None]


# ------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample_shape", [(), (2, 3)])
@pytest.mark.parametrize("batched", [False, True])
def test_sample_and_log_prob_shapes(params, sample_shape, batched):
    model = ssm(params, F=batched_F(params)) if batched else ssm(params)
    d = LinearGaussianStateSpace(model, num_steps=T)
    batch = (3,) if batched else ()
    assert d.batch_shape == batch
    assert d.event_shape == (T, M)
    assert d.event_dim == 2
    assert d.support is constraints.real_matrix
    y = d.sample(jax.random.PRNGKey(1), sample_shape)
    assert y.shape == sample_shape + batch + (T, M)
    assert d.shape(sample_shape) == y.shape
    lp = d.log_prob(y)
    assert lp.shape == sample_shape + batch
    assert np.all(np.isfinite(np.asarray(lp)))
    obs, (states,) = d.sample_with_intermediates(jax.random.PRNGKey(1), sample_shape)
    np.testing.assert_array_equal(obs, y)
    assert states.shape == sample_shape + batch + (T, N)


def test_new_style_keys_and_call_interface(params):
    d = LinearGaussianStateSpace(ssm(params), num_steps=T)
    y = d(rng_key=jax.random.key(0), sample_shape=(2,))
    assert y.shape == (2, T, M)


def test_num_steps_from_time_varying_model(params):
    F_t = np.stack([params["F"] * (1 - 0.05 * k) for k in range(T)])
    d = LinearGaussianStateSpace(ssm(params, F=F_t))
    assert d.event_shape == (T, M)
    with pytest.raises(ValueError, match="does not match"):
        LinearGaussianStateSpace(ssm(params, F=F_t), num_steps=T + 1)


def test_missing_num_steps_or_bad_arguments_raise(params):
    with pytest.raises(ValueError, match="num_steps"):
        LinearGaussianStateSpace(ssm(params))
    with pytest.raises(ValueError, match="continuous-time"):
        LinearGaussianStateSpace(ssm(params), jnp.arange(T, dtype=float))
    with pytest.raises(ValueError, match="form"):
        LinearGaussianStateSpace(ssm(params), num_steps=T, form="info")
    d = LinearGaussianStateSpace(ssm(params), num_steps=T)
    with pytest.raises(ValueError, match="event_shape"):
        d.log_prob(jnp.zeros((T + 1, M)))


# ------------------------------------------------------------------------------------------
# log_prob against independent references
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["cov", "sqrt"])
def test_log_prob_equals_scipy_multivariate_normal(params, form):
    rng = np.random.default_rng(3)
    y = random_observations(rng, params, T)
    mean, cov = dense_joint(params, T)
    joint_y = slice(T * N, T * (N + M))
    expected = scipy.stats.multivariate_normal(mean[joint_y], cov[joint_y, joint_y]).logpdf(
        y.reshape(-1)
    )
    d = LinearGaussianStateSpace(ssm(params), num_steps=T, form=form)
    np.testing.assert_allclose(d.log_prob(y), expected, rtol=1e-10)


def test_log_prob_with_missing_entries_equals_dense_oracle(params):
    rng = np.random.default_rng(4)
    y = random_observations(rng, params, T, missing=0.3, missing_rows=(2,))
    assert np.isnan(y).any()
    d = LinearGaussianStateSpace(ssm(params), num_steps=T)
    np.testing.assert_allclose(d.log_prob(y), dense_log_likelihood(params, y), rtol=1e-10)
    all_missing = np.full((T, M), np.nan)
    np.testing.assert_allclose(d.log_prob(all_missing), 0.0, atol=1e-12)


def test_batched_log_prob_equals_per_member_oracle(params):
    rng = np.random.default_rng(5)
    Fb = batched_F(params)
    d = LinearGaussianStateSpace(ssm(params, F=Fb), num_steps=T)
    ys = np.stack([random_observations(rng, params, T, missing=0.2) for _ in range(4)])[:, None]
    ys = np.broadcast_to(ys, (4, 3, T, M)).copy()
    ys[:, 1, 0, 0] = 0.3  # differ across the batch too
    lp = d.log_prob(ys)
    assert lp.shape == (4, 3)
    for s in range(4):
        for b in range(3):
            np.testing.assert_allclose(
                lp[s, b], dense_log_likelihood({**params, "F": Fb[b, 0]}, ys[s, b]), rtol=1e-10
            )
    # a value without the batch axis broadcasts against it
    lp_one = d.log_prob(ys[0, 0])
    assert lp_one.shape == (3,)


def test_log_prob_under_jit_and_distribution_as_pytree(params):
    rng = np.random.default_rng(6)
    y = random_observations(rng, params, T, missing=0.1)
    d = LinearGaussianStateSpace(ssm(params, F=batched_F(params)), num_steps=T)
    eager = d.log_prob(y)
    np.testing.assert_allclose(jax.jit(d.log_prob)(y), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda dd, v: dd.log_prob(v))(d, y), eager, rtol=1e-12)
    # flatten / unflatten keeps shapes and options
    leaves, treedef = jax.tree_util.tree_flatten(d)
    d2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (d2.batch_shape, d2.event_shape, d2.form) == (d.batch_shape, d.event_shape, d.form)
    # vmap over a stack of distributions (a pytree with a leading axis on every leaf)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), LinearGaussianStateSpace(
        ssm(params), num_steps=T))
    lp = jax.vmap(lambda dd: dd.log_prob(y))(stacked)
    np.testing.assert_allclose(lp, [dense_log_likelihood(params, y)] * 2, rtol=1e-10)


def test_gradient_of_log_prob_matches_finite_differences(params):
    rng = np.random.default_rng(7)
    y = random_observations(rng, params, T, missing=0.15)

    def lp(theta):
        F = params["F"] + theta[0] * np.array([[1.0, 0.0], [0.0, 0.0]]) + theta[1] * np.array(
            [[0.0, 1.0], [0.0, 0.0]]
        )
        R = params["R"] * jnp.exp(theta[2])
        m0 = params["m0"] + theta[3]
        return LinearGaussianStateSpace(ssm(params, F=F, R=R, m0=m0), num_steps=T).log_prob(y)

    lp = jax.jit(lp)
    theta = jnp.array([0.05, -0.1, 0.2, 0.3])
    grad = jax.jit(jax.grad(lp))(theta)
    eps = 1e-5
    fd = np.array([(lp(theta + eps * e) - lp(theta - eps * e)) / (2 * eps) for e in np.eye(4)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


def test_sample_moments_match_exact_moments(params):
    """Monte Carlo mean/covariance of 20000 draws within a few standard errors of the exact ones."""
    Ts = 3
    d = LinearGaussianStateSpace(ssm(params), num_steps=Ts)
    ys = np.asarray(d.sample(jax.random.PRNGKey(11), (20000,))).reshape(20000, -1)
    mean, cov = dense_joint(params, Ts)
    sl = slice(Ts * N, Ts * (N + M))
    mean, cov = mean[sl], cov[sl, sl]
    se_mean = np.sqrt(np.diag(cov) / ys.shape[0])
    assert np.all(np.abs(ys.mean(0) - mean) < 5 * se_mean)
    emp = np.cov(ys, rowvar=False)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / ys.shape[0])
    assert np.all(np.abs(emp - cov) < 6 * se_cov)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def test_validate_args_rejects_invalid_parameters(params):
    bad_Q = params["Q"] - 10 * np.eye(N)
    with pytest.raises(ValueError, match="indefinite Q"):
        LinearGaussianStateSpace(ssm(params, Q=bad_Q), num_steps=T, validate_args=True)
    asym_R = params["R"] + np.array([[0.0, 0.5], [0.0, 0.0]])
    with pytest.raises(ValueError, match="non-symmetric R"):
        LinearGaussianStateSpace(ssm(params, R=asym_R), num_steps=T, validate_args=True)
    with pytest.raises(ValueError, match="non-finite"):
        LinearGaussianStateSpace(ssm(params, F=params["F"] * np.nan), num_steps=T,
                                 validate_args=True)
    # without validation the same object is built (the likelihood is then -inf or NaN)
    LinearGaussianStateSpace(ssm(params, Q=bad_Q), num_steps=T, validate_args=False)


def test_validate_args_inside_jit_is_skipped_not_an_error(params):
    def f(scale):
        d = LinearGaussianStateSpace(ssm(params, R=params["R"] * scale), num_steps=T,
                                     validate_args=True)
        return d.log_prob(jnp.zeros((T, M)))

    assert np.isfinite(jax.jit(f)(1.0))


def test_validate_sample_nan_is_missing_inf_is_out_of_support(params):
    d = LinearGaussianStateSpace(ssm(params), num_steps=T, validate_args=True)
    y = np.zeros((T, M))
    y[1, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(d.log_prob(y))
    y[2, 1] = np.inf
    with pytest.warns(UserWarning, match="Out-of-support"):
        assert d.log_prob(y) == -np.inf


# ------------------------------------------------------------------------------------------
# inside NumPyro models
# ------------------------------------------------------------------------------------------
def test_log_density_of_a_numpyro_model(params):
    rng = np.random.default_rng(8)
    y = random_observations(rng, params, T, missing=0.1)

    def model(y=None):
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))
        numpyro.sample("y", LinearGaussianStateSpace(ssm(params, R=params["R"] * scale),
                                                     num_steps=T), obs=y)

    log_joint, _ = numpyro.infer.util.log_density(model, (y,), {}, {"scale": 1.7})
    expected = scipy.stats.lognorm(0.5).logpdf(1.7) + dense_log_likelihood(
        {**params, "R": params["R"] * 1.7}, y)
    np.testing.assert_allclose(log_joint, expected, rtol=1e-10)

    prior = numpyro.infer.Predictive(model, num_samples=5)(jax.random.PRNGKey(0))
    assert prior["y"].shape == (5, T, M)


def test_plate_over_a_batched_model(params):
    Fb = batched_F(params)
    rng = np.random.default_rng(9)
    ys = np.stack([random_observations(rng, {**params, "F": f[0]}, T) for f in Fb])

    def model(ys=None):
        with numpyro.plate("series", 3):
            numpyro.sample("y", LinearGaussianStateSpace(ssm(params, F=Fb), num_steps=T), obs=ys)

    log_joint, _ = numpyro.infer.util.log_density(model, (ys,), {}, {})
    expected = sum(dense_log_likelihood({**params, "F": f[0]}, yy) for f, yy in zip(Fb, ys))
    np.testing.assert_allclose(log_joint, expected, rtol=1e-10)
    # expand / to_event / mask from the base class
    d = LinearGaussianStateSpace(ssm(params), num_steps=T)
    assert d.expand((5,)).sample(jax.random.PRNGKey(0)).shape == (5, T, M)
    assert d.expand((5,)).to_event(1).log_prob(np.zeros((5, T, M))).shape == ()


# ------------------------------------------------------------------------------------------
# continuous-time models at irregular times
# ------------------------------------------------------------------------------------------
def _ou(theta=0.7, sigma=0.8, noise=0.3, coupling=0.4):
    A = jnp.array([[-theta, coupling], [-coupling, -2.0 * theta]])
    return statespace.ContinuousLinearSSM(
        A=A, Q=sigma**2 * jnp.eye(2), H=jnp.array([[1.0, 0.5]]), R=noise**2 * jnp.eye(1)
    )


def _irregular_times(seed, T):
    rng = np.random.default_rng(seed)
    return np.cumsum(np.concatenate([[0.0], rng.exponential(0.4, size=T - 1)]))


def _as_dense_oracle_model(ssm, times):
    """Exact discretisation by SciPy (Van Loan), in the dense oracle's dict format."""
    import scipy.linalg

    A, Q = np.asarray(ssm.A), np.asarray(ssm.Q)
    n = A.shape[0]
    F, Qd = [], []
    for dt in np.append(np.diff(times), 0.0):
        C = scipy.linalg.expm(np.block([[-A, Q], [np.zeros((n, n)), A.T]]) * dt)
        Fk = C[n:, n:].T
        F.append(Fk)
        Qd.append(Fk @ C[:n, n:])
    P0 = scipy.linalg.solve_continuous_lyapunov(A, -Q)
    return dict(F=np.stack(F), Q=np.stack(Qd), H=np.asarray(ssm.H), R=np.asarray(ssm.R),
                m0=np.zeros(n), P0=P0)


def test_continuous_log_prob_equals_dense_oracle_at_irregular_times():
    T_c = 12
    times = _irregular_times(0, T_c)
    ssm = _ou()
    d = LinearGaussianStateSpace(ssm, times)
    assert d.event_shape == (T_c, 1) and d.batch_shape == ()
    y = np.array(d.sample(jax.random.PRNGKey(2)))
    y[3] = np.nan
    np.testing.assert_allclose(
        d.log_prob(y), dense_log_likelihood(_as_dense_oracle_model(ssm, times), y), rtol=1e-9
    )
    with pytest.raises(ValueError, match="times"):
        LinearGaussianStateSpace(ssm)


@pytest.mark.slow  # ~13 s of compile; per-subject panels are also run by the panel example tests (slow)
@pytest.mark.timeout(180)
def test_continuous_batched_by_vmap_and_per_subject_times():
    """A batch of models built by vmap + NaN-padded per-subject times == per-subject oracle."""
    S, T_c = 3, 8
    thetas = jnp.array([0.4, 0.9, 1.5])
    batch = jax.vmap(lambda th: _ou(theta=th))(thetas)
    rng = np.random.default_rng(1)
    lengths = [8, 5, 6]
    times = np.zeros((S, T_c))
    for i, n in enumerate(lengths):
        times[i, :n] = _irregular_times(10 + i, n)
        times[i, n:] = times[i, n - 1]
    d = LinearGaussianStateSpace(batch, times)
    assert d.batch_shape == (S,) and d.event_shape == (T_c, 1)
    y = np.array(d.sample(jax.random.PRNGKey(3)))
    assert y.shape == (S, T_c, 1)
    for i, n in enumerate(lengths):
        y[i, n:] = np.nan
    lp = d.log_prob(y)
    assert lp.shape == (S,)
    for i, n in enumerate(lengths):
        single = _ou(theta=float(thetas[i]))
        ref = dense_log_likelihood(_as_dense_oracle_model(single, times[i, :n]), y[i, :n])
        np.testing.assert_allclose(lp[i], ref, rtol=1e-9)
    # a shared model with batched times broadcasts too
    d_shared = LinearGaussianStateSpace(_ou(), times)
    assert d_shared.batch_shape == (S,)
    assert d_shared.log_prob(y).shape == (S,)
    # inside a plate: the plate's log density is the sum over subjects
    def model():
        with numpyro.plate("subject", S):
            numpyro.sample("y", LinearGaussianStateSpace(batch, times), obs=y)

    log_joint = numpyro.infer.util.log_density(model, (), {}, {})[0]
    np.testing.assert_allclose(log_joint, lp.sum(), rtol=1e-12)


def test_continuous_validate_args_decreasing_times():
    with pytest.raises(ValueError, match="decreasing"):
        LinearGaussianStateSpace(_ou(), np.array([0.0, 1.0, 0.5]), validate_args=True)
