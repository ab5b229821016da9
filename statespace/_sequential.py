"""The sequential Kalman filter on one series (covariance and square-root form) with missing
data and exact diffuse starts.

The filter is a ``lax.scan`` over time whose step is an update (condition ``x[k]`` on ``y[k]``)
followed by a prediction (``x[k+1]`` from ``x[k]``); the arithmetic of the steps is in
``statespace._steps``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules._unrolled import UNROLL_MAX
from statespace._model import (
    LinearGaussianSSM,
    _from_first,
    _indefinite,
    _invalid_covariances,
    _steps_params,
)
from statespace._steps import (
    _LOG_2PI,
    _SMALL_M,
    FilterResult,
    _innovation,
    _log_likelihood_term,
    _mask_observation,
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


# ------------------------------------------------------------------------------------------
# The filter on one series
# ------------------------------------------------------------------------------------------
class ForwardPass(NamedTuple):
    """What the adjoint reads from the forward filter (:func:`filter_predictions`).

    Attributes:
        log_likelihood: the total (scalar), with the filter's ``-inf`` rules.
        predicted_means: ``(T, n)``, ``E[x[k] | y[0..k-1]]``.
        predicted_covs: ``(T, n, n)`` covariances (covariance form; else None).
        predicted_chols: ``(T, n, n)`` their lower factors (square-root form; else None).

    Example:
        >>> from statespace._sequential import filter_predictions
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM, kalman_filter
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> cov, sqrt = filter_predictions(model, y, "cov"), filter_predictions(model, y, "sqrt")
        >>> cov.predicted_covs.shape, cov.predicted_chols, sqrt.predicted_covs
        ((3, 1, 1), None, None)
        >>> L = sqrt.predicted_chols
        >>> bool(np.allclose(L @ L.transpose(0, 2, 1), cov.predicted_covs))
        True
    """

    log_likelihood: jax.Array
    predicted_means: jax.Array
    predicted_covs: jax.Array | None
    predicted_chols: jax.Array | None


class _Prepared(NamedTuple):
    """One series' parameters ready for the scan (:func:`_prepare`)."""

    const: dict  # time-constant parameters (``LQ`` for ``Q`` in square-root form)
    scanned: dict  # per-step parameters, leading axis T
    m0: jax.Array
    cov0: jax.Array  # P0, or its lower factor in square-root form
    A0: jax.Array  # (n, q) loadings of the q diffuse states
    invalid: jax.Array  # (T,) flags of indefinite covariances (see _invalid_covariances)
    factor_failed: jax.Array  # square-root form: a finite Q or P0 without a square root
    sqrt: bool


def _symmetric_params(model, dtype):
    """``(const, scanned, P0)`` cast to ``dtype``; covariances enter through their symmetric
    part (exact no-op for symmetric input), so gradients with respect to Q, R and P0 are
    symmetric matrices. Diffuse rows/columns of ``P0`` are zeroed."""
    const, scanned = _steps_params(model)
    sym = lambda k, v: _symmetrise(v) if k in ("Q", "R") else v  # noqa: E731
    const = {k: sym(k, v.astype(dtype)) for k, v in const.items()}
    scanned = {k: sym(k, v.astype(dtype)) for k, v in scanned.items()}
    P0 = _symmetrise(model.P0.astype(dtype))
    mask = model.diffuse_mask
    if mask is not None and mask.any():
        keep = jnp.asarray(~mask, dtype)
        P0 = P0 * keep[:, None] * keep[None, :]
    return const, scanned, P0


def _diffuse_loadings(model, dtype):
    """``A0 (n, q)``: the columns of the identity of the ``q`` diffuse states."""
    n, mask = model.state_dim, model.diffuse_mask
    if mask is None or not mask.any():
        return jnp.zeros((n, 0), dtype)
    return jnp.eye(n, dtype=dtype)[:, np.flatnonzero(mask)]


def _prepare(model: LinearGaussianSSM, y, form: str) -> _Prepared:
    """Parameters of one series (``T >= 1``) as the scan reads them."""
    dtype = y.dtype
    const, scanned, P0 = _symmetric_params(model, dtype)
    invalid = _invalid_covariances(const, scanned, P0, y.shape[0])
    factor_failed = jnp.zeros((), bool)
    sqrt = form == "sqrt"
    cov0 = P0
    if sqrt:
        if "Q" in scanned:
            scanned["LQ"] = _psd_cholesky(scanned.pop("Q"))
            LQ_all = scanned["LQ"]
        else:
            const["LQ"] = _psd_cholesky(const.pop("Q"))
            LQ_all = const["LQ"]
        cov0 = _psd_cholesky(P0)
        # A finite but indefinite Q or P0 has no square root: report -inf, like the cov form.
        factor_failed = (jnp.isnan(LQ_all).any() & jnp.isfinite(model.Q).all()) | (
            jnp.isnan(cov0).any() & jnp.isfinite(P0).all()
        )
    return _Prepared(const, scanned, model.m0.astype(dtype), cov0,
                     _diffuse_loadings(model, dtype), invalid, factor_failed, sqrt)


