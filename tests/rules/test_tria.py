"""rules.tria: square-root triangularisation and its Murray-formula derivative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rules import tria


def _mT(x):
    return np.swapaxes(x, -1, -2)


def _qr_reference(M):
    """Triangularisation written with jnp.linalg.qr and plain autodiff (the peer)."""
    L = jnp.swapaxes(jnp.linalg.qr(jnp.swapaxes(M, -1, -2), mode="r"), -1, -2)
    s = jnp.sign(jnp.diagonal(L, axis1=-2, axis2=-1))
    return L * jnp.where(s == 0, 1.0, s)[..., None, :]


def _assert_factor(L, M, atol=1e-13):
    L = np.asarray(L)
    assert np.all(np.triu(L, 1) == 0)
    assert np.all(np.diagonal(L, axis1=-2, axis2=-1) >= 0)
    np.testing.assert_allclose(L @ _mT(L), M @ _mT(M), atol=atol)


def _central_difference_grad(f, M, h=1e-6):
    f = jax.jit(f)
    g = np.zeros_like(M)
    for idx in np.ndindex(M.shape):
        E = np.zeros_like(M)
        E[idx] = h
        g[idx] = (f(M + E) - f(M - E)) / (2 * h)
    return g


def _logdet_objective(M, eps=1e-2):
    L = tria(M)
    return jnp.linalg.slogdet(L @ L.T + eps * jnp.eye(L.shape[0]))[1]


def test_values_batched_and_match_qr():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(2, 3, 4, 7))
    L = tria(M)
    assert L.shape == (2, 3, 4, 4)
    _assert_factor(L, M)
    np.testing.assert_allclose(L, _qr_reference(M), atol=1e-13)
    # Cholesky of M Mᵀ is the same factor (unique for full rank).
    np.testing.assert_allclose(L, np.linalg.cholesky(M @ _mT(M)), atol=1e-12)


def test_check_grads_order2_both_modes_batched():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(2, 3, 5))
    check_grads(jax.jit(tria), (M,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("zero_columns", [0, 3], ids=["full", "zero columns"])
def test_derivatives_match_qr_autodiff(zero_columns):
    rng = np.random.default_rng(2)
    M = np.concatenate([rng.normal(size=(2, 3, 4)), np.zeros((2, 3, zero_columns))], axis=-1)
    T, G = rng.normal(size=M.shape), rng.normal(size=(2, 3, 3))
    def jvp_vjp(fn):
        return jax.jit(lambda M, T, G: (jax.jvp(fn, (M,), (T,))[1], jax.vjp(fn, M)[1](G)[0]))

    for got, want in zip(jvp_vjp(tria)(M, T, G), jvp_vjp(_qr_reference)(M, T, G)):
        np.testing.assert_allclose(got, want, atol=1e-12)
    f = lambda M: jnp.sum(jnp.sin(tria(M)))  # noqa: E731
    g = lambda M: jnp.sum(jnp.sin(_qr_reference(M)))  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(jax.hessian(f))(M[0]), jax.jit(jax.hessian(g))(M[0]), atol=1e-10
    )


def test_murray_formula_independently():
    """L̇ = L Φ(L⁻¹ (Ṁ Mᵀ + M Ṁᵀ) L⁻ᵀ), Φ = lower triangle with halved diagonal."""
    rng = np.random.default_rng(3)
    M, T = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    L = np.asarray(tria(M))
    Li = np.linalg.inv(L)
    Z = Li @ (T @ M.T + M @ T.T) @ Li.T
    want = L @ (np.tril(Z) - 0.5 * np.diag(np.diag(Z)))
    np.testing.assert_allclose(jax.jvp(tria, (M,), (T,))[1], want, atol=1e-12)


RANK_DEFICIENT = {
    # trailing: dependent or zero rows last
    "zero last rows": lambda rng: np.vstack([rng.normal(size=(2, 5)), np.zeros((2, 5))]),
    "dependent last row": lambda rng: (lambda A: np.vstack([A, A[0] + 2 * A[1]]))(rng.normal(size=(3, 5))),
    "zero noise block": lambda rng: np.hstack(
        [np.vstack([rng.normal(size=(2, 3)), np.zeros((2, 3))]), np.zeros((4, 2))]
    ),
    # interior: a dependent row above independent ones
    "interior zero row": lambda rng: np.vstack(
        [rng.normal(size=(1, 5)), np.zeros((1, 5)), rng.normal(size=(2, 5))]
    ),
    "kalman update, zero prior variance": lambda rng: (
        lambda H, Ps: np.block([[H @ Ps, 0.5 * np.ones((1, 1))], [Ps, np.zeros((3, 1))]])
    )(rng.normal(size=(1, 3)), np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.0, 2.0]])),
}


@pytest.mark.parametrize("name", RANK_DEFICIENT.keys())
def test_rank_deficient_finite_and_matches_finite_differences(name):
    rng = np.random.default_rng(4)
    M = RANK_DEFICIENT[name](rng)
    L = np.asarray(tria(M))
    _assert_factor(L, M)
    zero = np.diag(L) <= 1e-12
    assert zero.any()
    assert np.all(L[:, zero] == 0)  # canonical: zero pivot ⇒ zero column
    g = jax.grad(_logdet_objective)(M)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, _central_difference_grad(_logdet_objective, M), atol=1e-6)
    # A solve against the invertible leading block of L (the innovation factor in a filter).
    r = int(np.argmax(zero)) if zero.any() else L.shape[0]
    b = rng.normal(size=r)

    def solve_objective(M):
        Lr = tria(M)[:r, :r]
        return jnp.sum(jax.scipy.linalg.solve_triangular(Lr, b, lower=True) ** 2)

    g = jax.grad(solve_objective)(M)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, _central_difference_grad(solve_objective, M), atol=1e-6)


@pytest.mark.parametrize("name", ["interior zero row", "kalman update, zero prior variance",
                                  "interior dependent row"])
def test_interior_deficiency_exact_along_rank_preserving_directions(name):
    """Where a dependent row precedes independent ones, L is differentiable only along
    perturbations that keep the row dependent; there L̇ equals finite differences of L."""
    rng = np.random.default_rng(5)
    if name == "interior dependent row":
        A = rng.normal(size=(3, 5))
        M = np.vstack([A[:2], A[0] - A[1], A[2]])
        D = rng.normal(size=M.shape)
        D[2] = D[0] - D[1]
    else:
        M = RANK_DEFICIENT[name](rng)
        D = rng.normal(size=M.shape)
        D[np.all(M == 0, axis=1)] = 0.0
    h = 1e-6
    fd = (tria(M + h * D) - tria(M - h * D)) / (2 * h)
    _, tangent = jax.jvp(tria, (M,), (D,))
    assert np.all(np.isfinite(tangent))
    np.testing.assert_allclose(tangent, fd, atol=1e-7)
    # and the derivative is finite in every direction, reverse mode included
    assert np.all(np.isfinite(jax.grad(lambda M: jnp.sum(tria(M) ** 3))(M)))


def test_qr_autodiff_is_not_finite_where_tria_is():
    M = RANK_DEFICIENT["kalman update, zero prior variance"](np.random.default_rng(4))
    f = lambda tri: lambda M: jnp.sum(jnp.sin(tri(M)))  # noqa: E731
    assert np.all(np.isfinite(jax.grad(f(tria))(M)))
    assert not np.all(np.isfinite(jax.grad(f(_qr_reference))(M)))


def test_zero_matrix_and_wide_padding():
    L = tria(np.zeros((3, 4)))
    assert np.all(L == 0)
    assert np.all(jax.grad(lambda M: jnp.sum(tria(M)))(np.zeros((3, 4))) == 0)
    rng = np.random.default_rng(6)
    M = rng.normal(size=(4, 2))  # k < n: treated as padded with zero columns
    _assert_factor(tria(M), M)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_input_is_nan(bad):
    """inf once made every tolerance infinite, so tria([[1, 0], [0, inf]]) was all zeros."""
    M = np.array([[[1.0, 0.0], [0.0, bad]], [[2.0, 1.0], [0.5, 3.0]]])
    L = np.asarray(tria(M))
    assert np.all(np.isnan(L[0]))
    np.testing.assert_allclose(L[1], np.linalg.cholesky(M[1] @ M[1].T), rtol=1e-14)
    _, tangent = jax.jvp(tria, (M[0],), (np.ones((2, 2)),))
    assert np.all(np.isnan(tangent))


def test_rank_tolerance_is_per_row():
    """A row 1e15 times smaller than another is a valid pivot (a tolerance scaled by the
    largest row, 30 eps 1e3 = 7e-12, zeroed it); the same small row in the span of the large
    one is a zero pivot. The reference is exact: M = L0 U with U orthogonal gives L0."""
    rng = np.random.default_rng(8)
    U = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    L0 = np.array([[1e3, 0.0, 0.0], [2e-12, 1e-12, 0.0], [0.5, 0.2, 2.0]])
    np.testing.assert_allclose(tria(L0 @ U), L0, rtol=1e-10, atol=1e-18)
    dependent = np.array([[1e3, 0.0, 0.0], [1e-12, 0.0, 0.0], [0.5, 0.2, 2.0]])
    L = np.asarray(tria(dependent @ U))
    assert L[1, 1] == 0.0 and np.all(L[2:, 1] == 0.0)
    np.testing.assert_allclose(L @ L.T, dependent @ dependent.T, rtol=1e-12, atol=1e-15)
    # the tangent at the small valid pivot solves L L̇ᵀ + L̇ Lᵀ = Ṁ Mᵀ + M Ṁᵀ, row scales kept
    M, D = L0 @ U, np.diag([1e3, 1e-12, 1.0]) @ rng.normal(size=(3, 3))
    L, Ld = jax.jvp(tria, (M,), (D,))
    np.testing.assert_allclose(L @ Ld.T + Ld @ L.T, D @ M.T + M @ D.T, rtol=1e-9, atol=1e-30)
    assert np.all(np.triu(Ld, 1) == 0)


def test_jit_vmap_float32():
    rng = np.random.default_rng(7)
    M = rng.normal(size=(5, 3, 6)).astype(np.float32)
    L = jax.jit(jax.vmap(tria))(M)
    assert L.dtype == jnp.float32
    _assert_factor(L, M.astype(float), atol=1e-5)
    g = jax.grad(lambda M: jnp.sum(tria(M) ** 2))(M)
    np.testing.assert_allclose(g, 2 * M, rtol=1e-4, atol=1e-5)  # ‖L‖² = ‖M‖²


def test_errors():
    with pytest.raises(ValueError, match=r"M.shape = \(3,\)"):
        tria(np.ones(3))
    with pytest.raises(TypeError):
        tria(np.ones((2, 2)) * 1j)
