r"""Parallel-in-time Kalman filtering and RTS smoothing by associative scans.

Särkkä & García-Fernández (2021), "Temporal parallelization of Bayesian smoothers", IEEE TAC
66(1); square-root form after Yaghoobi, Corenflos, Hassan & Särkkä (2022), "Parallel square-root
statistical linear regression for inference in nonlinear state space models". Both passes are
prefix (suffix) products of per-step elements under an associative operator, so the depth is
``O(log T)`` instead of ``T``; the work is a constant factor (~5x) above the sequential scan,
so on CPU the parallel form is slower and on GPU/TPU it wins for long series. The scan is
:func:`_prefix_scan` (blocked: sequential inside blocks of ~log2 T elements, recursive doubling
over the block totals), not ``lax.associative_scan``, whose ~log2 T unrolled levels made the
compiled program, and the compile time of the gradient, grow with T; here the program holds
three copies of the combination whatever T is.

Convention: ``x[0] ~ N(m0, P0)``, ``x[k+1] = F[k] x[k] + b[k] + w[k]``,
``w[k] ~ N(0, Q[k])``, ``y[k] = H[k] x[k] + d[k] + v[k]``, ``v[k] ~ N(0, R[k])``; ``y[0]``
observes ``x[0]``. Every parameter is first broadcast to a leading time axis of length ``T``
(``F[T-1], Q[T-1], b[T-1]`` are unused).

Filtering elements (paper, Lemma 7 / Eq. 12-15). Element ``k`` is the pair of densities
``p(x[k] | x[k-1], y[k]) = N(A_k x[k-1] + b_k, C_k)`` and
``p(y[k] | x[k-1]) ∝ N_I(x[k-1]; eta_k, J_k)`` (information form). With the "prior" of ``x[k]``
given ``x[k-1]``, ``x[k] = Fp x[k-1] + mp + N(0, Pp)`` (``Fp, mp, Pp = F[k-1], b[k-1], Q[k-1]``
for ``k >= 1`` and ``0, m0, P0`` for ``k = 0``, so that ``A_0 = 0, J_0 = 0, eta_0 = 0``)::

    S = H Pp H^T + R = L L^T,   W = L^{-1} H Pp,   V = L^{-1} H Fp,   e = L^{-1}(y - H mp - d)
    A = Fp - W^T V,   b = mp + W^T e,   C = Pp - W^T W,   eta = V^T e,   J = V^T V.

Combination ``(i earlier) o (j later)``, with ``M = I + C_i J_j``::

    A_ij   = A_j M^{-1} A_i
    b_ij   = A_j M^{-1} (b_i + C_i eta_j) + b_j
    C_ij   = A_j M^{-1} C_i A_j^T + C_j
    eta_ij = A_i^T M^{-T} (eta_j - J_j b_i) + eta_i
    J_ij   = A_i^T M^{-T} J_j A_i + J_i

The prefix ``a_0 o ... o a_k`` has ``b = E[x[k] | y[0..k]]`` and ``C = Cov[x[k] | y[0..k]]``.

Smoothing elements (paper, Lemma 10 / Eq. 22-24): ``x[k] | x[k+1], y[0..k]`` is
``N(E_k x[k+1] + g_k, L_k)`` with ``E_k = P_k F_k^T (F_k P_k F_k^T + Q_k)^{-1}``,
``g_k = m_k - E_k (F_k m_k + b_k)``, ``L_k = P_k - E_k F_k P_k`` and the last element
``(0, m_{T-1}, P_{T-1})``. Combination ``(j later) o (i earlier)``:
``E = E_i E_j``, ``g = E_i g_j + g_i``, ``L = E_i L_j E_i^T + L_i``; the suffix products are the
smoothed moments, and ``Cov(x[k+1], x[k] | y) = P^s_{k+1} E_k^T``.

Log-likelihood: the one-step predictions are recovered from the filtered moments in parallel,
``m^-_k = F[k-1] m_{k-1} + b[k-1]``, ``P^-_k = F[k-1] P_{k-1} F[k-1]^T + Q[k-1]``
(``m^-_0 = m0``, ``P^-_0 = P0``), and the innovation log-densities are evaluated for all ``k``
at once.

Missing data: NaN entries of ``y`` get zero rows of ``H``, zero offsets, unit variance in ``R``
and no correlation with the observed entries, and a zero innovation; the ``log 2 pi`` term counts
observed entries only, so missing entries contribute nothing (whole rows and single entries).

Numerics. ``form="cov"``: every covariance-like quantity is symmetrised after each
combination and ``C`` is formed as ``Pp - W^T W`` from one Cholesky factor of ``S``; one LU of
``M`` serves both ``M^{-1}`` and ``M^{-T}``. ``form="sqrt"`` (Yaghoobi et al. 2022) carries
lower factors ``C = U U^T``, ``J = Z Z^T``, ``L = D D^T`` and never forms a covariance by
subtraction: the combination triangularises
``tria([[U_i^T Z_j, I], [Z_j, 0]]) = [[X11, 0], [X21, X22]]`` and uses
``M^{-1} = I - U_i X11^{-T} X21^T``, ``U_ij = tria([A_j U_i X11^{-T}, U_j])``,
``Z_ij = tria([A_i^T X22, Z_i])``, so the factors stay valid in float32 where the covariance
form can lose definiteness. Both return full covariances (and the sqrt form the factors).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules import tria
from rules._precision import full_precision
from statespace._model import _BASE_RANK, _from_first, _per_step
from statespace._steps import FilterResult, _check_form, _mask_observation, _symmetrise
from statespace._steps import _psd_cholesky as _steps_psd_cholesky

_LOG_2PI = float(np.log(2.0 * np.pi))


class ParallelSmootherResult(NamedTuple):
    """Smoothed moments from :func:`parallel_smoother`.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM
        >>> from statespace._parallel import parallel_filter, parallel_smoother
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [jnp.nan], [1.1]])
        >>> out = parallel_smoother(model, y)  # runs parallel_filter itself
        >>> type(out).__name__, out.smoothed_means.shape, out.smoothed_cross_covs.shape
        ('ParallelSmootherResult', (3, 1), (2, 1, 1))
    """

    smoothed_means: jax.Array
    smoothed_covs: jax.Array
    smoothed_cross_covs: jax.Array


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------
def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _solve_lower(L, B):
    return lax.linalg.triangular_solve(L, B, left_side=True, lower=True)


def _solve_lower_T(L, B):
    """``L^{-T} B`` for lower-triangular ``L``."""
    return lax.linalg.triangular_solve(L, B, left_side=True, lower=True, transpose_a=True)


def _psd_cholesky(P):
    """The sequential filter's semi-definite Cholesky, applied to the symmetric part."""
    return _steps_psd_cholesky(_symmetrise(P))


