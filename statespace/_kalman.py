"""Kalman filtering entry points: :func:`kalman_filter` and :func:`log_likelihood`.

Model plumbing (continuous-time models discretised, shapes checked, batch axes mapped over)
and dispatch to the drivers: the sequential filter (``statespace._sequential``), its adjoint
gradient (``statespace._adjoint``) and the parallel filter (``statespace._parallel``).
"""

from __future__ import annotations

import jax.numpy as jnp

from rules._precision import full_precision
from statespace._adjoint import adjoint_log_likelihood
from statespace._model import (
    LinearGaussianSSM,
    _as_discrete,
    _check_times,
    _invalid_covariances,
    _joint_batch_shape,
    _map_batch,
    _series_arguments,
    _check_inputs,
    _steps_params,
    _with_inputs,
)
from statespace._nonlinear import nonlinear_options, nonlinear_pass
from statespace._parallel import parallel_filter
from statespace._sequential import filter_log_likelihoods, filter_moments
from statespace._steps import FilterResult, _check_form, _float_leaves, _reject


# ------------------------------------------------------------------------------------------
# Model plumbing
# ------------------------------------------------------------------------------------------
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
                          d=jnp.zeros(d.shape[:-1] + (1,), d.dtype), D=None)
    return model, jnp.full(y.shape[:-1] + (1,), jnp.nan, y.dtype)


def _map_over_series(fn, model: LinearGaussianSSM, y, inputs=None):
    """``fn(single_model, single_y)`` over the broadcast batch axes of model, ``y`` and
    ``inputs``, each single model with its inputs folded into its offsets."""
    batch = _joint_batch_shape(model, y, inputs)
    return _map_batch(lambda mdl, yy, *u: fn(_with_inputs(mdl, *u), yy), model, batch,
                      *_series_arguments(model, batch, y, inputs))


def _prepare_run(model, y, times, form, gradient="autodiff", inputs=None):
    """``(disc, ok, y, inputs)``: the arguments checked, the discrete model to filter (with
    ``ok`` as :func:`_as_discrete` gives it), ``y`` cast to its float dtype and the inputs
    still to fold into it (``None`` once a continuous-time model has folded them in).

    Raises:
        ValueError: unknown ``form`` or ``gradient``, and as :func:`_as_discrete`,
            :func:`_check_observations`, :func:`_check_times`, :func:`_check_inputs`.
    """
    _check_form(form)
    if gradient not in ("adjoint", "autodiff"):
        raise ValueError(f"gradient must be 'adjoint' or 'autodiff'; got {gradient!r}")
    disc, ok = _as_discrete(model, times, inputs)
    inputs = inputs if ok is None else None  # a continuous model folded them in
    y = _check_observations(disc, y)
    _check_times(times, y)
    _check_inputs(disc, inputs, y.shape[-2])
    if disc.obs_dim == 0:
        disc, y = _unobserved(disc, y)
    return disc, ok, y, inputs


def _reject_result(result: FilterResult, bad, bad_steps, leaves) -> FilterResult:
    """``result`` with :func:`_reject` applied to its log-likelihood (where ``bad``) and its
    per-step terms (where ``bad_steps``)."""
    return result._replace(
        log_likelihood=_reject(result.log_likelihood, bad, *leaves),
        log_likelihoods=_reject(result.log_likelihoods, bad_steps, *leaves),
    )


def _parallel_invalid(model, y):
    """The sequential filter's covariance checks (it applies them inside its scan) for the
    parallel filter: per-step flags ``(T,)``.

    Raises:
        NotImplementedError: a diffuse model.
    """
    if model.diffuse is not None:
        raise NotImplementedError("parallel=True does not support diffuse initialisation yet")
    const, scanned = _steps_params(model)
    return _invalid_covariances(const, scanned, model.P0, y.shape[0])


def _run_moments(model, y, times, form, parallel, inputs) -> FilterResult:
    """:func:`kalman_filter`'s work: the filter with all moments, mapped over batch axes."""
    disc, ok, y, inputs = _prepare_run(model, y, times, form, inputs=inputs)
    if parallel:
        def single(mdl, yy):
            invalid = _parallel_invalid(mdl, yy)
            out = parallel_filter(mdl, yy, form=form)
            return _reject_result(out, jnp.any(invalid), invalid, _float_leaves(mdl))
    else:
        def single(mdl, yy):
            return filter_moments(mdl, yy, form)

    out = _map_over_series(single, disc, y, inputs)
    if ok is None:
        return out
    bad = ~jnp.asarray(ok)
    return _reject_result(out, bad, bad[..., None], _float_leaves(model))


