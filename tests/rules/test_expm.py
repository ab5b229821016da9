"""Tests for ``rules.expm`` and ``rules.expm_frechet``.

References: mpmath at 40 digits (accuracy), ``scipy.linalg.expm`` / ``expm_frechet`` (same
matrices, the error budget), the ``2n × 2n`` block formula for the Fréchet derivative, and
finite differences (``check_grads``) for the derivative rules.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import scipy.linalg as sla

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

import rules
from rules import _expm

UNIT_ROUNDOFF = 2.0**-53


# ----------------------------------------------------------------------------- helpers


def _rel_err(x, ref):
    return np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref)


def _mp_expm(a):
    with mpmath.workdps(40):
        x = mpmath.expm(mpmath.matrix(np.asarray(a, np.float64).tolist()))
        return np.array(x.tolist(), dtype=np.float64)


def _spectrum(norm, n, rng):
    # Up to ‖A‖ = 10 anything goes; beyond, keep e^A of order one (one eigenvalue near 0.5,
    # the rest in [-‖A‖, 1]) so the reference neither overflows nor underflows to zero.
    lam = rng.uniform(-1.0, 1.0, n) * norm if norm <= 10 else rng.uniform(-norm, 1.0, n)
    lam[0] = 0.5 if norm > 10 else lam[0]
    return lam


def _test_matrix(kind, norm, n, rng):
    """A real n×n matrix with ‖A‖₁ = norm: orthogonally diagonalisable ("normal") or an
    orthogonal similarity of an upper-triangular matrix with a large strict upper part."""
    lam = _spectrum(norm, n, rng)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    if kind == "normal":
        a = q @ np.diag(lam) @ q.T
    else:
        a = q @ (np.diag(lam) + 3.0 * norm * np.triu(rng.standard_normal((n, n)), 1)) @ q.T
    return a * (norm / np.abs(a).sum(axis=0).max())


def _block_frechet(a, e):
    n = a.shape[-1]
    big = np.block([[a, e], [np.zeros_like(a), a]])
    return sla.expm(big)[:n, n:]


# Eager calls run each primitive through its jitted implementation, cached per shape, so the
# tests below share compilations by sticking to N×N matrices and batches of BATCH.
expm_jit = rules.expm
frechet_jit = rules.expm_frechet
N, BATCH = 4, 4

NORMS = [1e-8, 1e-4, 1e-2, 0.3, 1.0, 3.0, 10.0, 100.0, 1e3, 1e4]


# ----------------------------------------------------------------------------- accuracy


def _error_budget(a, ref):
    """10x SciPy's error on the same matrix, where errors below the rounding noise of the
    problem, u·κ_exp(A) (κ_exp the relative condition number, ``scipy.linalg.expm_cond``),
    count as that noise: for ill-conditioned matrices which of two correct codes wins is a
    rounding lottery (seen both ways by 20x)."""
    noise = UNIT_ROUNDOFF * max(1.0, sla.expm_cond(a))
    return 10 * max(_rel_err(sla.expm(a), ref), noise)


@pytest.mark.parametrize("kind", ["normal", "nonnormal"])
def test_expm_accuracy_against_mpmath(kind):
    rng = np.random.default_rng(0 if kind == "normal" else 1)
    for norm in NORMS:
        a = _test_matrix(kind, norm, N, rng)
        ref = _mp_expm(a)
        ours = _rel_err(expm_jit(a), ref)
        assert ours <= _error_budget(a, ref), (kind, norm, ours, _rel_err(sla.expm(a), ref))
        if kind == "normal" and norm <= 10:
            assert ours <= 1e-13, (norm, ours)
        if norm <= 1.0:  # well conditioned: within 10x of SciPy outright (or of u)
            assert ours <= 10 * max(_rel_err(sla.expm(a), ref), UNIT_ROUNDOFF)


@pytest.mark.slow
def test_expm_no_systematic_loss_against_scipy():
    # Over many strongly non-normal matrices the error ratio to SciPy is a lottery in both
    # directions; the geometric mean shows there is no systematic loss.
    rng = np.random.default_rng(11)
    log_ratios = []
    for norm in (1e2, 1e3, 1e4):
        for _ in range(12):
            a = _test_matrix("nonnormal", norm, N, rng)
            ref = _mp_expm(a)
            ours = _rel_err(expm_jit(a), ref)
            log_ratios.append(np.log(ours / max(_rel_err(sla.expm(a), ref), UNIT_ROUNDOFF)))
    assert np.exp(np.mean(log_ratios)) <= 2.0


def test_expm_batch_matches_single_matrices():
    # Mixed norms in one batch: the degree is the batch maximum, squarings are per matrix.
    rng = np.random.default_rng(2)
    batch = np.stack([_test_matrix("nonnormal", norm, N, rng) for norm in (1e-4, 0.3, 10, 1e3)])
    out = np.asarray(expm_jit(batch))
    for a, x in zip(batch, out):
        ref = _mp_expm(a)
        assert _rel_err(x, ref) <= _error_budget(a, ref)
    # any number of leading dims, and vmap, agree with the flat batch
    np.testing.assert_allclose(expm_jit(batch.reshape(2, 2, N, N)).reshape(out.shape), out,
                               rtol=1e-14, atol=0)
    np.testing.assert_allclose(jax.vmap(rules.expm)(batch), out, rtol=1e-14, atol=0)
    np.testing.assert_allclose(jax.jit(rules.expm)(batch), out, rtol=1e-14, atol=0)


@pytest.mark.parametrize("norm", [1e-3, 0.5, 3.0, 40.0, 300.0])
def test_frechet_against_scipy_and_block_formula(norm):
    # mildly non-normal (V diag(λ) V⁻¹), so that two correct codes agree to 1e-11
    rng = np.random.default_rng(3)
    a = _grad_test_matrix(norm, rng, N)
    e = rng.standard_normal((N, N))
    expm_a, frechet_ae = (np.asarray(x) for x in frechet_jit(a, e))
    scipy_expm, scipy_frechet = sla.expm_frechet(a, e)
    assert _rel_err(expm_a, scipy_expm) <= 1e-11
    assert _rel_err(frechet_ae, scipy_frechet) <= 1e-11
    assert _rel_err(frechet_ae, _block_frechet(a, e)) <= 1e-11
    # and the same number from our own expm of the block
    big = np.block([[a, e], [np.zeros_like(a), a]])
    assert _rel_err(np.asarray(expm_jit(big))[:N, N:], scipy_frechet) <= 1e-11


@pytest.mark.parametrize("norm", [1e5, 1e6, 1e8])
@pytest.mark.parametrize("kind", ["normal", "nonnormal"])
def test_huge_norms_finite_and_right(norm, kind):
    rng = np.random.default_rng(4)
    a = _test_matrix(kind, norm, 4, rng)
    ref = sla.expm(a)
    out = np.asarray(expm_jit(a))
    assert np.all(np.isfinite(out))
    assert _rel_err(out, ref) <= 1e-6
    expm_a, frechet_ae = frechet_jit(a, np.eye(4))
    _, scipy_frechet = sla.expm_frechet(a, np.eye(4))
    assert np.all(np.isfinite(np.asarray(frechet_ae)))
    assert _rel_err(frechet_ae, scipy_frechet) <= 1e-6


def test_badly_scaled_upper_triangular():
    # entries spanning 1e0 .. 1e8 above a stable diagonal
    t = np.array([[-1.0, 1e2, 1e4, 1e8],
                  [0.0, -2.0, 1e3, 1e6],
                  [0.0, 0.0, -0.5, 1e5],
                  [0.0, 0.0, 0.0, -3.0]])
    ref = _mp_expm(t)
    out = np.asarray(expm_jit(t))
    assert np.all(np.isfinite(out))
    assert _rel_err(out, ref) <= _error_budget(t, ref)
    assert np.allclose(np.tril(out, -1), 0.0)
    # SciPy's expm_frechet scales by ‖A‖₁ and overscales here (error 4e-9); ours chooses s
    # from ‖A^k‖^{1/k}. Reference: mpmath on the 2n×2n block.
    e = np.random.default_rng(12).standard_normal((4, 4))
    _, frechet_ae = frechet_jit(t, e)
    ref_frechet = _mp_expm(np.block([[t, e], [np.zeros_like(t), t]]))[:4, 4:]
    ours = _rel_err(frechet_ae, ref_frechet)
    assert ours <= 1e-12
    assert ours <= _rel_err(sla.expm_frechet(t, e)[1], ref_frechet)


@pytest.mark.parametrize("norm", [1e-3, 0.5, 3.0, 10.0])
@pytest.mark.parametrize("kind", ["normal", "nonnormal"])
def test_float32_accuracy(norm, kind):
    rng = np.random.default_rng(5)
    a = _test_matrix(kind, norm, 4, rng).astype(np.float32)
    ref = _mp_expm(a.astype(np.float64))
    out = expm_jit(jnp.asarray(a))
    assert out.dtype == jnp.float32
    assert _rel_err(out, ref) <= 1e-5
    e = rng.standard_normal((4, 4)).astype(np.float32)
    expm_a, frechet_ae = frechet_jit(jnp.asarray(a), jnp.asarray(e))
    assert frechet_ae.dtype == jnp.float32
    _, ref_frechet = sla.expm_frechet(a.astype(np.float64), e.astype(np.float64))
    assert _rel_err(expm_a, ref) <= 1e-5
    assert _rel_err(frechet_ae, ref_frechet) <= 1e-5


# ----------------------------------------------------------------------------- bad input


def test_nonfinite_input_gives_nan_and_leaves_the_rest_of_the_batch():
    a = np.stack([np.eye(N) * 0.1, np.full((N, N), np.nan), np.diag([np.inf] + [0.0] * (N - 1)),
                  np.eye(N) * 30.0])
    out = np.asarray(expm_jit(a))
    np.testing.assert_allclose(out[0], sla.expm(a[0]), rtol=1e-14)
    np.testing.assert_allclose(out[3], sla.expm(a[3]), rtol=1e-14)
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2]))
    e = np.ones((BATCH, N, N))
    e[0, 0, 0] = np.nan
    r, el = frechet_jit(np.stack([a[0], a[0], a[1], a[3]]), e)
    assert np.all(np.isnan(np.asarray(el)[0])) and np.all(np.isnan(np.asarray(el)[2]))
    assert np.all(np.isfinite(np.asarray(el)[1])) and np.all(np.isfinite(np.asarray(el)[3]))


def test_shape_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        rules.expm(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        rules.expm(jnp.ones(3))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        rules.expm_frechet(jnp.ones((3, 3)), jnp.ones((4, 4)))
    with pytest.raises(TypeError):
        rules.expm(jnp.ones((2, 2), jnp.complex64))


def test_integer_input_and_zero_matrix():
    np.testing.assert_array_equal(rules.expm(np.zeros((N, N), np.int32)), np.eye(N))
    assert rules.expm(np.zeros((0, 0))).shape == (0, 0)


def test_duck_typed_structured_operator():
    class Marked:
        def __rules_expm__(self):
            return "structured"

    assert rules.expm(Marked()) == "structured"


# ----------------------------------------------------------------------------- derivatives


def _grad_test_matrix(norm, rng, n=N):
    """Diagonalisable A = V diag(λ) V⁻¹ with ‖A‖₁ ≈ norm and e^A of order one."""
    v = rng.standard_normal((n, n)) + 2 * np.eye(n)
    lam = _spectrum(norm, n, rng)
    a = v @ np.diag(lam) @ np.linalg.inv(v)
    return a * (norm / np.abs(a).sum(axis=0).max())


@pytest.mark.parametrize("norm", [0.01, 0.5, 3.0, 12.0, 300.0])
def test_check_grads_second_order(norm):
    rng = np.random.default_rng(6)
    a = _grad_test_matrix(norm, rng)
    check_grads(rules.expm, (a,), order=2, modes=("fwd", "rev"))
    if norm >= 12:  # the squaring phase is exercised
        _, _, s, _, _ = _expm._select(jnp.asarray(a)[None], _expm._THETA["double"], -53.0)
        assert int(s[0]) > 0


def test_check_grads_under_vmap():
    rng = np.random.default_rng(7)
    a = np.stack([_grad_test_matrix(norm, rng) for norm in (0.01, 3.0, 12.0, 300.0)])
    check_grads(jax.vmap(rules.expm), (a,), order=2, modes=("fwd", "rev"))


def test_check_grads_frechet_both_arguments():
    rng = np.random.default_rng(8)
    a = _grad_test_matrix(3.0, rng)
    e = rng.standard_normal((N, N))
    check_grads(lambda a, e: rules.expm_frechet(a, e)[1], (a, e), order=2,
                modes=("fwd", "rev"))


def test_jvp_and_vjp_are_the_frechet_derivative_and_its_adjoint():
    rng = np.random.default_rng(9)
    a = _grad_test_matrix(12.0, rng)
    t = rng.standard_normal((N, N))
    g = rng.standard_normal((N, N))
    _, tangent = jax.jvp(rules.expm, (a,), (t,))
    np.testing.assert_allclose(tangent, sla.expm_frechet(a, t)[1], rtol=1e-11)
    _, pullback = jax.vjp(rules.expm, a)
    np.testing.assert_allclose(pullback(g)[0], sla.expm_frechet(a.T, g)[1], rtol=1e-11)


def test_reverse_mode_stores_at_most_4n2_per_matrix():
    rng = np.random.default_rng(10)
    batch, n = BATCH, N
    a = np.stack([_grad_test_matrix(norm, rng, n) for norm in np.geomspace(1e-2, 50, batch)])
    _, pullback = jax.vjp(rules.expm, jnp.asarray(a))
    stored = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(pullback))
    assert stored <= 4 * n * n * batch, stored
    # and under vmap the linearised program closes over no more than that either
    _, lin = jax.linearize(jax.vmap(rules.expm), jnp.asarray(a))
    assert sum(np.size(c) for c in jax.tree_util.tree_leaves(lin)) <= 4 * n * n * batch


def test_kronecker_sum_dispatch_matches_dense():
    # e^{A ⊕ B} = e^A ⊗ e^B through KroneckerSum.__rules_expm__, against the dense expm
    rng = np.random.default_rng(13)
    a, b = _grad_test_matrix(1.0, rng, 2), _grad_test_matrix(2.0, rng, 2)
    op = rules.kron_sum(a, b)
    out = rules.expm(op)
    np.testing.assert_allclose(out.to_dense(), sla.expm(np.asarray(op.to_dense())), rtol=1e-12,
                               atol=1e-14)