def _get(model, name):
    if isinstance(model, dict):
        return model.get(name)
    return getattr(model, name, None)


def _normalise(model, y):
    """``(params, y, mask)``: every parameter with a leading T axis, one common float dtype."""
    if _get(model, "diffuse") is not None:
        raise NotImplementedError(
            "the parallel filter does not support exact diffuse initialisation; use the "
            "sequential filter (parallel=False) or a large finite P0"
        )
    y = jnp.asarray(y)
    H = jnp.asarray(_get(model, "H"))
    F = jnp.asarray(_get(model, "F"))
    if H.ndim < 2 or F.ndim < 2:
        raise ValueError(f"F and H must be matrices; got F.shape = {F.shape}, H.shape = {H.shape}")
    n, m = F.shape[-1], H.shape[-2]
    if y.ndim != 2 or y.shape[-1] != m:
        raise ValueError(
            f"y must have shape (T, m) with m = {m} (one series; vmap for batches); "
            f"got y.shape = {y.shape} for H.shape = {H.shape}"
        )
    T = y.shape[0]
    if T < 1:
        raise ValueError(f"y must have at least one time step; got y.shape = {y.shape}")
    raw = {name: _get(model, name) for name in _BASE_RANK}
    if isinstance(raw["P0"], str):
        raise ValueError("P0 must be an array here (LinearGaussianSSM resolves 'stationary')")
    dtype = jnp.result_type(*(jnp.asarray(v) for v in raw.values() if v is not None), y.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    if raw["b"] is None:
        raw["b"] = jnp.zeros((n,), dtype)
    if raw["d"] is None:
        raw["d"] = jnp.zeros((m,), dtype)
    params = {}
    for name in ("F", "Q", "H", "R", "b", "d"):
        params[name] = _per_step(name, jnp.asarray(raw[name], dtype), T)
    params["m0"] = jnp.asarray(raw["m0"], dtype)
    params["P0"] = jnp.asarray(raw["P0"], dtype)
    if params["m0"].shape != (n,) or params["P0"].shape != (n, n):
        raise ValueError(
            f"m0 and P0 must have shapes ({n},) and ({n}, {n}); got m0.shape = "
            f"{params['m0'].shape}, P0.shape = {params['P0'].shape}"
        )
    y = y.astype(dtype)
    observed = ~jnp.isnan(y)
    return params, jnp.where(observed, y, 0.0), observed


def _mask_step(H, R, d, observed):
    """Observation model restricted to the observed entries (shapes unchanged)."""
    w, Hm, Rm = _mask_observation(H, R, observed)
    return Hm, Rm, d * w


def _prior_of_elements(params):
    """``(Fp, mp, Pp)`` per element: ``x[k] = Fp x[k-1] + mp + N(0, Pp)``."""
    F, Q, b = params["F"], params["Q"], params["b"]
    Fp = jnp.concatenate([jnp.zeros_like(F[:1]), F[:-1]])
    mp = jnp.concatenate([params["m0"][None], b[:-1]])
    Pp = jnp.concatenate([params["P0"][None], Q[:-1]])
    return Fp, mp, Pp


# ------------------------------------------------------------------------------------------
# Covariance form
# ------------------------------------------------------------------------------------------
def _filter_element_cov(Fp, mp, Pp, H, R, d, y, observed):
    Hm, Rm, dm = _mask_step(H, R, d, observed)
    L = jnp.linalg.cholesky(_symmetrise(Hm @ Pp @ Hm.T + Rm))
    e = _solve_lower(L, (y - Hm @ mp - dm)[:, None])[:, 0]
    W = _solve_lower(L, Hm @ Pp)
    V = _solve_lower(L, Hm @ Fp)
    A = Fp - W.T @ V
    b = mp + W.T @ e
    C = _symmetrise(Pp - W.T @ W)
    return A, b, C, V.T @ e, _symmetrise(V.T @ V)


def _filter_combine_cov(elem_i, elem_j):
    A_i, b_i, C_i, eta_i, J_i = elem_i
    A_j, b_j, C_j, eta_j, J_j = elem_j
    n = A_i.shape[-1]
    M = jnp.eye(n, dtype=A_i.dtype) + C_i @ J_j
    # A_j M^{-1} = (M^{-T} A_j^T)^T  and  M^{-1} A_i from one LU of M. The solves are
    # ``custom_linear_solve``s around that LU (taken under stop_gradient): the derivative of
    # X = M^{-1} B is X' = M^{-1} (B' - M' X), one more solve with the same factors, instead
    # of differentiating the LU factorisation itself (smaller program, faster reverse pass).
    lu_piv = lax.stop_gradient(jax.scipy.linalg.lu_factor(M))

    def solve(_, rhs):
        return jax.scipy.linalg.lu_solve(lu_piv, rhs)

    def solve_T(_, rhs):
        return jax.scipy.linalg.lu_solve(lu_piv, rhs, trans=1)

    MinvAi = lax.custom_linear_solve(lambda x: M @ x, A_i, solve, solve_T)
    AjMinv = lax.custom_linear_solve(lambda x: M.T @ x, A_j.T, solve_T, solve).T
    A = AjMinv @ A_i
    b = AjMinv @ (b_i + C_i @ eta_j) + b_j
    C = _symmetrise(AjMinv @ C_i @ A_j.T) + C_j
    eta = MinvAi.T @ (eta_j - J_j @ b_i) + eta_i
    J = _symmetrise(MinvAi.T @ J_j @ A_i) + J_i
    return A, b, C, eta, J


def _smoother_element_cov(mf, Pf, F, Q, b):
    Pp = _symmetrise(F @ Pf @ F.T + Q)
    L = jnp.linalg.cholesky(Pp)
    # E^T = Pp^{-1} F Pf
    E = _solve_lower_T(L, _solve_lower(L, F @ Pf)).T
    g = mf - E @ (F @ mf + b)
    n = F.shape[-1]
    I_EF = jnp.eye(n, dtype=F.dtype) - E @ F
    # P - E F P in Joseph form: a sum of PSD terms.
    Lk = _symmetrise(I_EF @ Pf @ I_EF.T + E @ Q @ E.T)
    return E, g, Lk


def _smoother_combine_cov(elem_later, elem_earlier):
    E_j, g_j, L_j = elem_later
    E_i, g_i, L_i = elem_earlier
    return E_i @ E_j, E_i @ g_j + g_i, _symmetrise(E_i @ L_j @ E_i.T) + L_i


# ------------------------------------------------------------------------------------------
# Square-root form (Yaghoobi et al. 2022)
# ------------------------------------------------------------------------------------------
def _masked_noise_factor(LR, w):
    """``(m, 2m)`` factor of the masked ``R`` of :func:`_mask_step`: ``[D LR, I - D]``,
    ``D = diag(w)`` (masking the rows of ``chol(R)`` alone would leave cross terms)."""
    return jnp.concatenate([LR * w[:, None], jnp.diag(1.0 - w)], axis=1)


def _pad_square(Z, n):
    """An ``(n, n)`` factor with the same ``Z Z^T`` as the ``(n, k)`` factor ``Z``."""
    k = Z.shape[-1]
    if k == n:
        return Z
    if k < n:
        return jnp.concatenate([Z, jnp.zeros(Z.shape[:-1] + (n - k,), Z.dtype)], axis=-1)
    return tria(Z)


def _filter_element_sqrt(Fp, mp, Up, H, LR, d, y, observed):
    n, m = Fp.shape[-1], H.shape[0]
    w = observed.astype(H.dtype)
    Hm = H * w[:, None]
    LRm = _masked_noise_factor(LR, w)
    block = jnp.block([[Hm @ Up, LRm], [Up, jnp.zeros((n, 2 * m), H.dtype)]])
    T_ = tria(block)
    L_S, G, U = T_[:m, :m], T_[m:, :m], T_[m:, m:]
    sol = _solve_lower(L_S, jnp.concatenate([(y - Hm @ mp - d * w)[:, None], Hm @ Fp], axis=1))
    e, V = sol[:, 0], sol[:, 1:]
    A = Fp - G @ V
    b = mp + G @ e
    return A, b, U, V.T @ e, _pad_square(V.T, n)


def _filter_combine_sqrt(elem_i, elem_j):
    A_i, b_i, U_i, eta_i, Z_i = elem_i
    A_j, b_j, U_j, eta_j, Z_j = elem_j
    n = A_i.shape[-1]
    eye = jnp.eye(n, dtype=A_i.dtype)
    X = tria(jnp.block([[U_i.T @ Z_j, eye], [Z_j, jnp.zeros_like(Z_j)]]))
    X11, X21, X22 = X[:n, :n], X[n:, :n], X[n:, n:]
    # Psi = X11^{-T} X21^T;  M^{-1} = (I + C_i J_j)^{-1} = I - U_i Psi.
    Psi = _solve_lower_T(X11, X21.T)
    Minv = eye - U_i @ Psi
    AjMinv = A_j @ Minv
    A = AjMinv @ A_i
    b = AjMinv @ (b_i + U_i @ (U_i.T @ eta_j)) + b_j
    # (I + C_i J_j)^{-1} C_i = U_i X11^{-T} X11^{-1} U_i^T.
    U = tria(jnp.concatenate([A_j @ _solve_lower(X11, U_i.T).T, U_j], axis=1))
    eta = A_i.T @ (Minv.T @ (eta_j - Z_j @ (Z_j.T @ b_i))) + eta_i
    Z = tria(jnp.concatenate([A_i.T @ X22, Z_i], axis=1))
    return A, b, U, eta, Z


def _smoother_element_sqrt(mf, Uf, F, LQ, b):
    n = F.shape[-1]
    T_ = tria(jnp.block([[F @ Uf, LQ], [Uf, jnp.zeros_like(Uf)]]))
    Lp, Zs, D = T_[:n, :n], T_[n:, :n], T_[n:, n:]
    # E = Zs Lp^{-1}
    E = _solve_lower_T(Lp, Zs.T).T
    g = mf - E @ (F @ mf + b)
    return E, g, D


def _smoother_combine_sqrt(elem_later, elem_earlier):
    E_j, g_j, D_j = elem_later
    E_i, g_i, D_i = elem_earlier
    return E_i @ E_j, E_i @ g_j + g_i, tria(jnp.concatenate([E_i @ D_j, D_i], axis=1))


# ------------------------------------------------------------------------------------------
# Log-likelihood from the filtered moments (all steps at once)
# ------------------------------------------------------------------------------------------
def _step_log_likelihood(mp, Pp_or_Up, H, R_or_LR, d, y, observed, sqrt):
    Hm, _, dm = _mask_step(H, R_or_LR, d, observed)
    w = observed.astype(H.dtype)
    m = H.shape[0]
    if sqrt:
        LRm = _masked_noise_factor(R_or_LR, w)
        L = tria(jnp.concatenate([Hm @ Pp_or_Up, LRm], axis=1))
        finite_in = jnp.isfinite(L).all()
    else:
        _, Rm, _ = _mask_step(H, R_or_LR, d, observed)
        S = _symmetrise(Hm @ Pp_or_Up @ Hm.T + Rm)
        L = jnp.linalg.cholesky(S)
        finite_in = jnp.isfinite(S).all()
    e = _solve_lower(L, (y - Hm @ mp - dm)[:, None])[:, 0]
    diag = jnp.diagonal(L)
    ll = -0.5 * (e @ e + 2.0 * jnp.sum(jnp.log(jnp.abs(diag))) + jnp.sum(w) * _LOG_2PI)
    # A finite S without a Cholesky factor (not positive definite): -inf, never an exception.
    failed = finite_in & ~(jnp.all(jnp.abs(diag) > 0) & jnp.isfinite(diag).all())
    del m
    return ll, failed


# ------------------------------------------------------------------------------------------
# Batched LAPACK calls on CPU: chunks small enough to run on the calling thread
# ------------------------------------------------------------------------------------------
# jaxlib 0.10's CPU LAPACK kernels (potrf, getrf, trsm, geqrf, ...; one custom call per
# batched Cholesky / LU / triangular solve / QR) split a batch over XLA:CPU's intra-op thread
# pool (``jax::ParallelBatchMap``) once ``batch x (their per-matrix flop estimate)`` reaches
# 200 000, and the calling pool thread then BLOCKS until the pieces have run. When the thunk
# executor runs as many such calls side by side as the pool has threads (2 on a 2-core
# machine: e.g. the Cholesky factors of the element construction and of the log-likelihood
# in the gradient), every pool thread waits for work queued behind it and the program never
# finishes (0 % CPU, BlockUntilReady; seen at T = 1e5, where a 2 x 2 Cholesky over 1e5 steps
# crosses the threshold). jaxlib 0.11 no longer has that parallel path. So on CPU every
# per-element function that reaches LAPACK is mapped over chunks of at most
# ``_cpu_chunk(d)`` elements (``lax.map(..., batch_size=...)``), with ``d`` the largest
# matrix dimension it hands to LAPACK: ``chunk x d^3 < 200 000`` bounds every kernel's
# estimate, so each call runs inline on its thread and nothing waits on the pool. The
# arithmetic per element is unchanged; other backends keep the plain ``vmap`` (identical
# programs), decided by ``jax.default_backend()`` at trace time. An enclosing ``jax.vmap``
# (a batch of series) multiplies the batch of each call by its size, which this cannot see.
_LAPACK_INLINE_WORK = 200_000


def _cpu_chunk(d: int) -> int | None:
    """Largest element batch whose LAPACK calls on ``d x d`` (or smaller) matrices stay below
    jaxlib's threshold for parallel dispatch on CPU; None (no chunking) on other backends."""
    if jax.default_backend() != "cpu":
        return None
    return max(1, (_LAPACK_INLINE_WORK - 1) // d**3)


def _vmap(fn, chunk: int | None):
    """``jax.vmap(fn)`` over the leading axis, as ``lax.map`` over batches of ``chunk``
    elements when the axis is longer than ``chunk`` (see :func:`_cpu_chunk`)."""
    vmapped = jax.vmap(fn)
    if chunk is None:
        return vmapped

    def mapped(*args):
        size = jax.tree_util.tree_leaves(args)[0].shape[0]
        if size <= chunk:
            return vmapped(*args)
        # k equal batches, padded with copies of the last element (valid inputs, results
        # dropped): one instance of ``fn`` in the program, not a second one for a remainder.
        k = -(-size // chunk)
        c = -(-size // k)
        pad = k * c - size

        def split(x):
            x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,) + x.shape[1:])])
            return x.reshape((k, c) + x.shape[1:])

        out = lax.map(lambda a: vmapped(*a), jax.tree_util.tree_map(split, args))
        return jax.tree_util.tree_map(lambda y: y.reshape((k * c,) + y.shape[2:])[:size], out)

    return mapped


