"""Tests for rules.lyap (A X + X Aᵀ + Q = 0) and rules.dlyap (A X Aᵀ − X + Q = 0).

References: SciPy's solvers (note SciPy's continuous convention A X + X Aᴴ = Q, so it is given
−Q), the dense n²×n² Kronecker solve, and the adjoint formulas of rules/_lyap.py.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import scipy.linalg as sl
from scipy.sparse.linalg import LinearOperator, onenormest
from jax.test_util import check_grads

import rules
from rules._lyap import KRON_MAX_N, _split_matmul

# Every solve in these tests runs jitted: one compiled program per shape and method, where
# eager dispatch compiles each primitive separately (≈ 3× the CPU time of the whole file).
lyap = jax.jit(rules.lyap, static_argnames="method")
dlyap = jax.jit(rules.dlyap, static_argnames="method")

LYAP_METHODS = ["schur", "sign", "kron"]
DLYAP_METHODS = ["schur", "doubling"]
SIZES = [1, 2, 5, 16, 64]


# ----------------------------------------------------------------------------- matrices


def _block_diagonal(real, imag):
    """Real block-diagonal matrix with eigenvalues real ± i imag (1×1 blocks where imag = 0)."""
    n = len(real)
    D = np.zeros((n, n))
    i = 0
    while i < n:
        if i + 1 < n and imag[i] != 0:
            D[i : i + 2, i : i + 2] = [[real[i], imag[i]], [-imag[i], real[i]]]
            i += 2
        else:
            D[i, i] = real[i]
            i += 1
    return D


def random_stable(n, seed, *, discrete=False):
    """Non-normal A = V D V⁻¹ whose decay rates span three decades (1e-3 … 1), with complex
    pairs; continuous: Re λ ∈ −[1e-3, 1]; discrete: 1 − |λ| ∈ 0.9·[1e-3, 1]."""
    rng = np.random.default_rng(seed)
    rates = np.logspace(-3, 0, n)
    rng.shuffle(rates)
    imag = np.where(rng.random(n) < 0.5, rng.uniform(0.1, 1.0, n), 0.0)
    if discrete:
        radius, angle = 1 - 0.9 * rates, np.pi * 0.9 * imag
        D = _block_diagonal(radius * np.cos(angle), radius * np.sin(angle))
    else:
        D = _block_diagonal(-rates, imag)
    V = np.eye(n) + 0.5 * rng.standard_normal((n, n)) / np.sqrt(n)
    return V @ D @ np.linalg.inv(V)


def well_conditioned(n, seed, *, discrete=False):
    """A small non-normal, comfortably stable A for finite-difference derivative checks."""
    N = np.random.default_rng(seed + 2000).standard_normal((n, n))
    if discrete:
        return 0.6 * N / np.linalg.norm(N, 2)
    return -1.5 * np.eye(n) + 0.4 * N


def random_spd(n, seed):
    G = np.random.default_rng(seed + 1000).standard_normal((n, n))
    return G @ G.T / n + np.eye(n)


def kron_lyap(A, Q):
    n = A.shape[0]
    eye = np.eye(n)
    return np.linalg.solve(np.kron(A, eye) + np.kron(eye, A), -Q.ravel()).reshape(n, n)


def kron_dlyap(A, Q):
    n = A.shape[0]
    return np.linalg.solve(np.eye(n * n) - np.kron(A, A), Q.ravel()).reshape(n, n)


def _kron_too_big(method, n):
    """True (after checking the error) where ``method="kron"`` refuses ``n``."""
    if method != "kron" or n <= KRON_MAX_N:
        return False
    with pytest.raises(ValueError, match=rf"n <= {KRON_MAX_N}.*\({n}, {n}\)"):
        rules.lyap(np.eye(n), np.eye(n), method="kron")
    return True


def rel_err(X, ref):
    X = np.asarray(X, np.float64)
    return np.linalg.norm(X - ref) / np.linalg.norm(ref)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("method", LYAP_METHODS)
def test_lyap_matches_scipy_float64(n, method):
    A, Q = random_stable(n, n), random_spd(n, n)
    if _kron_too_big(method, n):
        return
    X = lyap(A, Q, method=method)
    assert X.dtype == jnp.float64
    assert rel_err(X, sl.solve_continuous_lyapunov(A, -Q)) <= 1e-12


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("method", DLYAP_METHODS)
def test_dlyap_matches_scipy_float64(n, method):
    A, Q = random_stable(n, n, discrete=True), random_spd(n, n)
    X = dlyap(A, Q, method=method)
    assert X.dtype == jnp.float64
    assert rel_err(X, sl.solve_discrete_lyapunov(A, Q)) <= 1e-12


def _operator_condition(A, discrete):
    """κ₁(T) = ‖T‖₁‖T⁻¹‖₁ of the Kronecker operator T = I − A⊗A (discrete) or A⊕A
    (continuous), ‖T⁻¹‖₁ estimated (Higham–Tisseur, SciPy's onenormest) from SciPy's solves."""
    n = A.shape[0]
    if discrete:
        solve, op_norm = sl.solve_discrete_lyapunov, 1.0 + np.linalg.norm(A, 1) ** 2
    else:
        solve, op_norm = sl.solve_continuous_lyapunov, 2.0 * np.linalg.norm(A, 1)
    inverse = LinearOperator(
        (n * n, n * n), dtype=np.float64,
        matvec=lambda v: solve(A, np.reshape(v, (n, n))).ravel(),
        rmatvec=lambda v: solve(A.T, np.reshape(v, (n, n))).ravel(),
    )
    return op_norm * onenormest(inverse)


@pytest.mark.parametrize("n", [5, 64])
@pytest.mark.parametrize(
    "func,method", [(lyap, m) for m in LYAP_METHODS] + [(dlyap, m) for m in DLYAP_METHODS]
)
def test_float32_matches_scipy(func, method, n):
    # Two float32 checks that do not depend on the machine's rounding luck: the residual (a backward
    # error, ≤ 2.3u measured over 4 seeds and all methods) within 10u, and the forward error
    # against SciPy in float64 within the first-order perturbation bound κ₁(T)·u (measured
    # 0.001-0.22 of it). A fixed 1e-4 on the forward error failed on one machine at 1.01e-4
    # for dlyap-schur-64, where κ₁(T)·u is 3e-2.
    discrete = func is dlyap
    A = random_stable(n, n, discrete=discrete).astype(np.float32)
    Q = random_spd(n, n).astype(np.float32)
    if _kron_too_big(method, n):
        return
    X = func(A, Q, method=method)
    assert X.dtype == jnp.float32
    # reference: SciPy in float64 on the same (float32-rounded) inputs
    A64, Q64, X64 = A.astype(np.float64), Q.astype(np.float64), np.asarray(X, np.float64)
    unit_roundoff = float(np.finfo(np.float32).eps) / 2
    if discrete:
        ref = sl.solve_discrete_lyapunov(A64, Q64)
        residual = A64 @ X64 @ A64.T - X64 + Q64
        scale = (np.linalg.norm(A64) ** 2 + 1.0) * np.linalg.norm(X64) + np.linalg.norm(Q64)
    else:
        ref = sl.solve_continuous_lyapunov(A64, -Q64)
        residual = A64 @ X64 + X64 @ A64.T + Q64
        scale = 2.0 * np.linalg.norm(A64) * np.linalg.norm(X64) + np.linalg.norm(Q64)
    assert np.linalg.norm(residual) / scale <= 10 * unit_roundoff
    assert rel_err(X, ref) <= _operator_condition(A64, discrete) * unit_roundoff


@pytest.mark.parametrize("n", [2, 6])
@pytest.mark.parametrize(
    "func,method,oracle",
    [(lyap, m, kron_lyap) for m in LYAP_METHODS] + [(dlyap, m, kron_dlyap) for m in DLYAP_METHODS],
)
def test_matches_kronecker_solve_nonsymmetric_q(func, method, oracle, n):
    A = random_stable(n, 10 + n, discrete=func is dlyap)
    Q = np.random.default_rng(n).standard_normal((n, n))  # not symmetric
    X = func(A, Q, method=method)
    assert rel_err(X, oracle(A, Q)) <= 1e-12


@pytest.mark.cpu_only
@pytest.mark.parametrize("func", [lyap, dlyap])
def test_schur_solves_non_stable_equations(func):
    # a unique solution exists without stability (λᵢ + λⱼ ≠ 0, resp. λᵢ λⱼ ≠ 1)
    rng = np.random.default_rng(3)
    if func is lyap:
        A = np.diag([-1.0, 0.5, 2.0]) + 0.3 * np.triu(rng.standard_normal((3, 3)), 1)
        ref = kron_lyap
    else:
        A = np.diag([0.5, 1.5, -2.0]) + 0.3 * np.triu(rng.standard_normal((3, 3)), 1)
        ref = kron_dlyap
    Q = random_spd(3, 0)
    assert rel_err(func(A, Q, method="schur"), ref(A, Q)) <= 1e-12


@pytest.mark.cpu_only
def test_dlyap_schur_eigenvalues_near_minus_one():
    # The Cayley transform's A + I is nearly singular here; ω = −1 (the Stein operator is
    # unchanged by A → −A) keeps the accuracy, where SciPy's ω = 1 loses ≈ 2 digits at n = 16.
    for seed in range(3):
        A = -random_stable(5, seed, discrete=True)  # eigenvalues within 1e-3 of −1
        Q = random_spd(5, seed)
        assert rel_err(dlyap(A, Q, method="schur"), kron_dlyap(A, Q)) <= 1e-12
    # eigenvalues near +1 and −1 at once: neither sign avoids the pole, accuracy ≈ ε κ(A ± I)
    A = np.diag([-0.999, 0.999, 0.5, -0.2, 0.1]) + 0.2 * np.triu(np.ones((5, 5)), 1)
    assert rel_err(dlyap(A, random_spd(5, 4), method="schur"), kron_dlyap(A, random_spd(5, 4))) <= 1e-11


def test_sign_method_handles_anti_stable_a():
    A = -random_stable(4, 7)
    Q = random_spd(4, 7)
    assert rel_err(lyap(A, Q, method="sign"), kron_lyap(A, Q)) <= 1e-12


@pytest.mark.parametrize(
    "func,method", [(lyap, m) for m in LYAP_METHODS] + [(dlyap, m) for m in DLYAP_METHODS]
)
def test_symmetric_q_gives_exactly_symmetric_x(func, method):
    A = random_stable(16, 2, discrete=func is dlyap)
    X = np.asarray(func(A, random_spd(16, 2), method=method))
    np.testing.assert_array_equal(X, X.T)
    assert np.all(np.linalg.eigvalsh(X) > 0)  # a covariance for Q ≻ 0 and stable A


@pytest.mark.cpu_only
def test_auto_picks_schur_on_cpu():
    assert jax.default_backend() == "cpu"
    A, Q = random_stable(5, 1), random_spd(5, 1)
    np.testing.assert_array_equal(lyap(A, Q), lyap(A, Q, method="schur"))
    Ad = random_stable(5, 1, discrete=True)
    np.testing.assert_array_equal(dlyap(Ad, Q), dlyap(Ad, Q, method="schur"))


# ----------------------------------------------------------------------------- batching, jit


@pytest.mark.parametrize(
    "func,method", [(lyap, m) for m in LYAP_METHODS] + [(dlyap, m) for m in DLYAP_METHODS]
)
def test_batch_dims_broadcast_jit_and_vmap(func, method):
    discrete = func is dlyap
    A = np.stack([random_stable(3, s, discrete=discrete) for s in range(6)]).reshape(2, 3, 3, 3)
    Q = np.stack([random_spd(3, s) for s in range(3)])  # (3, 3, 3) broadcasts against (2, 3)
    solve = jax.jit(lambda a, q: func(a, q, method=method))
    X = solve(A, Q)
    assert X.shape == (2, 3, 3, 3)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(X[i, j], func(A[i, j], Q[j], method=method), rtol=1e-10)
    X_vmap = jax.vmap(jax.vmap(solve, in_axes=(0, 0)), in_axes=(0, None))(A, Q)
    np.testing.assert_allclose(X_vmap, X, rtol=1e-10)


def test_dtype_promotion_and_integer_input():
    A = np.array([[-2, 1], [0, -3]])
    X = lyap(A.astype(np.float32), np.eye(2))
    assert X.dtype == jnp.float64
    np.testing.assert_allclose(lyap(A, np.eye(2, dtype=int)), kron_lyap(A.astype(float), np.eye(2)))


# ----------------------------------------------------------------------------- derivatives


# quick run: one method of each solver; the full suite checks every method
_SECOND_ORDER_QUICK = {(lyap, "schur"), (lyap, "kron"), (dlyap, "doubling")}


@pytest.mark.parametrize(
    "func,method",
    [(f, m) if (f, m) in _SECOND_ORDER_QUICK else pytest.param(f, m, marks=[pytest.mark.slow, pytest.mark.timeout(300)])
     for f, m in [(lyap, m) for m in LYAP_METHODS] + [(dlyap, m) for m in DLYAP_METHODS]],
)
def test_check_grads_second_order_jit_vmap(func, method):
    # one check under jit(vmap(·)) covers both transformations (and halves the compile time)
    discrete = func is dlyap
    A = np.stack([well_conditioned(3, s, discrete=discrete) for s in (5, 6)])
    Q = np.stack([random_spd(3, s) for s in (5, 6)])
    check_grads(jax.jit(jax.vmap(lambda a, q: func(a, q, method=method))), (A, Q), order=2,
                modes=("fwd", "rev"))


@pytest.mark.parametrize(
    "func,method", [(lyap, m) for m in LYAP_METHODS] + [(dlyap, m) for m in DLYAP_METHODS]
)
def test_reverse_mode_matches_adjoint_formulas(func, method):
    # rules/_lyap.py: S = lyap(Aᵀ, X̄), Q̄ = S, Ā = S Xᵀ + Sᵀ X;  dlyap: Ā = S A Xᵀ + Sᵀ A X.
    discrete = func is dlyap
    A = random_stable(5, 8, discrete=discrete)
    Q = np.random.default_rng(8).standard_normal((5, 5))
    Xbar = np.random.default_rng(9).standard_normal((5, 5))
    X, vjp = jax.vjp(lambda a, q: func(a, q, method=method), A, Q)
    A_bar, Q_bar = jax.jit(vjp)(jnp.asarray(Xbar))
    X = np.asarray(X)
    if discrete:
        S = kron_dlyap(A.T, Xbar)
        A_ref = S @ A @ X.T + S.T @ A @ X
    else:
        S = kron_lyap(A.T, Xbar)
        A_ref = S @ X.T + S.T @ X
    np.testing.assert_allclose(Q_bar, S, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A_bar, A_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.cpu_only
def test_forward_mode_matches_kronecker_derivative():
    A, Q = random_stable(4, 11), random_spd(4, 11)
    rng = np.random.default_rng(12)
    dA, dQ = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    for method in LYAP_METHODS:
        tangent = jax.jit(lambda a, q, da, dq: jax.jvp(lambda a, q: lyap(a, q, method=method),
                                                       (a, q), (da, dq)))
        X, dX = tangent(A, Q, dA, dQ)
        ref = kron_lyap(A, dQ + dA @ np.asarray(X) + np.asarray(X) @ dA.T)
        np.testing.assert_allclose(dX, ref, rtol=1e-10, atol=1e-12)


def _sandwich_mp(A, B):
    """The n² × n² mpmath matrix of X ↦ A X Bᵀ (row-major vec): entries A[i, k] B[j, m]."""
    n = A.rows
    M = mpmath.zeros(n * n, n * n)
    for i in range(n):
        for j in range(n):
            for k in range(n):
                for m in range(n):
                    M[i * n + j, k * n + m] = A[i, k] * B[j, m]
    return M


def _tangent_mp(A, Q, dA, dQ, discrete):
    """Ẋ at 40 digits from the float64 inputs: 𝓛_A(X) = −Q, 𝓛_A(Ẋ) = −Q̇ − 𝓛_Ȧ'(X), where
    𝓛_A = A ⊗ I + I ⊗ A (continuous, linear in A: 𝓛' = 𝓛_Ȧ) or A ⊗ A − I (discrete:
    𝓛' = Ȧ ⊗ A + A ⊗ Ȧ), all exact matrices solved in mpmath."""
    n = A.shape[0]
    with mpmath.workdps(40):
        mp = lambda M: mpmath.matrix(np.asarray(M, np.float64).tolist())  # noqa: E731
        A_, dA_, eye = mp(A), mp(dA), mpmath.eye(n)
        if discrete:
            K = _sandwich_mp(A_, A_) - mpmath.eye(n * n)
            dK = _sandwich_mp(dA_, A_) + _sandwich_mp(A_, dA_)
        else:
            K = _sandwich_mp(A_, eye) + _sandwich_mp(eye, A_)
            dK = _sandwich_mp(dA_, eye) + _sandwich_mp(eye, dA_)
        vec = lambda M: mpmath.matrix(np.asarray(M, np.float64).ravel().tolist())  # noqa: E731
        x = mpmath.lu_solve(K, -vec(Q))
        dx = mpmath.lu_solve(K, -vec(dQ) - dK * x)
        return np.array([float(dx[i]) for i in range(n * n)]).reshape(n, n)


def _kron_solve_jax(A, Q, discrete):
    """The dense Kronecker solve through plain JAX autodiff (the accuracy peer)."""
    n = A.shape[-1]
    eye = jnp.eye(n, dtype=A.dtype)
    if discrete:
        return jnp.linalg.solve(jnp.eye(n * n, dtype=A.dtype) - jnp.kron(A, A), Q.ravel()).reshape(n, n)
    return jnp.linalg.solve(jnp.kron(A, eye) + jnp.kron(eye, A), -Q.ravel()).reshape(n, n)


def _derivative_errors(f, A, Q, dA, dQ, Xbar, dX_ref):
    """Relative errors of f's JVP along (dA, dQ) and of its VJP of Xbar (by the duality
    ⟨Ā, dA⟩ + ⟨Q̄, dQ⟩ = ⟨X̄, Ẋ⟩), against the mpmath tangent dX_ref."""
    _, dX = jax.jit(lambda a, q, da, dq: jax.jvp(f, (a, q), (da, dq)))(A, Q, dA, dQ)
    A_bar, Q_bar = jax.jit(lambda a, q, u: jax.vjp(f, a, q)[1](u))(A, Q, Xbar)
    jvp_err = rel_err(dX, dX_ref)
    pulled = np.sum(np.asarray(A_bar) * dA) + np.sum(np.asarray(Q_bar) * dQ)
    vjp_err = abs(pulled - np.sum(Xbar * dX_ref)) / (np.linalg.norm(Xbar) * np.linalg.norm(dX_ref))
    return jvp_err, vjp_err


@pytest.mark.parametrize(
    "func,method", [(lyap, "schur"), (lyap, "sign"), (dlyap, "schur"), (dlyap, "doubling")]
)
def test_derivatives_at_high_condition_as_accurate_as_kronecker_solve(func, method):
    # The notebook's sweep (examples/gradient_accuracy.ipynb) at κ ≈ 1e6–1e7: one eigenvalue
    # 1e-6 from the stability boundary of a non-normal A. Before refinement with an accurate
    # residual our tangents were ~100x worse than the dense LU (1.6e-10 vs 1.7e-12).
    discrete = func is dlyap
    rng = np.random.default_rng(31)
    n = 4
    V = np.eye(n) + 0.3 * rng.standard_normal((n, n))
    edge = [1 - 1e-6, 0.5, -0.4, 0.2] if discrete else [-1e-6, -1.0, -2.0, -3.0]
    A = V @ np.diag(edge) @ np.linalg.inv(V)
    Q = random_spd(n, 31)
    dA = rng.standard_normal((n, n))
    dQ = rng.standard_normal((n, n))
    dQ = dQ + dQ.T
    Xbar = rng.standard_normal((n, n))
    dX_ref = _tangent_mp(A, Q, dA, dQ, discrete)
    ours = _derivative_errors(lambda a, q: func(a, q, method=method), A, Q, dA, dQ, Xbar, dX_ref)
    dense = _derivative_errors(lambda a, q: _kron_solve_jax(a, q, discrete), A, Q, dA, dQ, Xbar,
                               dX_ref)
    assert dense[0] > 1e-14  # the operator is ill-conditioned enough to tell them apart
    assert ours[0] <= 2 * dense[0], (ours, dense)
    assert ours[1] <= 2 * dense[1], (ours, dense)


def test_split_matmul_carries_twice_the_working_precision():
    # the refinement's residual: hi + lo = A X to ≈ n ε 2^(β−t) |A| |X| (about ε² here), where
    # a plain product is off by ≈ ε |A| |X|; exact rational arithmetic is the reference
    rng = np.random.default_rng(41)
    n = 16
    A = rng.standard_normal((n, n)) * np.logspace(-3, 3, n)[:, None]  # rows of many scales
    X = rng.standard_normal((n, n)) * np.logspace(4, -4, n)[None, :]
    hi, lo = jax.jit(_split_matmul)(jnp.asarray(A), jnp.asarray(X))
    hi, lo = np.asarray(hi), np.asarray(lo)
    scale = np.abs(A) @ np.abs(X)
    worst = 0.0
    for i in range(n):
        for j in range(n):
            exact = sum(Fraction(A[i, k]) * Fraction(X[k, j]) for k in range(n))
            worst = max(worst, abs(float(Fraction(hi[i, j]) + Fraction(lo[i, j]) - exact)) / scale[i, j])
    assert worst <= 1e-20, worst
    assert np.max(np.abs(A @ X - (hi + lo)) / scale) > 1e-18  # a plain product is much worse


def _count_primitive(jaxpr, name):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            count += _count_primitive(sub, name)
        for param in eqn.params.values():
            for value in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(value, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    count += _count_primitive(inner, name)
                elif hasattr(value, "eqns"):
                    count += _count_primitive(value, name)
    return count


@pytest.mark.parametrize("func", [lyap, dlyap])
def test_schur_factorisation_computed_once_for_all_derivatives(func):
    # Every tangent and cotangent (and second-order ones) reuses the forward Schur factors.
    A = random_stable(3, 1, discrete=func is dlyap)
    Q = random_spd(3, 1)

    plain = rules.dlyap if func is dlyap else rules.lyap

    def loss(a, q):
        return jnp.sum(plain(a, q, method="schur") ** 2)

    for transformed in (jax.grad(loss, argnums=(0, 1)), jax.hessian(loss)):
        jaxpr = jax.make_jaxpr(transformed)(A, Q).jaxpr
        assert _count_primitive(jaxpr, "schur") == 1


def test_kron_lu_computed_once_for_all_derivatives():
    A, Q = random_stable(3, 3), random_spd(3, 3)

    def loss(a, q):
        return jnp.sum(rules.lyap(a, q, method="kron") ** 2)

    for transformed in (jax.grad(loss, argnums=(0, 1)), jax.hessian(loss)):
        assert _count_primitive(jax.make_jaxpr(transformed)(A, Q).jaxpr, "lu") == 1


def test_sign_iteration_run_once_for_gradient():
    A, Q = random_stable(3, 2), random_spd(3, 2)
    grad = jax.grad(lambda a, q: jnp.sum(rules.lyap(a, q, method="sign") ** 2), argnums=(0, 1))
    assert _count_primitive(jax.make_jaxpr(grad)(A, Q).jaxpr, "lu") == 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("func", [lyap, dlyap])
def test_bad_shapes_raise_value_error_naming_shapes(func):
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        func(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 2\)"):
        func(np.zeros((3, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        func(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(2, 3, 3\).*\(4, 3, 3\)"):
        func(np.zeros((2, 3, 3)), np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match="method"):
        func(np.eye(2), np.eye(2), method="kronecker")
    with pytest.raises(TypeError):
        func(np.eye(2) * 1j, np.eye(2))


@pytest.mark.parametrize("method", LYAP_METHODS)
def test_lyap_singular_a_gives_nan(method):
    A = np.array([[-1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, -2.0]])  # eigenvalue 0
    assert np.all(np.isnan(lyap(A, np.eye(3), method=method)))
    A_zero_block = np.array([[0.0, 1.0], [0.0, 0.0]])
    assert np.all(np.isnan(lyap(A_zero_block, np.eye(2), method=method)))


@pytest.mark.cpu_only
def test_lyap_sign_needs_one_half_plane():
    A = np.diag([-1.0, 2.0, -3.0])  # λᵢ + λⱼ ≠ 0: unique solution, but sign(A) ≠ ±I
    Q = random_spd(3, 3)
    assert np.all(np.isnan(lyap(A, Q, method="sign")))
    assert rel_err(lyap(A, Q, method="schur"), kron_lyap(A, Q)) <= 1e-12


@pytest.mark.parametrize("method", LYAP_METHODS)
def test_lyap_eigenvalues_summing_to_zero_give_nan(method):
    A = np.array([[0.0, 1.0], [-1.0, 0.0]])  # ±i: λ₁ + λ₂ = 0
    assert np.all(np.isnan(lyap(A, np.eye(2), method=method)))


def test_dlyap_doubling_nan_when_not_contractive():
    Q = np.eye(2)
    for A in (np.diag([0.5, 1.5]), np.diag([1.0, 0.5]), np.array([[0.0, 1.0], [-1.0, 0.0]])):
        assert np.all(np.isnan(dlyap(A, Q, method="doubling")))


@pytest.mark.parametrize("method", DLYAP_METHODS)
def test_dlyap_unit_circle_pairs_give_nan(method):
    c, s = np.cos(0.3), np.sin(0.3)
    A = np.array([[c, s], [-s, c]])  # |λ| = 1: λ λ̄ = 1, no unique solution
    assert np.all(np.isnan(dlyap(A, np.eye(2), method=method)))
    assert np.all(np.isnan(dlyap(np.diag([1.0, 0.3]), np.eye(2), method=method)))


@pytest.mark.cpu_only
def test_nan_under_jit_and_vmap_is_per_matrix():
    A = np.stack([np.diag([-1.0, -2.0]), np.diag([0.0, -2.0])])
    for method in LYAP_METHODS:
        X = jax.jit(jax.vmap(lambda a: lyap(a, jnp.eye(2), method=method)))(A)
        assert np.all(np.isfinite(X[0])) and np.all(np.isnan(X[1]))
