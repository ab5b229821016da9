"""Lazy Kronecker products: values and per-factor gradients against dense ``jnp.kron``."""

from functools import reduce

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads

import rules
from rules import Kronecker, KroneckerSum, kron, kron_sum


def _dense(*factors):
    return reduce(jnp.kron, factors)


def _assert_close_grads(got, want, rtol=1e-12):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(w))))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=rtol * scale)


def _spd(rng, n):
    a = rng.normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


SHAPES = {
    "2 square": [(3, 3), (4, 4)],
    "2 rectangular": [(3, 5), (4, 2)],
    "3 mixed": [(2, 3), (3, 3), (4, 2)],
}


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_matmul_transpose_shape_match_dense(shapes):
    rng = np.random.default_rng(0)
    factors = [rng.normal(size=s) for s in shapes]
    K, D = kron(*factors), np.asarray(_dense(*factors))
    assert isinstance(K, Kronecker)
    assert K.shape == D.shape
    np.testing.assert_allclose(K.to_dense(), D, rtol=0, atol=0)
    x, X = rng.normal(size=D.shape[1]), rng.normal(size=(D.shape[1], 3))
    np.testing.assert_allclose(K @ x, D @ x, atol=1e-13)
    np.testing.assert_allclose(K @ X, D @ X, atol=1e-13)
    y = rng.normal(size=D.shape[0])
    np.testing.assert_allclose(K.T @ y, D.T @ y, atol=1e-13)
    np.testing.assert_allclose(y @ K, y @ D, atol=1e-13)
    np.testing.assert_allclose(jnp.asarray(y) @ K, y @ D, atol=1e-13)
    assert K.T.shape == D.T.shape


@pytest.mark.parametrize("n_factors", [2, 3])
def test_square_operations_match_dense(n_factors):
    rng = np.random.default_rng(1)
    sizes = [3, 4, 2][:n_factors]
    factors = [_spd(rng, n) for n in sizes]
    K, D = kron(*factors), np.asarray(_dense(*factors))
    b, Bm = rng.normal(size=D.shape[0]), rng.normal(size=(D.shape[0], 2))
    np.testing.assert_allclose(K.solve(b), np.linalg.solve(D, b), atol=1e-13)
    np.testing.assert_allclose(K.solve(Bm, assume_a="pos"), np.linalg.solve(D, Bm), atol=1e-13)
    np.testing.assert_allclose(K.inv().to_dense(), np.linalg.inv(D), atol=1e-13)
    L = K.cholesky()
    assert isinstance(L, Kronecker)
    np.testing.assert_allclose(L.to_dense(), np.linalg.cholesky(D), atol=1e-12)
    np.testing.assert_allclose(K.logdet(), np.linalg.slogdet(D)[1], rtol=1e-13)
    np.testing.assert_allclose(K.diag(), np.diag(D), rtol=0, atol=0)
    np.testing.assert_allclose(K.trace(), np.trace(D), rtol=1e-14)


def test_slogdet_sign_and_logdet_of_indefinite():
    A = np.diag([-1.0, 2.0, 3.0])  # det < 0, odd power nB = 3 keeps the sign
    B = np.diag([1.0, 2.0, 0.5])
    sign, logabs = kron(A, B).slogdet()
    dsign, dlogabs = np.linalg.slogdet(np.kron(A, B))
    assert sign == dsign == -1
    np.testing.assert_allclose(logabs, dlogabs, rtol=1e-14)
    assert np.isnan(kron(A, B).logdet())
    assert kron(A, np.diag([1.0, 2.0])).logdet() > 0  # even power: det > 0


# --------------------------------------------------------------------------- gradients
def _losses(rng, sizes):
    """Pairs (lazy, dense) of scalar functions of the factors, with fixed data."""
    n = int(np.prod(sizes))
    x, X, y = rng.normal(size=n), rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
    return {
        "matvec": (
            lambda *f: 0.5 * jnp.sum((kron(*f) @ X - y) ** 2),
            lambda *f: 0.5 * jnp.sum((_dense(*f) @ X - y) ** 2),
        ),
        "solve": (
            lambda *f: jnp.sum(jnp.sin(kron(*f).solve(X))),
            lambda *f: jnp.sum(jnp.sin(jnp.linalg.solve(_dense(*f), X))),
        ),
        "logdet": (
            lambda *f: kron(*f).logdet(),
            lambda *f: jnp.linalg.slogdet(_dense(*f))[1],
        ),
        "quad": (
            lambda *f: x @ (kron(*f) @ x),
            lambda *f: x @ (_dense(*f) @ x),
        ),
        "inverse quad": (
            lambda *f: x @ kron(*f).solve(x, assume_a="pos"),
            lambda *f: x @ jnp.linalg.solve(_dense(*f), x),
        ),
        "gaussian logpdf": (
            lambda *f: -0.5 * (x @ kron(*f).solve(x) + kron(*f).logdet()),
            lambda *f: -0.5 * (x @ jnp.linalg.solve(_dense(*f), x)
                               + jnp.linalg.slogdet(_dense(*f))[1]),
        ),
    }