def _lapack_dim(form: str, n: int, m: int) -> int:
    """Largest matrix dimension the elements of ``form`` hand to LAPACK: the ``m x m`` and
    ``n x n`` factors and solves (cov), the ``(n + m) x (n + 2m)`` and ``2n x 2n`` blocks of
    ``tria`` (sqrt)."""
    return max(n, m) if form == "cov" else max(2 * n, n + 2 * m)


# ------------------------------------------------------------------------------------------
# The associative scan: blocked, with a program whose size does not grow with T
# ------------------------------------------------------------------------------------------
# ``lax.associative_scan`` unrolls its ~log2(T) levels into the program, two instances of the
# combination per level (four with the reverse pass), so compile time grew with log T: about
# 2.5 s of CPU per level for the log-likelihood gradient at n = 4, minutes at T = 1e5 on a
# loaded machine. The schedule below (Brent's theorem; blocked scan as in Blelloch 1990,
# Kogge-Stone tree on the block totals) computes the same prefix products with THREE
# instances of the combination whatever T is:
#   1. split the T elements into B blocks of S ~ log2(T) consecutive elements and scan each
#      block sequentially (``lax.scan`` over S steps, the B blocks side by side);
#   2. inclusive scan of the B block totals by recursive doubling (Kogge-Stone): level d
#      combines element k with element k - 2^d, ceil(log2 B) levels in a ``lax.scan``;
#   3. combine the total of all earlier blocks with every element's in-block prefix.
# Depth S + log2(B) + 1 ~ 2 log2(T) combinations (lax.associative_scan: 2 log2(T)); work
# T + B log2(B) + T ~ 3T (lax.associative_scan: ~2T). Positions with no earlier partner
# (first blocks, first elements, the padding after the last element) are combined with a
# copy of a real element and the result discarded with ``jnp.where``: every combination
# evaluated is one of valid elements, so no NaN can leak into reverse-mode cotangents.
def _block_size(T: int) -> int:
    return max(1, int(np.ceil(np.log2(T)))) if T > 1 else 1