def _empty_total(model: LinearGaussianSSM, dtype):
    """``log p(nothing) = 0`` for ``T = 0``, ``-inf`` for a model with an indefinite ``Q``,
    ``R`` or ``P0``."""
    const, scanned, P0 = _symmetric_params(model, dtype)
    covs = [v for k, v in {**const, **scanned}.items() if k in ("Q", "R")] + [P0]
    invalid = jnp.any(jnp.stack([jnp.any(_indefinite(v)) for v in covs]))
    return _reject(jnp.zeros((), dtype), invalid)


def _param(prep: _Prepared, name, xs):
    return xs[name] if name in xs else prep.const[name]


class _StepValues(NamedTuple):
    """What one general step can store: the log-likelihood term, the predicted (``mean``,
    ``cov``) and filtered moments, and the diffuse states' quantities after the update."""

    ll: jax.Array
    mean: jax.Array
    cov: jax.Array
    mean_f: jax.Array
    cov_f: jax.Array
    A: jax.Array
    A_f: jax.Array
    S_acc: jax.Array
    s_acc: jax.Array


def _general_step(prep: _Prepared, store, carry, xs):
    """One update and prediction in covariance or square-root form, diffuse states carried
    (augmented filter); ``store(values)`` picks what the scan keeps of :class:`_StepValues`."""
    mean, cov, A, S_acc, s_acc, failed = carry
    q = A.shape[-1]
    yk = xs["y"]
    H, d, R = (_param(prep, k, xs) for k in ("H", "d", "R"))
    F, b = _param(prep, "F", xs), _param(prep, "b", xs)
    observed = ~jnp.isnan(yk)
    w, Hm, Rm = _mask_observation(H, R, observed)
    v = _innovation(yk, observed, H, mean, d)
    A_in = A if q else None
    if prep.sqrt:
        upd = _update_sqrt(mean, cov, H, Hm, Rm, v, A_in)
    else:
        upd = _update_cov(mean, cov, Hm, Rm, v, A_in)
    ok = jnp.all(jnp.abs(upd.diag) > 0)
    failed = failed | (upd.finite & ~ok)
    # -inf from the first failed factorisation on (NaN input stays NaN: finite is False)
    ll = jnp.where(failed, -jnp.inf, _log_likelihood_term(upd.e, upd.diag, w))
    A_f = A  # without diffuse states the empty (n, 0) loadings pass through unchanged
    if q:
        A_f, S_acc, s_acc = _update_diffuse(A, S_acc, s_acc, upd.gain, upd.E, upd.e)
    predict = _predict_sqrt if prep.sqrt else _predict_cov
    noise = _param(prep, "LQ" if prep.sqrt else "Q", xs)
    mean_next, cov_next, A_next = predict(upd.mean, upd.cov, F, b, noise, A_f if q else None)
    if not q:
        A_next = A
    values = _StepValues(ll, mean, cov, upd.mean, upd.cov, A, A_f, S_acc, s_acc)
    return (mean_next, cov_next, A_next, S_acc, s_acc, failed), store(values)


def _general_scan(prep: _Prepared, y, store):
    """The general step over the series: ``(stored, S_T, s_T)`` with the stacked outputs of
    ``store`` and the diffuse accumulators after the last step."""
    dtype, q = y.dtype, prep.A0.shape[-1]
    carry0 = (prep.m0, prep.cov0, prep.A0, jnp.zeros((q, q), dtype), jnp.zeros((q,), dtype),
              prep.factor_failed)
    (_, _, _, S_T, s_T, _), stored = lax.scan(
        lambda c, xs: _general_step(prep, store, c, xs), carry0, dict(prep.scanned, y=y))
    return stored, S_T, s_T


