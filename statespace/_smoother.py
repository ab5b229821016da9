"""Rauch–Tung–Striebel smoothing and forward-filtering backward-sampling.

Both run backwards over the moments a Kalman filter returns (``statespace.kalman_filter``), so
missing data, time-varying parameters, offsets and continuous-time models are handled by the
filter; the backward pass only needs the transition matrices ``F[k]`` and noise covariances
``Q[k]`` that map step ``k`` to ``k + 1``.

Conventions: ``x[k+1] = F[k] x[k] + b[k] + w[k]``, ``w[k] ~ N(0, Q[k])``;
``y[k] = H[k] x[k] + d[k] + v[k]``; ``x[0] ~ N(m0, P0)`` is observed by ``y[0]``. The filter's
``predicted_*[k]`` are the moments of ``x[k]`` given ``y[0..k-1]`` and ``filtered_*[k]`` those
given ``y[0..k]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules import tria
from rules._precision import full_precision
from statespace._kalman import kalman_filter
from statespace._model import (
    _as_discrete,
    _check_inputs,
    _check_times,
    _joint_batch_shape,
    _map_batch,
    _per_step,
    _psd_sqrt,
    _series_arguments,
    _with_inputs,
)
from statespace._nonlinear import nonlinear_options, nonlinear_pass
from statespace._parallel import parallel_filter, parallel_smoother
from statespace._steps import _check_form, _psd_cholesky, _reject, _symmetrise


class SmootherResult(NamedTuple):
    """Output of :func:`rts_smoother` (a NamedTuple, hence a pytree: it jits and vmaps).

    Attributes:
        smoothed_means: ``(T, n)``, ``E[x[k] | y[0..T-1]]``.
        smoothed_covs: ``(T, n, n)``, ``Cov(x[k] | y[0..T-1])``, exactly symmetric.
        smoothed_cross_covs: ``(T-1, n, n)``, lag-one ``Cov(x[k+1], x[k] | y[0..T-1])``: rows index
            ``x[k+1]``, columns index ``x[k]`` (so ``smoothed_cross_covs[k] = P_{k+1|T} G_k^T``
            with the smoother gain ``G_k``). Transpose it for ``Cov(x[k], x[k+1] | y)``.
        log_likelihood: scalar, the filter's log-likelihood of the observed entries of ``y``.
        filtered_means: ``(T, n)``, ``E[x[k] | y[0..k]]`` (from the filter).
        filtered_covs: ``(T, n, n)``, ``Cov(x[k] | y[0..k])`` (from the filter).

    Example:
        >>> import jax.numpy as jnp, numpy as np, statespace
        >>> model = statespace.LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                                      m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [jnp.nan], [1.1]])
        >>> # the dense posterior of x = G w (w ~ N(0, I)) given y[0], y[2] with unit noise
        >>> G = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 0.5, 1.0]])
        >>> Px, obs = G @ G.T, [0, 2]
        >>> K = Px[:, obs] @ np.linalg.inv(Px[np.ix_(obs, obs)] + np.eye(2))
        >>> mean, cov = K @ np.array([0.3, 1.1]), Px - K @ Px[obs, :]
        >>> out = statespace.rts_smoother(model, y)
        >>> bool(np.allclose(out.smoothed_cross_covs[:, 0, 0], [cov[1, 0], cov[2, 1]]))
        True
        >>> # the last smoothed moments are the last filtered ones
        >>> bool(np.allclose(out.smoothed_covs[-1], out.filtered_covs[-1]))
        True
    """

    smoothed_means: jax.Array
    smoothed_covs: jax.Array
    smoothed_cross_covs: jax.Array
    log_likelihood: jax.Array
    filtered_means: jax.Array
    filtered_covs: jax.Array


def _mT(A):
    return jnp.swapaxes(A, -1, -2)


def _with_ok(result, ok):
    """Mark the log-likelihood ``-inf`` where the discretisation failed (as the filter does)."""
    if ok is None:
        return result
    return result._replace(log_likelihood=_reject(result.log_likelihood, ~jnp.asarray(ok)))


def _discrete_series(model, y, times, inputs):
    """``(disc, ok, batch, args)``: the discrete model (a continuous one discretised, its
    inputs folded in), ``ok`` as :func:`_as_discrete` gives it, the joint batch shape of model,
    ``y`` and inputs, and the per-member arguments (``y`` and the inputs still to fold)
    broadcast to it, for :func:`_map_batch`.

    Raises:
        ValueError: as :func:`_as_discrete`, :func:`_joint_batch_shape`, :func:`_check_times`
            and :func:`_check_inputs`.
    """
    model, ok = _as_discrete(model, times, inputs)
    inputs = inputs if ok is None else None  # a continuous model folded them in
    y = jnp.asarray(y)
    batch = _joint_batch_shape(model, y, inputs)
    _check_times(times, y)
    _check_inputs(model, inputs, y.shape[-2])
    return model, ok, batch, _series_arguments(model, batch, y, inputs)


def _run_filter(model, y, form, parallel):
    if parallel:
        try:
            return kalman_filter(model, y, form=form, parallel=True)
        except NotImplementedError:
            return parallel_filter(model, y, form=form)
    return kalman_filter(model, y, form=form)


# --------------------------------------------------------------------------------------------
# Covariance-form RTS backward pass.
#
# Rauch, Tung & Striebel (1965); Särkkä (2013), "Bayesian Filtering and Smoothing", Thm 8.2:
#   G_k       = P_{k|k} F_k^T P_{k+1|k}^{-1}                       (Cholesky solve with P_{k+1|k})
#   m_{k|T}   = m_{k|k} + G_k (m_{k+1|T} - m_{k+1|k})
#   P_{k|T}   = P_{k|k} - G_k P_{k+1|k} G_k^T + G_k P_{k+1|T} G_k^T
#   Cov(x_{k+1}, x_k | y) = P_{k+1|T} G_k^T        (lag-one smoother covariance, as used by EM;
#                                                   Särkkä 2013, ch. 12; Shumway & Stoffer, Prop. 6.3)
# P_{k|k} - G P_{k+1|k} G^T is evaluated in Joseph form (I - G F) P_{k|k} (I - G F)^T + G Q G^T,
# a sum of PSD terms, so rounding cannot make the smoothed covariance indefinite.
# --------------------------------------------------------------------------------------------
def _rts_backward_cov(filtered_means, filtered_covs, predicted_means, predicted_covs, F, Q):
    T, n = filtered_means.shape
    eye = jnp.eye(n, dtype=filtered_covs.dtype)

    # The gains and the Joseph-form conditional covariances depend only on the filter's output,
    # not on the backward carry: compute them for all k at once (batched Cholesky and solves),
    # leaving the sequential scan a few fused matmuls per step.
    def gain_terms(Pf, Pp, Fk, Qk):
        chol_p = jnp.linalg.cholesky(_symmetrise(Pp))
        G = _mT(jax.scipy.linalg.cho_solve((chol_p, True), Fk @ Pf))  # G^T = P_{k+1|k}^{-1} F P
        I_GF = eye - G @ Fk
        return G, _symmetrise(I_GF @ Pf @ _mT(I_GF) + G @ Qk @ _mT(G))

    G, C = jax.vmap(gain_terms)(filtered_covs[:-1], predicted_covs[1:], F[:-1], Q[:-1])

    def step(carry, inputs):
        m_next, P_next = carry
        mf, mp, Gk, Ck = inputs
        m = mf + Gk @ (m_next - mp)
        P = _symmetrise(Ck + Gk @ P_next @ _mT(Gk))
        return (m, P), (m, P, P_next @ _mT(Gk))

    last = (filtered_means[-1], _symmetrise(filtered_covs[-1]))
    inputs = (filtered_means[:-1], predicted_means[1:], G, C)
    _, (means, covs, cross) = lax.scan(step, last, inputs, reverse=True)
    means = jnp.concatenate([means, last[0][None]], axis=0)
    covs = jnp.concatenate([covs, last[1][None]], axis=0)
    return means, covs, cross


# --------------------------------------------------------------------------------------------
# Square-root RTS backward pass (Park & Kailath 1996; Särkkä & García-Fernández 2021 / Yaghoobi
# et al. 2022, square-root smoother step). With L_{k|k} L_{k|k}^T = P_{k|k}, S S^T = Q_k:
#   tria([[F L_{k|k}, S], [L_{k|k}, 0]]) = [[L_p, 0], [Z, L_c]]
# gives L_p L_p^T = P_{k+1|k}, Z L_p^T = P_{k|k} F^T, so G_k = Z L_p^{-1} (triangular solve), and
# L_c L_c^T = P_{k|k} - G_k P_{k+1|k} G_k^T. Then L_{k|T} = tria([L_c, G_k L_{k+1|T}]).
# --------------------------------------------------------------------------------------------
def _rts_backward_sqrt(filtered_means, filtered_chols, predicted_means, F, chol_Q):
    T, n = filtered_means.shape

    # The first triangularisation uses only the filter's output: batched over k, outside the scan.
    def gain_terms(Lf, Fk, Sk):
        block = jnp.block([[Fk @ Lf, Sk], [Lf, jnp.zeros_like(Lf)]])
        L = tria(block)
        L_p, Z, L_c = L[:n, :n], L[n:, :n], L[n:, n:]
        G = _mT(jax.scipy.linalg.solve_triangular(L_p, _mT(Z), lower=True, trans="T"))
        return G, L_c

    G, L_c = jax.vmap(gain_terms)(filtered_chols[:-1], F[:-1], chol_Q[:-1])

    def step(carry, inputs):
        m_next, L_next = carry
        mf, mp, Gk, Lck = inputs
        m = mf + Gk @ (m_next - mp)
        L_s = tria(jnp.concatenate([Lck, Gk @ L_next], axis=1))
        cross = L_next @ (_mT(L_next) @ _mT(Gk))
        return (m, L_s), (m, L_s, cross)

    last = (filtered_means[-1], filtered_chols[-1])
    inputs = (filtered_means[:-1], predicted_means[1:], G, L_c)
    _, (means, chols, cross) = lax.scan(step, last, inputs, reverse=True)
    means = jnp.concatenate([means, last[0][None]], axis=0)
    chols = jnp.concatenate([chols, last[1][None]], axis=0)
    return means, _symmetrise(chols @ _mT(chols)), cross


def _filtered_chols(result):
    for name in ("filtered_chols", "filtered_cov_chols", "filtered_sqrt_covs"):
        value = getattr(result, name, None)
        if value is not None:
            return value
    return jnp.linalg.cholesky(_symmetrise(result.filtered_covs))


@full_precision
def rts_smoother(model, y, times=None, *, inputs=None, form: str = "cov",
                 parallel: bool = False, method: str | None = None,
                 substeps: int | None = None, max_step: float | None = None) -> SmootherResult:
    """Rauch–Tung–Striebel smoother: moments of every state given all observations.

    Runs :func:`statespace.kalman_filter` forward, then the backward recursion (Särkkä 2013,
    Thm 8.2)::

        G_k     = P_{k|k} F_k^T P_{k+1|k}^{-1}
        m_{k|T} = m_{k|k} + G_k (m_{k+1|T} - m_{k+1|k})
        P_{k|T} = P_{k|k} + G_k (P_{k+1|T} - P_{k+1|k}) G_k^T
        Cov(x_{k+1}, x_k | y) = P_{k+1|T} G_k^T

    with a Cholesky solve for ``G_k`` (no explicit inverse) and the covariance update in Joseph
    form, so the result is symmetric positive semi-definite. NaN entries in ``y`` are missing
    (handled by the filter); parameters may be time-varying (leading ``T`` axis); offsets ``b``
    enter through the filter's predicted means. Batched models (parameters with batch axes, see
    ``LinearGaussianSSM``) and batched ``y`` (``batch + (T, m)``) are mapped over, adding the
    batch axes in front of every output. Everything jits, vmaps (e.g. over series with different
    NaN gaps) and differentiates (forward and reverse).

    Exact diffuse starts (``model.diffuse``): the backward pass is exact from the first step
    whose filtered moments are proper (the data identify the diffuse states) to the end;
    earlier steps, where the filter's moments are NaN, stay NaN (a diffuse smoother in the
    sense of Durbin & Koopman 2012, section 5.3, is not implemented).

    Args:
        model: a ``LinearGaussianSSM`` or a continuous-time model (then ``times`` is required and
            the model is discretised exactly at ``times``).
        y: ``(T, m)`` observations, NaN = missing.
        times: ``(T,)`` observation times for continuous-time models.
        inputs: ``(..., T, p)`` inputs of a model with input weights ``B``/``D`` (as in
            :func:`statespace.kalman_filter`).
        form: ``"cov"`` (covariance filter and backward pass) or ``"sqrt"`` (square-root filter
            and a square-root backward pass through ``rules.tria``; same numbers; ``Q`` may be
            singular, the predicted covariances must be positive definite as in ``"cov"``).
        parallel: parallel-in-time filter and smoother (associative scans, Särkkä &
            García-Fernández 2021): O(log T) depth, for GPU/TPU;
            slower than the sequential passes on CPU. No exact diffuse initialisation.
        method, substeps, max_step: for a :class:`statespace.NonlinearSDE` (as in
            :func:`statespace.kalman_filter`): the extended RTS smoother, the backward
            recursion above with ``F_k``, ``Q_k`` the filter's linearised transition over
            ``[t_k, t_{k+1}]`` (its substeps composed) and its predicted moments (Särkkä 2013,
            §9.1).

    Returns:
        SmootherResult with ``smoothed_means (T, n)``, ``smoothed_covs (T, n, n)``,
        ``smoothed_cross_covs (T-1, n, n)`` (``[k] = Cov(x[k+1], x[k] | y)``), and the filter's
        ``log_likelihood``, ``filtered_means``, ``filtered_covs``.

    Raises:
        ValueError: for an unknown ``form`` or badly shaped ``y``/parameters.

    Example:
        >>> import jax.numpy as jnp, numpy as np, statespace
        >>> model = statespace.LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                                      m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [jnp.nan], [1.1]])
        >>> # the dense posterior of x = G w (w ~ N(0, I)) given y[0], y[2] with unit noise
        >>> G = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 0.5, 1.0]])
        >>> Px, obs = G @ G.T, [0, 2]
        >>> K = Px[:, obs] @ np.linalg.inv(Px[np.ix_(obs, obs)] + np.eye(2))
        >>> mean, cov = K @ np.array([0.3, 1.1]), Px - K @ Px[obs, :]
        >>> out = statespace.rts_smoother(model, y)
        >>> out.smoothed_means.shape, out.smoothed_cross_covs.shape
        ((3, 1), (2, 1, 1))
        >>> np.round(np.asarray(out.smoothed_means[:, 0]), 6), np.round(mean, 6)
        (array([0.208219, 0.336986, 0.634247]), array([0.208219, 0.336986, 0.634247]))
        >>> bool(np.allclose(out.smoothed_covs[:, 0, 0], np.diag(cov)))
        True
        >>> sqrt = statespace.rts_smoother(model, y, form="sqrt")
        >>> bool(np.allclose(sqrt.smoothed_covs, out.smoothed_covs))
        True
    """
    _check_form(form)
    options = nonlinear_options(model, method, substeps, max_step, inputs=inputs,
                                parallel=bool(parallel))
    if options is not None:
        passes = nonlinear_pass(model, y, times, method=options[0], substeps=options[1], form=form,
                                max_step=options[2])
        backward = lambda p: _smooth(p.result, p.F, p.Q, form, False, None, None)  # noqa: E731
        for _ in range(passes.F.ndim - 3):
            backward = jax.vmap(backward)
        return backward(passes)
    model, ok, batch, args = _discrete_series(model, y, times, inputs)
    out = _map_batch(
        lambda mdl, obs, *u: _rts_single(_with_inputs(mdl, *u), obs, form, bool(parallel)),
        model, batch, *args)
    return _with_ok(out, ok)


def _rts_single(model, y, form, parallel):
    T = y.shape[0]
    result = _run_filter(model, y, form, parallel)
    return _smooth(result, _per_step("F", model.F, T), _per_step("Q", model.Q, T), form,
                   parallel, model, y)


def _smooth(result, F, Q, form, parallel, model, y):
    """The backward pass over a filter's ``result`` with transitions ``F``, ``Q`` (T, n, n)
    (``model`` and ``y`` only for the parallel smoother)."""
    T = F.shape[0]
    if T == 0:  # nothing to smooth
        return SmootherResult(result.filtered_means, result.filtered_covs, result.filtered_covs,
                              result.log_likelihood, result.filtered_means, result.filtered_covs)
    fm, fP = result.filtered_means, result.filtered_covs
    pm, pP = result.predicted_means, result.predicted_covs
    if T == 1:
        means, covs, cross = fm, _symmetrise(fP), jnp.zeros((0,) + fP.shape[1:], fP.dtype)
    elif parallel:
        means, covs, cross = parallel_smoother(model, y, result, form=form)
    elif form == "cov":
        means, covs, cross = _rts_backward_cov(fm, fP, pm, pP, F, Q)
    else:
        chol_Q = _psd_cholesky(_symmetrise(Q))
        means, covs, cross = _rts_backward_sqrt(fm, _filtered_chols(result), pm, F, chol_Q)
    return SmootherResult(
        smoothed_means=means,
        smoothed_covs=covs,
        smoothed_cross_covs=cross,
        log_likelihood=result.log_likelihood,
        filtered_means=fm,
        filtered_covs=fP,
    )


# --------------------------------------------------------------------------------------------
# Forward-filtering backward-sampling (Carter & Kohn 1994; Frühwirth-Schnatter 1994):
#   x_{T-1} ~ N(m_{T-1|T-1}, P_{T-1|T-1}),
#   x_k | x_{k+1}, y ~ N(m_{k|k} + G_k (x_{k+1} - m_{k+1|k}), P_{k|k} - G_k P_{k+1|k} G_k^T).
# Robust to singular Q, P_{k|k} or P_{k+1|k} (deterministic states, exact observations):
# * G_k = P_{k|k} F^T P_{k+1|k}^+ with an eigen-decomposition pseudo-inverse; this is the exact
#   conditional gain because range(F P_{k|k}) lies in range(P_{k+1|k}).
# * the conditional covariance is never factorised: it equals A A^T with
#   A = [(I - G F) P_{k|k}^{1/2}, G Q^{1/2}] (Joseph form), PSD square roots by eigh with
#   eigenvalues clipped at 0, so the noise is A z with z ~ N(0, I_{2n}).
# --------------------------------------------------------------------------------------------
def _psd_pinv(P):
    w, V = jnp.linalg.eigh(_symmetrise(P))
    n = P.shape[-1]
    tol = 10 * n * jnp.finfo(P.dtype).eps * jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    inv_w = jnp.where(w > tol, 1.0 / jnp.where(w > tol, w, 1.0), 0.0)
    return (V * inv_w[..., None, :]) @ _mT(V)


def _backward_sampling_factors(filtered_covs, predicted_covs, F, Q):
    """Per-step gains ``G_k (T-1, n, n)`` and noise factors ``A_k (T-1, n, 2n)``."""
    n = filtered_covs.shape[-1]
    eye = jnp.eye(n, dtype=filtered_covs.dtype)

    def one(Pf, Pp, Fk, Qk):
        G = Pf @ _mT(Fk) @ _psd_pinv(Pp)
        A = jnp.concatenate([(eye - G @ Fk) @ _psd_sqrt(Pf), G @ _psd_sqrt(Qk)], axis=1)
        return G, A

    return jax.vmap(one)(filtered_covs[:-1], predicted_covs[1:], F[:-1], Q[:-1])


@full_precision
def sample_posterior(key, model, y, num_samples: int, times=None, *, inputs=None,
                     form: str = "cov"):
    """Draw joint posterior samples of the states by forward-filtering backward-sampling.

    The filter runs once; the backward pass draws ``x[T-1]`` from its filtered distribution and
    each earlier state from ``p(x[k] | x[k+1], y[0..k])`` (Carter & Kohn 1994;
    Frühwirth-Schnatter 1994)::

        x[k] = m_{k|k} + G_k (x[k+1] - m_{k+1|k}) + A_k z_k,   z_k ~ N(0, I),
        A_k A_k^T = P_{k|k} - G_k P_{k+1|k} G_k^T = (I - G_k F_k) P_{k|k} (I - G_k F_k)^T + G_k Q_k G_k^T.

    The gain uses a pseudo-inverse of ``P_{k+1|k}`` and ``A_k`` uses PSD square roots (eigh,
    eigenvalues clipped at zero), so singular ``Q`` (e.g. a local linear trend, ARMA forms) and
    exactly known states work without jitter. Samples are pathwise differentiable in the
    parameters where the eigen-decompositions are (distinct eigenvalues).

    Args:
        key: a ``jax.random`` key.
        model: a ``LinearGaussianSSM`` (or continuous-time model with ``times``).
        y: ``(T, m)`` observations, NaN = missing.
        num_samples: number of independent trajectories (static).
        times: ``(T,)`` observation times for continuous-time models.
        inputs: ``(..., T, p)`` inputs of a model with input weights ``B``/``D`` (as in
            :func:`statespace.kalman_filter`).
        form: filter form, ``"cov"`` or ``"sqrt"``.

    Returns:
        ``(num_samples, T, n)`` array of trajectories from ``p(x[0..T-1] | y)`` (with batch axes
        in front for batched models or ``y``; each batch member gets its own key); all NaN for
        a model whose log-likelihood is ``-inf`` (no density, e.g. an unstable ``A`` with a
        stationary start or an indefinite covariance).

    Raises:
        ValueError: for an unknown ``form``, a negative ``num_samples`` or badly shaped input.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp, numpy as np, statespace
        >>> model = statespace.LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                                      m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [jnp.nan], [1.1]])
        >>> # the dense posterior of x = G w (w ~ N(0, I)) given y[0], y[2] with unit noise
        >>> G = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 0.5, 1.0]])
        >>> Px, obs = G @ G.T, [0, 2]
        >>> K = Px[:, obs] @ np.linalg.inv(Px[np.ix_(obs, obs)] + np.eye(2))
        >>> mean, cov = K @ np.array([0.3, 1.1]), Px - K @ Px[obs, :]
        >>> statespace.sample_posterior(jax.random.key(0), model, y, 5).shape
        (5, 3, 1)
        >>> # 20000 draws: their mean and covariance match the dense posterior (to 0.05)
        >>> draws = np.asarray(statespace.sample_posterior(jax.random.key(0), model, y, 20000))
        >>> bool(np.allclose(draws[:, :, 0].mean(0), mean, atol=0.05))
        True
        >>> bool(np.allclose(np.cov(draws[:, :, 0].T), cov, atol=0.05))
        True
    """
    _check_form(form)
    num_samples = int(num_samples)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0; got {num_samples}")
    model, ok, batch, args = _discrete_series(model, y, times, inputs)
    if not batch:
        draws = _ffbs_single(key, _with_inputs(model, *args[1:]), args[0], num_samples, form)
    else:
        keys = jax.random.split(key, int(np.prod(batch)))
        keys = keys.reshape(batch + keys.shape[1:])
        draws = _map_batch(
            lambda mdl, k, obs, *u: _ffbs_single(k, _with_inputs(mdl, *u), obs, num_samples, form),
            model, batch, keys, *args)
    # a model without a density (log-likelihood -inf) has no posterior: NaN, not finite draws
    return draws if ok is None else jnp.where(ok, draws, jnp.nan)


def _ffbs_single(key, model, y, num_samples, form):
    T = y.shape[0]
    if T == 0:
        return jnp.zeros((num_samples, 0, model.state_dim), y.dtype)
    result = _run_filter(model, y, form, False)
    F = _per_step("F", model.F, T)
    Q = _per_step("Q", model.Q, T)
    draws = _ffbs(key, result.filtered_means, result.filtered_covs, result.predicted_means,
                  result.predicted_covs, F, Q, num_samples)
    return jnp.where(jnp.isneginf(result.log_likelihood), jnp.nan, draws)


def _ffbs(key, filtered_means, filtered_covs, predicted_means, predicted_covs, F, Q, num_samples):
    T, n = filtered_means.shape
    dtype = filtered_means.dtype
    key_last, key_steps = jax.random.split(key)
    z_last = jax.random.normal(key_last, (num_samples, n), dtype)
    x_last = filtered_means[-1] + z_last @ _mT(_psd_sqrt(filtered_covs[-1]))
    if T == 1:
        return x_last[:, None, :]
    G, A = _backward_sampling_factors(filtered_covs, predicted_covs, F, Q)
    z = jax.random.normal(key_steps, (T - 1, num_samples, 2 * n), dtype)

    def step(x_next, inputs):
        mf, mp, Gk, Ak, zk = inputs
        x = mf + (x_next - mp) @ _mT(Gk) + zk @ _mT(Ak)
        return x, x

    _, xs = lax.scan(step, x_last, (filtered_means[:-1], predicted_means[1:], G, A, z), reverse=True)
    xs = jnp.concatenate([xs, x_last[None]], axis=0)
    return jnp.swapaxes(xs, 0, 1)
