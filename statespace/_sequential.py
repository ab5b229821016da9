"""The sequential Kalman filter on one series (covariance and square-root form) with missing
data and exact diffuse starts.

The filter is a ``lax.scan`` over time whose step is an update (condition ``x[k]`` on ``y[k]``)
followed by a prediction (``x[k+1]`` from ``x[k]``); the arithmetic of the steps is in
``statespace._steps``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules._unrolled import UNROLL_MAX
from statespace._model import _BASE_RANK, _TIME_PARAMS, LinearGaussianSSM, _indefinite
from statespace._steps import (
    _LOG_2PI,
    _SMALL_M,
    FilterResult,
    _innovation,
    _log_likelihood_term,
    _mask_observation,
    _mm,
    _pack,
    _packed_step,
    _predict_cov,
    _predict_sqrt,
    _psd_cholesky,
    _reject,
    _symmetrise,
    _unpack,
    _update_cov,
    _update_diffuse,
    _update_sqrt,
)


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
        v = _innovation(yk, observed, H, mean, d)
        A_in = A if q else None
        if sqrt:
            upd = _update_sqrt(mean, cov, H, Hm, Rm, v, A_in)
        else:
            upd = _update_cov(mean, cov, Hm, Rm, v, A_in)
        ok = jnp.all(jnp.abs(upd.diag) > 0)
        failed = failed | (upd.finite & ~ok)
        # -inf from the first failed factorisation on (NaN input stays NaN: finite is False)
        ll = jnp.where(failed, -jnp.inf, _log_likelihood_term(upd.e, upd.diag, w))
        A_f = A
        if q:
            A_f, S_acc, s_acc = _update_diffuse(A, S_acc, s_acc, upd.gain, upd.E, upd.e)
        A_next = _mm(F, A_f) if q else A
        if sqrt:
            mean_next, cov_next = _predict_sqrt(upd.mean, upd.cov, F, b, param("LQ", xs))
        else:
            mean_next, cov_next = _predict_cov(upd.mean, upd.cov, F, b, param("Q", xs))
        out = (ll,)
        if moments == "predicted":
            out = out + (mean, cov)
        elif moments:
            out = out + (upd.mean, upd.cov, mean, cov)
            if q:
                out = out + (A_f, A, S_acc, s_acc)
        return (mean_next, cov_next, A_next, S_acc, s_acc, failed), out

    def packed_step(X, xs):
        X_next, ll, X_f = _packed_step(X, xs["y"], *(param(k, xs) for k in ("H", "d", "R", "F", "b", "Q")))
        out = (ll,)
        # the carried P is symmetric to rounding only (not symmetrised in the loop: a kernel)
        if moments == "predicted":  # X_next itself (no copy of the carry), split after the scan
            out = out + (X_next,)
        elif moments:
            mean_f, cov_f = _unpack(X_f)
            mean, P = _unpack(X)
            out = out + (mean_f, _symmetrise(cov_f), mean, _symmetrise(P))
        return X_next, out

    xs = dict(scanned, y=y)
    if not sqrt and not q and model.obs_dim <= _SMALL_M and n + 1 <= UNROLL_MAX:
        X0 = _pack(m0, cov0)
        _, out = lax.scan(packed_step, X0, xs)
        failed = lax.cummax(jnp.isneginf(out[0]).astype(jnp.int32)) > 0
        out = (jnp.where(failed, -jnp.inf, out[0]),) + out[1:]
        if moments == "predicted":  # predictions of steps 1..T -> of steps 0..T-1
            Xs = jnp.concatenate([X0[None], out[1][:-1]], axis=0)
            means, covs = _unpack(Xs)
            out = (out[0], means, _symmetrise(covs))
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

