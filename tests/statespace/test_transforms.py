"""Tests of ``statespace.transforms``: round trips, constraints, Jacobians, batching."""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
import scipy.linalg

from statespace import transforms as T


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("kind", ["softplus", "exp"])
@pytest.mark.parametrize("lower", [0.0, 0.5])
def test_positive_round_trip_and_range(kind, lower):
    t = T.Positive(kind, lower=lower)
    u = jnp.array([-20.0, -3.0, 0.0, 2.5, 30.0])
    x = t.forward(u)
    assert np.all(np.asarray(x) > lower)
    # with a shift, x = lower + tiny loses the digits of tiny: a property of floating point
    rtol = 1e-10 if lower == 0 else 1e-6
    np.testing.assert_allclose(t.inverse(x), u, rtol=rtol, atol=1e-10)
    x_back = jnp.array([1e-6, 0.1, 1.0, 700.0]) + lower
    np.testing.assert_allclose(t.forward(t.inverse(x_back)), x_back, rtol=1e-12)
    # closed-form Jacobian vs autodiff
    grads = jax.vmap(jax.grad(t.forward))(u)
    np.testing.assert_allclose(t.log_abs_det_jacobian(u), np.log(grads), rtol=1e-10, atol=1e-12)


def test_softplus_inverse_no_overflow_or_underflow():
    x = jnp.array([1e-300, 1e-12, 1.0, 1e3, 1e300])
    u = T.softplus_inverse(x)
    assert np.all(np.isfinite(u))
    np.testing.assert_allclose(jax.nn.softplus(u), x, rtol=1e-12)
    assert np.isnan(T.softplus_inverse(-1.0))


