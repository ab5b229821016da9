"""Prediction at new times for continuous-time models: the smoother on a merged series."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rules._checks import as_float_array
from rules._precision import full_precision
from statespace._model import _as_discrete
from statespace._nonlinear import nonlinear_options, observation_moments
from statespace._smoother import rts_smoother

__all__ = ["Prediction", "predict"]


class Prediction(NamedTuple):
    """Predictive moments at new times given all the data (smoothing distribution).

    Attributes:
        means: ``(N, n)`` state means ``E[x(s_j) | y]``.
        covs: ``(N, n, n)`` state covariances.
        obs_means: ``(N, m)`` means of a new observation ``y(s_j) = H x(s_j) + d + v``.
        obs_covs: ``(N, m, m)`` its covariance ``H P Hᵀ + R`` (noise included; subtract ``R``
            for the latent ``H x + d``).

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import predict
        >>> from statespace.models import matern12
        >>> model = matern12(1.0, 2.0, noise_var=0.1)  # k(t, s) = 2 exp(-|t - s|), noise 0.1
        >>> times, y = jnp.array([0.0, 0.5, 2.0]), jnp.array([[0.4], [0.1], [-0.3]])
        >>> pred = predict(model, y, times, jnp.array([1.0, 3.0]))
        >>> pred.means.shape, pred.covs.shape, pred.obs_means.shape, pred.obs_covs.shape
        ((2, 1), (2, 1, 1), (2, 1), (2, 1, 1))
        >>> # the observation covariance is the state's (H = [[1]]) plus the noise variance
        >>> bool(np.allclose(pred.obs_covs, pred.covs + 0.1))
        True
    """

    means: jax.Array
    covs: jax.Array
    obs_means: jax.Array
    obs_covs: jax.Array


def _merged_inputs(inputs, new_inputs, T: int, N: int, order):
    """``inputs`` and ``new_inputs`` in the merged order of the times, or ``None``.

    Raises:
        ValueError: only one of them, or shapes other than ``(T, p)`` and ``(N, p)``.
    """
    if inputs is None and new_inputs is None:
        return None
    if inputs is None or new_inputs is None:
        raise ValueError("pass both inputs (at times) and new_inputs (at new_times)")
    inputs = as_float_array("inputs", inputs)
    new_inputs = as_float_array("new_inputs", new_inputs)
    if inputs.ndim != 2 or inputs.shape[0] != T or new_inputs.shape != (N, inputs.shape[1]):
        raise ValueError(f"inputs must be (T, p) = ({T}, p) and new_inputs (N, p) = ({N}, p); "
                         f"got inputs.shape = {inputs.shape}, new_inputs.shape = "
                         f"{new_inputs.shape}")
    return jnp.concatenate([inputs, new_inputs.astype(inputs.dtype)])[order]


@full_precision
def predict(model, y, times, new_times, *, inputs=None, new_inputs=None,
            method: str | None = None, substeps: int | None = None,
            max_step: float | None = None) -> Prediction:
    """Predictive means and covariances at arbitrary ``new_times`` (inside or beyond the data).

    Method: the new times are merged with the observation times (stable sort; a new time equal
    to an observation time comes right after it, ``dt = 0``), given all-NaN (missing)
    observations, the RTS smoother is run on the merged series and the new entries are picked
    out. Before the data this is the prior propagated back (the first merged time starts from
    ``N(m0, P0)``, exact for stationary models); beyond the data it is the forecast.

    Inputs (a model with ``B``/``D``): ``inputs`` at the observation times and ``new_inputs`` at
    the new ones are merged in the same order, so the input is piecewise constant in time and
    changes at every time given, observed or new (``input_kind="hold"``: ``u(t)`` is the input
    given at the latest time ``<= t``; ``"impulse"``: a jump ``B u`` at every time given). A
    forecast beyond the data thus takes the future inputs at the new times; a new time inside
    the data that should not change the held input gets the input of the observation before it.

    Args:
        model: a :class:`statespace.ContinuousLinearSSM` (or any
            :class:`statespace.DiscretizableModel`) with time-invariant ``H``, ``R``, ``d``.
        y: ``(T, m)`` observations (NaN = missing).
        times: ``(T,)`` non-decreasing observation times.
        new_times: ``(N,)`` times at which to predict (any order; duplicates allowed).
        inputs: ``(T, p)`` inputs at ``times``, for a model with input weights.
        new_inputs: ``(N, p)`` inputs at ``new_times`` (required with ``inputs``).
        method, substeps, max_step: for a :class:`statespace.NonlinearSDE` (as in
            :func:`statespace.kalman_filter`): the extended RTS smoother on the merged series;
            the observation moments come from the update's linearisation at the predicted
            state (``h(m)``, ``H P Hᵀ + R`` for ``"ekf"``; the cubature rule's for ``"ukf"``).

    Returns:
        :class:`Prediction` with state and observation means and covariances, in the order of
        ``new_times``; NaN at the entries of non-finite ``new_times`` (only there), and
        everywhere when the model has no density at these times (its ``ok`` is False).

    Raises:
        ValueError: on mismatched shapes, a time-varying ``H``, ``R`` or ``d``, or only one of
            ``inputs`` and ``new_inputs``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import predict
        >>> from statespace.models import matern12
        >>> model = matern12(1.0, 2.0, noise_var=0.1)  # k(t, s) = 2 exp(-|t - s|), noise 0.1
        >>> times, y = jnp.array([0.0, 0.5, 2.0]), jnp.array([[0.4], [0.1], [-0.3]])
        >>> new_times = jnp.array([1.0, 3.0, -1.0, jnp.nan])  # between, after, before; NaN
        >>> pred = predict(model, y, times, new_times)
        >>> # the same as dense Gaussian-process regression with that kernel
        >>> k = lambda a, b: 2.0 * np.exp(-np.abs(np.subtract.outer(a, b)))
        >>> t, s = np.array([0.0, 0.5, 2.0]), np.array([1.0, 3.0, -1.0])
        >>> A = np.linalg.solve(k(t, t) + 0.1 * np.eye(3), k(t, s))
        >>> mean, var = A.T @ np.array([0.4, 0.1, -0.3]), 2.0 - np.sum(k(t, s) * A, axis=0)
        >>> np.round(np.asarray(pred.obs_means[:3, 0]), 6), np.round(mean, 6)
        (array([-0.010947, -0.104412,  0.138099]), array([-0.010947, -0.104412,  0.138099]))
        >>> bool(np.allclose(pred.obs_covs[:3, 0, 0], var + 0.1))
        True
        >>> bool(jnp.isnan(pred.obs_means[3, 0]))  # only the NaN time gets NaN
        True
    """
    y = as_float_array("y", y)
    times = as_float_array("times", times)
    new_times = as_float_array("new_times", new_times)
    if y.ndim != 2 or times.shape != (y.shape[0],):
        raise ValueError(f"y must be (T, m) and times (T,); got y.shape = {y.shape}, "
                         f"times.shape = {times.shape}")
    if new_times.ndim != 1:
        raise ValueError(f"new_times must have shape (N,); got new_times.shape = {new_times.shape}")
    T, N = times.shape[0], new_times.shape[0]
    dtype = jnp.result_type(y, times, new_times)
    # A NaN or infinite new time gets NaN moments of its own; merged as it is, its NaN
    # transition would reach every other prediction through the smoother.
    bad = ~jnp.isfinite(new_times)
    new_times = jnp.where(bad, times[0] if T else 0.0, new_times)
    all_times = jnp.concatenate([times.astype(dtype), new_times.astype(dtype)])
    order = jnp.argsort(all_times, stable=True)
    options = nonlinear_options(model, method, substeps, max_step, inputs=inputs,
                                new_inputs=new_inputs)
    if options is not None:
        return _predict_nonlinear(model, y, all_times, order, bad, *options)
    merged_inputs = _merged_inputs(inputs, new_inputs, T, N, order)
    disc, ok = _as_discrete(model, all_times[order], merged_inputs)
    H, R, d = disc.H, disc.R, disc.d
    if merged_inputs is not None and d.ndim == 2:  # D u folded in: d per merged step
        d = d[jnp.argsort(order)[T:]]
    if H.ndim != 2 or R.ndim != 2 or d.ndim > 2:
        raise ValueError(f"predict needs time-invariant H, R, d; got H.shape = {H.shape}, "
                         f"R.shape = {R.shape}, d.shape = {d.shape}")
    m = disc.obs_dim
    if y.shape[1] != m:
        raise ValueError(f"y must be (T, m) = (T, {m}); got y.shape = {y.shape}")
    dtype = jnp.result_type(dtype, disc.F.dtype)
    all_y = jnp.concatenate([y.astype(dtype), jnp.full((N, m), jnp.nan, dtype)])
    smoothed = rts_smoother(disc, all_y[order])
    position = jnp.argsort(order)[T:]  # where each new time landed in the merged series
    # no density at these times (ok False, e.g. an unstable A with a stationary start): NaN
    bad = bad | ~jnp.asarray(True if ok is None else ok)
    means = jnp.where(bad[:, None], jnp.nan, smoothed.smoothed_means[position])
    covs = jnp.where(bad[:, None, None], jnp.nan, smoothed.smoothed_covs[position])
    obs_means = means @ H.T.astype(dtype) + d.astype(dtype)
    obs_covs = H.astype(dtype) @ covs @ H.T.astype(dtype) + R.astype(dtype)
    return Prediction(means, covs, obs_means, 0.5 * (obs_covs + jnp.swapaxes(obs_covs, -1, -2)))


def _predict_nonlinear(model, y, all_times, order, bad, method, substeps, max_step) -> Prediction:
    """:func:`predict` for a :class:`NonlinearSDE`: the extended smoother on the merged series
    (``bad`` marks non-finite new times, already replaced by a finite one)."""
    T, m = y.shape[0], model.obs_dim
    if y.shape[1] != m:
        raise ValueError(f"y must be (T, m) = (T, {m}); got y.shape = {y.shape}")
    N = all_times.shape[0] - T
    dtype = jnp.result_type(y, all_times, model.dtype)
    all_y = jnp.concatenate([y.astype(dtype), jnp.full((N, m), jnp.nan, dtype)])
    sorted_times = all_times[order].astype(dtype)
    smoothed = rts_smoother(model, all_y[order], sorted_times, method=method, substeps=substeps,
                            max_step=max_step)
    position = jnp.argsort(order)[T:]
    bad = bad | ~jnp.isfinite(smoothed.log_likelihood)
    means = jnp.where(bad[:, None], jnp.nan, smoothed.smoothed_means[position])
    covs = jnp.where(bad[:, None, None], jnp.nan, smoothed.smoothed_covs[position])
    obs_means, obs_covs = observation_moments(model, means, covs, sorted_times[position], method)
    return Prediction(means, covs, obs_means, obs_covs)
