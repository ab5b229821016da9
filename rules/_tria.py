"""Square-root triangularisation ``tria(M) = L``: lower triangular, ``L Lᵀ = M Mᵀ``.

The primal is a QR decomposition of ``Mᵀ`` (``Mᵀ = Q R``, ``L = Rᵀ``) with the signs fixed so
that the diagonal of L is non-negative. The derivative never touches Q.

Math (Murray 2016, "Differentiation of the Cholesky decomposition", arXiv:1602.07527,
applied to ``P = M Mᵀ = L Lᵀ``): differentiating ``L Lᵀ = M Mᵀ`` gives

    L̇ = L Φ(L⁻¹ (Ṁ Mᵀ + M Ṁᵀ) L⁻ᵀ),   Φ(X) = tril(X) − diag(X)/2.

With ``S = L⁻¹ M`` (which is ``Qᵀ``, obtained by a triangular solve) and ``C = L⁻¹ Ṁ Sᵀ``,
the argument of Φ is ``C + Cᵀ``. The tangent is linear in Ṁ and built from triangular solves,
matmuls and masks, all of which JAX transposes, so reverse mode and higher orders follow
from the single ``custom_jvp``.

Rank-deficient M (a row of M that is zero or a combination of the rows above it). ``M ↦ L``
is not differentiable there (already ``tria([[m]]) = |m|`` at ``m = 0``), and when such a
row has independent rows below it, L is not even continuous. What is returned:

* Primal: the *canonical* factor, whose column j is zero when pivot j is zero (pivot
  ``L_jj ≤ τ_j = 10·max(n, k)·eps·‖M[j, :]‖``). The tolerance is per row: ``L_jj`` is the
  distance of row j from the span of the rows above, and Householder QR is column-wise
  backward stable (Higham 2002, Thm 19.4: each column of ``Mᵀ`` is perturbed by
  ``O(eps)·‖M[j, :]‖``), so only a pivot below ``τ_j`` is rounding. A scale shared by all rows
  (``max_i ‖M[i, :]‖``) would zero a small but valid row next to a large one (a state
  variance 1e-12 beside 1e6). Unpivoted LAPACK QR instead spends an
  arbitrary direction on such a row and fills the column below the zero pivot with
  arbitrary numbers; this is detected and, only then (a ``lax.cond``), the factor is
  recomputed by a Householder sweep that skips zero columns. Full-rank M: plain QR.
* Tangent: Murray's formula with ``L̃`` (L with zero pivots replaced by 1) in the solves, and
  the columns of zero pivots of ``L̇`` set to zero. Always finite (no division by a zero
  pivot). It is exact, i.e. ``L L̇ᵀ + L̇ Lᵀ = Ṁ Mᵀ + M Ṁᵀ``, for every Ṁ when the dependent
  rows come last (a zero noise block at the end, a singular trailing state block), and
  otherwise for every Ṁ that keeps each dependent row in the span of the rows above it (the
  direction in which L is differentiable; e.g. a state with zero variance stays one). In the
  remaining directions L jumps and no lower-triangular L̇ can be exact; the returned one is
  the minimum-norm choice that leaves the zero columns at zero.

Non-finite M (an ``inf`` or NaN entry) gives an all-NaN L for that matrix, never a factor
with the offending row read as zero (``inf`` would otherwise also make every tolerance
infinite).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rules._checks import as_float_array
from rules._precision import full_precision


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _pivot_tol(M):
    """``(..., n)``: pivot ``L_jj`` at or below entry j is "zero": 10·max(n, k)·eps·‖M[j, :]‖."""
    n, k = M.shape[-2], M.shape[-1]
    scale = jnp.sqrt(jnp.sum(M * M, axis=-1))
    return lax.stop_gradient(10.0 * max(n, k) * jnp.finfo(M.dtype).eps * scale)


def _qr_tria(M):
    R = jnp.linalg.qr(_mT(M), mode="r")
    L = _mT(R)
    diag = jnp.diagonal(L, axis1=-2, axis2=-1)
    sign = jnp.where(diag < 0, -1.0, 1.0).astype(L.dtype)
    return L * sign[..., None, :]


def _canonical_tria(M, tol):
    """Householder QR of Mᵀ that *skips* numerically zero columns instead of spending a
    reflection on them, so a dependent row j of M gives an all-zero column j of L.

    Unpivoted LAPACK QR picks an arbitrary direction for a zero column; entries below the
    zero pivot then depend discontinuously on M. The canonical factor (zero pivot ⇒ zero
    column) is the unique lower-triangular square root with that property; it is only
    computed when the LAPACK result is not already canonical.
    """
    A = _mT(M)  # (..., k, n)
    k, n = A.shape[-2], A.shape[-1]
    rows = jnp.arange(k)
    cols = jnp.arange(n)

    def step(j, carry):
        A, R, r = carry
        a = jnp.where(rows >= r[..., None], lax.dynamic_index_in_dim(A, j, -1, False), 0.0)
        norm = jnp.sqrt(jnp.sum(a * a, axis=-1))
        use = norm > lax.dynamic_index_in_dim(tol, j, -1, False)
        at_r = (rows == r[..., None]).astype(A.dtype)
        alpha = jnp.sum(a * at_r, axis=-1)
        s = jnp.where(alpha >= 0, 1.0, -1.0).astype(A.dtype)
        v = a + (s * norm)[..., None] * at_r  # H a = −s‖a‖ e_r
        vv = jnp.sum(v * v, axis=-1)
        beta = jnp.where(use & (vv > 0), 2.0 / jnp.where(vv > 0, vv, 1.0), 0.0)
        A = A - beta[..., None, None] * v[..., :, None] * jnp.einsum("...k,...kn->...n", v, A)[..., None, :]
        row = -s[..., None] * jnp.einsum("...k,...kn->...n", at_r, A)
        row = jnp.where(use[..., None] & (cols >= j), row, 0.0)
        R = lax.dynamic_update_index_in_dim(R, row, j, -2)
        return A, R, r + use.astype(r.dtype)

    R0 = jnp.zeros(A.shape[:-2] + (n, n), A.dtype)
    r0 = jnp.zeros(A.shape[:-2], jnp.int32)
    _, R, _ = lax.fori_loop(0, n, step, (A, R0, r0))
    return _mT(R)


def _primal(M):
    L = _qr_tria(M)
    tol = _pivot_tol(M)  # (..., n), row j's
    diag = jnp.diagonal(L, axis1=-2, axis2=-1)
    # per column j: an entry below the pivot above its own row's tolerance
    below = jnp.any(jnp.abs(jnp.tril(L, -1)) > tol[..., :, None], axis=-2)
    not_canonical = jnp.any((diag <= tol) & below, axis=-1)

    def repair():
        fixed = jnp.where(not_canonical[..., None, None], _canonical_tria(M, tol), L)
        finite = jnp.all(jnp.isfinite(M), axis=(-2, -1))
        return jnp.where(finite[..., None, None], fixed, jnp.nan)

    # A non-finite entry makes its row's tolerance non-finite, so the exact (costlier) test
    # for non-finite M only runs then, in the rarely taken branch.
    L = lax.cond(jnp.any(not_canonical) | ~jnp.all(jnp.isfinite(tol)), repair, lambda: L)
    # A numerically zero pivot (its column is now below τ everywhere) becomes an exact zero
    # (never a NaN pivot: NaN <= τ is False).
    zero_pivot = jnp.diagonal(L, axis1=-2, axis2=-1) <= tol
    return jnp.where(zero_pivot[..., None, :], 0.0, L)


@jax.custom_jvp
def _tria(M):
    return _primal(M)


@_tria.defjvp
@full_precision
def _tria_jvp(primals, tangents):
    (M,), (M_dot,) = primals, tangents
    L = _tria(M)
    return L, _tria_tangent(M, L, M_dot)


def _tria_tangent(M, L, M_dot):
    """Murray's L̇ with the zero-pivot convention of the module docstring."""
    n = M.shape[-2]
    diag = jnp.diagonal(L, axis1=-2, axis2=-1)
    pivot = lax.stop_gradient(diag > _pivot_tol(M))
    # L̃: zero pivots replaced by 1 so every solve is well defined.
    unit_fix = jnp.where(pivot, 0.0, 1.0 - diag).astype(L.dtype)
    L_safe = L + unit_fix[..., None, :] * jnp.eye(n, dtype=L.dtype)
    S = lax.linalg.triangular_solve(L_safe, M, left_side=True, lower=True)  # L̃⁻¹ M
    C = lax.linalg.triangular_solve(L_safe, M_dot @ _mT(S), left_side=True, lower=True)
    Z = C + _mT(C)
    phi = jnp.tril(Z) - 0.5 * Z * jnp.eye(n, dtype=Z.dtype)
    return (L_safe @ phi) * pivot[..., None, :].astype(L.dtype)


