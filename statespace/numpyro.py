"""NumPyro distributions whose density is a Kalman-filter log-likelihood.

``LinearGaussianStateSpace`` is the marginal distribution of the observations ``y (T, m)`` of a
linear-Gaussian state-space model, with the latent states integrated out exactly by the Kalman
filter. NUTS then samples only the model parameters (a handful) instead of ``T · n`` latent
states, which removes the funnel geometry that makes latent-state HMC slow.

Example (continuous-time Ornstein–Uhlenbeck process observed at irregular times)::

    import jax.numpy as jnp
    import numpyro, numpyro.distributions as dist
    import statespace
    from statespace.numpyro import LinearGaussianStateSpace

    def model(times, y=None):
        theta = numpyro.sample("theta", dist.LogNormal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        noise = numpyro.sample("noise", dist.HalfNormal(1.0))
        ssm = statespace.ContinuousLinearSSM(
            A=-theta * jnp.eye(1), Q=2 * theta * sigma**2 * jnp.eye(1),
            H=jnp.eye(1), R=noise**2 * jnp.eye(1))
        numpyro.sample("y", LinearGaussianStateSpace(ssm, times), obs=y)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.distribution import Distribution
from numpyro.util import not_jax_tracer

from statespace._kalman import log_likelihood
from statespace._model import (
    DiscretizableModel,
    LinearGaussianSSM,
    _as_discrete,
    _check_inputs,
    _map_batch,
    _model_batch_shape,
)
from statespace._nonlinear import METHODS, NonlinearSDE, _check_substeps, refined_grid
from statespace._steps import _check_form

__all__ = ["LinearGaussianStateSpace", "NonlinearStateSpace"]

def _is_discrete(model) -> bool:
    return isinstance(model, LinearGaussianSSM)


def _obs_dim(model, times) -> int:
    """``m``: the model's ``obs_dim``, or (a model of the user's own that does not declare it)
    that of its discrete model at one series of ``times``, found by shape inference only."""
    if hasattr(model, "obs_dim"):
        return int(model.obs_dim)
    one_series = times.reshape((-1, times.shape[-1]))[0]
    disc, _ = jax.eval_shape(model.to_discrete, one_series)
    return int(disc.H.shape[-2])


def _series_length(model, times, num_steps):
    """``(times, T, time_batch)``: ``times`` as a float array (or ``None``), the number of
    steps and the batch axes of ``times``.

    Raises:
        ValueError: ``times`` for a discrete model or none for a continuous one, an unknown or
            inconsistent number of steps.
    """
    discrete = _is_discrete(model)
    if times is not None:
        if discrete:
            raise ValueError("times is only meaningful for continuous-time models; for a "
                             "discrete model pass num_steps=T")
        times = jnp.asarray(times)
        if not jnp.issubdtype(times.dtype, jnp.floating):
            times = times.astype(jnp.result_type(float))
        if times.ndim < 1:
            raise ValueError(f"times must have shape (..., T); got times.shape = {times.shape}")
        T = times.shape[-1]
        if num_steps is not None and int(num_steps) != T:
            raise ValueError(f"num_steps = {num_steps} but times.shape = {times.shape}")
        return times, T, tuple(times.shape[:-1])
    if not discrete:
        raise ValueError(f"{type(model).__name__} needs observation times: pass times of shape (T,)")
    T = num_steps if num_steps is not None else model.num_timesteps
    if T is None:
        raise ValueError("the number of time steps is unknown: pass num_steps=T (or times) for a "
                         "time-invariant discrete model")
    T = int(T)
    if model.num_timesteps not in (None, T):
        raise ValueError(f"num_steps = {T} does not match the model's time-varying length "
                         f"{model.num_timesteps}")
    return None, T, ()


def _checked_inputs(model, inputs, T: int):
    """``inputs`` as a float array, checked against the model's ``B``/``D`` where it declares
    them (``input_dim``), or ``None``.

    Raises:
        ValueError: as ``statespace.kalman_filter`` for inputs that do not fit the model.
    """
    if inputs is not None:
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.floating):
            inputs = inputs.astype(jnp.result_type(float))
    if hasattr(model, "input_dim"):
        _check_inputs(model, inputs, T)
    elif inputs is not None and (inputs.ndim < 2 or inputs.shape[-2] != T):
        raise ValueError(f"inputs must have shape (..., T, p) with T = {T}; got "
                         f"inputs.shape = {inputs.shape}")
    return inputs


def _psd_check(name, x, tol=1e-8):
    x = np.asarray(x)
    if x.size == 0:
        return
    if not np.all(np.isfinite(x)):
        raise ValueError(f"LinearGaussianStateSpace got a non-finite {name} parameter")
    asym = np.max(np.abs(x - np.swapaxes(x, -1, -2)))
    scale = max(1.0, float(np.max(np.abs(x))))
    if asym > 1e-8 * scale:
        raise ValueError(f"LinearGaussianStateSpace got a non-symmetric {name} (max |{name} - {name}ᵀ| = {asym:.3g})")
    w = np.linalg.eigvalsh(0.5 * (x + np.swapaxes(x, -1, -2)))
    if np.min(w) < -tol * scale:
        raise ValueError(
            f"LinearGaussianStateSpace got an indefinite {name} (smallest eigenvalue {np.min(w):.3g})"
        )


class LinearGaussianStateSpace(Distribution):
    r"""Distribution of the observations of a linear-Gaussian state-space model.

    ``log_prob(y)`` is the Kalman-filter log-likelihood ``log p(y[0], …, y[T-1])`` with the
    states integrated out (``statespace.log_likelihood``); ``NaN`` entries of ``y`` are missing
    and contribute nothing (whole rows and single entries both work). Sampling simulates
    states and observations.

    Shapes:

    - ``event_shape = (T, m)``: ``T`` is ``times.shape[-1]`` for a continuous-time model;
      for a discrete model it is ``num_steps``, or the length of the model's time-varying
      parameters when ``num_steps`` is omitted.
    - ``batch_shape``: the model's batch shape (its extra leading parameter axes, e.g.
      ``LinearGaussianSSM.batch_shape``) broadcast with the leading axes of ``times``
      (``times`` of shape ``batch + (T,)`` gives each batch member its own time grid, e.g.
      the subjects of a panel padded to a common ``T`` with NaN observations).
    - ``log_prob(value)`` takes ``value`` of shape ``sample_shape + batch_shape + (T, m)``
      (leading axes broadcast) and returns ``sample_shape + batch_shape``; batches are handled
      with ``jax.vmap``, never a Python loop.

    ``support`` is ``constraints.real_matrix``; with ``validate_args=True`` the parameters are
    checked at construction (symmetric positive semi-definite ``Q``, ``R``, ``P0``; finite
    parameters; non-decreasing ``times``) and ``log_prob`` returns ``-inf`` with a warning for
    values with infinite entries (NaN is allowed: it means missing).

    Args:
        model: a ``statespace.LinearGaussianSSM`` or a ``statespace.DiscretizableModel``
            (e.g. ``statespace.ContinuousLinearSSM``).
        times: observation times ``(T,)`` or ``batch + (T,)``, non-decreasing; required for
            continuous-time models, not accepted for discrete ones (as in
            ``statespace.log_likelihood``).
        inputs: ``(T, p)`` or ``batch + (T, p)`` inputs of a model with input weights ``B``/``D``
            (as in ``statespace.kalman_filter``); ``T`` when neither ``times`` nor
            ``num_steps`` gives it.
        form: ``"cov"`` (covariance filter) or ``"sqrt"`` (square-root filter).
        parallel: use the parallel-in-time (associative scan) filter.
        num_steps: ``T`` for a discrete model without ``times``.
        validate_args: NumPyro argument validation (see above).

    Raises:
        ValueError: no way to know ``T``; ``times`` missing (continuous) or given (discrete) or
            of the wrong rank; batch shapes that do not broadcast; invalid parameters when
            validating.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, statespace
        >>> from scipy.stats import multivariate_normal
        >>> from statespace.numpyro import LinearGaussianStateSpace
        >>> ssm = statespace.LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                                    m0=[0.0], P0=[[1.0]])
        >>> d = LinearGaussianStateSpace(ssm, num_steps=3)
        >>> d.event_shape, d.batch_shape, d.sample(jax.random.key(0), (4,)).shape
        ((3, 1), (), (4, 3, 1))
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> round(float(d.log_prob(y)), 6)  # = statespace.log_likelihood(ssm, y)
        -4.201405
        >>> # a continuous-time model with two time grids: a batch of two distributions
        >>> ou = statespace.ContinuousLinearSSM(A=[[-1.0]], Q=[[2.0]], H=[[1.0]], R=[[0.1]],
        ...                                     b=[1.0])  # stationary N(1, 1), corr e^{-|t-s|}
        >>> times = np.array([[0.0, 0.3, 1.7, 2.0], [0.0, 1.0, 2.0, 3.0]])
        >>> d = LinearGaussianStateSpace(ou, times)
        >>> d.event_shape, d.batch_shape
        ((4, 1), (2,))
        >>> y = np.array([1.1, 1.4, 0.7, 1.2])
        >>> np.round(np.asarray(d.log_prob(y[:, None])), 6)
        array([-3.533179, -3.901991])
        >>> cov = lambda t: np.exp(-np.abs(np.subtract.outer(t, t))) + 0.1 * np.eye(4)
        >>> [round(float(multivariate_normal(np.ones(4), cov(t)).logpdf(y)), 6) for t in times]
        [-3.533179, -3.901991]
    """

    arg_constraints = {}
    support = constraints.real_matrix
    reparametrized_params = []
    pytree_data_fields = ("model", "times", "inputs")
    pytree_aux_fields = ("form", "parallel", "num_steps")

    def __init__(
        self,
        model,
        times=None,
        *,
        inputs=None,
        form: str = "cov",
        parallel: bool = False,
        num_steps: int | None = None,
        validate_args: bool | None = None,
    ):
        _check_form(form)
        if not isinstance(model, (LinearGaussianSSM, DiscretizableModel)):
            raise TypeError("expected a LinearGaussianSSM or a DiscretizableModel (an object with "
                            f"a to_discrete(times) method); got {type(model).__name__}")
        self.model = model
        self.form = form
        self.parallel = bool(parallel)
        if num_steps is None and times is None and inputs is not None and jnp.ndim(inputs) >= 2:
            num_steps = jnp.shape(inputs)[-2]
        times, T, time_batch = _series_length(model, times, num_steps)
        inputs = _checked_inputs(model, inputs, T)
        self.times, self.inputs, self.num_steps = times, inputs, T
        m = _obs_dim(model, times)
        input_batch = () if inputs is None else tuple(inputs.shape[:-2])
        try:
            batch_shape = tuple(np.broadcast_shapes(_model_batch_shape(model), time_batch,
                                                    input_batch))
        except ValueError:
            raise ValueError(
                f"batch shape of the model {_model_batch_shape(model)} does not broadcast with "
                f"times.shape = {jnp.shape(times)} and inputs.shape = {jnp.shape(inputs)}"
            ) from None
        super().__init__(batch_shape=batch_shape, event_shape=(T, m), validate_args=validate_args)

    # -- validation --------------------------------------------------------------------------
    def validate_args(self, strict: bool = True) -> None:
        """Check the model's covariances and times (concrete values only).

        Raises:
            ValueError: a non-finite parameter, a covariance that is not symmetric positive
                semi-definite, decreasing ``times``, or (an unbatched continuous-time model,
                see ``ContinuousLinearSSM.check``) an unstable ``A`` with the stationary start.
            RuntimeError: ``strict`` and called on traced values inside ``jit``.
        """
        leaves = jax.tree_util.tree_leaves(self.model)
        if self.times is not None:
            leaves.append(self.times)
        if any(not not_jax_tracer(x) for x in leaves):
            if strict:
                raise RuntimeError("Cannot validate arguments inside jitted code.")
            return
        for name in ("Q", "R", "P0"):
            value = getattr(self.model, name, None)
            if value is not None and not isinstance(value, str):
                _psd_check(name, value)
        if (not _is_discrete(self.model) and not _model_batch_shape(self.model)
                and hasattr(self.model, "check")):
            self.model.check()  # e.g. an unstable A with the stationary start
        for x in leaves:
            if not np.all(np.isfinite(np.asarray(x))):
                raise ValueError("LinearGaussianStateSpace got a non-finite model parameter")
        if self.times is not None and np.any(np.diff(np.asarray(self.times), axis=-1) < 0):
            raise ValueError("LinearGaussianStateSpace got decreasing times")

    def _validate_sample(self, value):
        # NaN marks a missing entry and is part of the support; +-inf is not
        mask = jnp.all(~jnp.isinf(value), axis=(-2, -1))
        if not_jax_tracer(mask) and not np.all(mask):
            import warnings

            warnings.warn(
                "Out-of-support values provided to log prob method. "
                "The value argument should be within the support.",
                stacklevel=2,
            )
        return mask

    # -- batching helpers --------------------------------------------------------------------
    def _map_members(self, fn, *args):
        """``fn(single_model, single_times, single_inputs, *single_args)`` over
        ``batch_shape`` (``None`` for absent times or inputs); every leaf of ``args`` carries
        ``batch_shape`` in front."""
        batch = self.batch_shape
        series = [None if x is None else jnp.broadcast_to(x, batch + x.shape[x.ndim - k:])
                  for x, k in ((self.times, 1), (self.inputs, 2))]
        present = [x for x in series if x is not None]

        def member(model, *values):
            given = iter(values[:len(present)])
            times, inputs = (None if x is None else next(given) for x in series)
            return fn(model, times, inputs, *values[len(present):])

        return _map_batch(member, self.model, batch, *present, *args)

    def _single_log_prob(self, model, times, inputs, y):
        kwargs = {"form": self.form}
        if self.parallel:
            kwargs["parallel"] = True
        return log_likelihood(model, y, times, inputs=inputs, **kwargs)

    # -- density -----------------------------------------------------------------------------
    def log_prob(self, value):
        """Kalman log-likelihood of ``value`` (``sample_shape + batch_shape + (T, m)``).

        Returns:
            Array of shape ``sample_shape + batch_shape``.
        """
        value = jnp.asarray(value)
        if value.ndim < 2 or tuple(value.shape[-2:]) != self.event_shape:
            raise ValueError(
                f"value must have trailing shape event_shape = {self.event_shape}; "
                f"got value.shape = {value.shape}"
            )
        lp = _jit_log_prob(self, value)
        if self._validate_args:
            lp = jnp.where(self._validate_sample(value), lp, -jnp.inf)
        return lp

    def _log_prob(self, value):
        batch = self.batch_shape
        lead = tuple(np.broadcast_shapes(value.shape[:-2], batch))
        value = jnp.broadcast_to(value, lead + self.event_shape)
        sample_shape = lead[: len(lead) - len(batch)]
        num = math.prod(sample_shape)
        # batch axes first, the draws of each member behind them: (batch, num, T, m)
        per_member = jnp.moveaxis(value.reshape((num,) + batch + self.event_shape), 0, len(batch))

        def member(model, times, inputs, ys):
            return jax.vmap(lambda y: self._single_log_prob(model, times, inputs, y))(ys)

        lp = jnp.moveaxis(self._map_members(member, per_member), len(batch), 0)
        return lp.reshape(sample_shape + batch)

    # -- sampling ----------------------------------------------------------------------------
    def _single_sample(self, key, model, times, inputs):
        """States ``(T, n)`` and observations ``(T, m)`` of one unbatched model."""
        if _is_discrete(model):
            return model.simulate(key, self.num_steps, inputs)
        # exact discretisation at the observation times (F[k], Q[k] map t_k -> t_{k+1})
        model, ok = _as_discrete(model, times, inputs)
        # no density (log_prob -inf, e.g. an unstable A with a stationary start): NaN draws
        return jax.tree_util.tree_map(lambda x: jnp.where(ok, x, jnp.nan),
                                      model.simulate(key, self.num_steps))

    def sample_with_intermediates(self, key, sample_shape=()):
        """Observations and ``[states]``: shapes ``sample_shape + batch_shape + (T, m)`` / ``(T, n)``."""
        obs, states = _jit_sample(self, key, tuple(sample_shape))
        return obs, [states]

    def _sample(self, key, sample_shape):
        batch = self.batch_shape
        num = math.prod(sample_shape)
        keys = jax.random.split(key, num * math.prod(batch))
        keys = keys.reshape((num,) + batch + keys.shape[1:])
        keys = jnp.moveaxis(keys, 0, len(batch))

        def member(model, times, inputs, member_keys):
            return jax.vmap(lambda k: self._single_sample(k, model, times, inputs))(member_keys)

        states, obs = self._map_members(member, keys)
        states = jnp.moveaxis(states, len(batch), 0)
        obs = jnp.moveaxis(obs, len(batch), 0)
        n = states.shape[-1]
        states = states.reshape(sample_shape + batch + (self.num_steps, n))
        obs = obs.reshape(sample_shape + batch + self.event_shape)
        return obs, states

    def sample(self, key, sample_shape=()):
        """Simulated observations of shape ``sample_shape + batch_shape + (T, m)``."""
        return self.sample_with_intermediates(key, sample_shape)[0]


# One compiled program per distribution structure and value shape, so eager calls do not
# dispatch the filter op by op (under an outer jit, e.g. in MCMC, these are simply inlined).
_jit_log_prob = jax.jit(lambda dist, value: dist._log_prob(value))
_jit_sample = jax.jit(lambda dist, key, shape: dist._sample(key, shape), static_argnums=2)


class NonlinearStateSpace(Distribution):
    """The observations ``y (T, m)`` of a :class:`statespace.NonlinearSDE` at ``times``, with
    the local-linearisation (extended or sigma-point) Kalman filter's log-likelihood as the
    density: the approximate marginal likelihood with the states integrated out, so NUTS
    samples only the parameters.

    ``log_prob`` is ``statespace.log_likelihood(model, y, times, method=..., substeps=...,
    max_step=...)``
    (``-inf`` for a model the filter rejects, so a sampler rejects the point); NaN entries of
    ``y`` are missing. ``sample`` draws paths with :meth:`statespace.NonlinearSDE.simulate`
    (``sample_substeps`` substeps per interval) and observes them. Leading axes of ``y``
    are series sharing the model and ``times`` (the log-probability has their shape).

    Args:
        model: a :class:`statespace.NonlinearSDE`.
        times: ``(T,)`` observation times.
        method: ``"ekf"`` or ``"ukf"``.
        substeps: relinearisations per interval in the filter.
        form: ``"cov"`` or ``"sqrt"``.
        sample_substeps: substeps per interval when sampling (default ``substeps``).
        max_step: split every gap longer than this into ``ceil(gap / max_step)`` equal parts
            in the filter (see :func:`statespace.kalman_filter`; needs concrete ``times``,
            as the data given to a NumPyro model are).

    Raises:
        TypeError: a model that is not a ``NonlinearSDE``; ``max_step`` with traced ``times``.
        ValueError: bad ``times``, ``method``, ``form``, ``substeps`` or ``max_step``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, statespace
        >>> from statespace.numpyro import NonlinearStateSpace
        >>> sde = statespace.NonlinearSDE(lambda x, t, p: -p * jnp.sin(x), 0.1 * jnp.eye(1),
        ...                               lambda x, t, p: x, 0.01 * jnp.eye(1), jnp.zeros(1),
        ...                               jnp.eye(1), params=jnp.array(1.5))
        >>> d = NonlinearStateSpace(sde, jnp.linspace(0.0, 2.0, 5))
        >>> y = d.sample(jax.random.key(0))
        >>> y.shape, d.event_shape
        ((5, 1), (5, 1))
        >>> bool(np.isclose(d.log_prob(y), statespace.log_likelihood(sde, y, d.times)))
        True
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    pytree_data_fields = ("model", "times")
    pytree_aux_fields = ("method", "substeps", "form", "sample_substeps", "max_step")

    def __init__(self, model, times, *, method: str = "ekf", substeps: int = 1,
                 form: str = "cov", sample_substeps: int | None = None,
                 max_step: float | None = None, validate_args: bool | None = None):
        if not isinstance(model, NonlinearSDE):
            raise TypeError(f"expected a statespace.NonlinearSDE; got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        _check_form(form)
        _check_substeps(substeps)
        if sample_substeps is not None:
            _check_substeps(sample_substeps)
        if max_step is None:
            times = jnp.asarray(times)
        else:  # its errors now, not at the first log_prob; NumPy: under jit a JAX array made
            refined_grid(times, max_step)  # here would be traced, and the grid needs values
            times = np.asarray(times)
        if times.ndim != 1:
            raise ValueError(f"times must have shape (T,); got times.shape = {times.shape}")
        self.model, self.times, self.max_step = model, times, max_step
        self.method, self.substeps, self.form = method, substeps, form
        self.sample_substeps = substeps if sample_substeps is None else sample_substeps
        super().__init__(batch_shape=(), event_shape=(times.shape[0], model.obs_dim),
                         validate_args=validate_args)

    def log_prob(self, value):
        return log_likelihood(self.model, value, self.times, method=self.method,
                              substeps=self.substeps, form=self.form, max_step=self.max_step)

    def sample(self, key, sample_shape=()):
        def one(k):
            return self.model.simulate(k, self.times, self.sample_substeps)[1]

        keys = jax.random.split(key, math.prod(sample_shape)) if sample_shape else key[None]
        draws = jax.vmap(one)(keys)
        return draws.reshape(tuple(sample_shape) + self.event_shape)
