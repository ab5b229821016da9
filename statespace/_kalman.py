"""Kalman filter (covariance and square-root form) with missing data and exact diffuse starts.

The filter is a ``lax.scan`` over time whose step is an update (condition ``x[k]`` on ``y[k]``)
followed by a prediction (``x[k+1]`` from ``x[k]``). The ``m x m`` innovation covariance is
factored once per step (Cholesky, unrolled for small ``m``; for ``m <= 2`` in the covariance
form a square-root-free ``L D L^T`` written as scalar code) and every solve is triangular; no
inverse is formed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules import tria
from rules._precision import full_precision
from statespace._model import (
    _BASE_RANK,
    _FIELDS,
    _TIME_PARAMS,
    LinearGaussianSSM,
    _indefinite,
    _split_axes,
)

# Matrices up to this size are factored / solved with unrolled scalar code that XLA fuses
# into the scan step; larger ones go through LAPACK.
_UNROLL_MAX = 8
_LOG_2PI = math.log(2.0 * math.pi)


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
def _cholesky(S):
    """Lower Cholesky factor; NaN (never an exception) when ``S`` is not positive definite."""
    m = S.shape[-1]
    if m > _UNROLL_MAX:
        return jnp.linalg.cholesky(S)
    return _assemble_lower(_cholesky_entries(S), S)


def _cholesky_entries(S):
    """Unrolled Cholesky of a small ``S`` as nested lists of scalars ``cols[i][j]`` (i >= j)."""
    m = S.shape[-1]
    cols = [[None] * m for _ in range(m)]
    for j in range(m):
        acc = S[..., j, j]
        for k in range(j):
            acc = acc - cols[j][k] * cols[j][k]
        ljj = jnp.sqrt(acc)
        cols[j][j] = ljj
        inv = 1.0 / ljj
        for i in range(j + 1, m):
            acc = S[..., i, j]
            for k in range(j):
                acc = acc - cols[i][k] * cols[j][k]
            cols[i][j] = acc * inv
    return cols


def _chol_solve(S, B):
    """``(diag(L), L^{-1} B)`` with ``L = chol(S)`` for ``S (..., m, m)``, ``B (..., m, k)``
    (leading axes batch).

    For small ``m`` the factor is never assembled: the substitution reads the scalar entries
    of the unrolled factorisation directly, so XLA fuses factorisation and solve (fewer kernels
    per scan step than ``_solve_lower(_cholesky(S), B)``, same arithmetic).
    """
    m = S.shape[-1]
    if m > _UNROLL_MAX:
        L = jnp.linalg.cholesky(S)
        diag = jnp.diagonal(L, axis1=-2, axis2=-1)
        return diag, lax.linalg.triangular_solve(L, B, left_side=True, lower=True)
    cols = _cholesky_entries(S)
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
    if m > _UNROLL_MAX:
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
    return jnp.where(finite[..., None, None], _assemble_lower(cols, A), jnp.nan)


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


def _assemble_lower(cols, like):
    m = len(cols)
    zero = jnp.zeros_like(like[..., 0, 0])
    rows = [
        jnp.stack([cols[i][j] if j <= i else zero for j in range(m)], axis=-1) for i in range(m)
    ]
    return jnp.stack(rows, axis=-2)


def _solve_lower(L, B):
    """``L^{-1} B`` for lower-triangular ``L (m, m)`` and ``B (m, k)`` (forward substitution)."""
    m = L.shape[-1]
    if m > _UNROLL_MAX:
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
    if max(A.shape + B.shape) > _UNROLL_MAX:
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


def _invalid_covariances(const, scanned, P0, T):
    """Per-step flags ``(T,)``: from the first step that uses a finite ``P0``, ``R[k]`` (step
    ``k``) or ``Q[k]`` (step ``k + 1``) that is clearly not positive semi-definite
    (``_indefinite``) on. Such a model has no density: the filter reports ``-inf`` from there
    on, as for a failed factorisation, even where the innovation covariances happen to be
    positive definite."""
    bad = jnp.broadcast_to(_indefinite(P0), (T,))
    if "R" in scanned:
        bad = bad | _indefinite(scanned["R"])
    else:
        bad = bad | _indefinite(const["R"])
    if "Q" in scanned:  # Q[k] maps step k to k + 1
        bad = bad | jnp.concatenate([jnp.zeros((1,), bool), _indefinite(scanned["Q"])[:-1]])
    else:
        bad = bad | (_indefinite(const["Q"]) & (jnp.arange(T) > 0))
    return lax.cummax(bad.astype(jnp.int32)) > 0


# ------------------------------------------------------------------------------------------
# Model plumbing
# ------------------------------------------------------------------------------------------
def _as_discrete(model, times):
    """The discrete model to filter and an ``ok`` flag (``None`` for discrete models).

    Continuous-time models are recognised by duck typing: an object with a method
    ``_to_discrete(times)`` returning ``(LinearGaussianSSM, ok)``; the filter sets the
    log-likelihood to ``-inf`` where ``ok`` is False.

    Raises:
        ValueError: ``times`` given for a discrete model, or missing for a continuous one.
        TypeError: ``model`` is neither.
    """
    if hasattr(model, "_to_discrete"):
        if times is None:
            raise ValueError(f"{type(model).__name__} is a continuous-time model: pass times")
        return model._to_discrete(times)
    if times is not None:
        raise ValueError(
            "times is only meaningful for continuous-time models; got a discrete model"
        )
    if not isinstance(model, LinearGaussianSSM):
        raise TypeError(f"expected a LinearGaussianSSM or continuous-time model; got {type(model)}")
    return model, None


def _check_times(times, y):
    """``times`` must have one entry per row of ``y`` (a static check: shapes only).

    Raises:
        ValueError: naming both shapes.
    """
    if times is not None and tuple(jnp.shape(times)) != (y.shape[-2],):
        raise ValueError(f"times must have shape (T,) with T = {y.shape[-2]} rows of y; got "
                         f"times.shape = {jnp.shape(times)}, y.shape = {y.shape}")


def _check_observations(model: LinearGaussianSSM, y):
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    m = model.obs_dim
    if y.ndim < 2 or y.shape[-1] != m:
        raise ValueError(f"y must have shape (..., T, m) with m = {m}; got y.shape = {y.shape} "
                         f"for H.shape = {model.H.shape}")
    T = model.num_timesteps
    if T is not None and y.shape[-2] != T:
        raise ValueError(f"y has {y.shape[-2]} time steps (y.shape = {y.shape}) but the "
                         f"time-varying parameters have {T}")
    dtype = jnp.result_type(model.F.dtype, y.dtype)
    return y.astype(dtype)


def _unobserved(model: LinearGaussianSSM, y):
    """A model with ``m = 0`` as one that observes a single, always missing entry: the same
    likelihood (0) and moments (the prior's), without empty ``m x m`` factorisations."""
    H, R, d = model.H, model.R, model.d
    model = model.replace(H=jnp.zeros(H.shape[:-2] + (1, H.shape[-1]), H.dtype),
                          R=jnp.ones(R.shape[:-2] + (1, 1), R.dtype),
                          d=jnp.zeros(d.shape[:-1] + (1,), d.dtype))
    return model, jnp.full(y.shape[:-1] + (1,), jnp.nan, y.dtype)


def _map_batch(fn, model: LinearGaussianSSM, y):
    """Apply ``fn(single_model, single_y)`` over the broadcast batch axes of model and ``y``."""
    batch = tuple(np.broadcast_shapes(model.batch_shape, y.shape[:-2]))
    if not batch:
        return fn(model, y)
    size = int(np.prod(batch))
    leaves, axes = {}, {}
    for name in _FIELDS:
        x = getattr(model, name)
        nb = len(_split_axes(name, tuple(x.shape))[0])
        if nb == 0:
            leaves[name], axes[name] = x, None
        else:
            core = x.shape[nb:]
            leaves[name] = jnp.broadcast_to(x, batch + core).reshape((size,) + core)
            axes[name] = 0
    y_flat = jnp.broadcast_to(y, batch + y.shape[-2:]).reshape((size,) + y.shape[-2:])
    out = jax.vmap(lambda lv, yy: fn(model.replace(**lv), yy), in_axes=(axes, 0))(leaves, y_flat)
    return jax.tree_util.tree_map(lambda a: a.reshape(batch + a.shape[1:]), out)


def _steps_params(model: LinearGaussianSSM):
    """Split parameters into constants and per-step (scanned) arrays."""
    const, scanned = {}, {}
    for name in _TIME_PARAMS:
        x = getattr(model, name)
        if x.ndim == _BASE_RANK[name]:
            const[name] = x
        elif x.shape[0] == 1:
            const[name] = x[0]
        else:
            scanned[name] = x
    return const, scanned


# ------------------------------------------------------------------------------------------
# The filter on one series
# ------------------------------------------------------------------------------------------
def _filter_single(model: LinearGaussianSSM, y, form: str, moments):
    """The filter on one series. ``moments``: False (log-likelihoods only), True (all
    moments, a :class:`FilterResult`) or ``"predicted"`` (``total, log_likelihoods, predicted
    means, predicted covariances`` -- lower factors in sqrt form; non-diffuse models only)."""
    n = model.state_dim
    dtype = y.dtype
    const, scanned = _steps_params(model)
    # Covariances enter through their symmetric part (exact no-op for symmetric input), so
    # gradients with respect to Q, R and P0 are symmetric matrices.
    sym = lambda k, v: _symmetrise(v) if k in ("Q", "R") else v  # noqa: E731
    const = {k: sym(k, v.astype(dtype)) for k, v in const.items()}
    scanned = {k: sym(k, v.astype(dtype)) for k, v in scanned.items()}
    m0 = model.m0.astype(dtype)
    P0 = _symmetrise(model.P0.astype(dtype))
    sqrt = form == "sqrt"

    mask = model.diffuse_mask
    q = 0 if mask is None else int(mask.sum())
    if q:
        keep = jnp.asarray(~mask, dtype)
        P0 = P0 * keep[:, None] * keep[None, :]
        A0 = jnp.eye(n, dtype=dtype)[:, np.flatnonzero(mask)]
    else:
        A0 = jnp.zeros((n, 0), dtype)

    if y.shape[0] == 0:
        covs = [v for k, v in {**const, **scanned}.items() if k in ("Q", "R")] + [P0]
        invalid = jnp.any(jnp.stack([jnp.any(_indefinite(v)) for v in covs]))
        return _empty_series(n, dtype, sqrt, moments, _reject(jnp.zeros((), dtype), invalid))
    invalid = _invalid_covariances(const, scanned, P0, y.shape[0])
    factor_failed = jnp.zeros((), bool)
    if sqrt:
        if "Q" in scanned:
            scanned["LQ"] = _psd_cholesky(scanned.pop("Q"))
            Q_src, LQ_all = model.Q, scanned["LQ"]
        else:
            const["LQ"] = _psd_cholesky(const.pop("Q"))
            Q_src, LQ_all = model.Q, const["LQ"]
        L0 = _psd_cholesky(P0)
        # A finite but indefinite Q or P0 has no square root: report -inf, like the cov form.
        factor_failed = (jnp.isnan(LQ_all).any() & jnp.isfinite(Q_src).all()) | (
            jnp.isnan(L0).any() & jnp.isfinite(P0).all()
        )
        cov0 = L0
    else:
        cov0 = P0

    def param(name, xs):
        return xs[name] if name in xs else const[name]

    def step(carry, xs):
        mean, cov, A, S_acc, s_acc, failed = carry
        yk = xs["y"]
        H, d, R = param("H", xs), param("d", xs), param("R", xs)
        F, b = param("F", xs), param("b", xs)
        observed = ~jnp.isnan(yk)
        w, Hm, Rm = _mask_observation(H, R, observed)
        m = Hm.shape[0]
        v = jnp.where(observed, yk - _mm(H, mean) - d, 0.0)
        if sqrt:
            L_pred = cov
            LR = _psd_cholesky(Rm)
            top = jnp.concatenate([_mm(Hm, L_pred), LR], axis=1)
            bottom = jnp.concatenate([L_pred, jnp.zeros((n, m), dtype)], axis=1)
            T_ = tria(jnp.concatenate([top, bottom], axis=0))
            L_S, G, cov_f = T_[:m, :m], T_[m:, :m], T_[m:, m:]
            rhs = v[:, None] if not q else jnp.concatenate([v[:, None], _mm(Hm, A)], axis=1)
            sol = _solve_lower(L_S, rhs)
            e, E = sol[:, 0], sol[:, 1:]
            mean_f = mean + _mm(G, e)
            finite_in = jnp.isfinite(Rm).all() & jnp.isfinite(L_pred).all() & jnp.isfinite(H).all()
            diag = jnp.diagonal(L_S)
        else:
            P = cov
            HP = _mm(Hm, P)
            S = _mm(HP, Hm.T) + Rm
            finite_in = jnp.isfinite(S).all()
        if not sqrt:
            parts = [HP, v[:, None]] + ([_mm(Hm, A)] if q else [])
            diag, sol = _chol_solve(S, jnp.concatenate(parts, axis=1))
            W, e, E = sol[:, :n], sol[:, n], sol[:, n + 1:]
            G = W.T
            mean_f = mean + _mm(G, e)
            cov_f = P - _mm(G, W)
        ok = jnp.all(jnp.abs(diag) > 0)
        failed = failed | (finite_in & ~ok)
        # -inf from the first failed factorisation on (NaN input stays NaN: finite_in is False)
        ll = -0.5 * (jnp.sum(e * e) + 2.0 * jnp.sum(jnp.log(jnp.abs(diag))) + jnp.sum(w) * _LOG_2PI)
        ll = jnp.where(failed, -jnp.inf, ll)
        A_f = A
        if q:
            A_f = A - _mm(G, E)
            S_acc = S_acc + _mm(E.T, E)
            s_acc = s_acc + _mm(E.T, e)
        # predict x[k+1]
        mean_next = _mm(F, mean_f) + b
        A_next = _mm(F, A_f) if q else A
        if sqrt:
            cov_next = tria(jnp.concatenate([_mm(F, cov_f), param("LQ", xs)], axis=1))
        else:
            cov_next = _symmetrise(_mm(_mm(F, cov_f), F.T) + param("Q", xs))
        out = (ll,)
        if moments == "predicted":
            out = out + (mean, cov)
        elif moments:
            out = out + (mean_f, cov_f, mean, cov)
            if q:
                out = out + (A_f, A, S_acc, s_acc)
        return (mean_next, cov_next, A_next, S_acc, s_acc, failed), out

    def packed_step(carry, xs):
        # Covariance form for small m without diffuse states: the carry is X = [m | P] (one
        # array), S^{-1} comes from the scalar L D L^T solve, products share operands and every
        # product is fused, so the step needs about 2/3 of the XLA kernels of `step` (at these
        # sizes a kernel launch costs about as much as its arithmetic). Same formulas as `step`: K^T = S^{-1} H P, m_f = m + (HP)^T S^{-1} v,
        # P_f = P - (HP)^T K^T, [m+ | P+] = [F X_f | b | Q] blockdiag(1, F^T; I).
        X = carry
        yk = xs["y"]
        H, d, R = param("H", xs), param("d", xs), param("R", xs)
        F = param("F", xs)
        observed = ~jnp.isnan(yk)
        w, Hm, Rm = _mask_observation(H, R, observed)
        mean, P = X[:, 0], X[:, 1:]
        HX = _mm_fused(H, X)
        v = jnp.where(observed, yk - HX[:, 0] - d, 0.0)
        HP = HX[:, 1:] * w[:, None]
        S = _mm_fused(HP, Hm.T) + Rm
        Z, det, ok = _spd_solve_small(S, jnp.concatenate([v[:, None], HP], axis=1))
        corr = _mm_fused(HP.T, Z[:, :n + 1])  # [K v | K H P]
        X_f = X + jnp.concatenate([corr[:, :1], -corr[:, 1:]], axis=1)
        # -inf on a failed factorisation (NaN input stays NaN); later steps are set to -inf
        # after the scan (a carried flag would cost a kernel per step)
        ll = -0.5 * (jnp.sum(v * Z[:, 0]) + jnp.log(det) + jnp.sum(w) * _LOG_2PI)
        ll = jnp.where(jnp.isfinite(S).all() & ~ok, -jnp.inf, ll)
        FX = _mm_fused(F, X_f)
        eye = jnp.eye(n + 1, dtype=dtype)
        blk = jnp.zeros((n + 1, n + 1), dtype).at[0, 0].set(1.0).at[1:, 1:].set(F.T)
        X_next = _mm_fused(
            jnp.concatenate([FX, param("b", xs)[:, None], param("Q", xs)], axis=1),
            jnp.concatenate([blk, eye], axis=0),
        )
        out = (ll,)
        # the carried P is symmetric to rounding only (not symmetrised in the loop: a kernel)
        if moments == "predicted":  # X_next itself (no copy of the carry), split after the scan
            out = out + (X_next,)
        elif moments:
            out = out + (X_f[:, 0], _symmetrise(X_f[:, 1:]), mean, _symmetrise(P))
        return X_next, out

    xs = dict(scanned, y=y)
    if not sqrt and not q and model.obs_dim <= _SMALL_M and n + 1 <= _UNROLL_MAX:
        X0 = jnp.concatenate([m0[:, None], cov0], axis=1)
        _, out = lax.scan(packed_step, X0, xs)
        failed = lax.cummax(jnp.isneginf(out[0]).astype(jnp.int32)) > 0
        out = (jnp.where(failed, -jnp.inf, out[0]),) + out[1:]
        if moments == "predicted":  # predictions of steps 1..T -> of steps 0..T-1
            Xs = jnp.concatenate([X0[None], out[1][:-1]], axis=0)
            out = (out[0], Xs[:, :, 0], _symmetrise(Xs[:, :, 1:]))
    else:
        carry0 = (m0, cov0, A0, jnp.zeros((q, q), dtype), jnp.zeros((q,), dtype), factor_failed)
        (_, _, _, S_T, s_T, _), out = lax.scan(step, carry0, xs)
    log_likelihoods = _reject(out[0], invalid, *jax.tree_util.tree_leaves(model))
    if q:
        # Collapse the diffuse part (de Jong 1991; Durbin & Koopman 2012, section 5.7):
        # log L_d = log int p(y | delta) d delta
        #         = sum_k ll_k + 1/2 s^T S^{-1} s - 1/2 log|S| + q/2 log 2 pi
        # (the Gaussian integral over delta; KFAS's and statsmodels' convention).
        # A series with no observed entry (panel padding) has S = 0 and gets 0, as a
        # non-diffuse model does: log p(nothing) = 0 (I in place of S keeps the gradient finite).
        seen = jnp.any(~jnp.isnan(y))
        L_d = jnp.linalg.cholesky(jnp.where(seen, S_T, jnp.eye(q, dtype=dtype)))
        u = lax.linalg.triangular_solve(L_d, s_T[:, None], left_side=True, lower=True)[:, 0]
        correction = 0.5 * (u @ u) - jnp.sum(jnp.log(jnp.diagonal(L_d))) + 0.5 * q * _LOG_2PI
        correction = jnp.where(seen, correction, 0.0)
        log_likelihoods = log_likelihoods.at[-1].add(correction)
    total = jnp.sum(log_likelihoods)
    if not moments:
        return total, log_likelihoods
    if moments == "predicted":  # what the adjoint pass needs (statespace._adjoint)
        return total, log_likelihoods, out[1], out[2]

    mean_f, cov_f, mean_p, cov_p = out[1:5]
    chol_f = chol_p = None
    if sqrt:
        chol_f, chol_p = cov_f, cov_p
        cov_f = chol_f @ jnp.swapaxes(chol_f, -1, -2)
        cov_p = chol_p @ jnp.swapaxes(chol_p, -1, -2)
    if q:
        A_f, A_p, S_f, s_f = out[5:9]
        S_p = jnp.concatenate([jnp.zeros((1, q, q), dtype), S_f[:-1]])
        s_p = jnp.concatenate([jnp.zeros((1, q), dtype), s_f[:-1]])
        mean_f, cov_f = _collapse(mean_f, cov_f, A_f, S_f, s_f)
        mean_p, cov_p = _collapse(mean_p, cov_p, A_p, S_p, s_p)
    return FilterResult(total, log_likelihoods, mean_f, cov_f, mean_p, cov_p, chol_f, chol_p)


def _empty_series(n, dtype, sqrt, moments, total):
    """:func:`_filter_single`'s output for ``T = 0``: ``log p(nothing) = 0`` (``-inf`` for an
    invalid model, in ``total``) and empty moments."""
    per_step, means, covs = (jnp.zeros(s, dtype) for s in ((0,), (0, n), (0, n, n)))
    if not moments:
        return total, per_step
    if moments == "predicted":
        return total, per_step, means, covs
    chols = covs if sqrt else None
    return FilterResult(total, per_step, means, covs, means, covs, chols, chols)


def _collapse(means, covs, A, S, s):
    """Moments of ``x = a + A delta + eps`` with ``delta | y ~ N(S^{-1} s, S^{-1})``."""
    L = jnp.linalg.cholesky(S)
    u = lax.linalg.triangular_solve(L, s[..., None], left_side=True, lower=True)
    delta = lax.linalg.triangular_solve(L, u, left_side=True, lower=True, transpose_a=True)[..., 0]
    B = lax.linalg.triangular_solve(L, jnp.swapaxes(A, -1, -2), left_side=True, lower=True)
    means = means + jnp.einsum("tnq,tq->tn", A, delta)
    covs = covs + jnp.swapaxes(B, -1, -2) @ B
    return means, covs


def _run(model, y, times, form, parallel, moments, gradient="autodiff"):
    if form not in ("cov", "sqrt"):
        raise ValueError(f"form must be 'cov' or 'sqrt'; got {form!r}")
    if gradient not in ("adjoint", "autodiff"):
        raise ValueError(f"gradient must be 'adjoint' or 'autodiff'; got {gradient!r}")
    disc, ok = _as_discrete(model, times)
    y = _check_observations(disc, y)
    _check_times(times, y)
    if disc.obs_dim == 0:
        disc, y = _unobserved(disc, y)
    if gradient == "adjoint" and not moments and not parallel and disc.diffuse is None:
        # Imported here: statespace._adjoint imports this module.
        from statespace._adjoint import adjoint_log_likelihood

        def single(mdl, yy):
            return adjoint_log_likelihood(mdl, yy, form), None
    elif parallel:
        if disc.diffuse is not None:
            raise NotImplementedError("parallel=True does not support diffuse initialisation yet")
        # Imported here: statespace._parallel imports this module.
        from statespace._parallel import parallel_filter

        def single(mdl, yy):
            # the sequential filter's covariance checks (it applies them inside its scan)
            const, scanned = _steps_params(mdl)
            invalid = _invalid_covariances(const, scanned, mdl.P0, yy.shape[0])
            out = parallel_filter(mdl, yy, form=form, moments=moments)
            return _reject_output(out, jnp.any(invalid), invalid, moments, jax.tree_util.tree_leaves(mdl))
    else:

        def single(mdl, yy):
            return _filter_single(mdl, yy, form, moments)

    out = _map_batch(single, disc, y)
    if ok is None:
        return out
    bad = ~jnp.asarray(ok)
    return _reject_output(out, bad, bad[..., None], moments, jax.tree_util.tree_leaves(model))


def _reject_output(out, bad, bad_steps, moments, leaves):
    """The filter's output ``out`` with :func:`_reject` applied to its log-likelihood (where
    ``bad``) and its per-step terms (where ``bad_steps``); ``leaves``: the model's arrays, of
    which the float ones get NaN tangents (any duck-typed model)."""
    leaves = [x for x in leaves if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if moments:
        return out._replace(
            log_likelihood=_reject(out.log_likelihood, bad, *leaves),
            log_likelihoods=_reject(out.log_likelihoods, bad_steps, *leaves),
        )
    total, per_step = out
    if per_step is not None:
        per_step = _reject(per_step, bad_steps, *leaves)
    return _reject(total, bad, *leaves), per_step


@full_precision
def kalman_filter(
    model, y, times=None, *, form: str = "cov", parallel: bool = False
) -> FilterResult:
    r"""Kalman filter: log-likelihood and filtered / one-step-predicted state moments.

    Step ``k`` conditions the prediction of ``x[k]`` on ``y[k]`` and then predicts ``x[k+1]``:

    .. math::

        S_k = H P^-_k H^T + R,\ L_k L_k^T = S_k,\ W = L_k^{-1} H P^-_k,\
        e = L_k^{-1}(y_k - H m^-_k - d),\\
        m_k = m^-_k + W^T e,\ P_k = P^-_k - W^T W,\
        \ell_k = -\tfrac12\,(e^T e + 2 \log|L_k| + m_k^{\rm obs} \log 2\pi),\\
        m^-_{k+1} = F m_k + b,\ P^-_{k+1} = F P_k F^T + Q,

    with ``m^-_0 = m0``, ``P^-_0 = P0`` (``y[0]`` observes ``x[0]``). ``form="sqrt"`` carries
    lower Cholesky factors instead and updates them with ``rules.tria``: the update
    triangularises ``[[H L^-, chol(R)], [L^-, 0]]`` and the prediction ``[F L, chol(Q)]``;
    it gives the same numbers and stays accurate when ``P`` is badly conditioned. Both forms
    return full covariances; the sqrt form also returns the factors.

    Missing data: ``NaN`` entries of ``y`` (single entries or whole rows) are left out
    exactly: their rows of ``H`` are zeroed, ``R`` gets unit variance on them and no
    correlation with observed entries, their innovation is set to 0, and the ``log 2 pi``
    count uses the observed entries only, so they contribute nothing. Shapes never change,
    so ``vmap`` over series with different gaps works.

    Exact diffuse initialisation (``model.diffuse``): the diffuse states get an unknown
    fixed effect ``delta`` (``x[0] = m0 + A delta + eta``, ``eta ~ N(0, P_star)``); the filter
    carries ``A`` through the recursions (augmented Kalman filter, de Jong 1991) and
    accumulates ``S = sum E^T E``, ``s = sum E^T e`` with ``E = L^{-1} H A``. The diffuse
    log-likelihood is the likelihood integrated over ``delta`` with a flat prior,
    ``log L_d = log int p(y | delta) d delta = lim_{kappa->inf} log L(P_delta = kappa I)
    + q/2 log(2 pi kappa)`` (Durbin & Koopman 2012, section 7.2; de Jong 1991), i.e.
    ``sum_k ell_k + 1/2 s^T S^{-1} s - 1/2 log|S| + q/2 log 2 pi`` with ``q`` diffuse states;
    the collapse term is added to the LAST entry of ``log_likelihoods``. This is KFAS's
    ``logLik`` (its diffuse steps carry no ``log 2 pi``) and statsmodels'
    ``UnobservedComponents`` log-likelihood with ``initialize_diffuse()`` (Nile local level
    at ``(sigma_eps^2, sigma_eta^2) = (15099, 1469.1)``: -632.5456; statsmodels leaves the
    diffuse observations out, the same number when the diffuse states are observed with unit
    loadings, as in the local level and trend). statsmodels' ``MLEModel`` with
    ``loglikelihood_burn=0``, and this package before, count ``-1/2 log 2 pi`` for each of
    those observations: ``q/2 log 2 pi`` less. The maximiser is the same; values between
    models with different ``q`` are not. Filtered / predicted moments are collapsed with
    ``delta | y[0..k] ~ N(S_k^{-1} s_k, S_k^{-1})``; they are NaN (or meaningless) while the
    data do not yet identify the diffuse states (``S_k`` singular), e.g. ``predicted[0]``.

    Robustness: NaN in a parameter gives a NaN log-likelihood; a finite but not positive
    definite innovation covariance, or a ``Q``, ``R`` or ``P0`` that is clearly not positive
    semi-definite (an eigenvalue below ``-100 n eps max|entry|``), gives ``-inf`` for the
    first step that uses it and all later ones, with a NaN gradient (never an exception
    under ``jit``); so does a continuous-time model with decreasing ``times``, an indefinite
    diffusion or an impossible stationary start. ``T = 0`` or ``m = 0`` gives 0 (nothing is
    observed), as does a series with every entry missing, diffuse or not.

    Batches: model batch axes (see :class:`LinearGaussianSSM`) and leading axes of ``y``
    broadcast; the filter is mapped over them and every output gets the batch shape in front.

    Args:
        model: a :class:`LinearGaussianSSM`, or a continuous-time model (anything with a
            ``_to_discrete(times)`` method returning ``(LinearGaussianSSM, ok)``).
        y: observations ``(..., T, m)``; ``NaN`` marks missing entries.
        times: observation times ``(T,)``, only for continuous-time models.
        form: ``"cov"`` (default) or ``"sqrt"``.
        parallel: use the associative-scan filter (Särkkä & García-Fernández 2021,
            ``statespace._parallel``): O(log T) depth, the same numbers; it pays off on
            GPU/TPU, not on CPU. Not available with diffuse initialisation.

    Returns:
        A :class:`FilterResult`.

    Raises:
        ValueError: bad shapes of ``y``, unknown ``form``, ``times`` given for a discrete model
            or missing for a continuous one, or of a length other than ``y``'s ``T``.
        NotImplementedError: ``parallel=True`` with a diffuse model.

    Example:
        >>> result = kalman_filter(model, y)
        >>> result.log_likelihood, result.filtered_means.shape
    """
    return _run(model, y, times, form, parallel, moments=True)


@full_precision
def log_likelihood(model, y, times=None, **kwargs):
    """Log-likelihood ``log p(y)`` of the observed entries of ``y`` (see :func:`kalman_filter`).

    A leaner path than ``kalman_filter(...).log_likelihood``: the scan stores no moments.

    Derivatives (``gradient="adjoint"``, the default): the total is a ``jax.custom_jvp``
    whose rule runs the forward filter and one hand-written backward scan (the adjoint
    recursion, ``statespace._adjoint``; about 2-3x cheaper than autodiff through the scan).
    ``jax.grad``, ``jax.jvp``, ``jax.hessian`` and forward-over-reverse all work (second
    order differentiates the rule's own code). In sqrt form the forward pass is the
    square-root filter and the reverse pass is the covariance-form recursion evaluated at
    ``P = L L^T`` (the gradient of the same function). ``gradient="autodiff"`` selects plain
    autodiff through the filter's ``lax.scan``; diffuse models and ``parallel=True`` always
    use it. A failed factorisation gives ``-inf`` with a NaN gradient.

    Args:
        model: a :class:`LinearGaussianSSM` or continuous-time model.
        y: observations ``(..., T, m)``, NaN = missing.
        times: observation times, continuous-time models only.
        **kwargs: ``form="cov" | "sqrt"``, ``parallel``, ``gradient="adjoint" | "autodiff"``.

    Returns:
        The log-likelihood (scalar, or the batch shape).

    Example:
        >>> jax.grad(lambda F: log_likelihood(model.replace(F=F), y))(model.F)
    """
    unknown = set(kwargs) - {"form", "parallel", "gradient"}
    if unknown:
        raise TypeError(f"log_likelihood got unexpected keyword arguments {sorted(unknown)}")
    total, _ = _run(model, y, times, kwargs.get("form", "cov"), kwargs.get("parallel", False),
                    moments=False, gradient=kwargs.get("gradient", "adjoint"))
    return total
