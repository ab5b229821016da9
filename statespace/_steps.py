"""Pure building blocks of the Kalman filters: small dense linear algebra, the missing-data
mask, the steps of the filter (innovation, update and prediction in covariance, square-root
and packed small-``m`` form, each a function of arrays) and the result type, shared by the
sequential filter, its adjoint, the parallel filter and the smoother (a leaf module: it
imports no other module of this package).

The ``m x m`` innovation covariance is factored once per step (Cholesky, unrolled for small
``m``; for ``m <= 2`` in the covariance form a square-root-free ``L D L^T`` written as scalar
code) and every solve is triangular; no inverse is formed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rules import tria
from rules._unrolled import UNROLL_MAX, assemble_lower, cholesky_entries

_LOG_2PI = math.log(2.0 * math.pi)


# the two forms every filter and smoother offers: covariance and square-root (Cholesky factor)
FORMS = ("cov", "sqrt")


def _check_form(form):
    """Raises:
        ValueError: ``form`` is not one of :data:`FORMS`.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")


class FilterResult(NamedTuple):
    """Output of :func:`kalman_filter` (a NamedTuple, hence a pytree).

    Attributes:
        log_likelihood: scalar (or batch-shaped) ``log p(observed entries of y)``.
        log_likelihoods: ``(T,)`` per-step terms ``log p(y[k] | y[0..k-1])``; they sum to
            ``log_likelihood``. For diffuse models see :func:`kalman_filter`.
        filtered_means: ``(T, n)``, ``E[x[k] | y[0..k]]``.
        filtered_covs: ``(T, n, n)``, ``Cov[x[k] | y[0..k]]`` (full covariances in both forms).
        predicted_means: ``(T, n)``, ``E[x[k] | y[0..k-1]]``; ``predicted_means[0] = m0``.
        predicted_covs: ``(T, n, n)``, ``Cov[x[k] | y[0..k-1]]``; ``predicted_covs[0] = P0``.
        filtered_chols: ``form="sqrt"`` only (else ``None``): lower Cholesky factors of
            ``filtered_covs``.
        predicted_chols: ``form="sqrt"`` only (else ``None``): lower factors of
            ``predicted_covs``.

    The filtered and predicted moments are all a Rauch-Tung-Striebel smoother needs:
    ``G[k] = filtered_covs[k] F[k]^T predicted_covs[k+1]^{-1}``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM, kalman_filter
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> result = kalman_filter(model, y)
        >>> result.log_likelihoods.shape, result.predicted_covs.shape, result.filtered_chols
        ((3,), (3, 1, 1), None)
        >>> bool(np.allclose(result.log_likelihoods.sum(), result.log_likelihood))
        True
        >>> # predicted[k+1] = F filtered[k] F^T + Q, predicted[0] = P0
        >>> P = result.filtered_covs[:-1, 0, 0]
        >>> bool(np.allclose(result.predicted_covs[1:, 0, 0], 0.25 * P + 1.0))
        True
        >>> bool(np.allclose(result.predicted_covs[0], model.P0))
        True
        >>> sqrt = kalman_filter(model, y, form="sqrt")
        >>> L = sqrt.filtered_chols
        >>> bool(np.allclose(L @ L.transpose(0, 2, 1), result.filtered_covs))
        True
    """

    log_likelihood: jax.Array
    log_likelihoods: jax.Array
    filtered_means: jax.Array
    filtered_covs: jax.Array
    predicted_means: jax.Array
    predicted_covs: jax.Array
    filtered_chols: jax.Array | None = None
    predicted_chols: jax.Array | None = None


# ------------------------------------------------------------------------------------------
# Small dense linear algebra
# ------------------------------------------------------------------------------------------
def _chol_solve(S, B):
    """``(diag(L), L^{-1} B)`` with ``L = chol(S)`` for ``S (..., m, m)``, ``B (..., m, k)``
    (leading axes batch).

    For small ``m`` the factor is never assembled: the substitution reads the scalar entries
    of the unrolled factorisation directly, so XLA fuses factorisation and solve (fewer kernels
    per scan step than ``_solve_lower(cholesky(S), B)``, same arithmetic).
    """
    m = S.shape[-1]
    if m > UNROLL_MAX:
        L = jnp.linalg.cholesky(S)
        diag = jnp.diagonal(L, axis1=-2, axis2=-1)
        return diag, lax.linalg.triangular_solve(L, B, left_side=True, lower=True)
    cols = cholesky_entries(S)
    rows = []
    for i in range(m):
        acc = B[..., i, :]
        for j in range(i):
            acc = acc - cols[i][j][..., None] * rows[j]
        rows.append(acc / cols[i][i][..., None])
    return jnp.stack([cols[i][i] for i in range(m)], axis=-1), jnp.stack(rows, axis=-2)