def _prefix_scan(combine, elems, *, reverse: bool = False, chunk: int | None = None):
    """Inclusive scan of ``elems`` (a tuple of arrays with a leading time axis) under the
    associative ``combine(earlier, later)`` (``reverse=True``: ``combine(later, earlier)``
    accumulated from the end, as ``lax.associative_scan(..., reverse=True)``). ``chunk``:
    batch the combinations in groups of at most this many (see :func:`_cpu_chunk`)."""
    if reverse:
        flipped = tuple(jnp.flip(x, axis=0) for x in elems)
        return tuple(
            jnp.flip(x, axis=0) for x in _prefix_scan(combine, flipped, chunk=chunk)
        )
    T = elems[0].shape[0]
    if T == 1:
        return elems
    batched = _vmap(combine, chunk)
    S = _block_size(T)
    B = -(-T // S)
    pad = B * S - T
    # Edge padding: copies of the last element, whose results are dropped.
    blocks = tuple(
        jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,) + x.shape[1:])]).reshape(
            (B, S) + x.shape[1:]
        )
        for x in elems
    )

    # 1. Sequential scan inside each block (all blocks at once).
    def in_block(carry, current):
        out = batched(carry, current)
        return out, out

    first = tuple(x[:, 0] for x in blocks)
    rest = tuple(jnp.moveaxis(x[:, 1:], 1, 0) for x in blocks)
    _, scanned = lax.scan(in_block, first, rest)
    local = tuple(
        jnp.concatenate([f[:, None], jnp.moveaxis(r, 0, 1)], axis=1)
        for f, r in zip(first, scanned)
    )
    if B == 1:
        return tuple(x.reshape((B * S,) + x.shape[2:])[:T] for x in local)

    # 2. Kogge-Stone inclusive scan of the block totals.
    index = jnp.arange(B)

    def doubling(totals, shift):
        has_partner = index >= shift
        partner = jnp.where(has_partner, index - shift, index)
        combined = batched(tuple(x[partner] for x in totals), totals)
        keep = lambda new, old: jnp.where(
            has_partner.reshape((B,) + (1,) * (old.ndim - 1)), new, old
        )
        return tuple(keep(c, t) for c, t in zip(combined, totals)), None

    levels = int(np.ceil(np.log2(B)))
    shifts = jnp.asarray([2**d for d in range(levels)], dtype=index.dtype)
    totals, _ = lax.scan(doubling, tuple(x[:, -1] for x in local), shifts)

    # 3. Prefix of all earlier blocks o in-block prefix (block 0 keeps its own).
    earlier = tuple(
        jnp.broadcast_to(jnp.concatenate([t[:1], t[:-1]])[:, None], l.shape)
        for t, l in zip(totals, local)
    )
    flat = lambda x: x.reshape((B * S,) + x.shape[2:])
    combined = batched(tuple(flat(x) for x in earlier), tuple(flat(x) for x in local))
    first_block = jnp.arange(B * S) < S
    out = tuple(
        jnp.where(first_block.reshape((B * S,) + (1,) * (c.ndim - 1)), flat(l), c)
        for c, l in zip(combined, local)
    )
    return tuple(x[:T] for x in out)


