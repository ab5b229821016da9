r"""Differentiable Lyapunov solves: ``lyap`` (continuous) and ``dlyap`` (discrete).

Conventions:

* ``lyap(A, Q)`` returns ``X`` with ``A X + X Aᵀ + Q = 0``; for a stable ``A`` and
  ``Q = G Gᵀ`` this is the stationary covariance of ``dx = A x dt + G dW``.
* ``dlyap(A, Q)`` returns ``X`` with ``A X Aᵀ − X + Q = 0``; for ``ρ(A) < 1`` this is the
  stationary covariance of ``x[k+1] = A x[k] + w[k]``, ``Cov(w) = Q``.

Both are linear solves ``𝓛_A(X) = −Q`` with the operators

    𝓛_A(X) = A X + X Aᵀ         (continuous),     𝓛_A(X) = A X Aᵀ − X     (discrete),

so both are written as one ``lax.custom_linear_solve``: ``matvec = 𝓛_A`` (differentiable in
``A``), and ``solve`` / ``transpose_solve`` close over a factorisation of ``A`` computed once
under ``lax.stop_gradient``. Differentiating ``𝓛_A(X) = −Q`` gives

    tangent:   𝓛_A(Ẋ) = −Q̇ − 𝓛_Ȧ(X)                    (same operator, new right side)
    adjoint:   S = lyap(Aᵀ, X̄) (resp. dlyap(Aᵀ, X̄)),  Q̄ = S,
               Ā = S Xᵀ + Sᵀ X (continuous),   Ā = S A Xᵀ + Sᵀ A X (discrete),

because the transposed operator 𝓛_Aᵀ is 𝓛 at ``Aᵀ``. ``custom_linear_solve`` derives every tangent, cotangent and
higher-order derivative from ``matvec`` and the two solvers, so each one costs one more solve
with the SAME factors, never a new factorisation or a differentiated iteration.

Methods
-------
``"schur"`` (both; CPU only, ``method="auto"`` on CPU) — Bartels & Stewart (1972): a real Schur
form ``A = Z T Zᵀ`` from LAPACK (``jax.scipy.linalg.schur``), turned into a complex upper
triangular one ``A = U R Uᴴ`` (``U = Z G``, ``G`` the block-diagonal 2×2 unitary rotations
that triangularise the 2×2 blocks: all commute, so this costs O(n²)). With ``Y = Uᴴ X U``,
``C = Uᴴ (−Q) U`` the continuous equation becomes triangular, ``R Y + Y Rᴴ = C``, solved
column by column from the last (``lax.fori_loop``, written out in Python for ``n ≤ 4``;
column ``j`` needs only columns ``k > j``):

    (R + r̄ⱼⱼ I) yⱼ = cⱼ − Σ_{k>j} r̄ⱼₖ yₖ,

one O(n²) triangular solve per column, O(n³) in all (the loop keeps ``R + r̄ⱼⱼ I`` and resets
only its diagonal, and stores ``Yᵀ`` so that a column is a contiguous row). The transposed operator needs
``Rᴴ W + W R = C``; reversing the index order (``P`` the flip) makes ``P Rᴴ P`` upper
triangular, so it is the same sweep with ``(P Rᴴ P, U P)``. The solution is unique iff
``λᵢ + λⱼ ≠ 0`` for all eigenvalue pairs; the output is NaN when ``min |λᵢ + λ̄ⱼ| ≤ τ``,
``τ = 10 √n ε ‖A‖_F`` (the size of the eigenvalues' rounding errors), e.g. for a singular ``A``.

The discrete equation goes through the Cayley (bilinear) transform first, as SciPy's
``solve_discrete_lyapunov`` does for n ≥ 10: for ``ω = ±1`` (``A X Aᵀ = (ωA) X (ωA)ᵀ``),
``K = (ωA + I)⁻¹`` and ``B = (ωA − I) K``,

    A X Aᵀ − X = C   ⇔   B X + X Bᵀ = 2 K C Kᵀ,

the continuous equation for ``B`` (the transposed operator: ``Bᵀ``, ``2 Kᵀ C K``). The Schur
factors of ``B`` and ``Zᵀ K``, ``Zᵀ Kᵀ`` (``K`` folded into the Schur transform) are the
factorisation. ``ω = +1`` unless ``A + I`` is poorly conditioned
(1-norm condition > 100), then the better conditioned of ``A ± I``, so eigenvalues near −1 lose
no accuracy (SciPy's ``ω = 1`` does); only eigenvalues near both +1 and −1 at once cost
accuracy (≈ ε times the condition of ``A ± I``). ``λᵢ λⱼ = 1`` ⇔ ``μᵢ + μⱼ = 0`` for the
eigenvalues ``μ = (ωλ − 1)/(ωλ + 1)`` of ``B``, so the same NaN test applies (to ``B``), e.g.
for an orthogonal ``A``; NaN also when both ``A ± I`` are singular.

``"kron"`` (``lyap``; small ``n``, any backend) — the Kronecker form: with row-major ``vec``,
``vec(A X + X Aᵀ) = (A ⊗ I + I ⊗ A) vec(X)``, one ``n² × n²`` LU with partial pivoting made
once (O(n⁶): for ``n <= 16``). The transposed operator is 𝓛 at ``Aᵀ``, whose matrix is the
transpose, so it reuses the same LU. The output is NaN when a pivot is ``<= τ`` (``τ`` as for
``"schur"``: ``λᵢ + λⱼ = 0`` makes the matrix singular, e.g. for a singular ``A``). Few and
large operations: for the 4×4 stationary start of a continuous-time model it costs a fraction
of the Schur sweep's column loop (``statespace.ContinuousLinearSSM.initial``).

``"sign"`` (``lyap``; runs on GPU/TPU, ``method="auto"`` there) — the matrix sign function
(Roberts 1980) of ``M = [[A, Q], [0, −Aᵀ]]`` is ``[[−I, 2X], [0, I]]`` for a stable ``A``.
Newton's iteration with Byers' (1987) determinant scaling ``cₖ = |det Aₖ|^{1/n}``,

    Aₖ₊₁ = (Aₖ / cₖ + cₖ Aₖ⁻¹) / 2,          Qₖ₊₁ = (Qₖ / cₖ + cₖ Aₖ⁻¹ Qₖ Aₖ⁻ᵀ) / 2,

needs only LU, inverses and matmuls; ``Aₖ → sign(A) = −I`` and ``Qₖ → 2X``. The inverses
``Aₖ⁻¹`` and scales ``cₖ`` are the "factorisation": they do not depend on ``Q``, so every
further right-hand side (tangents, cotangents) reruns only the two-matmul ``Q`` recursion with
the cached inverses; the transposed operator uses ``Aₖ⁻ᵀ``. An anti-stable ``A`` (``sign = +I``)
works too (``X = −Q∞/2``). Output is NaN when ``A`` has eigenvalues in both half planes or on
the imaginary axis (the iteration does not reach ``±I``), when it does not converge in 40
steps, or when ``κ₁(A) ≥ 1/(n ε)`` (numerically singular ``A``).

``"doubling"`` (``dlyap``; GPU/TPU, ``method="auto"`` there) — squared Smith iteration
(Smith 1968): ``X = Σᵢ Aⁱ Q Aⁱᵀ`` summed by doubling,

    Xₖ₊₁ = Xₖ + Pₖ Xₖ Pₖᵀ,     Pₖ₊₁ = Pₖ²,     P₀ = A, X₀ = Q,

pure matmuls; after ``K`` steps the remainder is ``P_K X P_Kᵀ`` and the loop stops once
``‖P_K‖_F² ≤ ε/10``; if that took so many doublings that ``1 − ρ(A)`` is at rounding level
(``2^(K−1) ≥ ln(1/√ε) / (10 √n ε)``) the output is NaN. The powers ``Pₖ`` are cached and reused for every further right-hand
side (``Pₖᵀ`` for the transposed operator). Needs ``ρ(A) < 1``; otherwise (or without
convergence in 60 doublings) the output is NaN. The refinement's correction ``E`` (below) is
summed only while its remainder bound ``‖Pₖ‖_F² ‖Eₖ‖_F`` exceeds ``ε/10 ‖X‖_F``, the
rounding level of the solution it corrects (usually two doublings fewer).

Refinement: the ``"schur"``, ``"sign"`` and ``"doubling"`` solves end with one step of iterative
refinement, ``X ← X + 𝓛̃⁻¹(B − 𝓛(X))``, the correction solved with the same factors and the
residual taken with the original ``A`` in about twice the working precision (Ozaki's
error-free splitting of the products, ``_split_matmul``). Without it these methods lost up to
~100x more than the dense Kronecker LU at high condition numbers (the Schur form rounds a
small eigenvalue ``λ`` with a relative error ``≈ ε ‖A‖ / |λ|``, the Cayley transform
``μ = (λ − 1)/(λ + 1)`` likewise; every derivative solve inherited it): the notebook's
``lyap`` tangent at ``κ ≈ 3.5e6`` was 1.6e-10 against the LU's 1.7e-12. A residual rounded to
working precision would not do: its own error ``≈ ε ‖A‖ ‖X‖``, amplified by ``κ``, is as large
as what it corrects. With the accurate residual one step makes ``X`` and its tangents
accurate to a few ``ε`` there (``tests/rules/test_lyap.py``), at the cost of a second
sweep per solve (the first step's right side is ``B`` itself: no residual of ``X = 0``).
``"kron"`` (an LU with partial pivoting) is left as it is. Cost against the solves before
refinement (same process, 2-core CPU, jax 0.10; forward / gradient): Schur at n = 64–128
1.08–1.14x / 1.12–1.21x (the sweep was made up to ~3x cheaper to pay for it), at n = 4–16
1.2–1.3x / 1.3–1.5x (bound by per-operation overhead: two more sweeps and a residual), sign
1.07–1.3x / 1.08–1.15x, doubling 1.6–1.9x / 1.7–2x (bound by its matmul count: ``K`` and about
``K − 2`` doublings plus the residual, against ``K``).

Symmetry: when ``Q`` (or any right-hand side of a derivative solve) is exactly symmetric the
returned ``X`` is symmetrised, so it is exactly symmetric; a non-symmetric ``Q`` is solved as
given.

References:
    R. H. Bartels, G. W. Stewart, "Solution of the matrix equation AX + XB = C",
    Comm. ACM 15 (1972) 820–826.
    J. D. Roberts, "Linear model reduction and solution of the algebraic Riccati equation by
    use of the sign function", Int. J. Control 32 (1980) 677–687 (report from 1971).
    R. Byers, "Solving the algebraic Riccati equation with the matrix sign function",
    Linear Algebra Appl. 85 (1987) 267–279.
    R. A. Smith, "Matrix equation XA + BX = C", SIAM J. Appl. Math. 16 (1968) 198–201.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules._checks import as_float_array, check_same_matrix_shape, check_square, common_dtype
from rules._linalg import _lu_solvers
from rules._precision import full_precision

__all__ = ["lyap", "dlyap"]

_LYAP_METHODS = ("auto", "schur", "sign", "kron")
# the largest n for method="kron" (an n² × n² LU)
KRON_MAX_N = 16
_DLYAP_METHODS = ("auto", "schur", "doubling")
_SIGN_MAX_ITERS = 40
_DOUBLING_MAX_ITERS = 60
_CAYLEY_CONDITION_OK = 100.0
# up to this n the Schur sweep and the refinement step are unrolled in Python (no loops): their
# loops' overhead is most of a small solve's cost, but written out they grow the program by
# ~2n triangular solves per solve (n = 8 in a likelihood's stationary start: +2.5 s compile)
_UNROLL_MAX_N = 4


# --------------------------------------------------------------------------------------
# public API


@full_precision
def lyap(A, Q, *, method: str = "auto"):
    r"""Solve the continuous Lyapunov equation ``A X + X Aᵀ + Q = 0`` for ``X``.

    For a stable ``A`` (all eigenvalues in the open left half plane) and ``Q = G Gᵀ``, ``X`` is
    the stationary covariance ``P∞ = ∫₀^∞ e^{At} Q e^{Aᵀt} dt`` of ``dx = A x dt + G dW``.
    Forward- and reverse-mode derivatives (any order) with respect to ``A`` and ``Q`` are
    defined on the solution through ``lax.custom_linear_solve``:
    ``A Ẋ + Ẋ Aᵀ = −(Q̇ + Ȧ X + X Ȧᵀ)`` and, for a cotangent ``X̄``, ``S = lyap(Aᵀ, X̄)``,
    ``Q̄ = S``, ``Ā = S Xᵀ + Sᵀ X``; each solve reuses the factorisation of ``A`` made once in
    the forward pass. See the module docstring for the
    methods and their math.

    Args:
        A: ``(..., n, n)`` real matrix (any leading batch dims, broadcast against ``Q``'s).
        Q: ``(..., n, n)`` real matrix. When ``Q`` is exactly symmetric, so is ``X``.
        method: ``"auto"`` (``"schur"`` on CPU, ``"sign"`` on GPU/TPU, by
            ``jax.default_backend()``), ``"schur"`` (Bartels–Stewart; CPU only; any ``A`` with
            ``λᵢ + λⱼ ≠ 0``), ``"sign"`` (Newton matrix-sign iteration; needs all
            eigenvalues of ``A`` in one open half plane) or ``"kron"`` (dense ``n² × n²`` LU;
            any backend, ``n <= 16``; any ``A`` with ``λᵢ + λⱼ ≠ 0``).

    Returns:
        ``X`` of shape ``broadcast(batch(A), batch(Q)) + (n, n)`` in the common floating dtype.
        NaN where the equation has no unique solution (e.g. singular ``A``) or the chosen
        method cannot solve it (see the module docstring); never a wrong finite answer.

    Raises:
        ValueError: if ``A`` is not ``(..., n, n)``, ``Q`` does not match it, the batch dims
            do not broadcast, ``method`` is unknown, or ``method="kron"`` with ``n > 16`` (the
            message names the shapes).
        TypeError: for complex or non-numeric inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from rules import lyap
        >>> A = jnp.array([[-1.0, 0.5], [0.0, -2.0]])
        >>> X = lyap(A, jnp.eye(2))
        >>> bool(jnp.allclose(A @ X + X @ A.T + jnp.eye(2), 0.0, atol=1e-6))
        True
        >>> bool(jnp.allclose(lyap(A, jnp.eye(2), method="kron"), X))
        True
        >>> round(float(lyap(jnp.array([[-2.0]]), jnp.array([[1.0]]))[0, 0]), 6)  # 1 / (2·2)
        0.25
    """
    A, Q, method = _prepare("lyap", A, Q, method, _LYAP_METHODS, "sign")
    if method == "kron" and A.shape[-1] > KRON_MAX_N:
        raise ValueError(f"lyap: method='kron' is for n <= {KRON_MAX_N} (an n² x n² LU); got A.shape = {A.shape}")
    core = partial(_lyap_single, method=method)
    return jnp.vectorize(core, signature="(n,n),(n,n)->(n,n)")(A, Q)


@full_precision
def dlyap(A, Q, *, method: str = "auto"):
    r"""Solve the discrete Lyapunov (Stein) equation ``A X Aᵀ − X + Q = 0`` for ``X``.

    For ``ρ(A) < 1`` and ``Q ⪰ 0``, ``X = Σᵢ Aⁱ Q Aⁱᵀ`` is the stationary covariance of
    ``x[k+1] = A x[k] + w[k]``, ``Cov(w) = Q``. Derivatives (forward, reverse, any order) with
    respect to ``A`` and ``Q`` are defined on the solution via ``lax.custom_linear_solve``:
    ``A Ẋ Aᵀ − Ẋ = −(Q̇ + Ȧ X Aᵀ + A X Ȧᵀ)``; the adjoint is the same equation at ``Aᵀ``, with
    ``Ā = S A Xᵀ + Sᵀ A X``; every derivative solve reuses the forward factorisation.

    Args:
        A: ``(..., n, n)`` real matrix (leading batch dims broadcast against ``Q``'s).
        Q: ``(..., n, n)`` real matrix. When ``Q`` is exactly symmetric, so is ``X``.
        method: ``"auto"`` (``"schur"`` on CPU, ``"doubling"`` on GPU/TPU), ``"schur"``
            (Cayley transform + Bartels–Stewart; CPU only; any ``A`` with ``λᵢ λⱼ ≠ 1``) or
            ``"doubling"`` (squared Smith iteration; needs ``ρ(A) < 1``).

    Returns:
        ``X`` with the broadcast batch shape, in the common floating dtype; NaN where the
        equation has no unique solution or the method cannot solve it (``ρ(A) ≥ 1`` for
        ``"doubling"``); never a wrong finite answer.

    Raises:
        ValueError: for non-square ``A``, mismatched ``Q``, non-broadcasting batch dims or an
            unknown ``method`` (the message names the shapes).
        TypeError: for complex or non-numeric inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from rules import dlyap
        >>> A = jnp.array([[0.5, 0.2], [0.0, -0.3]])
        >>> X = dlyap(A, jnp.eye(2))
        >>> bool(jnp.allclose(A @ X @ A.T - X + jnp.eye(2), 0.0, atol=1e-6))
        True
        >>> round(float(dlyap(jnp.array([[0.5]]), jnp.array([[1.0]]))[0, 0]), 6)  # 1 / (1 − 0.5²)
        1.333333
    """
    A, Q, method = _prepare("dlyap", A, Q, method, _DLYAP_METHODS, "doubling")
    core = partial(_dlyap_single, method=method)
    return jnp.vectorize(core, signature="(n,n),(n,n)->(n,n)")(A, Q)


def _prepare(fname, A, Q, method, methods, accelerator_method):
    A = as_float_array("A", A)
    Q = as_float_array("Q", Q)
    check_square("A", A)
    check_same_matrix_shape("A", A, "Q", Q)
    try:
        np.broadcast_shapes(A.shape[:-2], Q.shape[:-2])
    except ValueError:
        raise ValueError(
            f"{fname}: batch dims of A and Q do not broadcast; got A.shape = {A.shape}, "
            f"Q.shape = {Q.shape}"
        ) from None
    if method not in methods:
        raise ValueError(f"{fname}: method must be one of {methods}; got {method!r}")
    if method == "auto":
        method = "schur" if jax.default_backend() == "cpu" else accelerator_method
    dtype = common_dtype(A, Q)
    return A.astype(dtype), Q.astype(dtype), method


# --------------------------------------------------------------------------------------
# one matrix: custom_linear_solve around a factorisation made once


def _solve_on_solution(matvec, Q, solver, factors):
    """``matvec(X) = −Q`` as a ``custom_linear_solve``: both modes and every order reuse
    ``factors`` (computed once, under ``stop_gradient``) through ``solver``."""
    return lax.custom_linear_solve(
        matvec,
        -Q,
        solve=lambda _, b: _symmetric_preserving(partial(solver, factors, transpose=False), b),
        transpose_solve=lambda _, b: _symmetric_preserving(
            partial(solver, factors, transpose=True), b
        ),
    )


def _lyap_single(A, Q, *, method):
    # 𝓛_A(X) = A X + X Aᵀ = −Q. Tangent and adjoint are 𝓛_A and 𝓛_Aᵀ = 𝓛_{Aᵀ} solves with
    # new right sides (module docstring); custom_linear_solve builds them from matvec + the solvers.
    A_const = lax.stop_gradient(A)
    if method == "kron":
        factors = _kron_factors(A_const)
        solver = _kron_solve
    else:
        # Schur and sign solves lose more than the Kronecker LU to rounding at high condition
        # (the small eigenvalue's rounding error in the Schur form, the iteration's in sign),
        # and every derivative solve inherits it; one refinement step with an accurate
        # residual brings them below the LU's error (measured: tests/rules/test_lyap.py).
        factors = (_schur_factors if method == "schur" else _sign_factors)(A_const)
        plain_solve = _schur_solve if method == "schur" else _sign_solve

        def solver(factors, B, *, transpose):
            At = A_const.T if transpose else A_const
            plain = partial(plain_solve, factors, transpose=transpose)
            return _refined(plain, partial(_lyap_residual, At), B)

    def matvec(X):
        return A @ X + X @ A.T

    return _solve_on_solution(matvec, Q, solver, factors)


def _dlyap_single(A, Q, *, method):
    # 𝓛_A(X) = A X Aᵀ − X = −Q; tangent 𝓛_A(Ẋ) = −Q̇ − Ȧ X Aᵀ − A X Ȧᵀ, adjoint 𝓛_{Aᵀ}.
    A_const = lax.stop_gradient(A)
    if method == "schur":
        factors = _cayley_factors(A_const)

        # The Cayley transform rounds B's eigenvalues μ = (λ − 1)/(λ + 1) with an absolute
        # error ≈ ε, a relative one ≈ ε / |μ| for λ near 1 (float64: 1e-14 already at
        # λ = 0.96, against the Kronecker LU's 3e-16); one refinement step with an accurate
        # residual of the original Stein operator removes it (float32: ε κ reaches 1e-4 at
        # 1 − |λ| = 1e-3, n = 64, and is brought back to ≈ 1e-6).
        def solver(factors, B, *, transpose):
            At = A_const.T if transpose else A_const
            plain = partial(_cayley_solve, factors, transpose=transpose)
            return _refined(plain, partial(_stein_residual, At), B)
    else:
        factors = _doubling_factors(A_const)

        # the truncated sum's rounding grows like ε / (1 − ρ²); refined as the Schur solve,
        # the correction summed only until its remainder is below the solution's rounding
        def solver(factors, B, *, transpose):
            At = A_const.T if transpose else A_const
            X = _doubling_solve(factors, B, transpose=transpose)
            floor = jnp.finfo(B.dtype).eps / 10 * jnp.sqrt(jnp.sum(X * X))
            residual = _stein_residual(At, B, X)
            return X + _doubling_solve(factors, residual, transpose=transpose, floor=floor)

    def matvec(X):
        return A @ X @ A.T - X

    return _solve_on_solution(matvec, Q, solver, factors)


def _symmetric_preserving(solve, b):
    # 𝓛_A commutes with transposition, so a symmetric right side has a symmetric solution;
    # symmetrising then is exact math and removes the rounding asymmetry.
    x = solve(b)
    is_symmetric = jnp.all(b == b.T)
    return jnp.where(is_symmetric, 0.5 * (x + x.T), x)


def _nan_unless(ok, x):
    return jnp.where(ok, x, jnp.full_like(x, jnp.nan))


# --------------------------------------------------------------------------------------
# Bartels–Stewart on a complex triangular Schur form


def _complex_dtype(dtype):
    return jnp.complex64 if dtype == jnp.float32 else jnp.complex128


def _tridiag_right(M, d, sub, sup):
    """``M @ G`` for ``G`` with diagonal ``d``, ``G[k+1, k] = sub[k]``, ``G[k, k+1] = sup[k]``."""
    zero = jnp.zeros(M.shape[:-1] + (1,), M.dtype)
    from_left = jnp.concatenate([zero, M[:, :-1] * sup], axis=1)  # M[:, j-1] G[j-1, j]
    from_right = jnp.concatenate([M[:, 1:] * sub, zero], axis=1)  # M[:, j+1] G[j+1, j]
    return M * d + from_left + from_right


def _real_to_complex_schur(T, Z):
    """Triangularise the 2×2 blocks of a real Schur form ``A = Z T Zᵀ``.

    Each block ``[[a, b], [c, d]]`` (``c ≠ 0``) at rows/cols ``k, k+1`` has eigenvalue
    ``μ = (a+d)/2 + i √(−((a−d)²/4 + bc))`` with eigenvector ``x ∝ (b, μ − a)``; the unitary
    ``[[x₁, −x̄₂], [x₂, x̄₁]]`` maps the block to ``[[μ, ·], [0, μ̄]]``. The rotations act on
    disjoint index pairs, so they commute and form one tridiagonal unitary ``G``:
    ``A = (Z G) (Gᴴ T G) (Z G)ᴴ``. Returns ``(R, (d, sub, sup))`` with ``R = Gᴴ T G``.
    """
    n = T.shape[-1]
    cdtype = _complex_dtype(T.dtype)
    T = jnp.triu(T, k=-1)
    if n == 1:
        return T.astype(cdtype), (jnp.ones((1,), cdtype), jnp.zeros((0,), cdtype),
                                  jnp.zeros((0,), cdtype))
    a = jnp.diagonal(T)[:-1]
    d = jnp.diagonal(T)[1:]
    b = jnp.diagonal(T, offset=1)
    c = jnp.diagonal(T, offset=-1)
    starts = c != 0
    disc = ((a - d) / 2) ** 2 + b * c
    imag = jnp.sqrt(jnp.where(starts, jnp.maximum(-disc, 0.0), 1.0))
    x1 = jnp.where(starts, b, 1.0).astype(cdtype)
    x2 = jnp.where(starts, (d - a) / 2 + 1j * imag, 0.0).astype(cdtype)
    norm = jnp.sqrt(jnp.abs(x1) ** 2 + jnp.abs(x2) ** 2)
    x1, x2 = x1 / norm, x2 / norm
    ones = jnp.ones((1,), cdtype)
    # diagonal: x₁ at a block's first index, x̄₁ at its second, 1 elsewhere
    diag = jnp.concatenate([jnp.where(starts, x1, 1.0), ones])
    diag = diag * jnp.concatenate([ones, jnp.where(starts, jnp.conj(x1), 1.0)])
    sub = jnp.where(starts, x2, 0.0)
    sup = jnp.where(starts, -jnp.conj(x2), 0.0)
    TG = _tridiag_right(T.astype(cdtype), diag, sub, sup)
    # Gᴴ (T G) = ((T G)ᴴ G)ᴴ
    R = jnp.conj(_tridiag_right(jnp.conj(TG).T, diag, sub, sup)).T
    return jnp.triu(R), (diag, sub, sup)


def _schur_factors(A):
    n = A.shape[-1]
    T, Z = jax.scipy.linalg.schur(A, output="real")
    R, rot = _real_to_complex_schur(T, Z)
    lam = jnp.diagonal(R)
    # eigenvalue errors are ≈ ε ‖A‖ (times their condition, which we cannot know cheaply)
    tol = 10 * np.sqrt(n) * jnp.finfo(A.dtype).eps * jnp.linalg.norm(A)
    gap = jnp.min(jnp.abs(lam[:, None] + jnp.conj(lam[None, :])))
    ok = (gap > tol) & jnp.all(jnp.isfinite(R))
    # transposed operator: the same sweep with the flipped (P Rᴴ P) triangular factor
    R_flipped = jnp.conj(R).T[::-1, ::-1]
    return dict(Z=Z, R=R, R_flipped=R_flipped, rot=rot, ok=ok)


def _triangular_sweep(R, C):
    """Solve ``R Y + Y Rᴴ = C``, ``R`` upper triangular, column by column from the last."""
    # The loop carries the shifted matrix M = R + r̄ⱼⱼ I and resets only its diagonal (exactly,
    # from diag(R)), and keeps Y transposed (a solved column is a contiguous row): no n² copy
    # of M and no strided column access per step (3.5x faster at n = 128 than rebuilding M).
    n = R.shape[-1]
    Rc = jnp.conj(R)
    if n <= _UNROLL_MAX_N:
        return _unrolled_sweep(R, Rc, C)
    diag = jnp.diagonal(R)
    idx = jnp.arange(n)

    def column(i, state):
        Yt, M = state
        j = n - 1 - i
        row = Rc[j]  # r̄ⱼₖ; the not-yet-solved columns of Y (k ≤ j) are still zero
        rhs = C[:, j] - row @ Yt
        M = M.at[idx, idx].set(diag + row[j])
        y = lax.linalg.triangular_solve(M, rhs[:, None], left_side=True, lower=False)[:, 0]
        return Yt.at[j].set(y), M

    Yt, _ = lax.fori_loop(0, n, column, (jnp.zeros_like(C), R))
    return Yt.T


def _unrolled_sweep(R, Rc, C):
    # the same column recursion written out in Python: for small n the loop's per-step
    # overhead is most of the cost
    n = R.shape[-1]
    eye = jnp.eye(n, dtype=R.dtype)
    columns = [None] * n
    for j in range(n - 1, -1, -1):
        rhs = C[:, j]
        for k in range(j + 1, n):
            rhs = rhs - Rc[j, k] * columns[k]
        M = R + Rc[j, j] * eye
        columns[j] = lax.linalg.triangular_solve(M, rhs[:, None], left_side=True, lower=False)[:, 0]
    return jnp.stack(columns, axis=1)


def _schur_solve(factors, B, *, transpose, left=None):
    # X = Z G Y Gᴴ Zᵀ with Y the triangular solution for C = Gᴴ (L B Lᵀ) G, L = Zᵀ (or the
    # ``left`` given: Zᵀ K for the Cayley transform, folding its K in).
    Z, (d, sub, sup) = factors["Z"], factors["rot"]
    cdtype = factors["R"].dtype
    left = Z.T if left is None else left
    C = (left @ B @ left.T).astype(cdtype)
    C = jnp.conj(_tridiag_right(jnp.conj(_tridiag_right(C, d, sub, sup)).T, d, sub, sup)).T
    if transpose:
        Y = _triangular_sweep(factors["R_flipped"], C[::-1, ::-1])
        Y = Y[::-1, ::-1]
    else:
        Y = _triangular_sweep(factors["R"], C)
    # G Y Gᴴ = ((Y Gᴴ)ᴴ... ) : G Y Gᴴ = (G (G Y)ᴴ)ᴴ, and G M = (Mᴴ Gᴴ)ᴴ; use Gᴴ's bands
    dh, subh, suph = jnp.conj(d), jnp.conj(sup), jnp.conj(sub)
    YGh = _tridiag_right(Y, dh, subh, suph)  # Y Gᴴ
    GYGh = jnp.conj(_tridiag_right(jnp.conj(YGh).T, dh, subh, suph)).T  # G (Y Gᴴ)
    X = Z @ jnp.real(GYGh).astype(B.dtype) @ Z.T
    return _nan_unless(factors["ok"], X)


# Kronecker form: vec(A X + X Aᵀ) = (A ⊗ I + I ⊗ A) vec(X) for the row-major vec, and
# Aᵀ ⊗ I + I ⊗ Aᵀ = (A ⊗ I + I ⊗ A)ᵀ, so the transposed operator is the LU's transpose solve.
def _kron_factors(A):
    n = A.shape[-1]
    eye = jnp.eye(n, dtype=A.dtype)
    # a singular K (λᵢ + λⱼ = 0) leaves a pivot at rounding level; same τ as the Schur method
    tol = 10 * np.sqrt(n) * jnp.finfo(A.dtype).eps * jnp.linalg.norm(A)
    return _lu_solvers(jnp.kron(A, eye) + jnp.kron(eye, A), singular_tol=tol)


def _kron_solve(factors, B, *, transpose):
    n = B.shape[-1]
    solve, transpose_solve = factors
    return (transpose_solve if transpose else solve)(None, B.reshape(n * n, 1)).reshape(n, n)


def _refined(solve, residual, B):
    # One step of iterative refinement, X ← X + 𝓛⁻¹(B − 𝓛(X)), the residual taken with the
    # original operator, in about twice the working precision (_split_matmul): a residual
    # rounded to working precision is itself wrong by ≈ ε ‖A‖ ‖X‖, which the solve amplifies
    # by the operator's condition number, so the step could not improve on that.
    # As a two-step loop from X = 0 the solve is traced and compiled once, not twice; the
    # first step's right side is B itself (the residual of X = 0), so no residual is taken.
    # Small n (≤ _UNROLL_MAX_N): written out, the loop's and the branch's overhead dominate.
    if B.shape[-1] <= _UNROLL_MAX_N:
        X = solve(B)
        return X + solve(residual(B, X))

    def step(i, X):
        rhs = lax.cond(i == 0, lambda X: B, lambda X: residual(B, X), X)
        return X + solve(rhs)

    return lax.fori_loop(0, 2, step, jnp.zeros_like(B))


def _split_matmul(A, X):
    """``A @ X`` as an unevaluated sum ``hi + lo`` with about twice the working precision.

    Ozaki et al.'s error-free splitting: ``A₁ = fl((A + σ) − σ)`` with one power of two ``σᵢ``
    per row of ``A`` (per column of ``X`` for ``X₁``) rounds every entry to a grid so coarse
    that each product ``a₁ b₁`` and every partial sum of ``A₁ X₁`` is exact (``β`` bits below
    the row maximum, ``2β ≥ t + log₂ k`` for ``t`` mantissa bits and inner size ``k``); the
    remainders ``A₂ = A − A₁``, ``X₂ = X − X₁`` are exact too and ``2^(β−t)`` smaller, so
    ``hi = A₁ X₁`` is exact and ``lo = A₁ X₂ + A₂ X`` carries an error ``≈ ε 2^(β−t) |A| |X|``.

    Reference: K. Ozaki, T. Ogita, S. Oishi, S. M. Rump, "Error-free transformations of matrix
    multiplication by using fast routines of matrix multiplication and its applications",
    Numer. Algorithms 59 (2012) 95–118.
    """
    bits = jnp.finfo(A.dtype).nmant + 1
    beta = int(np.ceil((bits + np.log2(max(A.shape[-1], 2))) / 2))

    finfo = jnp.finfo(A.dtype)
    int_type = {16: jnp.int16, 32: jnp.int32, 64: jnp.int64}[finfo.bits]
    exponent_bits = ((1 << finfo.nexp) - 1) << finfo.nmant

    def split(M, axis):
        # σ = 2^(e+β) for the row maximum m = f 2^e, f ∈ [½, 1): 2^(β+1) times m with its
        # mantissa bits cleared (a bit mask, much cheaper than frexp/ldexp)
        m = jnp.max(jnp.abs(M), axis=axis, keepdims=True)
        floor_pow2 = lax.bitcast_convert_type(
            lax.bitcast_convert_type(m, int_type) & exponent_bits, M.dtype
        )
        sigma = floor_pow2 * (2.0 ** (beta + 1))
        # lax.sub/add: no reassociation can fold (M + σ) − σ back into M
        high = lax.sub(lax.add(M, sigma), sigma)
        return high, M - high

    A1, A2 = split(A, -1)
    X1, X2 = split(X, -2)
    mm = partial(jnp.matmul, precision=lax.Precision.HIGHEST)
    # lo = A₁ X₂ + A₂ X as one product [A₁ A₂] [X₂; X] (fewer, larger operations)
    lo = mm(jnp.concatenate([A1, A2], axis=-1), jnp.concatenate([X2, X], axis=-2))
    return mm(A1, X1), lo


def _lyap_residual(A, B, X):
    """``B − (A X + X Aᵀ)`` with the products in about twice the working precision."""
    hi, lo = _split_matmul(A, X)
    hi_t, lo_t = _split_matmul(X, A.T)
    # hi + hi_t ≈ B: their sum and the difference with B round only at the level of B
    return (B - (hi + hi_t)) - (lo + lo_t)


def _stein_residual(A, B, X):
    """``B − (A X Aᵀ − X)`` with the products in about twice the working precision."""
    hi, lo = _split_matmul(A, X)
    hi2, lo2 = _split_matmul(hi, A.T)
    lo2 = lo2 + jnp.matmul(lo, A.T, precision=lax.Precision.HIGHEST)
    return (B - (hi2 - X)) - lo2


# Discrete Bartels–Stewart through the Cayley (bilinear) transform, as SciPy does for n ≥ 10.
# For ω = ±1 the Stein operator is unchanged by A → ωA. With K = (ωA + I)⁻¹ and
# B = (ωA − I) K = I − 2K (K, B and A commute),
#     (ωA + I)(B X + X Bᵀ)(ωA + I)ᵀ = (ωA − I) X (ωA + I)ᵀ + (ωA + I) X (ωA − I)ᵀ
#                                   = 2 (A X Aᵀ − X),
# so A X Aᵀ − X = C  ⇔  B X + X Bᵀ = 2 K C Kᵀ (transposed: Bᵀ X + X B = 2 Kᵀ C K), the
# continuous equation; K and the Schur factors of B are the factorisation. Transforming before
# the Schur decomposition, not after, keeps the small gaps 1 − λᵢλⱼ accurate (measured at
# n = 16 with eigenvalues up to 0.999: 5e-14 against the Kronecker solve, where a sweep on the
# Schur form of A gave 9e-13). ω is the sign that makes ωA + I better conditioned, so
# eigenvalues near −1 are handled like those near +1.


def _cayley_factors(A):
    n = A.shape[-1]
    eye = jnp.eye(n, dtype=A.dtype)

    def transform(omega):
        shifted = omega * A + eye
        K = jnp.linalg.inv(shifted)
        condition = _norm1(shifted) * _norm1(K)
        return K, jnp.where(jnp.isfinite(condition), condition, jnp.inf)

    def better_of_both(K_plus, cond_plus):
        K_minus, cond_minus = transform(-1.0)
        use_plus = cond_plus <= cond_minus
        omega = jnp.where(use_plus, 1.0, -1.0).astype(A.dtype)
        return jnp.where(use_plus, K_plus, K_minus), omega

    # ω = −1 is tried only when A + I is not comfortably conditioned (under vmap both run)
    K, cond_plus = transform(1.0)
    K, omega = lax.cond(
        cond_plus <= _CAYLEY_CONDITION_OK,
        lambda K, c: (K, jnp.ones((), A.dtype)),
        better_of_both,
        K,
        cond_plus,
    )
    schur = _schur_factors((omega * A - eye) @ K)
    schur["ok"] = schur["ok"] & jnp.all(jnp.isfinite(K))
    # each solve transforms 2 K C Kᵀ (resp. 2 Kᵀ C K) to Schur coordinates: Zᵀ K made once
    Zt = schur["Z"].T
    return dict(ZtK=Zt @ K, ZtKt=Zt @ K.T, schur=schur)


def _cayley_solve(factors, C, *, transpose):
    left = factors["ZtKt" if transpose else "ZtK"]
    return _schur_solve(factors["schur"], 2 * C, transpose=transpose, left=left)


# --------------------------------------------------------------------------------------
# matrix-sign Newton iteration (lyap on GPU/TPU)


def _norm1(M):
    return jnp.max(jnp.sum(jnp.abs(M), axis=0))


def _sign_factors(A):
    """Run Newton's sign iteration on ``A`` alone; keep every ``Aₖ⁻¹`` and scale ``cₖ``."""
    n = A.shape[-1]
    dtype = A.dtype
    eps = jnp.finfo(dtype).eps
    eye = jnp.eye(n, dtype=dtype)
    tol = jnp.sqrt(eps)
    inverses = jnp.zeros((_SIGN_MAX_ITERS, n, n), dtype)
    scales = jnp.ones((_SIGN_MAX_ITERS,), dtype)

    def cond(state):
        k, Ak, _, _, after = state
        return (k < _SIGN_MAX_ITERS) & (after < 2) & jnp.all(jnp.isfinite(Ak))

    def body(state):
        k, Ak, inverses, scales, after = state
        lu, piv = jax.scipy.linalg.lu_factor(Ak)
        inv = jax.scipy.linalg.lu_solve((lu, piv), eye)
        # Byers' determinant scaling |det Aₖ|^{1/n}; dropped once converging (it is ≈ 1)
        c = jnp.exp(jnp.mean(jnp.log(jnp.abs(jnp.diagonal(lu)))))
        c = jnp.where(after > 0, 1.0, c).astype(dtype)
        Anew = 0.5 * (Ak / c + c * inv)
        small = _norm1(Anew - Ak) <= tol * _norm1(Anew)
        after = after + ((after > 0) | small).astype(after.dtype)
        return k + 1, Anew, inverses.at[k].set(inv), scales.at[k].set(c), after

    k, Ak, inverses, scales, after = lax.while_loop(
        cond, body, (jnp.int32(0), A, inverses, scales, jnp.int32(0))
    )
    sign = jnp.where(jnp.trace(Ak) < 0, -1.0, 1.0).astype(dtype)
    condition = _norm1(A) * _norm1(inverses[0])
    ok = (
        (after >= 2)
        & (_norm1(Ak - sign * eye) <= n * tol)
        & (condition < 1 / (n * eps))
        & jnp.all(jnp.isfinite(Ak))
    )
    return dict(inverses=inverses, scales=scales, num_iters=k, sign=sign, ok=ok)


def _sign_solve(factors, B, *, transpose):
    # The (1,2) block of Newton's iterates on [[A, −B], [0, −Aᵀ]]: Qₖ₊₁ = (Qₖ/c + c Aₖ⁻¹ Qₖ Aₖ⁻ᵀ)/2
    # with the cached inverses (their transposes for 𝓛_Aᵀ), Q∞ = −2 sign·X.
    inverses, scales = factors["inverses"], factors["scales"]

    def body(state):
        k, Qk = state
        inv = inverses[k]
        if transpose:
            inv = inv.T
        c = scales[k]
        return k + 1, 0.5 * (Qk / c + c * (inv @ Qk @ inv.T))

    _, Qk = lax.while_loop(lambda s: s[0] < factors["num_iters"], body, (jnp.int32(0), -B))
    X = -0.5 * factors["sign"] * Qk
    return _nan_unless(factors["ok"], X)


# --------------------------------------------------------------------------------------
# squared Smith doubling (dlyap on GPU/TPU)


def _doubling_factors(A):
    """Powers ``Pₖ = A^(2^k)`` (and ``‖Pₖ‖_F²``) until ``‖P_K‖_F² ≤ ε/10``."""
    n = A.shape[-1]
    dtype = A.dtype
    eps = jnp.finfo(dtype).eps
    powers = jnp.zeros((_DOUBLING_MAX_ITERS, n, n), dtype)
    squares = jnp.zeros((_DOUBLING_MAX_ITERS,), dtype)

    def converged(P):
        return jnp.sum(P * P) <= eps / 10

    def cond(state):
        k, P, _, _ = state
        return (k < _DOUBLING_MAX_ITERS) & ~converged(P) & jnp.all(jnp.isfinite(P))

    def body(state):
        k, P, powers, squares = state
        return k + 1, P @ P, powers.at[k].set(P), squares.at[k].set(jnp.sum(P * P))

    k, P, powers, squares = lax.while_loop(cond, body, (jnp.int32(0), A, powers, squares))
    # 2^(K−1) terms were not enough: 1 − ρ(A) ≲ ln(1/√ε) / 2^(K−1). Refuse when that is below
    # the rounding level 10 √n ε of ρ (e.g. an orthogonal A, whose computed ρ is 1 − 1e-16).
    most_doublings = np.log2(0.5 * np.log(1 / eps) / (10 * np.sqrt(n) * eps))
    ok = converged(P) & jnp.all(jnp.isfinite(P)) & (k - 1 < most_doublings)
    return dict(powers=powers, squares=squares, num_iters=k, ok=ok)


def _doubling_solve(factors, B, *, transpose, floor=None):
    # A X Aᵀ − X = B  ⇔  X = Σᵢ Aⁱ (−B) Aⁱᵀ, summed by Xₖ₊₁ = Xₖ + Pₖ Xₖ Pₖᵀ. The remainder
    # after step k is ≈ Pₖ Xₖ Pₖᵀ, at most ‖Pₖ‖_F² ‖Xₖ‖_F: with a ``floor`` (the refinement's
    # correction, needed only to the solution's rounding level) the sum stops once that is
    # below it, usually a few doublings before the last.
    powers, squares = factors["powers"], factors["squares"]

    def cond(state):
        k, X = state
        going = k < factors["num_iters"]
        if floor is not None:
            going = going & (squares[k] * jnp.sqrt(jnp.sum(X * X)) > floor)
        return going

    def body(state):
        k, X = state
        P = powers[k]
        if transpose:
            P = P.T
        return k + 1, X + P @ X @ P.T

    _, X = lax.while_loop(cond, body, (jnp.int32(0), -B))
    return _nan_unless(factors["ok"], X)