def _run_total(model, y, times, form, parallel, gradient, inputs):
    """:func:`log_likelihood`'s work: the total only, mapped over batch axes."""
    disc, ok, y, inputs = _prepare_run(model, y, times, form, gradient, inputs)
    if gradient == "adjoint" and not parallel and disc.diffuse is None:
        def single(mdl, yy):
            return adjoint_log_likelihood(mdl, yy, form)
    elif parallel:
        def single(mdl, yy):
            invalid = _parallel_invalid(mdl, yy)
            total = parallel_filter(mdl, yy, form=form).log_likelihood
            return _reject(total, jnp.any(invalid), *_float_leaves(mdl))
    else:
        def single(mdl, yy):
            return filter_log_likelihoods(mdl, yy, form)[0]

    total = _map_over_series(single, disc, y, inputs)
    if ok is None:
        return total
    return _reject(total, ~jnp.asarray(ok), *_float_leaves(model))


@full_precision
def kalman_filter(
    model, y, times=None, *, inputs=None, form: str = "cov", parallel: bool = False,
    method: str | None = None, substeps: int | None = None, max_step: float | None = None,
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
        model: a :class:`LinearGaussianSSM`, or a :class:`DiscretizableModel` (e.g.
            :class:`ContinuousLinearSSM`, or a class of the user's own with a
            ``to_discrete(times) -> (LinearGaussianSSM, ok)`` method).
        y: observations ``(..., T, m)``; ``NaN`` marks missing entries.
        times: observation times ``(T,)``, only for continuous-time models.
        inputs: ``(..., T, p)`` inputs for a model with input weights ``B``/``D``: ``u[k]``
            drives the step ``k -> k+1`` through ``B`` and enters ``y[k]`` through ``D`` (see
            :class:`LinearGaussianSSM`); leading axes broadcast with the batch.
        form: ``"cov"`` (default) or ``"sqrt"``.
        parallel: use the associative-scan filter (Särkkä & García-Fernández 2021):
            O(log T) depth, the same numbers; it pays off on
            GPU/TPU, not on CPU. Not available with diffuse initialisation.
        method: for a :class:`NonlinearSDE` only: ``"ekf"`` (default; local linearisation of
            the drift, linearised observation update) or ``"ukf"`` (sigma-point observation
            update); see ``statespace/_nonlinear.py``.
        substeps: for a :class:`NonlinearSDE` only: relinearisations per interval (default 1).
        max_step: for a :class:`NonlinearSDE` only, with concrete ``times``: split every gap
            longer than ``max_step`` into ``ceil(gap / max_step)`` equal parts first, each with
            ``substeps`` relinearisations (long gaps need them, short ones do not); the result
            is reported at ``times``.

    Returns:
        A :class:`FilterResult`.

    Raises:
        ValueError: bad shapes of ``y``, unknown ``form``, ``times`` given for a discrete model
            or missing for a continuous one, or of a length other than ``y``'s ``T``; inputs
            for a model without ``B``/``D`` or the reverse, or of the wrong length or width.
        NotImplementedError: ``parallel=True`` with a diffuse model.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from scipy.stats import multivariate_normal
        >>> from statespace import LinearGaussianSSM, kalman_filter
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> result = kalman_filter(model, y)
        >>> result.filtered_means.shape, result.filtered_covs.shape
        ((3, 1), (3, 1, 1))
        >>> # step 0: x[0] ~ N(0, 1), y[0] = 0.3 with unit noise: mean 0.15, variance 0.5
        >>> m, P = result.filtered_means[0, 0], result.filtered_covs[0, 0, 0]
        >>> round(float(m), 6), round(float(P), 6)
        (0.15, 0.5)
        >>> # the dense Gaussian log-density of y: cov(x) from x[k+1] = 0.5 x[k] + w, plus R
        >>> G = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 0.5, 1.0]])
        >>> dense = multivariate_normal(np.zeros(3), G @ G.T + np.eye(3)).logpdf(y[:, 0])
        >>> round(float(result.log_likelihood), 6), round(float(dense), 6)
        (-4.201405, -4.201405)
        >>> bool(np.allclose(kalman_filter(model, y, form="sqrt").log_likelihood, dense))
        True
        >>> # an input u[k] pushes x[k+1] by B u[k]: the mean of y becomes (0, 2, 1) for u[1] = 2
        >>> pushed = model.replace(B=jnp.array([[1.0]]))
        >>> u = jnp.array([[0.0], [2.0], [0.0]])
        >>> dense = multivariate_normal([0.0, 0.0, 2.0], G @ G.T + np.eye(3)).logpdf(y[:, 0])
        >>> bool(np.isclose(kalman_filter(pushed, y, inputs=u).log_likelihood, dense))
        True
    """
    options = nonlinear_options(model, method, substeps, max_step, inputs=inputs, parallel=parallel)
    if options is not None:
        return nonlinear_pass(model, y, times, method=options[0], substeps=options[1], form=form,
                              max_step=options[2]).result
    return _run_moments(model, y, times, form, parallel, inputs)


@full_precision
def log_likelihood(model, y, times=None, **kwargs):
    """Log-likelihood ``log p(y)`` of the observed entries of ``y`` (see :func:`kalman_filter`).

    A leaner path than ``kalman_filter(...).log_likelihood``: the scan stores no moments.

    Derivatives (``gradient="adjoint"``, the default): the total is a ``jax.custom_jvp``
    whose rule runs the forward filter and one hand-written backward scan (the adjoint
    recursion, derived in the docstring of ``statespace/_adjoint.py``; about 2-3x cheaper than
    autodiff through the scan).
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
        **kwargs: ``inputs`` (as in :func:`kalman_filter`), ``form="cov" | "sqrt"``,
            ``parallel``, ``gradient="adjoint" | "autodiff"``; for a :class:`NonlinearSDE`
            ``method``, ``substeps`` and ``max_step`` (as in :func:`kalman_filter`; autodiff
            gradients).

    Returns:
        The log-likelihood (scalar, or the batch shape).

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from scipy.stats import multivariate_normal
        >>> from statespace import LinearGaussianSSM, log_likelihood
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> round(float(log_likelihood(model, y)), 6)  # = kalman_filter(model, y).log_likelihood
        -4.201405
        >>> # a missing entry is left out: the dense log-density of y[0] and y[2] alone
        >>> G = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 0.5, 1.0]])
        >>> cov = (G @ G.T + np.eye(3))[np.ix_([0, 2], [0, 2])]
        >>> dense = multivariate_normal(np.zeros(2), cov).logpdf(y[jnp.array([0, 2]), 0])
        >>> missing = log_likelihood(model, y.at[1, 0].set(jnp.nan))
        >>> round(float(missing), 6), round(float(dense), 6)
        (-2.866744, -2.866744)
        >>> # the adjoint gradient equals autodiff through the scan
        >>> grad = jax.grad(lambda F: log_likelihood(model.replace(F=F), y))
        >>> auto = jax.grad(lambda F: log_likelihood(model.replace(F=F), y, gradient="autodiff"))
        >>> round(float(grad(model.F)[0, 0]), 6), bool(np.allclose(grad(model.F), auto(model.F)))
        (-0.21144, True)
    """
    unknown = set(kwargs) - {"inputs", "form", "parallel", "gradient", "method", "substeps",
                             "max_step"}
    if unknown:
        raise TypeError(f"log_likelihood got unexpected keyword arguments {sorted(unknown)}")
    options = nonlinear_options(model, kwargs.get("method"), kwargs.get("substeps"),
                                kwargs.get("max_step"),
                                inputs=kwargs.get("inputs"), parallel=kwargs.get("parallel"),
                                gradient=kwargs.get("gradient"))
    if options is not None:
        return nonlinear_pass(model, y, times, method=options[0], substeps=options[1],
                              max_step=options[2],
                              form=kwargs.get("form", "cov")).result.log_likelihood
    return _run_total(model, y, times, kwargs.get("form", "cov"), kwargs.get("parallel", False),
                      kwargs.get("gradient", "adjoint"), kwargs.get("inputs"))
