"""rules.inv and rules.solve: values, derivatives (both modes, order 2), one factorisation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads

from rules import inv, solve


def _mT(x):
    return np.swapaxes(x, -1, -2)


def _general(rng, *shape):
    n = shape[-1]
    return rng.normal(size=shape) + 2.0 * np.sqrt(n) * np.eye(n)


def _spd(rng, *shape):
    a = rng.normal(size=shape)
    return a @ _mT(a) + shape[-1] * np.eye(shape[-1])


def test_values_match_scipy():
    rng = np.random.default_rng(0)
    A, P = _general(rng, 5, 5), _spd(rng, 5, 5)
    B, b = rng.normal(size=(5, 3)), rng.normal(size=5)
    np.testing.assert_allclose(solve(A, B), scipy.linalg.solve(A, B), rtol=1e-12)
    np.testing.assert_allclose(solve(A, b), scipy.linalg.solve(A, b), rtol=1e-12)
    np.testing.assert_allclose(
        solve(P, B, assume_a="pos"), scipy.linalg.solve(P, B, assume_a="pos"), rtol=1e-12
    )
    np.testing.assert_allclose(inv(A), scipy.linalg.inv(A), rtol=1e-12)
    np.testing.assert_allclose(inv(P, assume_a="pos"), scipy.linalg.inv(P), rtol=1e-12)


def test_batched_and_broadcast():
    rng = np.random.default_rng(1)
    A = _general(rng, 2, 3, 4, 4)
    B = rng.normal(size=(3, 4, 2))  # broadcasts against A's (2, 3) batch
    X = solve(A, B)
    assert X.shape == (2, 3, 4, 2)
    np.testing.assert_allclose(A @ X, np.broadcast_to(B, X.shape), atol=1e-12)
    np.testing.assert_allclose(solve(A, B[0, :, 0]), np.linalg.solve(A, B[0, :, 0][:, None])[..., 0], atol=1e-12)
    np.testing.assert_allclose(inv(A), np.linalg.inv(A), atol=1e-12)
    got = jax.vmap(lambda a: inv(a, assume_a="pos"))(_spd(rng, 3, 4, 4))
    assert got.shape == (3, 4, 4)


@pytest.mark.parametrize("assume_a", ["gen", "pos"])
def test_check_grads_order2_batched(assume_a):
    rng = np.random.default_rng(2)
    A = _spd(rng, 2, 3, 3) if assume_a == "pos" else _general(rng, 2, 3, 3)
    B = rng.normal(size=(2, 3, 2))
    f = jax.jit(lambda A, B: (solve(A, B, assume_a=assume_a), inv(A, assume_a=assume_a)))
    check_grads(f, (A, B), order=2, modes=("fwd", "rev"))


def test_derivative_formulas():
    """Tangent −A⁻¹ Ȧ A⁻¹ and cotangent −A⁻ᵀ Ḡ A⁻ᵀ (independent of autodiff through LU)."""
    rng = np.random.default_rng(3)
    A, A_dot, G = _general(rng, 4, 4), rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    Ai = np.linalg.inv(A)
    _, tangent = jax.jvp(inv, (A,), (A_dot,))
    np.testing.assert_allclose(tangent, -Ai @ A_dot @ Ai, atol=1e-12)
    _, vjp = jax.vjp(inv, A)
    np.testing.assert_allclose(vjp(G)[0], -Ai.T @ G @ Ai.T, atol=1e-12)
    # solve: B̄ = A⁻ᵀ X̄, Ā = −B̄ Xᵀ
    B = rng.normal(size=(4, 2))
    X = np.linalg.solve(A, B)
    Xbar = rng.normal(size=(4, 2))
    _, vjp = jax.vjp(solve, A, B)
    Abar, Bbar = vjp(Xbar)
    np.testing.assert_allclose(Bbar, np.linalg.solve(A.T, Xbar), atol=1e-12)
    np.testing.assert_allclose(Abar, -np.linalg.solve(A.T, Xbar) @ X.T, atol=1e-12)


def test_pos_output_and_cotangent_exactly_symmetric():
    rng = np.random.default_rng(4)
    P = _spd(rng, 3, 6, 6)
    X = np.asarray(inv(P, assume_a="pos"))
    assert np.array_equal(X, _mT(X))
    W = rng.normal(size=(6, 6))  # a non-symmetric weight makes the natural cotangent asymmetric
    g = np.asarray(jax.grad(lambda P: jnp.sum(W * inv(P, assume_a="pos")))(P))
    assert np.array_equal(g, _mT(g))
    b = rng.normal(size=(6, 2))
    g = np.asarray(jax.grad(lambda P: jnp.sum(jnp.sin(solve(P, b, assume_a="pos"))))(P))
    assert np.array_equal(g, _mT(g))
    # "pos" uses (A + Aᵀ)/2: the cotangent is the symmetric part of the general one.
    g_gen = jax.grad(lambda P: jnp.sum(W * inv(P)))(P[0])
    g_pos = jax.grad(lambda P: jnp.sum(W * inv(P, assume_a="pos")))(P[0])
    np.testing.assert_allclose(g_pos, 0.5 * (g_gen + g_gen.T), atol=1e-12)


def test_one_factorisation_per_call_in_gradient():
    """The reverse pass reuses the primal's LU: exactly one `lu` in the gradient's jaxpr."""
    rng = np.random.default_rng(5)
    A, B = _general(rng, 4, 4), rng.normal(size=(4, 3))
    text = str(jax.make_jaxpr(jax.grad(lambda A, B: jnp.sum(solve(A, B) ** 2), (0, 1)))(A, B))
    assert len(re.findall(r"= lu\b", text)) == 1
    text = str(jax.make_jaxpr(jax.hessian(lambda A: jnp.sum(inv(A, assume_a="pos"))))(A @ A.T))
    assert len(re.findall(r"= cholesky\b", text)) == 1


@pytest.mark.parametrize("assume_a", ["gen", "pos"])
def test_singular_gives_nan_not_finite(assume_a):
    S = np.array([[1.0, 2.0], [2.0, 4.0]])  # exactly singular (and only semi-definite)
    assert np.all(np.isnan(inv(S, assume_a=assume_a)))
    assert np.all(np.isnan(solve(S, np.ones(2), assume_a=assume_a)))
    g = jax.grad(lambda S: jnp.sum(solve(S, np.ones(2), assume_a=assume_a)))(S)
    assert not np.any(np.isfinite(g))
    # Under jit and vmap only the singular member is NaN.
    batch = np.stack([S, np.eye(2)])
    out = jax.jit(lambda A: inv(A, assume_a=assume_a))(batch)
    assert np.all(np.isnan(out[0])) and np.allclose(out[1], np.eye(2))


def test_float32():
    rng = np.random.default_rng(6)
    A = _general(rng, 4, 4).astype(np.float32)
    B = rng.normal(size=(4, 2)).astype(np.float32)
    X = solve(A, B)
    assert X.dtype == jnp.float32
    np.testing.assert_allclose(X, np.linalg.solve(A.astype(float), B.astype(float)), rtol=1e-4, atol=1e-5)
    assert inv(A, assume_a="pos").dtype == jnp.float32


def test_errors_name_shapes():
    with pytest.raises(ValueError, match=r"A.shape = \(2, 3\)"):
        inv(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"B.shape = \(4,\)"):
        solve(np.eye(3), np.ones(4))
    with pytest.raises(ValueError, match=r"B.shape = \(4, 2\)"):
        solve(np.eye(3), np.ones((4, 2)))
    with pytest.raises(ValueError, match="batch"):
        solve(np.ones((2, 3, 3)), np.ones((4, 3, 1)))
    with pytest.raises(ValueError, match="assume_a"):
        solve(np.eye(2), np.ones(2), assume_a="sym")
    with pytest.raises(TypeError):
        inv(np.eye(2) * 1j)