def _packed_scan(prep: _Prepared, X0, y, store):
    """:func:`statespace._steps._packed_step` over the series from ``X0 = [m0 | P0]``
    (covariance form, small ``m``, no diffuse states); ``store(ll, X, X_f, X_next)`` picks
    what the scan keeps. The first output, the log-likelihood terms, is ``-inf`` from the
    first failed step on."""

    def step(X, xs):
        X_next, ll, X_f = _packed_step(
            X, xs["y"], *(_param(prep, k, xs) for k in ("H", "d", "R", "F", "b", "Q")))
        return X_next, store(ll, X, X_f, X_next)

    _, stored = lax.scan(step, X0, dict(prep.scanned, y=y))
    failed = _from_first(jnp.isneginf(stored[0]))
    return (jnp.where(failed, -jnp.inf, stored[0]),) + stored[1:]


def _packs(model: LinearGaussianSSM, prep: _Prepared) -> bool:
    """Whether the packed step serves this model (covariance form, ``m <= _SMALL_M``, no
    diffuse states, ``n + 1 <= UNROLL_MAX``)."""
    return (not prep.sqrt and not prep.A0.shape[-1] and model.obs_dim <= _SMALL_M
            and model.state_dim + 1 <= UNROLL_MAX)


def _finish_log_likelihoods(model, prep: _Prepared, y, per_step, S_T, s_T):
    """The per-step terms with the invalid-covariance rule applied and, for diffuse models,
    the collapse of the diffuse part added to the last term."""
    log_likelihoods = _reject(per_step, prep.invalid, *jax.tree_util.tree_leaves(model))
    q = prep.A0.shape[-1]
    if q:
        # Collapse the diffuse part (de Jong 1991; Durbin & Koopman 2012, section 5.7):
        # log L_d = log int p(y | delta) d delta
        #         = sum_k ll_k + 1/2 s^T S^{-1} s - 1/2 log|S| + q/2 log 2 pi
        # (the Gaussian integral over delta; KFAS's and statsmodels' convention).
        # A series with no observed entry (panel padding) has S = 0 and gets 0, as a
        # non-diffuse model does: log p(nothing) = 0 (I in place of S keeps the gradient finite).
        seen = jnp.any(~jnp.isnan(y))
        L_d = jnp.linalg.cholesky(jnp.where(seen, S_T, jnp.eye(q, dtype=y.dtype)))
        u = lax.linalg.triangular_solve(L_d, s_T[:, None], left_side=True, lower=True)[:, 0]
        correction = 0.5 * (u @ u) - jnp.sum(jnp.log(jnp.diagonal(L_d))) + 0.5 * q * _LOG_2PI
        correction = jnp.where(seen, correction, 0.0)
        log_likelihoods = log_likelihoods.at[-1].add(correction)
    return log_likelihoods


def filter_log_likelihoods(model: LinearGaussianSSM, y, form: str):
    """The filter on one series, storing nothing but the log-likelihood terms.

    Returns:
        ``(total, log_likelihoods (T,))``.

    Example:
        >>> from statespace._sequential import filter_log_likelihoods
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM, kalman_filter
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> total, terms = filter_log_likelihoods(model, y, "cov")
        >>> round(float(total), 6), terms.shape, bool(np.allclose(terms.sum(), total))
        (-4.201405, (3,), True)
        >>> bool(np.allclose(terms, kalman_filter(model, y).log_likelihoods))
        True
    """
    if y.shape[0] == 0:
        return _empty_total(model, y.dtype), jnp.zeros((0,), y.dtype)
    prep = _prepare(model, y, form)
    if _packs(model, prep):
        X0 = _pack(prep.m0, prep.cov0)
        (per_step,) = _packed_scan(prep, X0, y, lambda ll, X, X_f, X_next: (ll,))
        S_T = s_T = None
    else:
        (per_step,), S_T, s_T = _general_scan(prep, y, lambda s: (s.ll,))
    log_likelihoods = _finish_log_likelihoods(model, prep, y, per_step, S_T, s_T)
    return jnp.sum(log_likelihoods), log_likelihoods


def filter_predictions(model: LinearGaussianSSM, y, form: str) -> ForwardPass:
    """The filter on one series (no diffuse states), storing the predicted moments the
    adjoint reads: covariances in covariance form, lower factors in square-root form.

    Example:
        >>> from statespace._sequential import filter_predictions
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM, kalman_filter
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> forward = filter_predictions(model, y, "cov")
        >>> round(float(forward.log_likelihood), 6)
        -4.201405
        >>> bool(np.allclose(forward.predicted_means, kalman_filter(model, y).predicted_means))
        True
    """
    n, dtype = model.state_dim, y.dtype
    sqrt = form == "sqrt"
    if y.shape[0] == 0:
        empty = jnp.zeros((0, n, n), dtype)
        return ForwardPass(_empty_total(model, dtype), jnp.zeros((0, n), dtype),
                           None if sqrt else empty, empty if sqrt else None)
    prep = _prepare(model, y, form)
    if _packs(model, prep):
        # X_next itself (no copy of the carry), split after the scan: the predictions of
        # steps 1..T shifted to those of steps 0..T-1
        X0 = _pack(prep.m0, prep.cov0)
        per_step, X_next = _packed_scan(prep, X0, y, lambda ll, X, X_f, X_next: (ll, X_next))
        means, covs = _unpack(jnp.concatenate([X0[None], X_next[:-1]], axis=0))
        covs = _symmetrise(covs)
        S_T = s_T = None
    else:
        (per_step, means, covs), S_T, s_T = _general_scan(
            prep, y, lambda s: (s.ll, s.mean, s.cov))
    total = jnp.sum(_finish_log_likelihoods(model, prep, y, per_step, S_T, s_T))
    return ForwardPass(total, means, None if sqrt else covs, covs if sqrt else None)