# ------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------
@full_precision
def parallel_filter(model, y, *, form: str = "cov"):
    r"""Associative-scan Kalman filter (Särkkä & García-Fernández 2021): ``O(log T)`` depth.

    Computes the same quantities as the sequential ``statespace.kalman_filter`` for ONE
    discrete-time model and ONE series: the filtering elements ``(A, b, C, eta, J)`` of every
    step are built in parallel, combined by an associative scan (:func:`_prefix_scan`; see the
    module docstring for the formulas), and the one-step predictions and per-step innovation
    log-densities are then evaluated for all steps at once::

        m^-_k = F[k-1] m_{k-1} + b[k-1],  P^-_k = F[k-1] P_{k-1} F[k-1]^T + Q[k-1],
        ell_k = log N(y_k; H[k] m^-_k + d[k], H[k] P^-_k H[k]^T + R[k])   (observed entries).

    NaN entries of ``y`` are missing (whole rows or single entries); parameters may carry a
    leading ``T`` axis (time-varying, ``F[k], Q[k], b[k]`` map ``k -> k+1``); offsets ``b, d``.
    A finite innovation covariance that is not positive definite makes that step's and every
    later step's log-likelihood ``-inf`` (as the sequential filter does).

    Args:
        model: a discrete ``LinearGaussianSSM`` (or any object / dict with ``F, Q, H, R, m0,
            P0`` and optional ``b, d``) with no batch axes; continuous models must be
            discretised first (``model.to_discrete(times)``). Exact diffuse
            initialisation is not supported.
        y: ``(T, m)`` observations, NaN = missing.
        form: ``"cov"`` (covariance elements, symmetrised at every combination) or ``"sqrt"``
            (Cholesky-factor elements through ``rules.tria``, Yaghoobi et al. 2022; robust in
            float32; needs ``Q``, ``R``, ``P0`` positive semi-definite).

    Returns:
        A ``statespace.FilterResult`` (fields, in order): ``log_likelihood`` (scalar),
        ``log_likelihoods (T,)``, ``filtered_means (T, n)``, ``filtered_covs (T, n, n)``,
        ``predicted_means (T, n)``, ``predicted_covs (T, n, n)``,
        and for ``form="sqrt"`` ``filtered_chols``, ``predicted_chols`` (under ``jit`` the
        moments a caller does not use are not computed).

    Raises:
        ValueError: badly shaped ``y`` or parameters (the message names the shapes), batch
            axes, unknown ``form``.
        NotImplementedError: a model with ``diffuse`` states.

    Example:
        >>> from statespace import kalman_filter
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM
        >>> from statespace._parallel import parallel_filter, parallel_smoother
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [jnp.nan], [1.1]])
        >>> out, ref = parallel_filter(model, y), kalman_filter(model, y)
        >>> round(float(out.log_likelihood), 6), round(float(ref.log_likelihood), 6)
        (-2.866744, -2.866744)
        >>> bool(np.allclose(out.filtered_covs, ref.filtered_covs))
        True
        >>> bool(np.allclose(out.predicted_means, ref.predicted_means))
        True
    """
    _check_form(form)
    params, y0, observed = _normalise(model, y)
    F, Q, H, R, b, d = (params[k] for k in ("F", "Q", "H", "R", "b", "d"))
    Fp, mp, Pp = _prior_of_elements(params)
    sqrt = form == "sqrt"
    chunk = _cpu_chunk(_lapack_dim(form, F.shape[-1], H.shape[-2]))
    if sqrt:
        Up = _vmap(_psd_cholesky, chunk)(Pp)
        LR = _vmap(_psd_cholesky, chunk)(R)
        elems = _vmap(_filter_element_sqrt, chunk)(Fp, mp, Up, H, LR, d, y0, observed)
        combine = _filter_combine_sqrt
    else:
        elems = _vmap(_filter_element_cov, chunk)(Fp, mp, Pp, H, R, d, y0, observed)
        combine = _filter_combine_cov
    _, means, covs, _, _ = _prefix_scan(combine, elems, chunk=chunk)

    # One-step predictions from the filtered moments, in parallel over k.
    pred_means = jnp.concatenate(
        [params["m0"][None], jnp.einsum("tij,tj->ti", F[:-1], means[:-1]) + b[:-1]]
    )
    if sqrt:
        chols_f = covs
        LQ = _vmap(_psd_cholesky, chunk)(Q)
        tail = _vmap(tria, chunk)(jnp.concatenate([F[:-1] @ chols_f[:-1], LQ[:-1]], axis=-1))
        chols_p = jnp.concatenate([Up[:1], tail])
        lls, failed = _vmap(
            lambda mp_, Up_, H_, LR_, d_, y_, o_: _step_log_likelihood(
                mp_, Up_, H_, LR_, d_, y_, o_, True
            ),
            chunk,
        )(pred_means, chols_p, H, LR, d, y0, observed)
    else:
        tail = _symmetrise(F[:-1] @ covs[:-1] @ _mT(F[:-1]) + Q[:-1])
        pred_covs = jnp.concatenate([params["P0"][None], tail])
        lls, failed = _vmap(
            lambda mp_, Pp_, H_, R_, d_, y_, o_: _step_log_likelihood(
                mp_, Pp_, H_, R_, d_, y_, o_, False
            ),
            chunk,
        )(pred_means, pred_covs, H, R, d, y0, observed)
    failed = _from_first(failed)
    lls = jnp.where(failed, -jnp.inf, lls)
    total = jnp.sum(lls)
    if sqrt:
        return FilterResult(
            total, lls, means, _symmetrise(chols_f @ _mT(chols_f)), pred_means,
            _symmetrise(chols_p @ _mT(chols_p)), chols_f, chols_p,
        )
    return FilterResult(total, lls, means, covs, pred_means, pred_covs, None, None)