# Innovation covariances up to this size are solved with an unrolled square-root-free
# Cholesky (L D L^T) written as scalar arithmetic: no sqrt and a short chain of pivots, so XLA
# needs fewer kernels per scan step than for the unrolled Cholesky (an expensive scalar -- sqrt,
# divide -- with several users becomes a kernel of its own). Same accuracy as Cholesky.
_SMALL_M = 2


def _spd_solve_small(S, B):
    """``(S^{-1} B, det(S), pd)`` for symmetric ``S (..., m, m)``, ``m <= _SMALL_M``,
    ``B (..., m, k)`` by ``S = L D L^T`` (reads the lower triangle of ``S``; leading axes
    batch).

    ``pd`` is True exactly when ``S`` is positive definite (both pivots positive; False on
    NaN). Written as scalar arithmetic so XLA fuses it into its consumers.
    """
    m = S.shape[-1]
    if m == 1:
        a = S[..., 0, 0]
        return B / S[..., :1, :1], a, a > 0
    a, b, c = S[..., 0, 0], S[..., 1, 0], S[..., 1, 1]
    # S = L diag(a, p) L^T with L = [[1, 0], [l, 1]] (Cholesky without square roots)
    l = b / a
    p = c - l * b
    B0, B1 = B[..., 0, :], B[..., 1, :]
    z1 = (B1 - l[..., None] * B0) / p[..., None]
    sol = jnp.stack([B0 / a[..., None] - l[..., None] * z1, z1], axis=-2)
    return sol, a * p, (a > 0) & (p > 0)


def _mm_fused(A, B):
    """``A @ B`` as broadcast-multiply-sum whatever the size (callers keep sizes small)."""
    return jnp.sum(A[:, :, None] * B[None, :, :], axis=1)


def _psd_cholesky(A):
    """Lower factor ``L`` with ``L L^T = A`` for symmetric positive SEMI-definite ``A``.

    A pivot that is zero (to rounding) gives a zero column, so singular noise covariances (a
    state without noise, ``Q = 0`` of a zero-length interval, the zeroed diffuse rows of
    ``P0``) have a square root; a clearly negative pivot gives NaN, and so does a non-finite
    ``A`` (all entries). Used for the square-root form's ``Q``, ``R`` and ``P0``, any size.

    "Zero to rounding" is relative to the pivot's own diagonal entry: pivot ``j`` (the Schur
    complement ``A_jj - sum_k L_jk^2``) is zero when ``|pivot| <= 8 m eps A_jj``. Cholesky's
    backward error is componentwise, ``|dA| <= c m eps |L| |L^T|`` (Higham 2002, Thm 10.3),
    whose diagonal is ``c m eps A_jj``; so a variance 1e-12 beside 1e6 is kept, and only a
    row dependent on the rows above to rounding is dropped.
    """
    m = A.shape[-1]
    finite = jnp.all(jnp.isfinite(A), axis=(-2, -1))
    tol = 8 * m * jnp.finfo(A.dtype).eps * jnp.abs(jnp.diagonal(A, axis1=-2, axis2=-1))
    if m > UNROLL_MAX:
        L = _psd_cholesky_loop(A, tol)
        return jnp.where(finite[..., None, None], L, jnp.nan)
    cols = [[None] * m for _ in range(m)]
    for j in range(m):
        acc = A[..., j, j]
        for k in range(j):
            acc = acc - cols[j][k] * cols[j][k]
        pos = acc > tol[..., j]
        root = jnp.sqrt(jnp.where(pos, acc, 1.0))
        cols[j][j] = jnp.where(pos, root, jnp.where(acc >= -tol[..., j], 0.0, jnp.nan))  # NaN stays NaN
        inv = jnp.where(pos, 1.0 / root, 0.0)
        for i in range(j + 1, m):
            acc_ij = A[..., i, j]
            for k in range(j):
                acc_ij = acc_ij - cols[i][k] * cols[j][k]
            cols[i][j] = acc_ij * inv
    return jnp.where(finite[..., None, None], assemble_lower(cols, A), jnp.nan)