def test_interval_round_trip_and_jacobian():
    t = T.Interval(-2.0, 3.0)
    u = jnp.linspace(-8.0, 8.0, 9)
    x = t(u)
    assert np.all((np.asarray(x) > -2.0) & (np.asarray(x) < 3.0))
    np.testing.assert_allclose(t.inverse(x), u, rtol=1e-9, atol=1e-9)
    grads = jax.vmap(jax.grad(t.forward))(u)
    np.testing.assert_allclose(t.log_abs_det_jacobian(u), np.log(grads), rtol=1e-10)
    with pytest.raises(ValueError):
        T.Interval(1.0, 1.0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_cholesky_covariance_round_trip_and_spd(n):
    t = T.CholeskyCovariance(n)
    u = _normal(n, (7, n * (n + 1) // 2))
    S = t(u)
    assert S.shape == (7, n, n)
    np.testing.assert_allclose(S, np.swapaxes(S, -1, -2), atol=0)
    assert np.all(np.linalg.eigvalsh(np.asarray(S)) > 0)
    np.testing.assert_allclose(t.inverse(S), u, rtol=1e-9, atol=1e-10)
    # inverse of an arbitrary SPD matrix then forward gives it back
    rng = np.random.default_rng(n)
    M = rng.standard_normal((n, n))
    spd = M @ M.T + 0.1 * np.eye(n)
    np.testing.assert_allclose(t(t.inverse(spd)), spd, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(t.cholesky(t.inverse(spd)), np.linalg.cholesky(spd), rtol=1e-10,
                               atol=1e-12)


def test_cholesky_covariance_log_det_jacobian_matches_formula():
    # d vech(L L^T) / d vech(L) has |det| = 2^n prod_i L_ii^(n - i + 1) (0-based: n - i),
    # and the log-diagonal adds prod_i L_ii: log|J| = n log 2 + sum_i (n - i + 1) log L_ii
    n = 3
    t = T.CholeskyCovariance(n)
    u = _normal(0, (n * (n + 1) // 2,))
    L = np.asarray(t.cholesky(u))
    expected = n * np.log(2.0) + sum((n - i + 1) * np.log(L[i, i]) for i in range(n))
    np.testing.assert_allclose(t.log_abs_det_jacobian(u), expected, rtol=1e-10)


@pytest.mark.parametrize("n, eps", [(1, 0.0), (2, 0.0), (3, 0.05), (5, 0.2)])
def test_stable_matrix_is_stable_and_round_trips(n, eps):
    t = T.StableMatrix(n, eps=eps)
    u = _normal(10 + n, (50, n * n))
    A = np.asarray(t(u))
    assert A.shape == (50, n, n)
    real_parts = np.linalg.eigvals(A).real
    assert np.all(real_parts <= -eps + 1e-12)
    assert np.all(real_parts < 0)
    # negative-definite symmetric part => contraction: ||expm(A t)||_2 <= exp(-eps t)
    for a in A[:5]:
        for tt in (0.3, 2.0):
            assert np.linalg.norm(scipy.linalg.expm(a * tt), 2) <= np.exp(-eps * tt) + 1e-10
    np.testing.assert_allclose(t.inverse(A), u, rtol=1e-8, atol=1e-9)


def test_stable_matrix_inverse_of_a_dissipative_matrix_and_nan_outside():
    t = T.StableMatrix(2)
    A = np.array([[-1.0, 0.7], [-0.3, -0.5]])  # symmetric part negative definite
    np.testing.assert_allclose(t(t.inverse(A)), A, rtol=1e-12, atol=1e-14)
    non_normal = np.array([[-1.0, 10.0], [0.0, -1.0]])  # stable but indefinite symmetric part
    assert np.all(np.isnan(np.asarray(t.inverse(non_normal))))


def test_stable_matrix_gradients_finite_and_jittable():
    t = T.StableMatrix(3, eps=0.1)
    u = _normal(3, (9,))

    def f(u):
        return jnp.sum(jnp.sin(jax.jit(t.forward)(u)))

    g = jax.grad(f)(u)
    assert np.all(np.isfinite(np.asarray(g)))
    check_grads(t.forward, (u,), order=2, modes=("fwd", "rev"))
    ladj = t.log_abs_det_jacobian(u)
    # Closed form: A = -(L Lᵀ + eps I) + (S - Sᵀ). The pairs (A_ij, A_ji), i > j, are
    # sym ± skew (|det| 2 each, n(n-1)/2 pairs); the skew part is S itself; L ↦ L Lᵀ has
    # |det| = 2ⁿ ∏ L_ii^(n-i+1) (Muirhead 1982, Thm 2.1.9, i = 1..n); L_ii = exp(u_ii) adds ∏ L_ii.
    n = 3
    log_diag = np.asarray(u)[[0, 2, 5]]  # L filled row by row: its diagonal is u[0], u[2], u[5]
    closed = n * (n + 1) / 2 * np.log(2.0) + np.sum((n - np.arange(1, n + 1) + 2) * log_diag)
    np.testing.assert_allclose(ladj, closed, rtol=1e-12)
    # and the dense Jacobian of the flattened map
    jac = jax.jacfwd(lambda v: t.forward(v).reshape(-1))(u)
    np.testing.assert_allclose(ladj, np.linalg.slogdet(np.asarray(jac))[1], rtol=1e-12)
    # batched input: one value per row
    us = np.stack([u, 0.5 * u])
    np.testing.assert_allclose(t.log_abs_det_jacobian(us)[0], ladj, rtol=1e-12)


def test_constrain_unconstrain_pytree():
    spec = {"sigma": T.Positive(), "cov": T.CholeskyCovariance(2), "drift": T.StableMatrix(2),
            "free": T.Identity()}
    u = {"sigma": jnp.array(0.3), "cov": jnp.array([0.1, -0.4, 0.2]),
         "drift": jnp.array([0.0, 0.5, -0.2, 1.0]), "free": jnp.arange(3.0)}
    p = T.constrain(spec, u)
    assert p["cov"].shape == (2, 2) and p["drift"].shape == (2, 2)
    back = T.unconstrain(spec, p)
    for k in u:
        np.testing.assert_allclose(back[k], u[k], rtol=1e-10, atol=1e-12)


def test_fill_tril_shapes_and_errors():
    v = jnp.arange(6.0)
    L = T.fill_tril(v, 3)
    np.testing.assert_array_equal(L, [[0, 0, 0], [1, 2, 0], [3, 4, 5]])
    np.testing.assert_array_equal(T.tril_to_vec(L), v)
    with pytest.raises(ValueError, match="n\\(n\\+1\\)/2"):
        T.fill_tril(jnp.arange(5.0), 3)
    with pytest.raises(ValueError, match="n²"):
        T.StableMatrix(2)(jnp.zeros(3))
    with pytest.raises(ValueError):
        T.Positive("cube")
    with pytest.raises(ValueError):
        T.StableMatrix(2, eps=-1.0)


def test_float32_stays_float32():
    u = jnp.zeros(4, dtype=jnp.float32)
    assert T.StableMatrix(2)(u).dtype == jnp.float32
    assert T.Positive()(u).dtype == jnp.float32