@pytest.mark.parametrize("sizes", [(3, 4), (2, 3, 2)], ids=["2 factors", "3 factors"])
@pytest.mark.parametrize(
    "name", ["matvec", "solve", "logdet", "quad", "inverse quad", "gaussian logpdf"]
)
def test_factor_gradients_equal_dense_autodiff(sizes, name):
    rng = np.random.default_rng(2)
    factors = [_spd(rng, n) for n in sizes]
    lazy, dense = _losses(rng, sizes)[name]
    argnums = tuple(range(len(factors)))
    np.testing.assert_allclose(lazy(*factors), dense(*factors), rtol=1e-12)
    _assert_close_grads(jax.grad(lazy, argnums)(*factors), jax.grad(dense, argnums)(*factors))


def test_seed_example_structural_gradient():
    """loss(A, B, X) = ½‖(A ⊗ B) X − y‖², gradients through rules.kron equal dense ones."""
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(4, 3)), rng.normal(size=(5, 2))
    X, y = rng.normal(size=(6, 3)), rng.normal(size=(20, 3))

    def loss(A, B, X):
        return 0.5 * jnp.sum((kron(A, B) @ X - y) ** 2)

    def dense_loss(A, B, X):
        return 0.5 * jnp.sum((jnp.kron(A, B) @ X - y) ** 2)

    _assert_close_grads(jax.grad(loss, (0, 1, 2))(A, B, X), jax.grad(dense_loss, (0, 1, 2))(A, B, X))
    # the closed forms of rules/_kron.py, vector case: Ā = Ȳ B Xᵀ, B̄ = Ȳᵀ A X.
    x = X[:, 0]
    Xm = x.reshape(3, 2)
    Ybar = (np.kron(A, B) @ x - y[:, 0]).reshape(4, 5)
    gA, gB = jax.grad(lambda A, B: 0.5 * jnp.sum((kron(A, B) @ x - y[:, 0]) ** 2), (0, 1))(A, B)
    np.testing.assert_allclose(gA, Ybar @ B @ Xm.T, atol=1e-12)
    np.testing.assert_allclose(gB, Ybar.T @ A @ Xm, atol=1e-12)
    # README: structural = natural contracted with the other factor; <Ā, A> = <B̄, B> = <G, K>.
    G = jax.grad(lambda K: 0.5 * jnp.sum((K @ X - y) ** 2))(jnp.kron(A, B))
    gA, gB = jax.grad(loss, (0, 1))(A, B, X)
    G4 = np.asarray(G).reshape(4, 5, 3, 2)  # G[(i,j),(k,l)]
    np.testing.assert_allclose(gA, np.einsum("ijkl,jl->ik", G4, B), atol=1e-12)
    np.testing.assert_allclose(gB, np.einsum("ijkl,ik->jl", G4, A), atol=1e-12)
    inner = float(jnp.vdot(G, jnp.kron(A, B)))
    np.testing.assert_allclose([jnp.vdot(gA, A), jnp.vdot(gB, B)], [inner, inner], rtol=1e-12)