def _psd_cholesky_loop(A, tol):
    """:func:`_psd_cholesky` for large ``m``: the same pivots as a right-looking loop over
    columns (rank-one update of the Schur complement), batched over leading axes. LAPACK's
    Cholesky cannot serve here: it fails (NaN) on any singular ``A``."""
    m = A.shape[-1]
    idx = jnp.arange(m)

    def column(j, carry):
        S, Lt = carry  # S: Schur complement (rows/columns < j already eliminated)
        col = lax.dynamic_index_in_dim(S, j, -1, False)
        acc = lax.dynamic_index_in_dim(col, j, -1, False)
        tol_j = lax.dynamic_index_in_dim(tol, j, -1, False)
        pos = acc > tol_j
        root = jnp.sqrt(jnp.where(pos, acc, 1.0))
        pivot = jnp.where(pos, root, jnp.where(acc >= -tol_j, 0.0, jnp.nan))  # NaN stays NaN
        below = jnp.where(idx > j, col * jnp.where(pos, 1.0 / root, 0.0)[..., None], 0.0)
        S = S - below[..., :, None] * below[..., None, :]
        Lt = lax.dynamic_update_index_in_dim(Lt, below + jnp.where(idx == j, pivot[..., None], 0.0), j, -2)
        return S, Lt

    _, Lt = lax.fori_loop(0, m, column, (A, jnp.zeros_like(A)))
    return jnp.swapaxes(Lt, -1, -2)


def _solve_lower(L, B):
    """``L^{-1} B`` for lower-triangular ``L (m, m)`` and ``B (m, k)`` (forward substitution)."""
    m = L.shape[-1]
    if m > UNROLL_MAX:
        return lax.linalg.triangular_solve(L, B, left_side=True, lower=True)
    rows = []
    for i in range(m):
        acc = B[i]
        for j in range(i):
            acc = acc - L[i, j] * rows[j]
        rows.append(acc / L[i, i])
    return jnp.stack(rows, axis=0)


def _mm(A, B):
    """``A @ B`` for small matrices as broadcast-multiply-sum, which XLA fuses into the step
    (a ``dot`` is a separate kernel call per scan iteration); ``@`` for larger ones."""
    if max(A.shape + B.shape) > UNROLL_MAX:
        return A @ B
    if B.ndim == 1:
        return jnp.sum(A * B[None, :], axis=1)
    return jnp.sum(A[:, :, None] * B[None, :, :], axis=1)


# Triple products with every dimension up to this size are one fused reduction over two
# indices (n^4 multiply-adds, one kernel) instead of two chained reductions (two kernels).
_TRIPLE_MAX = 4


def _mmm(A, B, C):
    """``A @ B @ C`` for small matrices as ONE broadcast-multiply-sum over both inner indices."""
    if max(A.shape + B.shape + C.shape) > _TRIPLE_MAX:
        return _mm(_mm(A, B), C)
    return jnp.sum(A[:, :, None, None] * B[None, :, :, None] * C[None, None, :, :], axis=(1, 2))


def _mask_observation(H, R, observed):
    """Observation model of one step restricted to its observed entries (shapes unchanged).

    Leading axes of ``observed`` (and of ``H``, ``R`` where they have them) batch over steps.
    Returns ``(w, Hm, Rm)``: the 0/1 indicator ``w`` of ``observed``, ``H`` with unobserved
    rows zeroed, and ``R`` with unit variance and no correlation at unobserved entries, so a
    missing entry contributes nothing to the likelihood or the update.
    """
    w = observed.astype(H.dtype)
    ww = w[..., :, None] * w[..., None, :]
    Rm = R * ww + jnp.eye(R.shape[-1], dtype=R.dtype) * (1.0 - w[..., None, :])
    return w, H * w[..., :, None], Rm


def _symmetrise(P):
    return 0.5 * (P + jnp.swapaxes(P, -1, -2))


def _float_leaves(tree):
    """The float arrays of ``tree`` (any duck-typed model): what :func:`_reject` gives NaN
    tangents."""
    leaves = jax.tree_util.tree_leaves(tree)
    return [x for x in leaves if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]