def filter_moments(model: LinearGaussianSSM, y, form: str) -> FilterResult:
    """The filter on one series with all filtered and predicted moments (diffuse states
    collapsed: ``delta | y[0..k] ~ N(S_k^{-1} s_k, S_k^{-1})``).

    Example:
        >>> from statespace._sequential import filter_moments
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM, kalman_filter
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> result = filter_moments(model, y, "sqrt")  # kalman_filter without the plumbing
        >>> type(result).__name__, result.filtered_chols.shape
        ('FilterResult', (3, 1, 1))
        >>> bool(np.allclose(result.filtered_covs, kalman_filter(model, y).filtered_covs))
        True
    """
    n, dtype = model.state_dim, y.dtype
    if y.shape[0] == 0:
        per_step, means, covs = (jnp.zeros(s, dtype) for s in ((0,), (0, n), (0, n, n)))
        chols = covs if form == "sqrt" else None
        return FilterResult(_empty_total(model, dtype), per_step, means, covs, means, covs,
                            chols, chols)
    prep = _prepare(model, y, form)
    q = prep.A0.shape[-1]
    if _packs(model, prep):
        def store(ll, X, X_f, X_next):
            # the carried P is symmetric to rounding only (not symmetrised in the loop)
            (mean_f, cov_f), (mean, P) = _unpack(X_f), _unpack(X)
            return ll, mean_f, _symmetrise(cov_f), mean, _symmetrise(P)

        X0 = _pack(prep.m0, prep.cov0)
        per_step, mean_f, cov_f, mean_p, cov_p = _packed_scan(prep, X0, y, store)
        S_T = s_T = None
    else:
        diffuse = (lambda s: (s.A_f, s.A, s.S_acc, s.s_acc)) if q else (lambda s: ())
        out, S_T, s_T = _general_scan(
            prep, y, lambda s: (s.ll, s.mean_f, s.cov_f, s.mean, s.cov) + diffuse(s))
        per_step, mean_f, cov_f, mean_p, cov_p = out[:5]
    log_likelihoods = _finish_log_likelihoods(model, prep, y, per_step, S_T, s_T)
    chol_f = chol_p = None
    if prep.sqrt:
        chol_f, chol_p = cov_f, cov_p
        cov_f = chol_f @ jnp.swapaxes(chol_f, -1, -2)
        cov_p = chol_p @ jnp.swapaxes(chol_p, -1, -2)
    if q:
        A_f, A_p, S_f, s_f = out[5:]
        S_p = jnp.concatenate([jnp.zeros((1, q, q), dtype), S_f[:-1]])
        s_p = jnp.concatenate([jnp.zeros((1, q), dtype), s_f[:-1]])
        mean_f, cov_f = _collapse(mean_f, cov_f, A_f, S_f, s_f)
        mean_p, cov_p = _collapse(mean_p, cov_p, A_p, S_p, s_p)
    return FilterResult(jnp.sum(log_likelihoods), log_likelihoods, mean_f, cov_f, mean_p,
                        cov_p, chol_f, chol_p)


def _collapse(means, covs, A, S, s):
    """Moments of ``x = a + A delta + eps`` with ``delta | y ~ N(S^{-1} s, S^{-1})``."""
    L = jnp.linalg.cholesky(S)
    u = lax.linalg.triangular_solve(L, s[..., None], left_side=True, lower=True)
    delta = lax.linalg.triangular_solve(L, u, left_side=True, lower=True, transpose_a=True)[..., 0]
    B = lax.linalg.triangular_solve(L, jnp.swapaxes(A, -1, -2), left_side=True, lower=True)
    means = means + jnp.einsum("tnq,tq->tn", A, delta)
    covs = covs + jnp.swapaxes(B, -1, -2) @ B
    return means, covs

