"""Inverse and linear solve whose derivative rules reuse one factorisation.

Math (any reference on matrix calculus, e.g. Giles 2008, "Collected matrix derivative
results for forward and reverse mode AD"):

    X = A⁻¹ B:   tangent  Ẋ = A⁻¹ (Ḃ − Ȧ X)
                 cotangent B̄ = A⁻ᵀ X̄,  Ā = −B̄ Xᵀ
    X = A⁻¹:     tangent  Ẋ = −A⁻¹ Ȧ A⁻¹,  cotangent Ā = −A⁻ᵀ X̄ A⁻ᵀ

Every one of these is a solve with A or Aᵀ. ``lax.custom_linear_solve`` expresses exactly
that: the primal, every tangent and every cotangent (at any order) call the ``solve`` /
``transpose_solve`` closures, which close over one LU (or Cholesky) factorisation computed
once under ``lax.stop_gradient``. The dependence on A enters only through the linear
``matvec`` x ↦ A x, which JAX differentiates and transposes itself.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rules._checks import as_float_array, check_square
from rules._precision import full_precision

_ASSUME_A = ("gen", "pos")


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _lu_solvers(A, singular_tol=0.0):
    """LU-based solve and transpose-solve closures for batched A (..., n, n).

    The factorisation is taken under ``stop_gradient``: derivatives reach A only through
    the matvec of ``custom_linear_solve``. A singular A (a pivot with ``|u_ii| <=
    singular_tol``, by default an exactly zero one, or a non-finite pivot) makes both solvers
    return NaN everywhere instead of a partly finite answer.
    """
    lu, _, perm = lax.linalg.lu(lax.stop_gradient(A))
    pivots = jnp.diagonal(lu, axis1=-2, axis2=-1)
    singular = jnp.any((jnp.abs(pivots) <= singular_tol) | ~jnp.isfinite(pivots), axis=-1)
    singular = singular[..., None, None]
    inverse_perm = jnp.argsort(perm, axis=-1)

    def solve(_, b):
        x = jnp.take_along_axis(b, perm[..., None], axis=-2)
        x = lax.linalg.triangular_solve(lu, x, left_side=True, lower=True, unit_diagonal=True)
        x = lax.linalg.triangular_solve(lu, x, left_side=True, lower=False)
        return jnp.where(singular, jnp.nan, x)

    def transpose_solve(_, b):
        # Aᵀ = Uᵀ Lᵀ P, so Aᵀ x = b  ⇔  x = Pᵀ L⁻ᵀ U⁻ᵀ b.
        x = lax.linalg.triangular_solve(lu, b, left_side=True, lower=False, transpose_a=True)
        x = lax.linalg.triangular_solve(
            lu, x, left_side=True, lower=True, transpose_a=True, unit_diagonal=True
        )
        x = jnp.take_along_axis(x, inverse_perm[..., None], axis=-2)
        return jnp.where(singular, jnp.nan, x)

    return solve, transpose_solve


def _cholesky_solver(A_sym):
    """Cholesky-based solve for symmetric A (the operator is its own transpose)."""
    chol = lax.linalg.cholesky(lax.stop_gradient(A_sym))
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    failed = jnp.any(~(diag > 0), axis=-1)[..., None, None]  # NaN diag counts as failed

    def solve(_, b):
        x = lax.linalg.triangular_solve(chol, b, left_side=True, lower=True)
        x = lax.linalg.triangular_solve(chol, x, left_side=True, lower=True, transpose_a=True)
        return jnp.where(failed, jnp.nan, x)

    return solve


def _prepare(A, B, assume_a):
    if assume_a not in _ASSUME_A:
        raise ValueError(f"assume_a must be one of {_ASSUME_A}; got {assume_a!r}")
    A = as_float_array("A", A)
    B = as_float_array("B", B)
    n = check_square("A", A)
    dtype = jnp.result_type(A, B)
    A, B = A.astype(dtype), B.astype(dtype)
    vector = B.ndim == 1
    if vector:
        if B.shape[0] != n:
            raise ValueError(
                f"B must have shape (n,) or (..., n, k) with n = A.shape[-1]; "
                f"got A.shape = {A.shape}, B.shape = {B.shape}"
            )
        B = jnp.broadcast_to(B[:, None], A.shape[:-2] + (n, 1))
    else:
        if B.shape[-2] != n:
            raise ValueError(
                f"B must have shape (n,) or (..., n, k) with n = A.shape[-1]; "
                f"got A.shape = {A.shape}, B.shape = {B.shape}"
            )
        try:
            batch = jnp.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except ValueError:
            raise ValueError(
                f"the batch dimensions of A and B do not broadcast; "
                f"got A.shape = {A.shape}, B.shape = {B.shape}"
            ) from None
        A = jnp.broadcast_to(A, batch + A.shape[-2:])
        B = jnp.broadcast_to(B, batch + B.shape[-2:])
    if assume_a == "pos":
        # Only the symmetric part is used: the function is then defined for every A and its
        # cotangent with respect to A is exactly symmetric.
        A = (A + _mT(A)) * 0.5
    return A, B, vector


def _solve(A, B, assume_a):
    """X = A⁻¹ B for prepared, batch-aligned A (..., n, n) and B (..., n, k)."""

    def matvec(x):
        return A @ x

    if assume_a == "pos":
        solve = _cholesky_solver(A)
        return lax.custom_linear_solve(matvec, B, solve, symmetric=True)
    solve, transpose_solve = _lu_solvers(A)
    return lax.custom_linear_solve(matvec, B, solve, transpose_solve)


@full_precision
def solve(A, B, *, assume_a: str = "gen"):
    """Solve ``A X = B`` with one factorisation shared by the primal and all derivatives.

    Tangent ``Ẋ = A⁻¹ (Ḃ − Ȧ X)``; cotangents ``B̄ = A⁻ᵀ X̄``, ``Ā = −B̄ Xᵀ``. Both modes and
    higher orders go through ``lax.custom_linear_solve``, so each extra tangent or cotangent
    costs two triangular solves with the same LU (or Cholesky) factors, never a new
    factorisation.

    Args:
        A: ``(..., n, n)`` coefficient matrices; leading dimensions batch.
        B: ``(n,)`` a vector, or ``(..., n, k)`` right-hand sides (batch dimensions broadcast
            against A's).
        assume_a: ``"gen"`` (LU with partial pivoting) or ``"pos"`` (Cholesky; A is taken to
            be symmetric positive definite and only its symmetric part ``(A + Aᵀ)/2`` is
            used, so the cotangent of A is exactly symmetric).

    Returns:
        X with ``A X = B``: shape ``(..., n)`` for a vector B, else the broadcast
        ``(..., n, k)``. If A is exactly singular (a zero pivot in LU) or, for ``"pos"``,
        not numerically positive definite (Cholesky fails), the corresponding X is NaN
        everywhere, and so are its derivatives: never a silently finite answer.

    Raises:
        ValueError: if A is not square, B's shape does not match, the batch dimensions do
            not broadcast, or ``assume_a`` is unknown (the message names the shapes).
        TypeError: for complex inputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from rules import solve
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> b = jnp.array([1.0, 2.0])
        >>> x = solve(A, b, assume_a="pos")
        >>> bool(jnp.allclose(A @ x, b)), x.shape, solve(A, jnp.ones((2, 3))).shape
        (True, (2,), (2, 3))
        >>> g = jax.grad(lambda A: solve(A, b).sum())(A)
        >>> bool(jnp.allclose(g, -jnp.outer(solve(A.T, jnp.ones(2)), x)))  # Ā = −A⁻ᵀ 1 xᵀ
        True
    """
    A, B, vector = _prepare(A, B, assume_a)
    X = _solve(A, B, assume_a)
    return X[..., 0] if vector else X


@full_precision
def inv(A, *, assume_a: str = "gen"):
    """Matrix inverse with the derivative rules of :func:`solve` (one factorisation).

    Tangent ``−A⁻¹ Ȧ A⁻¹``, cotangent ``−A⁻ᵀ Ā A⁻ᵀ``, both as solves with the same factors.

    Args:
        A: ``(..., n, n)``; leading dimensions batch.
        assume_a: ``"gen"`` (LU) or ``"pos"`` (Cholesky on ``(A + Aᵀ)/2``; the returned
            inverse and the cotangent of A are then exactly symmetric).

    Returns:
        ``A⁻¹`` with A's shape; NaN everywhere for an exactly singular A (or a non positive
        definite one with ``"pos"``).

    Raises:
        ValueError: if A is not square or ``assume_a`` is unknown.
        TypeError: for complex inputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from rules import inv
        >>> A = jnp.array([[2.0, 1.0], [0.0, 3.0]])
        >>> Ainv = inv(A)
        >>> bool(jnp.allclose(A @ Ainv, jnp.eye(2)))
        True
        >>> Ainv_, dAinv = jax.jvp(inv, (A,), (jnp.eye(2),))  # tangent −A⁻¹ I A⁻¹ = −A⁻²
        >>> bool(jnp.allclose(dAinv, -Ainv @ Ainv))
        True
    """
    A = as_float_array("A", A)
    n = check_square("A", A)
    eye = jnp.broadcast_to(jnp.eye(n, dtype=A.dtype), A.shape)
    A, eye, _ = _prepare(A, eye, assume_a)
    X = _solve(A, eye, assume_a)
    if assume_a == "pos":
        X = (X + _mT(X)) * 0.5  # exact symmetry (a + b == b + a in floating point)
    return X