@jax.custom_jvp
def _reject(value, bad, *inputs):
    """``value`` with ``-inf`` where ``bad`` (an invalid model); there the tangent is NaN, also
    along every array of ``inputs`` (the model's parameters), so a rejected model never gets a
    finite gradient (a ``jnp.where`` would give 0, and so would the filter's own selects on
    the path back from ``value``)."""
    return jnp.where(bad, -jnp.inf, value)


@_reject.defjvp
def _reject_jvp(primals, tangents):
    value, bad, *inputs = primals
    # products with constants (NaN where bad): linear in the tangents, so reverse mode
    # transposes them into NaN cotangents (a select with a NaN branch would transpose to 0)
    t = tangents[0] * jnp.where(bad, jnp.nan, 1.0).astype(value.dtype)
    nan_where_bad = jnp.where(bad, jnp.nan, 0.0).astype(value.dtype)
    for dx in tangents[2:]:
        t = t + nan_where_bad * jnp.sum(dx).astype(value.dtype)
    return _reject(value, bad, *inputs), t


# ------------------------------------------------------------------------------------------
# One step of the filter: innovation, update (three forms), prediction
# ------------------------------------------------------------------------------------------
# Notation of one step k (the step index is dropped): predicted mean m and covariance P of
# x[k] given y[0..k-1], observation model (H, d, R) with missing entries masked
# (_mask_observation), transition (F, b, Q) to step k+1.
class Update(NamedTuple):
    """Result of an update step (covariance or square-root form).

    Attributes:
        mean: filtered mean ``m_f``.
        cov: filtered covariance ``P_f`` (its lower factor in square-root form).
        gain: ``G = Wᵀ`` with ``W = L⁻¹ H P``, so that ``m_f = m + G e``.
        e: whitened innovation ``L⁻¹ v``.
        E: whitened diffuse block ``L⁻¹ H A`` (no columns without diffuse states).
        diag: diagonal of ``L`` (``S = L Lᵀ``); a zero entry is a failed factorisation.
        finite: whether the inputs of the factorisation were finite (a NaN parameter gives
            NaN, not ``-inf``).

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace._steps import _update_cov, _update_sqrt
        >>> m, P = jnp.array([0.0, 1.0]), jnp.array([[2.0, 0.5], [0.5, 1.0]])
        >>> H, R, y = jnp.array([[1.0, 1.0]]), jnp.array([[0.5]]), jnp.array([2.5])
        >>> u = _update_cov(m, P, H, R, y - H @ m)
        >>> u.mean.shape, u.cov.shape, u.gain.shape, u.E.shape, bool(u.finite)
        ((2,), (2, 2), (2, 1), (1, 0), True)
        >>> # the textbook update with the gain K = P Hᵀ S⁻¹
        >>> S = H @ P @ H.T + R
        >>> K = P @ H.T @ np.linalg.inv(S)
        >>> np.round(np.asarray(u.mean), 6), bool(np.allclose(u.mean, m + K @ (y - H @ m)))
        (array([0.833333, 1.5     ]), True)
        >>> bool(np.allclose(u.cov, P - K @ S @ K.T)), bool(np.allclose(u.diag ** 2, S))
        (True, True)
        >>> # the square-root form: the same mean, and the lower factor of the same covariance
        >>> r = _update_sqrt(m, jnp.linalg.cholesky(P), H, H, R, y - H @ m)
        >>> bool(np.allclose(r.mean, u.mean)), bool(np.allclose(r.cov @ r.cov.T, u.cov))
        (True, True)
    """

    mean: jax.Array
    cov: jax.Array
    gain: jax.Array
    e: jax.Array
    E: jax.Array
    diag: jax.Array
    finite: jax.Array


def _innovation(y, observed, H, mean, d):
    """``v = y − H m − d`` on the observed entries, 0 on the missing ones."""
    return jnp.where(observed, y - _mm(H, mean) - d, 0.0)


def _update_cov(mean, P, Hm, Rm, v, A=None):
    """Kalman update in covariance form with one Cholesky solve (see :func:`_chol_solve`)::

        S = H P Hᵀ + R = L Lᵀ,   W = L⁻¹ H P,   e = L⁻¹ v,   E = L⁻¹ H A,
        m_f = m + Wᵀ e,          P_f = P − Wᵀ W.

    Args:
        mean, P: predicted mean ``(n,)`` and covariance ``(n, n)``.
        Hm, Rm: the masked observation matrix ``(m, n)`` and noise covariance ``(m, m)``.
        v: innovation ``(m,)`` (:func:`_innovation`).
        A: ``(n, q)`` loadings of the diffuse states, or None.

    Returns:
        An :class:`Update`.
    """
    HP = _mm(Hm, P)
    S = _mm(HP, Hm.T) + Rm
    return _update_cov_moments(mean, P, HP, S, v, None if A is None else _mm(Hm, A))


