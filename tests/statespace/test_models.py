"""Model builders: state-space covariances and log-likelihoods equal the closed-form kernels'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads

import statespace
from statespace import models
from tests.statespace.continuous_oracle import dense_gp_log_likelihood, discretized_model, stationary_cov
from tests.statespace.dense_oracle import dense_diffuse_log_likelihood


def _sho_kernel(w, q, S):
    def k(tau):
        tau = np.abs(tau)
        if q > 0.5:
            eta = np.sqrt(1 - 1 / (4 * q**2))
            return S * np.exp(-w * tau / (2 * q)) * (np.cos(eta * w * tau) + np.sin(eta * w * tau) / (2 * eta * q))
        if q == 0.5:
            return S * np.exp(-w * tau) * (1 + w * tau)
        eta = np.sqrt(1 / (4 * q**2) - 1)
        return S * np.exp(-w * tau / (2 * q)) * (np.cosh(eta * w * tau) + np.sinh(eta * w * tau) / (2 * eta * q))

    return k


def _carma_kernel(alpha, beta, sigma):
    """Kelly et al. (2014), eq. 4: R(τ) = σ² Σ_k β(r_k) β(−r_k) e^{r_k τ} / (−2 Re r_k Π_{l≠k} (r_l − r_k)(r_l* + r_k))."""
    roots = np.roots(np.concatenate([[1.0], alpha]))
    bpoly = lambda s: sum(b * s**j for j, b in enumerate(beta))  # noqa: E731

    def k(tau):
        tau = np.abs(tau)
        total = 0.0
        for i, r in enumerate(roots):
            den = -2 * r.real
            for l, rl in enumerate(roots):
                if l != i:
                    den = den * (rl - r) * (np.conj(rl) + r)
            total = total + bpoly(r) * bpoly(-r) * np.exp(r * tau) / den
        return sigma**2 * np.real(total)

    return k


def _mat(ell, var, nu):
    def k(tau):
        r = np.abs(tau) / ell
        if nu == 0.5:
            return var * np.exp(-r)
        if nu == 1.5:
            return var * (1 + np.sqrt(3) * r) * np.exp(-np.sqrt(3) * r)
        return var * (1 + np.sqrt(5) * r + 5 * r**2 / 3) * np.exp(-np.sqrt(5) * r)

    return k


def _qp_kernel(period, decay, variances):
    def k(tau):
        tau = np.abs(tau)
        out = 0.0
        for j, v in enumerate(variances):
            nu = 2 * np.pi * (j + 1) / period
            w = np.sqrt(nu**2 + 1 / decay**2)
            out = out + _sho_kernel(w, w * decay / 2, v)(tau)
        return out

    return k


CASES = {
    "matern12": (lambda nv: models.matern12(0.7, 1.3, noise_var=nv), _mat(0.7, 1.3, 0.5)),
    "matern32": (lambda nv: models.matern32(0.7, 1.3, noise_var=nv), _mat(0.7, 1.3, 1.5)),
    "matern52": (lambda nv: models.matern52(0.7, 1.3, noise_var=nv), _mat(0.7, 1.3, 2.5)),
    "sho_underdamped": (lambda nv: models.sho(3.0, 4.0, 0.9, noise_var=nv), _sho_kernel(3.0, 4.0, 0.9)),
    "sho_critical": (lambda nv: models.sho(2.0, 0.5, 0.9, noise_var=nv), _sho_kernel(2.0, 0.5, 0.9)),
    "sho_overdamped": (lambda nv: models.sho(2.0, 0.3, 0.9, noise_var=nv), _sho_kernel(2.0, 0.3, 0.9)),
    "carma21": (lambda nv: models.carma(jnp.array([1.2, 2.5]), jnp.array([1.0, 0.4]), 0.8, noise_var=nv),
                _carma_kernel(np.array([1.2, 2.5]), np.array([1.0, 0.4]), 0.8)),
    "carma31": (lambda nv: models.carma(jnp.array([2.0, 3.0, 1.5]), jnp.array([1.0, 0.5]), 1.1, noise_var=nv),
                _carma_kernel(np.array([2.0, 3.0, 1.5]), np.array([1.0, 0.5]), 1.1)),
    "quasi_periodic": (lambda nv: models.quasi_periodic(1.0, 5.0, jnp.array([1.0, 0.3]), noise_var=nv),
                       _qp_kernel(1.0, 5.0, [1.0, 0.3])),
    "sum": (lambda nv: models.sum_of(models.matern32(0.7, 1.3), models.sho(3.0, 4.0, 0.9), noise_var=nv),
            lambda t: _mat(0.7, 1.3, 1.5)(t) + _sho_kernel(3.0, 4.0, 0.9)(t)),
    "product": (lambda nv: models.product_of(models.matern32(2.0, 1.3), models.sho(3.0, 4.0, 0.9), noise_var=nv),
                lambda t: _mat(2.0, 1.3, 1.5)(t) * _sho_kernel(3.0, 4.0, 0.9)(t)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_from_state_space(name):
    build, kern = CASES[name]
    model = build(0.0)
    A, Q, H = (np.asarray(v) for v in (model.A, model.Q, model.H))
    P = stationary_cov(A, Q)
    taus = np.array([0.0, 0.03, 0.4, 1.1, 3.7])
    ss = [(H @ scipy.linalg.expm(A * tau) @ P @ H.T).item() for tau in taus]
    np.testing.assert_allclose(ss, kern(taus), rtol=1e-9, atol=1e-12)
    # our P∞ (rules.lyap) and our discretisation agree with SciPy
    _, P0, ok = model.initial()
    assert bool(ok)
    np.testing.assert_allclose(P0, P, rtol=1e-9, atol=1e-12)
    F = statespace.discretize(model, taus).F
    ours = np.einsum("ij,tjk,kl,li->t", H, np.asarray(F), np.asarray(P0), H.T)
    np.testing.assert_allclose(ours, kern(taus), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_log_likelihood_matches_dense_gp(name):
    build, kern = CASES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    T = 20
    times = np.sort(rng.uniform(0.0, 6.0, T))
    times[4] = times[3]
    y = rng.normal(size=(T, 1))
    y[7] = np.nan
    noise = 0.07
    K = kern(times[:, None] - times[None]) + noise * np.eye(T)
    ref = dense_gp_log_likelihood(K, y[:, 0])
    ll = statespace.log_likelihood(build(noise), y, times)
    np.testing.assert_allclose(ll, ref, rtol=1e-9)


def test_ou_builder():
    A = np.array([[-1.0, 0.3], [0.1, -0.6]])
    Q = np.array([[0.5, 0.1], [0.1, 0.3]])
    full = models.ou(A, Q, noise_var=0.2)
    assert full.H.shape == (2, 2) and full.R.shape == (2, 2)
    np.testing.assert_allclose(full.R, 0.2 * np.eye(2))
    one = models.ou(A, Q, H=np.array([[1.0, -1.0]]), noise_var=0.2)
    assert one.obs_dim == 1 and one.R.shape == (1, 1)
    with pytest.raises(ValueError, match=r"drift.shape = \(2, 3\)"):
        models.ou(np.ones((2, 3)), Q)


def _brownian_cov(times, t0, P0, sigma2):
    u = times - t0
    return P0 + sigma2 * np.minimum(u[:, None], u[None])


def test_local_level_and_trend_with_given_prior_match_closed_form():
    rng = np.random.default_rng(3)
    T = 15
    times = np.sort(rng.uniform(0.0, 10.0, T))
    y = np.cumsum(rng.normal(size=(T, 1)), axis=0)
    noise = 0.3
    ll = statespace.log_likelihood(models.local_level(0.5, noise, m0=jnp.zeros(1), P0=jnp.eye(1) * 2.0), y, times)
    K = _brownian_cov(times, times[0], 2.0, 0.25) + noise * np.eye(T)
    np.testing.assert_allclose(ll, dense_gp_log_likelihood(K, y[:, 0]), rtol=1e-10)

    sl, ss, pl, ps = 0.4, 0.2, 1.5, 0.7
    u = times - times[0]
    lo, hi = np.minimum(u[:, None], u[None]), np.maximum(u[:, None], u[None])
    K = pl + ps * u[:, None] * u[None] + sl**2 * lo + ss**2 * (lo**2 * hi / 2 - lo**3 / 6) + noise * np.eye(T)
    model = models.local_linear_trend(sl, ss, noise, m0=jnp.zeros(2), P0=jnp.diag(jnp.array([pl, ps])))
    np.testing.assert_allclose(statespace.log_likelihood(model, y, times), dense_gp_log_likelihood(K, y[:, 0]), rtol=1e-10)


def test_diffuse_builders_and_sum_with_trend():
    assert models.local_level(0.3).diffuse == (True,)
    trend = models.local_linear_trend(0.1, 0.05)
    assert trend.diffuse == (True, True)
    combo = models.sum_of(trend, models.matern32(1.0, 1.0), noise_var=0.1)
    assert combo.diffuse == (True, True, False, False)
    m0, P0, ok = combo.initial()
    assert bool(ok)
    np.testing.assert_allclose(P0[2:, 2:], stationary_cov(np.asarray(combo.A[2:, 2:]), np.asarray(combo.Q[2:, 2:])), rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(P0[:2], 0.0)
    rng = np.random.default_rng(4)
    times = np.sort(rng.uniform(0, 10, 25))
    y = (0.3 * times + np.sin(times))[:, None] + 0.1 * rng.normal(size=(25, 1))
    ll = statespace.log_likelihood(combo, y, times)
    # the dense oracle's log ∫ p(y | δ) dδ: flat prior on the 2 trend states, the Matérn block
    # stationary (SciPy's Lyapunov solution), SciPy's discretisation
    A, Q = np.asarray(combo.A), np.asarray(combo.Q)
    P0 = np.zeros((4, 4))
    P0[2:, 2:] = stationary_cov(A[2:, 2:], Q[2:, 2:])
    dk = dense_diffuse_log_likelihood(discretized_model(A, Q, combo.H, combo.R, times, np.zeros(4), P0),
                                      y, diffuse=[True, True, False, False])
    # The package follows Durbin & Koopman: its value is log ∫ p(y | δ) dδ itself.
    np.testing.assert_allclose(ll, dk, rtol=1e-10)


def test_builder_errors():
    with pytest.raises(ValueError, match="q < p"):
        models.carma(jnp.array([1.0]), jnp.array([1.0, 0.5]), 1.0)
    with pytest.raises(ValueError, match="lengthscale must be a scalar"):
        models.matern32(jnp.ones(2), 1.0)
    with pytest.raises(ValueError, match="observes m"):
        models.sum_of(models.matern32(1.0, 1.0), models.ou(-jnp.eye(2), jnp.eye(2)))
    with pytest.raises(ValueError, match="stationary"):
        models.product_of(models.local_level(1.0), models.matern12(1.0, 1.0))


def test_invalid_hyperparameter_gives_minus_inf():
    y = jnp.ones((4, 1))
    times = jnp.arange(4.0)
    ll = jax.jit(lambda ell: statespace.log_likelihood(models.matern32(ell, 1.0, 0.1), y, times))(-1.0)
    assert ll == -jnp.inf


def _hyperparameter_log_likelihood():
    rng = np.random.default_rng(5)
    T = 12
    times = jnp.asarray(np.sort(rng.uniform(0, 5, T)))
    y = jnp.asarray(rng.normal(size=(T, 1)))

    @jax.jit
    def ll(p):
        model = models.sum_of(models.sho(p[0], p[1], p[2]),
                              models.carma(p[3:5], jnp.array([1.0, 0.3]), p[5]), noise_var=p[6])
        return statespace.log_likelihood(model, y, times)

    return ll, jnp.array([2.0, 3.0, 0.8, 1.5, 2.0, 0.7, 0.1])


def test_hyperparameter_gradients():
    ll, p = _hyperparameter_log_likelihood()
    check_grads(ll, (p,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# Slow: compiling forward-over-reverse of the whole likelihood takes ~30 s. The default run
# keeps second order of its parts: the discretisation's products and rules (test_smallmm.py,
# the rules' order-2 check_grads) and test_adjoint.py::test_second_order_and_forward_mode (the
# filter's Hessian); the discretisation's own HVP is test_discretize_second_order (slow too).
@pytest.mark.slow
@pytest.mark.timeout(600)  # forward-over-reverse of a whole likelihood: the longest compile
def test_hyperparameter_hessian():
    ll, p = _hyperparameter_log_likelihood()
    hess = jax.jit(jax.jacfwd(jax.grad(ll)))(p)
    assert np.all(np.isfinite(hess))
    np.testing.assert_allclose(hess, hess.T, rtol=1e-7, atol=1e-8)
    eps = 1e-5
    e0 = jnp.zeros(7).at[0].set(1.0)
    g = jax.jit(jax.grad(ll))
    np.testing.assert_allclose(hess[0], (g(p + eps * e0) - g(p - eps * e0)) / (2 * eps), rtol=1e-5, atol=1e-6)


def test_product_of_is_the_kronecker_model_and_differentiates():
    """P∞ of the product is P_a ⊗ P_b (so its kernel is k_a k_b; the likelihood is checked in
    test_log_likelihood_matches_dense_gp), and hyperparameter gradients pass through rules.kron
    and rules.kron_sum."""
    a, b = models.matern32(2.0, 1.3), models.sho(3.0, 4.0, 0.9)
    prod = models.product_of(a, b, noise_var=0.1)
    Pa, Pb = (np.asarray(c.initial()[1]) for c in (a, b))
    np.testing.assert_allclose(prod.initial()[1], np.kron(Pa, Pb), rtol=1e-9, atol=1e-12)

    def summary(p):  # every matrix of the product model, weighted
        m = models.product_of(models.matern32(p[0], 1.3), models.sho(p[1], 4.0, 0.9), noise_var=0.1)
        w = jnp.arange(1.0, 17.0).reshape(4, 4)
        return jnp.sum(w * m.A) + jnp.sum(w * m.Q) + jnp.sum(w[0] * m.H[0])

    p = jnp.array([2.0, 3.0])
    g = jax.grad(summary)(p)
    eps = 1e-6
    fd = [(summary(p.at[i].add(eps)) - summary(p.at[i].add(-eps))) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-9)
