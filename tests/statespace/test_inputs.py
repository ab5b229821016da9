"""Inputs (covariates, controls) of discrete-time models: ``B u[k]`` on the step ``k -> k+1``,
``D u[k]`` on ``y[k]``.

Oracles: the dense Gaussian of ``y`` with the input-driven mean (``tests/statespace/
dense_oracle.py`` for the covariance, the mean by the deterministic recursion), and dynamax's
``lgssm_filter`` with the inputs re-indexed to its convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.linalg import expm
from scipy.stats import multivariate_normal

import statespace
from statespace import LinearGaussianSSM
from statespace.numpyro import LinearGaussianStateSpace

pytestmark = pytest.mark.timeout(300)

N, M, P, T = 2, 2, 3, 6


def _case(seed=0):
    rng = np.random.default_rng(seed)
    F = np.array([[0.8, 0.1], [-0.2, 0.7]])
    params = dict(F=F, Q=0.3 * np.eye(N), H=rng.normal(size=(M, N)), R=0.5 * np.eye(M),
                  m0=np.array([0.2, -0.1]), P0=np.eye(N), b=np.array([0.1, 0.0]),
                  d=np.array([0.0, 0.3]), B=rng.normal(size=(N, P)), D=rng.normal(size=(M, P)))
    u = rng.normal(size=(T, P))
    y = rng.normal(size=(T, M))
    y[2, 1] = np.nan
    return params, u, y


def _dense(params, u, y):
    """log N(y_obs; mean, cov): mean from the deterministic recursion, cov from the moments."""
    F, Q, H, R = (np.asarray(params[k]) for k in ("F", "Q", "H", "R"))
    means, covs = [np.asarray(params["m0"])], [np.asarray(params["P0"])]
    for k in range(T - 1):
        means.append(F @ means[-1] + params["b"] + params["B"] @ u[k])
        covs.append(F @ covs[-1] @ F.T + Q)
    # Cov(x[j], x[k]) = F^{j-k} P_k for j >= k
    cov_x = np.zeros((T * N, T * N))
    for k in range(T):
        block = covs[k]
        for j in range(k, T):
            cov_x[j * N:(j + 1) * N, k * N:(k + 1) * N] = block
            cov_x[k * N:(k + 1) * N, j * N:(j + 1) * N] = block.T
            block = F @ block
    Hbig = np.kron(np.eye(T), H)
    mean_y = np.concatenate([H @ means[k] + params["d"] + params["D"] @ u[k] for k in range(T)])
    cov_y = Hbig @ cov_x @ Hbig.T + np.kron(np.eye(T), R)
    keep = ~np.isnan(y.reshape(-1))
    return multivariate_normal(mean_y[keep], cov_y[np.ix_(keep, keep)]).logpdf(y.reshape(-1)[keep])


@pytest.mark.parametrize("form", ["cov", "sqrt"])
@pytest.mark.parametrize("gradient", ["adjoint", "autodiff"])
def test_log_likelihood_matches_dense_oracle(form, gradient):
    params, u, y = _case()
    model = LinearGaussianSSM(**params)
    value = statespace.log_likelihood(model, y, inputs=u, form=form, gradient=gradient)
    np.testing.assert_allclose(value, _dense(params, u, y), rtol=1e-10)
    filtered = statespace.kalman_filter(model, y, inputs=u, form=form)
    np.testing.assert_allclose(filtered.log_likelihood, value, rtol=1e-12)


def test_parallel_filter_and_smoother_with_inputs():
    params, u, y = _case()
    model = LinearGaussianSSM(**params)
    seq = statespace.kalman_filter(model, y, inputs=u)
    par = statespace.kalman_filter(model, y, inputs=u, parallel=True)
    np.testing.assert_allclose(par.filtered_means, seq.filtered_means, rtol=1e-9, atol=1e-12)
    smoothed = statespace.rts_smoother(model, y, inputs=u)
    # the last smoothed mean is the last filtered one; the inputs reach it through the filter
    np.testing.assert_allclose(smoothed.smoothed_means[-1], seq.filtered_means[-1], rtol=1e-12)
    np.testing.assert_allclose(statespace.rts_smoother(model, y, inputs=u, parallel=True)
                               .smoothed_means, smoothed.smoothed_means, rtol=1e-9, atol=1e-12)
    draws = statespace.sample_posterior(jax.random.key(0), model, y, 3000, inputs=u)
    np.testing.assert_allclose(draws.mean(0), smoothed.smoothed_means, atol=0.1)


@pytest.fixture
def dynamax():
    """dynamax's linear-Gaussian module; importing dynamax sets JAX's global default matmul
    precision (``dynamax/__init__.py``), which is put back afterwards for the other tests."""
    before = jax.config.jax_default_matmul_precision
    yield pytest.importorskip("dynamax.linear_gaussian_ssm")
    jax.config.update("jax_default_matmul_precision", before)


def test_matches_dynamax_with_reindexed_inputs(dynamax):
    params, u, y = _case()
    y = np.nan_to_num(y)  # dynamax has no missing entries
    # dynamax: x_t = F x_{t-1} + B' u'_t + b, y_t = H x_t + D' u'_t + d. With
    # u'_t = [u_{t-1}; u_t] (u_{-1} = 0), B' = [B, 0], D' = [0, D] it is our model.
    shifted = np.concatenate([np.zeros((1, P)), u[:-1]])
    u2 = np.concatenate([shifted, u], axis=1)
    ssm = dynamax.LinearGaussianSSM(N, M, 2 * P)
    p, _ = ssm.initialize(
        initial_mean=jnp.asarray(params["m0"]), initial_covariance=jnp.asarray(params["P0"]),
        dynamics_weights=jnp.asarray(params["F"]), dynamics_bias=jnp.asarray(params["b"]),
        dynamics_input_weights=jnp.concatenate([params["B"], np.zeros((N, P))], axis=1),
        dynamics_covariance=jnp.asarray(params["Q"]), emission_weights=jnp.asarray(params["H"]),
        emission_bias=jnp.asarray(params["d"]),
        emission_input_weights=jnp.concatenate([np.zeros((M, P)), params["D"]], axis=1),
        emission_covariance=jnp.asarray(params["R"]))
    theirs = dynamax.inference.lgssm_filter(p, jnp.asarray(y), jnp.asarray(u2))
    ours = statespace.kalman_filter(LinearGaussianSSM(**params), y, inputs=u)
    np.testing.assert_allclose(ours.log_likelihood, theirs.marginal_loglik, rtol=1e-10)
    np.testing.assert_allclose(ours.filtered_means, theirs.filtered_means, rtol=1e-8, atol=1e-10)


# second order compiles second-order programs of the whole filter (~20 s): full suite only
@pytest.mark.parametrize("order", [1, pytest.param(2, marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_gradients_in_B_D_and_the_inputs(order):
    params, u, y = _case()
    base = LinearGaussianSSM(**params)

    def loglik(B, D, inputs, gradient="adjoint"):
        return statespace.log_likelihood(base.replace(B=B, D=D), y, inputs=inputs,
                                         gradient=gradient)

    args = (jnp.asarray(params["B"]), jnp.asarray(params["D"]), jnp.asarray(u))
    check_grads(loglik, args, order=order, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)
    ours = jax.grad(loglik, argnums=(0, 1, 2))(*args)
    auto = jax.grad(lambda *a: loglik(*a, gradient="autodiff"), argnums=(0, 1, 2))(*args)
    for a, b in zip(ours, auto):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_batched_inputs_and_time_varying_weights():
    params, u, y = _case()
    model = LinearGaussianSSM(**params)
    u2 = np.stack([u, 2 * u])
    batched = statespace.log_likelihood(model, y, inputs=u2)
    assert batched.shape == (2,)
    for i in range(2):
        np.testing.assert_allclose(batched[i], _dense(params, u2[i], y), rtol=1e-10)
    # a time-varying B equal at every step is the constant one
    tv = model.replace(B=jnp.broadcast_to(params["B"], (T, N, P)))
    np.testing.assert_allclose(statespace.log_likelihood(tv, y, inputs=u),
                               statespace.log_likelihood(model, y, inputs=u), rtol=1e-12)
    # under vmap: one series of inputs per member
    vmapped = jax.vmap(lambda uu: statespace.log_likelihood(model, y, inputs=uu))(u2)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-12)


def test_simulate_with_inputs_has_the_input_driven_mean():
    params, u, _ = _case()
    params = dict(params, Q=0.0 * np.eye(N), R=0.0 * np.eye(M), P0=0.0 * np.eye(N))
    model = LinearGaussianSSM(**params)
    x, y = model.simulate(jax.random.key(0), T, inputs=u)
    expected = [params["m0"]]
    for k in range(T - 1):
        expected.append(params["F"] @ expected[-1] + params["b"] + params["B"] @ u[k])
    np.testing.assert_allclose(x, np.array(expected), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, x @ params["H"].T + params["d"] + u @ params["D"].T,
                               rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_clear_errors_and_nan_is_documented_nan():
    params, u, y = _case()
    model = LinearGaussianSSM(**params)
    plain = LinearGaussianSSM(**{k: v for k, v in params.items() if k not in ("B", "D")})
    with pytest.raises(ValueError, match="pass inputs"):
        statespace.log_likelihood(model, y)
    with pytest.raises(ValueError, match="no input weights"):
        statespace.log_likelihood(plain, y, inputs=u)
    with pytest.raises(ValueError, match=r"inputs.shape = \(5, 3\)"):
        statespace.kalman_filter(model, y, inputs=u[:5])
    with pytest.raises(ValueError, match=r"inputs.shape = \(6, 2\)"):
        statespace.rts_smoother(model, y, inputs=u[:, :2])
    with pytest.raises(ValueError, match="one width"):
        LinearGaussianSSM(**dict(params, D=params["D"][:, :2]))
    with pytest.raises(ValueError, match=r"B must have shape"):
        LinearGaussianSSM(**dict(params, B=params["B"][:1]))
    with pytest.raises(ValueError, match="pass inputs"):
        statespace.sample_posterior(jax.random.key(0), model, y, 2)
    u_nan = u.copy()
    u_nan[1, 0] = np.nan  # documented: NaN inputs give a NaN log-likelihood
    assert np.isnan(statespace.log_likelihood(model, y, inputs=u_nan))


# --------------------------------------------------------------------------------------------
# Continuous time: inputs held over each step (zero-order hold) or as impulses
# --------------------------------------------------------------------------------------------
def _ou_case(kind, seed=1):
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.uniform(0.2, 1.5, T))
    u = rng.normal(size=(T, 2))
    y = rng.normal(size=(T, 1))
    y[3] = np.nan
    a, q, r = 0.8, 1.1, 0.3
    B, D = np.array([[0.7, -0.4]]), np.array([[0.2, 0.5]])
    model = statespace.ContinuousLinearSSM(A=[[-a]], Q=[[q]], H=[[1.0]], R=[[r]], B=B, D=D,
                                           input_kind=kind)
    return model, (a, q, r, B, D), times, u, y


def _ou_dense(kind, a, q, r, B, D, times, u, y):
    """Dense oracle: OU covariance (inputs are deterministic) and the input-driven mean."""
    mean = np.zeros(T)
    mean[0] = 0.0 if kind == "hold" else B[0] @ u[0]
    for k in range(T - 1):
        decay = np.exp(-a * (times[k + 1] - times[k]))
        if kind == "hold":  # ∫_0^dt e^{-a s} ds B u[k]
            mean[k + 1] = decay * mean[k] + (1 - decay) / a * (B[0] @ u[k])
        else:
            mean[k + 1] = decay * mean[k] + B[0] @ u[k + 1]
    mean_y = mean + u @ D[0]
    cov = q / (2 * a) * np.exp(-a * np.abs(np.subtract.outer(times, times))) + r * np.eye(T)
    keep = ~np.isnan(y[:, 0])
    return multivariate_normal(mean_y[keep], cov[np.ix_(keep, keep)]).logpdf(y[keep, 0])


@pytest.mark.parametrize("kind", ["hold", "impulse"])
def test_continuous_inputs_match_dense_oracle(kind):
    model, (a, q, r, B, D), times, u, y = _ou_case(kind)
    expected = _ou_dense(kind, a, q, r, B, D, times, u, y)
    np.testing.assert_allclose(statespace.log_likelihood(model, y, times, inputs=u), expected,
                               rtol=1e-10)
    np.testing.assert_allclose(statespace.kalman_filter(model, y, times, inputs=u, form="sqrt")
                               .log_likelihood, expected, rtol=1e-10)
    # two series of inputs at once: the discrete model gets a batch axis
    both = statespace.log_likelihood(model, y, times, inputs=np.stack([u, -u]))
    np.testing.assert_allclose(both[1], _ou_dense(kind, a, q, r, B, D, times, -u, y), rtol=1e-10)


def test_held_inputs_match_van_loan_for_singular_drift():
    A = np.array([[0.0, 1.0], [0.0, 0.0]])  # integrated random walk: A is singular
    B, b = np.array([[0.3], [1.0]]), np.array([0.1, -0.2])
    model = statespace.ContinuousLinearSSM(A=A, Q=np.diag([0.0, 1.0]), H=[[1.0, 0.0]],
                                           R=[[0.1]], m0=np.zeros(2), P0=np.eye(2), b=b, B=B)
    times = np.array([0.0, 0.4, 1.9, 2.0, 5.5])
    u = np.array([[1.0], [-2.0], [0.5], [3.0], [0.0]])
    disc, ok = model.to_discrete(times, inputs=u)
    assert bool(ok)
    for k in range(len(times) - 1):
        # Van Loan's augmented exponential: expm([[A, c], [0, 0]] dt) = [[F, ∫e^{As} ds c], [0, 1]]
        block = np.zeros((3, 3))
        block[:2, :2], block[:2, 2] = A, b + B @ u[k]
        augmented = expm(block * (times[k + 1] - times[k]))
        np.testing.assert_allclose(disc.F[k], augmented[:2, :2], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(disc.b[k], augmented[:2, 2], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind, order", [("hold", 1), pytest.param("hold", 2, marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
                                         pytest.param("impulse", 2, marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_continuous_input_gradients(kind, order):
    model, _, times, u, y = _ou_case(kind)

    def loglik(B, D, inputs):
        built = statespace.ContinuousLinearSSM(model.A, model.Q, model.H, model.R, B=B, D=D,
                                               input_kind=kind)
        return statespace.log_likelihood(built, y, times, inputs=inputs)

    args = (model.B, model.D, jnp.asarray(u))
    check_grads(loglik, args, order=order, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_continuous_input_errors():
    model, _, times, u, y = _ou_case("hold")
    with pytest.raises(ValueError, match="pass inputs"):
        statespace.log_likelihood(model, y, times)
    with pytest.raises(ValueError, match=r"inputs.shape = \(6, 1\)"):
        statespace.log_likelihood(model, y, times, inputs=u[:, :1])
    with pytest.raises(ValueError, match="input_kind"):
        statespace.ContinuousLinearSSM(A=[[-1.0]], Q=[[1.0]], H=[[1.0]], R=[[1.0]], B=[[1.0]],
                                       input_kind="pulse")
    plain = statespace.ContinuousLinearSSM(A=[[-1.0]], Q=[[1.0]], H=[[1.0]], R=[[1.0]])
    with pytest.raises(ValueError, match="no input weights"):
        statespace.log_likelihood(plain, y, times, inputs=u)


@pytest.mark.parametrize("kind", ["hold", "impulse"])
def test_forecast_with_future_inputs_is_the_dense_conditional(kind):
    model, (a, q, r, B, D), times, u, y = _ou_case(kind)
    new_times = np.array([times[-1] + 0.5, times[-1] + 1.7, times[2] + 0.1])
    new_u = np.array([[1.0, -1.0], [0.5, 2.0], [0.3, 0.3]])
    pred = statespace.predict(model, y, times, new_times, inputs=u, new_inputs=new_u)
    # dense: the state mean over the merged, sorted times (inputs change at every time given)
    all_t = np.concatenate([times, new_times])
    all_u = np.concatenate([u, new_u])
    order = np.argsort(all_t, kind="stable")
    mean = np.zeros(len(all_t))
    t_s, u_s = all_t[order], all_u[order]
    mean_s = np.zeros(len(all_t))
    mean_s[0] = 0.0 if kind == "hold" else B[0] @ u_s[0]
    for k in range(len(all_t) - 1):
        decay = np.exp(-a * (t_s[k + 1] - t_s[k]))
        push = (1 - decay) / a * (B[0] @ u_s[k]) if kind == "hold" else B[0] @ u_s[k + 1]
        mean_s[k + 1] = decay * mean_s[k] + push
    mean[order] = mean_s
    cov = q / (2 * a) * np.exp(-a * np.abs(np.subtract.outer(all_t, all_t)))
    obs = np.flatnonzero(~np.isnan(y[:, 0]))
    new = np.arange(T, T + len(new_times))
    gain = cov[np.ix_(new, obs)] @ np.linalg.inv(cov[np.ix_(obs, obs)] + r * np.eye(len(obs)))
    resid = y[obs, 0] - mean[obs] - u[obs] @ D[0]
    np.testing.assert_allclose(pred.means[:, 0], mean[new] + gain @ resid, rtol=1e-9)
    cond = cov[np.ix_(new, new)] - gain @ cov[np.ix_(obs, new)]
    np.testing.assert_allclose(pred.covs[:, 0, 0], np.diag(cond), rtol=1e-9)
    np.testing.assert_allclose(pred.obs_means[:, 0], pred.means[:, 0] + new_u @ D[0], rtol=1e-12)
    with pytest.raises(ValueError, match="new_inputs"):
        statespace.predict(model, y, times, new_times, inputs=u)


def test_adjoint_path_is_taken_with_inputs():
    """Inputs are folded into the offsets before the filter: the default gradient is still the
    adjoint rule (a custom_jvp in the program), not autodiff through the scan."""
    params, u, y = _case()

    def loglik(B, gradient):
        model = LinearGaussianSSM(**dict(params, B=B))
        return statespace.log_likelihood(model, y, inputs=u, gradient=gradient)

    # the adjoint rule is the custom_jvp named _loglik (statespace/_adjoint.py)
    adjoint = str(jax.make_jaxpr(lambda B: loglik(B, "adjoint"))(params["B"]))
    autodiff = str(jax.make_jaxpr(lambda B: loglik(B, "autodiff"))(params["B"]))
    assert "name=_loglik" in adjoint and "name=_loglik" not in autodiff


def test_numpyro_distribution_and_fit_take_inputs():
    params, u, y = _case()
    model = LinearGaussianSSM(**params)
    dist = LinearGaussianStateSpace(model, inputs=u)
    assert dist.event_shape == (T, M) and dist.batch_shape == ()
    np.testing.assert_allclose(dist.log_prob(y), _dense(params, u, y), rtol=1e-10)
    batched = LinearGaussianStateSpace(model, inputs=np.stack([u, -u]))
    assert batched.batch_shape == (2,)
    np.testing.assert_allclose(batched.log_prob(y)[1], _dense(params, -u, y), rtol=1e-10)
    draws = batched.sample(jax.random.key(0), (4,))
    assert draws.shape == (4, 2, T, M) and np.all(np.isfinite(draws))
    # fit: the inputs travel in args; the fitted B and D make the data likelier than the start
    simulated = dist.sample(jax.random.key(1))

    def nll(weights, y, u):
        fitted = model.replace(B=weights["B"], D=weights["D"])
        return -statespace.log_likelihood(fitted, y, inputs=u)

    start = {"B": jnp.zeros((N, P)), "D": jnp.zeros((M, P))}
    result = statespace.fit(nll, start, args=(simulated, jnp.asarray(u)), progress=False)
    assert result.converged and result.loss < float(nll(start, simulated, jnp.asarray(u)))
    grad = jax.grad(nll)(result.params, simulated, jnp.asarray(u))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grad)) < 1e-4
