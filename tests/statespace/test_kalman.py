"""Kalman filter: dense joint-Gaussian oracle, both forms, missing data, batches, diffuse starts,
robustness, float32 conditioning and derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from statespace import LinearGaussianSSM, kalman_filter, log_likelihood
from statespace._model import _as_discrete
from tests.statespace.dense_oracle import (
    dense_filtered,
    dense_joint,
    dense_log_likelihood,
    dense_predicted,
    random_model,
    random_observations,
)

FORMS = ["cov", "sqrt"]

# Jitted entry points shared by the tests, so equal shapes compile once for the whole file.
KF = jax.jit(kalman_filter, static_argnames=("form",))
LL = jax.jit(log_likelihood, static_argnames=("form",))


def _case(n=3, m=2, T=6, seed=0, time_varying=False, offsets=False, missing=0.0, rows=()):
    rng = np.random.default_rng(seed)
    p = random_model(rng, n, m, T=T, time_varying=time_varying, offsets=offsets)
    y = random_observations(rng, p, T, missing=missing, missing_rows=rows)
    return p, y


CASES = {
    "plain": dict(),
    "offsets": dict(offsets=True),
    "time_varying": dict(time_varying=True, offsets=True),
    "missing_entries": dict(missing=0.3, offsets=True),
    "missing_rows": dict(missing=0.2, rows=(0, 3), time_varying=("H", "R", "F"), offsets=True),
    "m1": dict(n=2, m=1, missing=0.3),
    "wide_m": dict(n=2, m=4, missing=0.2, offsets=True),
    # above _UNROLL_MAX: LAPACK Cholesky / triangular solves and plain matmuls
    "large": dict(n=9, m=9, T=4, missing=0.2, offsets=True),
}


# Every case in covariance form; the square-root form (slower to compile) on the richest ones.
_DENSITY_RUNS = [(c, "cov") for c in CASES] + [
    (c, "sqrt") for c in ("time_varying", "missing_rows", "wide_m", "m1", "large")
]


@pytest.mark.parametrize("case, form", _DENSITY_RUNS)
def test_log_likelihood_equals_dense_density(case, form):
    p, y = _case(seed=list(CASES).index(case), **CASES[case])
    model = LinearGaussianSSM(**p)
    expected = dense_log_likelihood(p, y)
    result = KF(model, y, form=form)
    np.testing.assert_allclose(result.log_likelihood, expected, rtol=1e-10)
    np.testing.assert_allclose(jnp.sum(result.log_likelihoods), expected, rtol=1e-10)
    np.testing.assert_allclose(LL(model, y, form=form), expected, rtol=1e-10)
    # per-step terms are log p(y[k] | y[:k]) = differences of prefix densities
    prefix = [dense_log_likelihood(p, y[: k + 1]) for k in range(len(y))]
    np.testing.assert_allclose(result.log_likelihoods, np.diff(prefix, prepend=0.0), atol=1e-10)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", ["time_varying", "missing_rows", "wide_m"])
def test_filtered_and_predicted_moments_equal_dense_conditionals(case, form):
    p, y = _case(seed=7, **CASES[case])
    result = KF(LinearGaussianSSM(**p), y, form=form)
    fm, fc = dense_filtered(p, y)
    pm, pc = dense_predicted(p, y)
    np.testing.assert_allclose(result.filtered_means, fm, atol=1e-10)
    np.testing.assert_allclose(result.filtered_covs, fc, atol=1e-10)
    np.testing.assert_allclose(result.predicted_means, pm, atol=1e-10)
    np.testing.assert_allclose(result.predicted_covs, pc, atol=1e-10)
    np.testing.assert_allclose(result.predicted_means[0], p["m0"], rtol=1e-14)
    np.testing.assert_allclose(result.predicted_covs[0], p["P0"], rtol=1e-14)
    np.testing.assert_array_equal(result.filtered_covs, np.swapaxes(result.filtered_covs, 1, 2))
    if form == "sqrt":
        L = result.filtered_chols
        np.testing.assert_allclose(L @ np.swapaxes(L, 1, 2), result.filtered_covs, atol=1e-12)
    else:
        assert result.filtered_chols is None


def test_cov_and_sqrt_forms_agree():
    p, y = _case(n=4, m=2, T=40, seed=11, missing=0.2, time_varying=("F", "Q"), offsets=True)
    model = LinearGaussianSSM(**p)
    a, b = KF(model, y, form="cov"), KF(model, y, form="sqrt")
    for name in ("log_likelihood", "log_likelihoods", "filtered_means", "filtered_covs",
                 "predicted_means", "predicted_covs"):
        x, z = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        np.testing.assert_allclose(x, z, rtol=1e-9, atol=1e-9 * np.max(np.abs(z)), err_msg=name)


@pytest.mark.parametrize("form", FORMS)
def test_all_missing_gives_prior(form):
    p, y = _case(T=4)
    y[:] = np.nan
    result = KF(LinearGaussianSSM(**p), y, form=form)
    assert float(result.log_likelihood) == 0.0
    mean, cov = dense_joint(p, 4)
    np.testing.assert_allclose(result.filtered_means.reshape(-1), mean[:12], atol=1e-12)


def test_vmap_over_series_with_different_gaps():
    p, _ = _case(T=6)
    model = LinearGaussianSSM(**p)
    ys = np.stack(
        [random_observations(np.random.default_rng(s), p, 6, missing=0.4) for s in range(3)]
    )
    batched = jax.vmap(lambda yy: LL(model, yy))(ys)
    direct = LL(model, ys)  # leading axes of y are batch axes
    expected = [dense_log_likelihood(p, yy) for yy in ys]
    np.testing.assert_allclose(batched, expected, rtol=1e-10)
    np.testing.assert_allclose(direct, expected, rtol=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_batched_model_broadcasts_against_y(form):
    p, y = _case(T=5, time_varying=("H",), offsets=True)
    scales = np.array([0.5, 1.0, 1.5])
    Fs = np.stack([s * p["F"] for s in scales])[:, None]  # (3, 1, n, n)
    m0s = np.stack([p["m0"] + s for s in scales])  # (3, n)
    Hs = np.stack([p["H"]] * 3)  # (3, T, m, n): batch then time
    model = LinearGaussianSSM(**{**p, "F": Fs, "m0": m0s, "H": Hs})
    ys = np.stack([y, y + 0.1])[:, None]  # (2, 1, T, m) broadcasts to (2, 3)
    result = KF(model, ys, form=form)
    assert result.log_likelihood.shape == (2, 3)
    assert result.filtered_covs.shape == (2, 3, 5, 3, 3)
    for i in range(2):
        for j, s in enumerate(scales):
            single = {**p, "F": s * p["F"], "m0": p["m0"] + s}
            expected = dense_log_likelihood(single, ys[i, 0])
            np.testing.assert_allclose(result.log_likelihood[i, j], expected, rtol=1e-10)


def test_y_shape_errors_and_parallel():
    p, y = _case(T=5, time_varying=("F",))
    model = LinearGaussianSSM(**p)
    with pytest.raises(ValueError, match=r"y.shape = \(5, 3\)"):
        kalman_filter(model, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="time steps"):
        kalman_filter(model, y[:4])
    with pytest.raises(ValueError, match="form"):
        kalman_filter(model, y, form="info")
    with pytest.raises(NotImplementedError, match="diffuse"):
        kalman_filter(model.replace(diffuse=True), y, parallel=True)
    with pytest.raises(ValueError, match="times"):
        kalman_filter(model, y, times=np.arange(5.0))


class _FakeContinuous:
    """Duck-typed continuous model: ``to_discrete`` returns a fixed discrete model."""

    def __init__(self, disc, ok):
        self.disc, self.ok = disc, ok
        self.seen_times = None

    def to_discrete(self, times):
        self.seen_times = times
        return self.disc, jnp.asarray(self.ok)


@pytest.mark.parametrize("ok", [True, False])
def test_continuous_models_are_converted(ok):
    p, y = _case(T=5, time_varying=("F", "Q"), offsets=True)
    fake = _FakeContinuous(LinearGaussianSSM(**p), ok)
    times = np.arange(5.0)
    result = kalman_filter(fake, y, times)
    assert fake.seen_times is times
    if ok:
        np.testing.assert_allclose(result.log_likelihood, dense_log_likelihood(p, y), rtol=1e-10)
    else:
        assert float(result.log_likelihood) == -np.inf
        assert np.all(np.asarray(result.log_likelihoods) == -np.inf)
        assert float(log_likelihood(fake, y, times)) == -np.inf
    with pytest.raises(ValueError, match="pass times"):
        kalman_filter(fake, y)
    disc, flag = _as_discrete(fake, times)
    assert disc is fake.disc and bool(flag) == ok
    with pytest.raises(TypeError):
        _as_discrete(object(), None)


# ------------------------------------------------------------------------------------------
# Robustness
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["F", "Q", "H", "R", "m0", "P0", "b", "d"])
def test_nan_parameter_gives_nan(name, form):
    p, y = _case(T=5, offsets=True)
    value = np.array(p[name], dtype=float)
    value.reshape(-1)[0] = np.nan
    p[name] = value
    ll = jax.jit(lambda mdl, yy: log_likelihood(mdl, yy, form=form))(LinearGaussianSSM(**p), y)
    assert np.isnan(float(ll))


@pytest.mark.parametrize("form", FORMS)
def test_non_positive_definite_innovation_gives_minus_inf(form):
    p, y = _case(T=5, seed=3)
    p["R"] = -10.0 * np.eye(2)  # S = H P H^T + R indefinite at the first step
    fn = jax.jit(lambda mdl, yy: kalman_filter(mdl, yy, form=form))
    result = fn(LinearGaussianSSM(**p), y)
    assert float(result.log_likelihood) == -np.inf
    assert np.all(np.asarray(result.log_likelihoods) == -np.inf)


@pytest.mark.parametrize("form", FORMS)
def test_failure_at_a_later_step_gives_minus_inf_from_there(form):
    p, y = _case(T=6, seed=5, time_varying=("R",))
    p["R"][3] = -50.0 * np.eye(2)
    result = jax.jit(lambda mdl: kalman_filter(mdl, y, form=form))(LinearGaussianSSM(**p))
    steps = np.asarray(result.log_likelihoods)
    assert np.all(np.isfinite(steps[:3])) and np.all(steps[3:] == -np.inf)
    prefix = dense_log_likelihood({**p, "R": p["R"][:3]}, y[:3])
    np.testing.assert_allclose(steps[:3].sum(), prefix, rtol=1e-10)


def test_indefinite_Q_in_sqrt_form_gives_minus_inf():
    p, y = _case(T=5, seed=6)
    p["Q"] = -np.eye(3)
    assert float(log_likelihood(LinearGaussianSSM(**p), y, form="sqrt")) == -np.inf


def test_singular_noise_covariances():
    """A state without noise (singular Q) and singular P0: both forms match the dense density."""
    p, y = _case(n=3, m=2, T=8, seed=8, missing=0.2)
    p["Q"] = np.diag([0.0, 0.3, 0.5])
    p["P0"] = np.diag([1.0, 0.0, 2.0])
    expected = dense_log_likelihood(p, y)
    for form in FORMS:
        ll = log_likelihood(LinearGaussianSSM(**p), y, form=form)
        np.testing.assert_allclose(ll, expected, rtol=1e-10)


def _ill_conditioned(dtype, T=60):
    rng = np.random.default_rng(3)
    th = 0.3
    F = 0.999 * np.array([[np.cos(th), -np.sin(th), 0, 0], [np.sin(th), np.cos(th), 0, 0],
                          [0, 0, 0.99, 0.1], [0, 0, 0, 0.95]])
    p = dict(F=F, Q=np.diag([1e-4, 1e-4, 1e-3, 1e-3]), H=rng.standard_normal((2, 4)),
             R=1e-8 * np.eye(2), m0=np.zeros(4), P0=1e6 * np.eye(4))
    model64 = LinearGaussianSSM(**p)
    _, y = model64.simulate(jax.random.key(0), T)
    model = LinearGaussianSSM(**{k: jnp.asarray(v, dtype) for k, v in p.items()})
    return model64, model, y


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_float32_ill_conditioned_sqrt_stays_accurate_cov_fails():
    """Tiny R and huge P0: in float32 the covariance form loses positive definiteness of the
    innovation covariance within a few steps (reported as -inf, as promised), while the
    square-root form stays finite and close to the dense float64 oracle."""
    model64, model32, y = _ill_conditioned(jnp.float32)
    params = {k: np.asarray(getattr(model64, k)) for k in ("F", "Q", "H", "R", "m0", "P0")}
    ref_ll = dense_log_likelihood(params, np.asarray(y))
    ref_means = dense_filtered(params, np.asarray(y))[0]
    y32 = jnp.asarray(y, jnp.float32)

    sqrt32 = kalman_filter(model32, y32, form="sqrt")
    assert sqrt32.log_likelihood.dtype == jnp.float32
    assert np.all(np.isfinite(sqrt32.filtered_covs)) and np.isfinite(sqrt32.log_likelihood)
    np.testing.assert_allclose(sqrt32.log_likelihood, ref_ll, rtol=5e-3)  # measured 7e-4
    scale = np.max(np.abs(ref_means))
    np.testing.assert_allclose(sqrt32.filtered_means, ref_means, atol=1e-3 * scale)

    cov32 = kalman_filter(model32, y32, form="cov")
    steps = np.asarray(cov32.log_likelihoods)
    assert float(cov32.log_likelihood) == -np.inf
    first_bad = int(np.argmax(~np.isfinite(steps)))
    assert 0 < first_bad < 10  # fails early, and every later step is flagged too
    assert np.all(steps[first_bad:] == -np.inf)
    # in float64 both forms are right (the conditioning is the float32 problem): 3.1e-6 from
    # the oracle, which is itself 4e-7 from a 40-digit evaluation of the same joint covariance
    for form in FORMS:
        np.testing.assert_allclose(kalman_filter(model64, y, form=form).log_likelihood, ref_ll,
                                   rtol=1e-5, err_msg=form)


# ------------------------------------------------------------------------------------------
# Derivatives
# ------------------------------------------------------------------------------------------
_GRAD_NAMES = ["F", "Q", "H", "R", "m0", "P0", "b", "d"]


@pytest.mark.parametrize("form", FORMS)
def test_check_grads_every_parameter(form):
    p, y = _case(n=2, m=2, T=5, seed=9, offsets=True, missing=0.2)
    params = {k: jnp.asarray(p[k]) for k in _GRAD_NAMES}

    def loglik(params):
        sym = {k: (v + v.T) / 2 if k in ("Q", "R", "P0") else v for k, v in params.items()}
        return log_likelihood(LinearGaussianSSM(**sym), y, form=form)

    check_grads(jax.jit(loglik), (params,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_covariance_gradients_are_symmetric(form):
    p, y = _case(n=3, m=2, T=5, seed=17, missing=0.2)
    grads = jax.jit(jax.grad(lambda mdl: LL(mdl, y, form=form)))(LinearGaussianSSM(**p))
    for name in ("Q", "R", "P0"):
        g = np.asarray(getattr(grads, name))
        np.testing.assert_allclose(g, g.T, rtol=1e-12, atol=1e-14, err_msg=name)
        assert np.max(np.abs(g)) > 0


def test_check_grads_time_varying():
    p, y = _case(n=2, m=1, T=4, seed=10, time_varying=True, offsets=True, missing=0.2)
    params = {k: jnp.asarray(p[k]) for k in ("F", "H", "b", "d", "m0")}

    def loglik(params):
        return log_likelihood(LinearGaussianSSM(**{**p, **params}), y)

    check_grads(jax.jit(loglik), (params,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_hessian(form):
    p, y = _case(n=2, m=1, T=5, seed=12, missing=0.2)
    theta = jnp.concatenate([jnp.asarray(p["F"]).ravel(), jnp.asarray(p["m0"])])

    def loglik(theta):
        mdl = LinearGaussianSSM(**{**p, "F": theta[:4].reshape(2, 2), "m0": theta[4:]})
        return log_likelihood(mdl, y, form=form)

    hess = jax.jit(jax.hessian(loglik))(theta)
    assert hess.shape == (6, 6)
    np.testing.assert_allclose(hess, hess.T, atol=1e-8)
    grad = jax.jit(jax.grad(loglik))
    eps = 1e-5
    fd = np.stack([(grad(theta.at[i].add(eps)) - grad(theta.at[i].add(-eps))) / (2 * eps)
                   for i in range(6)])
    np.testing.assert_allclose(hess, fd, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Exact diffuse initialisation
# ------------------------------------------------------------------------------------------
def _dense_diffuse_log_likelihood(p, y, mask):
    """log int N(y; mu + Z delta, Sigma) d delta (= the kappa -> inf limit of
    log N(y; mu, Sigma + kappa Z Z^T) + q/2 log(2 pi kappa)), densely: -(N - q)/2 log 2 pi
    - 1/2 log|Sigma| - 1/2 log|Z^T Sigma^-1 Z| - 1/2 (r^T Sigma^-1 r - s^T S^-1 s)."""
    T, n = y.shape[0], p["F"].shape[-1]
    keep = (~mask).astype(float)
    base = {**p, "P0": p["P0"] * np.outer(keep, keep)}
    mean, cov = dense_joint(base, T)
    obs = T * n + np.flatnonzero(~np.isnan(y).reshape(-1))
    Z = []
    for i in np.flatnonzero(mask):
        shifted = dict(base, m0=base["m0"] + np.eye(n)[i])
        Z.append(dense_joint(shifted, T)[0][obs] - mean[obs])
    Z = np.stack(Z, axis=1)
    Sigma = cov[np.ix_(obs, obs)]
    r = y.reshape(-1)[obs - T * n] - mean[obs]
    Si_r, Si_Z = np.linalg.solve(Sigma, r), np.linalg.solve(Sigma, Z)
    S, s = Z.T @ Si_Z, Z.T @ Si_r
    return -0.5 * ((obs.size - Z.shape[1]) * np.log(2 * np.pi) + np.linalg.slogdet(Sigma)[1]
                   + np.linalg.slogdet(S)[1] + r @ Si_r - s @ np.linalg.solve(S, s))


DIFFUSE_MASKS = {"one": [True, False, False], "two": [True, False, True], "all": [True] * 3}


@pytest.mark.parametrize(
    "which, form", [(w, "cov") for w in DIFFUSE_MASKS] + [("two", "sqrt"), ("all", "sqrt")]
)
def test_diffuse_log_likelihood_exact(which, form):
    mask = np.array(DIFFUSE_MASKS[which])
    p, y = _case(n=3, m=2, T=7, seed=13, offsets=True, missing=0.2, time_varying=("H",))
    model = LinearGaussianSSM(**p, diffuse=mask)
    result = KF(model, y, form=form)
    expected = _dense_diffuse_log_likelihood(p, y, mask)
    np.testing.assert_allclose(result.log_likelihood, expected, rtol=1e-10)
    np.testing.assert_allclose(jnp.sum(result.log_likelihoods), expected, rtol=1e-10)
    np.testing.assert_allclose(LL(model, y, form=form), expected, rtol=1e-10)


def test_diffuse_is_the_large_kappa_limit():
    """Independent of the closed form: log L(kappa) + q/2 log(2 pi kappa) -> log L_d like 1/kappa,
    so Richardson extrapolation of two large kappas matches to high accuracy, and the filtered
    moments (once the diffuse states are identified) are the large-kappa ones."""
    mask = np.array([True, False, True])
    p, y = _case(n=3, m=2, T=7, seed=14, offsets=True, missing=0.1)
    keep = (~mask).astype(float)
    ours = kalman_filter(LinearGaussianSSM(**p, diffuse=mask), y)

    def at(kappa):
        P0 = p["P0"] * np.outer(keep, keep) + kappa * np.diag(mask.astype(float))
        return dense_log_likelihood({**p, "P0": P0}, y) + mask.sum() / 2 * np.log(2 * np.pi * kappa), P0

    (l1, _), (l2, P0_big) = at(1e5), at(2e5)
    np.testing.assert_allclose(ours.log_likelihood, 2 * l2 - l1, rtol=1e-8)
    fm, fc = dense_filtered({**p, "P0": P0_big}, y)
    np.testing.assert_allclose(ours.filtered_means[2:], fm[2:], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ours.filtered_covs[2:], fc[2:], rtol=1e-3, atol=1e-4)


def test_diffuse_local_level_is_likelihood_after_first_observation():
    """Local level with a diffuse start: log L_d = log p(y[1:] | y[0]) (the first observation
    integrates to int N(y[0]; delta, R) d delta = 1)."""
    rng = np.random.default_rng(15)
    p = dict(F=np.eye(1), Q=np.array([[0.3]]), H=np.eye(1), R=np.array([[0.5]]),
             m0=np.zeros(1), P0=np.zeros((1, 1)))
    y = np.cumsum(rng.standard_normal((9, 1)), axis=0)
    y[4] = np.nan
    ours = log_likelihood(LinearGaussianSSM(**p, diffuse=True), y)
    # x[1] | y[0] ~ N(y[0], R + Q); filter y[1:] from there.
    rest = {**p, "m0": y[0], "P0": p["R"] + p["Q"]}
    expected = dense_log_likelihood(rest, y[1:])
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_diffuse_gradients():
    mask = np.array([True, False])
    p, y = _case(n=2, m=2, T=6, seed=16, offsets=True, missing=0.1)
    params = {k: jnp.asarray(p[k]) for k in ("F", "H", "R", "b", "d")}

    def loglik(params):
        R = (params["R"] + params["R"].T) / 2
        return log_likelihood(LinearGaussianSSM(**{**p, **params, "R": R}, diffuse=mask), y)

    # eps=1e-5: the default 1e-4 leaves a central-difference error of ~1e-5 relative here
    check_grads(jax.jit(loglik), (params,), order=1, modes=("rev",), eps=1e-5, atol=1e-6,
                rtol=1e-6)