@full_precision
def parallel_smoother(model, y, filter_result=None, *, form: str = "cov"):
    r"""Associative-scan RTS smoother (Särkkä & García-Fernández 2021): ``O(log T)`` depth.

    The smoothing elements ``(E_k, g_k, L_k)`` (see the module docstring) are built from the
    filtered moments for all ``k`` at once and combined by a reverse associative scan;
    the suffix products are the smoothed moments::

        E_k = P_k F_k^T (F_k P_k F_k^T + Q_k)^{-1},  g_k = m_k - E_k (F_k m_k + b_k),
        L_k = P_k - E_k F_k P_k,   m^s_k = E_k m^s_{k+1} + g_k,
        P^s_k = E_k P^s_{k+1} E_k^T + L_k,   Cov(x[k+1], x[k] | y) = P^s_{k+1} E_k^T.

    Args:
        model: as for :func:`parallel_filter` (one discrete model, no batch axes).
        y: ``(T, m)`` observations, NaN = missing (only used when ``filter_result`` is None).
        filter_result: output of :func:`parallel_filter` or ``statespace.kalman_filter`` on the
            same model and data (anything with ``filtered_means``, ``filtered_covs`` and, for
            ``form="sqrt"``, optionally ``filtered_chols``); computed by the parallel filter if
            None.
        form: ``"cov"`` or ``"sqrt"`` (factors ``L_k = D_k D_k^T`` through ``rules.tria``).

    Returns:
        ``ParallelSmootherResult(smoothed_means (T, n), smoothed_covs (T, n, n),
        smoothed_cross_covs (T-1, n, n))`` with ``smoothed_cross_covs[k] = Cov(x[k+1], x[k] | y)``
        (rows index ``x[k+1]``), as ``statespace.SmootherResult``.

    Raises:
        ValueError: as :func:`parallel_filter`.

    Example:
        >>> from statespace import kalman_filter, rts_smoother
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM
        >>> from statespace._parallel import parallel_filter, parallel_smoother
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [jnp.nan], [1.1]])
        >>> s = parallel_smoother(model, y, parallel_filter(model, y))
        >>> s.smoothed_means.shape, s.smoothed_covs.shape, s.smoothed_cross_covs.shape
        ((3, 1), (3, 1, 1), (2, 1, 1))
        >>> ref = rts_smoother(model, y)  # the sequential smoother: the same moments
        >>> bool(np.allclose(s.smoothed_means, ref.smoothed_means))
        True
        >>> bool(np.allclose(s.smoothed_cross_covs, ref.smoothed_cross_covs))
        True
        >>> # sqrt form, here on the sequential filter's factors
        >>> sqrt = parallel_smoother(model, y, kalman_filter(model, y, form="sqrt"), form="sqrt")
        >>> bool(np.allclose(sqrt.smoothed_covs, ref.smoothed_covs))
        True
    """
    _check_form(form)
    params, _, _ = _normalise(model, y)
    if filter_result is None:
        filter_result = parallel_filter(model, y, form=form)
    means = filter_result.filtered_means
    covs = filter_result.filtered_covs
    T, n = means.shape
    dtype = means.dtype
    F, Q, b = (params[k].astype(dtype) for k in ("F", "Q", "b"))
    if T == 1:
        return ParallelSmootherResult(means, _symmetrise(covs), jnp.zeros((0, n, n), dtype))
    chunk = _cpu_chunk(_lapack_dim(form, n, 1))
    if form == "sqrt":
        chols = getattr(filter_result, "filtered_chols", None)
        if chols is None:
            chols = _vmap(_psd_cholesky, chunk)(covs)
        LQ = _vmap(_psd_cholesky, chunk)(Q[:-1])
        E, g, D = _vmap(_smoother_element_sqrt, chunk)(
            means[:-1], chols[:-1], F[:-1], LQ, b[:-1]
        )
        elems = (
            jnp.concatenate([E, jnp.zeros((1, n, n), dtype)]),
            jnp.concatenate([g, means[-1:]]),
            jnp.concatenate([D, chols[-1:]]),
        )
        _, sm, sD = _prefix_scan(_smoother_combine_sqrt, elems, reverse=True, chunk=chunk)
        sP = _symmetrise(sD @ _mT(sD))
    else:
        E, g, Lk = _vmap(_smoother_element_cov, chunk)(
            means[:-1], covs[:-1], F[:-1], Q[:-1], b[:-1]
        )
        elems = (
            jnp.concatenate([E, jnp.zeros((1, n, n), dtype)]),
            jnp.concatenate([g, means[-1:]]),
            jnp.concatenate([Lk, _symmetrise(covs[-1:])]),
        )
        # The covariance-form combination is matrix products only (no LAPACK): one vmap.
        _, sm, sP = _prefix_scan(_smoother_combine_cov, elems, reverse=True)
    cross = sP[1:] @ _mT(E)
    return ParallelSmootherResult(sm, sP, cross)