def _update_cov_moments(mean, P, HP, S, v, HA=None):
    """:func:`_update_cov` given ``HP = H P (m, n)`` and ``S = H P Hᵀ + R (m, m)`` (masked),
    and ``HA = H A`` for diffuse states (or None): also the update of a statistically
    linearised observation (sigma points), where only these moments exist."""
    n = P.shape[-1]
    finite = jnp.isfinite(S).all()
    parts = [HP, v[:, None]] + ([HA] if HA is not None else [])
    diag, sol = _chol_solve(S, jnp.concatenate(parts, axis=1))
    W, e, E = sol[:, :n], sol[:, n], sol[:, n + 1:]
    G = W.T
    return Update(mean + _mm(G, e), P - _mm(G, W), G, e, E, diag, finite)


def _update_sqrt(mean, L_pred, H, Hm, Rm, v, A=None):
    """Kalman update in square-root form (one triangularisation, ``rules.tria``)::

        tria([[H L, chol(R)], [L, 0]]) = [[L_S, 0], [G, L_f]],   S = L_S L_Sᵀ,
        e = L_S⁻¹ v,   E = L_S⁻¹ H A,   m_f = m + G e,   P_f = L_f L_fᵀ.

    Args:
        mean, L_pred: predicted mean ``(n,)`` and lower factor ``L (n, n)`` of ``P = L Lᵀ``.
        H: the unmasked observation matrix (only its finiteness is read); ``Hm``, ``Rm``,
            ``v``, ``A`` as for :func:`_update_cov`.

    Returns:
        An :class:`Update` whose ``cov`` is the lower factor ``L_f``.
    """
    upd = _update_sqrt_loadings(mean, L_pred, _mm(Hm, L_pred), Rm, v,
                                None if A is None else _mm(Hm, A))
    finite = jnp.isfinite(Rm).all() & jnp.isfinite(L_pred).all() & jnp.isfinite(H).all()
    return upd._replace(finite=finite)


def _update_sqrt_loadings(mean, L_pred, HL, Rm, v, HA=None):
    """:func:`_update_sqrt` given ``HL = H L (m, n)`` (masked) and ``HA = H A`` (or None):
    also the update of a statistically linearised observation (sigma points), whose ``H L``
    is known without ``H``. Its ``finite`` is None: the caller knows which inputs to test."""
    n, m = L_pred.shape[-1], HL.shape[0]
    LR = _psd_cholesky(Rm)
    top = jnp.concatenate([HL, LR], axis=1)
    bottom = jnp.concatenate([L_pred, jnp.zeros((n, m), L_pred.dtype)], axis=1)
    T_ = tria(jnp.concatenate([top, bottom], axis=0))
    L_S, G, L_f = T_[:m, :m], T_[m:, :m], T_[m:, m:]
    rhs = v[:, None] if HA is None else jnp.concatenate([v[:, None], HA], axis=1)
    sol = _solve_lower(L_S, rhs)
    e, E = sol[:, 0], sol[:, 1:]
    mean_f = mean + _mm(G, e)
    return Update(mean_f, L_f, G, e, E, jnp.diagonal(L_S), None)


def _log_likelihood_term(e, diag, w):
    """``log N(v; 0, S) = −(eᵀ e + 2 Σ log|diag L| + m_obs log 2π) / 2`` with ``m_obs = Σ w``
    observed entries (``e = L⁻¹ v``, ``S = L Lᵀ``)."""
    return -0.5 * (jnp.sum(e * e) + 2.0 * jnp.sum(jnp.log(jnp.abs(diag))) + jnp.sum(w) * _LOG_2PI)


def _update_diffuse(A, S_acc, s_acc, G, E, e):
    """The diffuse states' part of an update (augmented filter, de Jong 1991)::

        A_f = A − G E,   S⁺ = S + Eᵀ E,   s⁺ = s + Eᵀ e.
    """
    return A - _mm(G, E), S_acc + _mm(E.T, E), s_acc + _mm(E.T, e)