def test_grad_of_kronecker_argument_is_kronecker_of_factor_grads():
    rng = np.random.default_rng(4)
    A, B = _spd(rng, 3), _spd(rng, 2)
    g = jax.grad(lambda K: K.logdet())(kron(A, B))
    assert isinstance(g, Kronecker)
    # log det(A ⊗ B) = n_B log det A + n_A log det B, so the factor gradients are
    # n_B A⁻ᵀ and n_A B⁻ᵀ; and they agree with the dense determinant's gradient (plain JAX).
    np.testing.assert_allclose(g.factors[0], 2 * np.linalg.inv(A).T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g.factors[1], 3 * np.linalg.inv(B).T, rtol=1e-12, atol=1e-14)
    dense = jax.grad(lambda A, B: jnp.linalg.slogdet(jnp.kron(A, B))[1], (0, 1))(A, B)
    np.testing.assert_allclose(g.factors[0], dense[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.factors[1], dense[1], rtol=1e-10, atol=1e-12)


def test_check_grads_factors():
    rng = np.random.default_rng(5)
    A, B = _spd(rng, 3), _spd(rng, 2)
    x = rng.normal(size=6)
    f = jax.jit(lambda A, B: (kron(A, B).solve(x), kron(A, B).logdet()))
    check_grads(f, (A, B), order=2, modes=("fwd", "rev"))


def test_jit_vmap():
    rng = np.random.default_rng(6)
    As = rng.normal(size=(5, 3, 3))
    B, x = rng.normal(size=(2, 2)), rng.normal(size=6)
    got = jax.jit(jax.vmap(lambda A: kron(A, B) @ x))(As)
    want = np.stack([np.kron(A, B) @ x for A in As])
    np.testing.assert_allclose(got, want, atol=1e-13)
    # A Kronecker as a pytree through jit.
    K = kron(As[0], B)
    np.testing.assert_allclose(jax.jit(lambda K: K @ x)(K), np.kron(As[0], B) @ x, atol=1e-13)


# ------------------------------------------------------------------- no dense intermediates
def _all_var_sizes(jaxpr):
    """Sizes of every variable in a jaxpr and all of its sub-jaxprs."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    sizes = []

    def visit(jp):
        if isinstance(jp, ClosedJaxpr):
            jp = jp.jaxpr
        for v in list(jp.invars) + list(jp.constvars) + list(jp.outvars):
            if hasattr(v, "aval") and hasattr(v.aval, "shape"):
                sizes.append(int(np.prod(v.aval.shape)))
        for eqn in jp.eqns:
            for v in list(eqn.invars) + list(eqn.outvars):
                if hasattr(v.aval, "shape"):
                    sizes.append(int(np.prod(v.aval.shape)))
            for param in eqn.params.values():
                subs = param if isinstance(param, (tuple, list)) else [param]
                for sub in subs:
                    if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                        visit(sub)
                    elif hasattr(sub, "jaxpr") and isinstance(sub.jaxpr, (Jaxpr, ClosedJaxpr)):
                        visit(sub.jaxpr)  # e.g. custom_linear_solve's jaxpr tuples

    visit(jaxpr)
    return sizes


@pytest.mark.parametrize("name", ["matvec", "solve", "logdet", "quad", "gaussian logpdf"])
def test_gradient_jaxpr_has_no_dense_sized_intermediate(name):
    n = 64
    rng = np.random.default_rng(7)
    factors = [_spd(rng, n), _spd(rng, n)]
    lazy, dense = _losses(rng, (n, n))[name]
    grad_lazy = jax.make_jaxpr(jax.grad(lazy, (0, 1)))(*factors)
    sizes = _all_var_sizes(grad_lazy)
    assert len(sizes) > 10  # the walk really saw the program
    assert max(sizes) < (n * n) ** 2
    assert max(sizes) <= 2 * n * n  # nothing beyond the (n², 2) right-hand side
    # The walk does see dense-sized arrays where they exist.
    grad_dense = jax.make_jaxpr(jax.grad(dense, (0, 1)))(*factors)
    assert max(_all_var_sizes(grad_dense)) >= (n * n) ** 2


# ------------------------------------------------------------------------- Kronecker sum
def test_kron_sum_matmul_dense_and_expm():
    rng = np.random.default_rng(8)
    A, B = rng.normal(size=(3, 3)), rng.normal(size=(4, 4))
    S = kron_sum(A, B)
    assert isinstance(S, KroneckerSum)
    D = np.kron(A, np.eye(4)) + np.kron(np.eye(3), B)
    np.testing.assert_allclose(S.to_dense(), D, atol=0)
    x, X = rng.normal(size=12), rng.normal(size=(12, 2))
    np.testing.assert_allclose(S @ x, D @ x, atol=1e-13)
    np.testing.assert_allclose(S @ X, D @ X, atol=1e-13)
    E = S.__rules_expm__()
    assert isinstance(E, Kronecker)
    np.testing.assert_allclose(E.to_dense(), scipy.linalg.expm(D), rtol=1e-11, atol=1e-13)
    # Vectorised Lyapunov operator: (A ⊕ A) vec X = vec(A X + X Aᵀ).
    Xm = rng.normal(size=(3, 3))
    np.testing.assert_allclose(kron_sum(A, A) @ Xm.ravel(), (A @ Xm + Xm @ A.T).ravel(), atol=1e-13)


def test_rules_expm_dispatches_on_kron_sum():
    rng = np.random.default_rng(9)
    A, B = rng.normal(size=(2, 2)), rng.normal(size=(3, 3))
    E = rules.expm(kron_sum(A, B))
    assert isinstance(E, Kronecker)
    D = np.kron(A, np.eye(3)) + np.kron(np.eye(2), B)
    np.testing.assert_allclose(E.to_dense(), scipy.linalg.expm(D), rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------------------- errors
def test_errors_name_shapes():
    A, B = np.ones((2, 3)), np.ones((4, 4))
    with pytest.raises(ValueError, match="at least two"):
        kron(A)
    with pytest.raises(ValueError, match=r"\(2, 3, 1\)"):
        kron(A, np.ones((2, 3, 1)))
    with pytest.raises(ValueError, match=r"x.shape = \(5,\)"):
        kron(A, B) @ np.ones(5)
    with pytest.raises(ValueError, match=r"factors\[0\].shape = \(2, 3\)"):
        kron(A, B).solve(np.ones(8))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        kron_sum(A, B)