@full_precision
def tria(M):
    """Lower-triangular square root of ``M Mᵀ``: ``L`` with ``L Lᵀ = M Mᵀ``, ``diag(L) ≥ 0``.

    This is the triangularisation step of square-root Kalman filters: for instance
    ``tria([[H P½, R½], [P½, 0]])`` yields the innovation factor, the gain term and the updated
    state factor in one call. It is the R factor of ``QR(Mᵀ)``, transposed and sign-fixed.

    Derivative: ``L̇ = L Φ(L⁻¹ (Ṁ Mᵀ + M Ṁᵀ) L⁻ᵀ)``, Φ = lower triangle with halved diagonal
    (Murray 2016), from M and L only (Q is never formed); forward, reverse and higher orders.
    Unlike JAX's QR derivative it stays finite for rank-deficient M (zero columns, zero or
    dependent rows): L is then the canonical factor (zero column under a zero pivot), a
    zero pivot's column gets a zero derivative and the rest of L̇ solves
    ``L L̇ᵀ + L̇ Lᵀ = Ṁ Mᵀ + M Ṁᵀ`` (see the module docstring for exactly when).

    Args:
        M: ``(..., n, k)``; leading dimensions batch. ``k ≥ n`` is the usual case; ``k < n``
            is accepted and treated as M padded with zero columns (L is then singular).

    Returns:
        L: ``(..., n, n)`` lower triangular with non-negative diagonal.

    Raises:
        ValueError: if M has rank < 2 (names the shape).
        TypeError: for complex inputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from rules import tria
        >>> M = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0]])
        >>> L = tria(M)
        >>> L.shape, bool(jnp.allclose(L @ L.T, M @ M.T)), bool(jnp.all(jnp.triu(L, 1) == 0))
        ((2, 2), True, True)
        >>> # Σ log diag(L) = ½ log det(M Mᵀ), whose gradient is (M Mᵀ)⁻¹ M
        >>> g = jax.grad(lambda M: jnp.log(jnp.diag(tria(M))).sum())(M)
        >>> bool(jnp.allclose(g, jnp.linalg.solve(M @ M.T, M)))
        True
    """
    M = as_float_array("M", M)
    if M.ndim < 2:
        raise ValueError(f"M must have shape (..., n, k); got M.shape = {M.shape}")
    n, k = M.shape[-2], M.shape[-1]
    if k < n:
        M = jnp.concatenate([M, jnp.zeros(M.shape[:-1] + (n - k,), M.dtype)], axis=-1)
    return _tria(M)