def _predict_cov(mean_f, P_f, F, b, Q, A_f=None):
    """Prediction in covariance form: ``m⁻ = F m_f + b``, ``P⁻ = F P_f Fᵀ + Q`` (symmetrised)
    and, for diffuse states with loadings ``A_f``, ``A⁻ = F A_f``.

    Returns:
        ``(m⁻, P⁻, A⁻)``; ``A⁻`` is None when ``A_f`` is.
    """
    mean_next = _mm(F, mean_f) + b
    A_next = None if A_f is None else _mm(F, A_f)
    return mean_next, _symmetrise(_mm(_mm(F, P_f), F.T) + Q), A_next


def _predict_sqrt(mean_f, L_f, F, b, LQ, A_f=None):
    """Prediction in square-root form: ``m⁻ = F m_f + b``, ``L⁻ = tria([F L_f, chol(Q)])``
    (so ``L⁻ L⁻ᵀ = F P_f Fᵀ + Q``) and ``A⁻ = F A_f`` as :func:`_predict_cov`.

    Returns:
        ``(m⁻, L⁻, A⁻)``; ``A⁻`` is None when ``A_f`` is.
    """
    mean_next = _mm(F, mean_f) + b
    A_next = None if A_f is None else _mm(F, A_f)
    return mean_next, tria(jnp.concatenate([_mm(F, L_f), LQ], axis=1)), A_next


def _pack(mean, cov):
    """``X = [m | P]``: the mean as column 0, then the covariance's columns."""
    return jnp.concatenate([mean[..., :, None], cov], axis=-1)


def _unpack(X):
    """``(m, P)`` from ``X = [m | P]`` (:func:`_pack`; leading axes batch)."""
    return X[..., 0], X[..., 1:]


def _packed_step(X, y, H, d, R, F, b, Q):
    """Update and prediction in covariance form on the packed ``X = [m | P]``, small ``m``.

    For ``m <= _SMALL_M`` without diffuse states: ``S⁻¹`` comes from the scalar ``L D Lᵀ``
    solve (:func:`_spd_solve_small`), products share operands and every product is fused, so
    a ``lax.scan`` step needs about 2/3 of the XLA kernels of the general one (at these sizes
    a kernel launch costs about as much as its arithmetic). The same formulas::

        S = H P Hᵀ + R,   Kᵀ = S⁻¹ H P,   [m_f | P_f] = [m + (H P)ᵀ S⁻¹ v | P − (H P)ᵀ Kᵀ],
        [m⁻ | P⁻] = [F X_f | b | Q] [[1, 0], [0, Fᵀ], [I]]  (X_f = [m_f | P_f]),
        ℓ = −(vᵀ S⁻¹ v + log det S + m_obs log 2π) / 2.

    ``P`` is symmetric to rounding only (not symmetrised: a kernel per step).

    Returns:
        ``(X_next, ll, X_f)``; ``ll`` is ``-inf`` where the factorisation of a finite ``S``
        failed (NaN input stays NaN; the caller carries ``-inf`` on to later steps).
    """
    n = X.shape[-1] - 1
    dtype = X.dtype
    observed = ~jnp.isnan(y)
    w, Hm, Rm = _mask_observation(H, R, observed)
    HX = _mm_fused(H, X)
    v = jnp.where(observed, y - HX[:, 0] - d, 0.0)
    HP = HX[:, 1:] * w[:, None]
    S = _mm_fused(HP, Hm.T) + Rm
    Z, det, ok = _spd_solve_small(S, jnp.concatenate([v[:, None], HP], axis=1))
    corr = _mm_fused(HP.T, Z[:, :n + 1])  # [K v | K H P]
    X_f = X + jnp.concatenate([corr[:, :1], -corr[:, 1:]], axis=1)
    ll = -0.5 * (jnp.sum(v * Z[:, 0]) + jnp.log(det) + jnp.sum(w) * _LOG_2PI)
    ll = jnp.where(jnp.isfinite(S).all() & ~ok, -jnp.inf, ll)
    FX = _mm_fused(F, X_f)
    eye = jnp.eye(n + 1, dtype=dtype)
    blk = jnp.zeros((n + 1, n + 1), dtype).at[0, 0].set(1.0).at[1:, 1:].set(F.T)
    X_next = _mm_fused(
        jnp.concatenate([FX, b[:, None], Q], axis=1),
        jnp.concatenate([blk, eye], axis=0),
    )
    return X_next, ll, X_f
