"""Discrete-time linear-Gaussian state-space model (a registered pytree)."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules import dlyap
from rules._checks import as_float_array
from rules._precision import full_precision

# Rank of one time step's value of each parameter ("base rank").
_BASE_RANK = {"F": 2, "Q": 2, "H": 2, "R": 2, "m0": 1, "P0": 2, "b": 1, "d": 1, "B": 2, "D": 2}
# Parameters that may carry a time axis (m0 and P0 describe x[0] only).
_TIME_PARAMS = ("F", "Q", "H", "R", "b", "d", "B", "D")
# What the filters read per step (inputs are folded into b and d before they run)
_STEP_PARAMS = ("F", "Q", "H", "R", "b", "d")
# pytree children; the input weights B and D are None in a model without inputs
_FIELDS = ("F", "Q", "H", "R", "m0", "P0", "b", "d", "B", "D")


def _split_axes(name: str, shape: tuple) -> tuple[tuple, int | None]:
    """Split a parameter's leading axes into ``(batch_shape, time_length or None)``.

    Rule: rank == base -> constant; rank == base + 1 -> a time axis; rank >= base + 2 -> batch
    axes followed by a time axis (which may have length 1 to broadcast over time). ``m0`` and
    ``P0`` never have a time axis: every extra leading axis of theirs is a batch axis.
    """
    extra = len(shape) - _BASE_RANK[name]
    if name not in _TIME_PARAMS:
        return tuple(shape[:extra]), None
    if extra == 0:
        return (), None
    return tuple(shape[: extra - 1]), shape[extra - 1]


@jax.tree_util.register_pytree_node_class
class LinearGaussianSSM:
    r"""Linear-Gaussian state-space model in discrete time.

    .. math::

        x_{k+1} = F_k x_k + b_k + w_k,\quad w_k \sim N(0, Q_k);\qquad
        y_k = H_k x_k + d_k + v_k,\quad v_k \sim N(0, R_k);\qquad x_0 \sim N(m_0, P_0).

    ``y[0]`` observes ``x[0]`` directly: there is no prediction step before the first
    observation.

    Shapes (``n`` states, ``m`` observed series): ``F, Q, P0: (n, n)``, ``H: (m, n)``,
    ``R: (m, m)``, ``m0, b: (n,)``, ``d: (m,)``.

    Inputs (covariates, controls): with input weights ``B (n, p)`` and/or ``D (m, p)`` the
    model takes ``inputs`` ``u (T, p)`` in :func:`statespace.kalman_filter` and the other
    entry points::

        x[k+1] = F x[k] + b + B u[k] + w[k],     y[k] = H x[k] + d + D u[k] + v[k],

    so ``u[k]`` drives the step ``k -> k+1`` (its ``B u[T-1]`` is unused) and enters ``y[k]``
    directly: the filter folds the inputs into time-varying offsets ``b[k] + B u[k]`` and
    ``d[k] + D u[k]``. (dynamax's ``lgssm_filter`` has ``x_t = F x_{t-1} + B u_t + ...``: its
    ``u_t`` drives the step into ``t``; the same model takes our ``u[k] = `` its ``u_{k+1}``
    for ``B``.) NaN in ``inputs`` gives NaN log-likelihoods and moments (a missing input has
    no density to integrate over: impute it or model it as a state).

    Time-varying parameters: ``F, Q, H, R, b, d, B, D`` may carry ONE extra leading axis of
    length ``T``, indexed by time: ``F[k], Q[k], b[k], B[k]`` map step ``k -> k+1`` (entry
    ``T-1`` is unused), ``H[k], R[k], d[k], D[k]`` give ``y[k]``.

    Batches of models: a parameter with two or more extra leading axes has shape
    ``batch + (T_or_1,) + base``: leading batch axes, then a time axis that may have length 1
    (the same value at every step). ``m0`` and ``P0`` have no time axis; any extra leading axes
    of theirs are batch axes: ``batch + (n,)`` and ``batch + (n, n)``. Batch shapes of all
    parameters (and of ``y`` in :func:`statespace.kalman_filter`) broadcast against each other,
    and the filter maps over them. Example: 3 models with a shared ``H`` and their own ``F``:
    ``F.shape == (3, 1, n, n)``, ``H.shape == (m, n)``, ``m0.shape == (3, n)``.

    Exact diffuse initialisation (Durbin & Koopman 2012, ch. 5): ``diffuse=True`` (all states)
    or a boolean mask of length ``n`` marks states whose initial distribution is improper flat:
    ``P0 = P_star + kappa P_inf`` with ``P_inf = diag(mask)`` and ``kappa -> inf``. ``P_star`` is
    ``P0`` with the rows and columns of the diffuse states zeroed (their ``m0`` entries are
    irrelevant); the filter treats the limit exactly (see :func:`statespace.kalman_filter`).
    The mask is static (part of the pytree's auxiliary data).

    The object is a registered pytree with children ``(F, Q, H, R, m0, P0, b, d)`` and static
    auxiliary data ``diffuse``; it can be passed through ``jit``, ``vmap`` and ``grad``.

    Args:
        F: transition matrix ``(n, n)`` (or time-varying / batched, see above).
        Q: process-noise covariance ``(n, n)``.
        H: observation matrix ``(m, n)``.
        R: observation-noise covariance ``(m, m)``.
        m0: initial mean ``(n,)``.
        P0: initial covariance ``(n, n)``, or ``"stationary"``: ``P0 = dlyap(F, Q)``, the
            stationary covariance (time-invariant ``F`` and ``Q`` with spectral radius < 1).
        b: state offset ``(n,)``; default zeros.
        d: observation offset ``(m,)``; default zeros.
        diffuse: ``None``/``False``, ``True``, or a boolean sequence of length ``n``.
        B: input weights on the state ``(n, p)``, or ``None`` (no inputs on the state).
        D: input weights on the observations ``(m, p)``, or ``None``.

    Raises:
        ValueError: if shapes are inconsistent (the message names both shapes), if time-axis
            lengths disagree, batch shapes do not broadcast, or ``P0="stationary"`` is asked for
            time-varying ``F``/``Q``.
        TypeError: for complex or non-numeric parameters.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from statespace import LinearGaussianSSM, log_likelihood
        >>> model = LinearGaussianSSM(F=jnp.eye(2) * 0.9, Q=jnp.eye(2), H=jnp.ones((1, 2)),
        ...                           R=jnp.eye(1), m0=jnp.zeros(2), P0="stationary")
        >>> model.state_dim, model.obs_dim, model.batch_shape, model.num_timesteps
        (2, 1, (), None)
        >>> round(float(model.P0[0, 0]), 6)  # stationary: P0 = 0.81 P0 + 1
        5.263158
        >>> x, y = model.simulate(jax.random.key(0), 50)
        >>> x.shape, y.shape, bool(jnp.isfinite(log_likelihood(model, y)))
        ((50, 2), (50, 1), True)
        >>> # y[0] = 0 observing x[0] ~ N(0, 1) with noise N(0, 1): log N(0; 0, 2) = −½ log 4π
        >>> scalar = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                            m0=[0.0], P0=[[1.0]])
        >>> round(float(log_likelihood(scalar, jnp.zeros((1, 1)))), 6)
        -1.265512
    """

    def __init__(self, F, Q, H, R, m0, P0, *, b=None, d=None, diffuse=None, B=None, D=None):
        F = as_float_array("F", F)
        Q = as_float_array("Q", Q)
        H = as_float_array("H", H)
        R = as_float_array("R", R)
        m0 = as_float_array("m0", m0)
        stationary = isinstance(P0, str)
        if stationary and P0 != "stationary":
            raise ValueError(f"P0 must be an array or 'stationary'; got {P0!r}")
        if not stationary:
            P0 = as_float_array("P0", P0)
        b = None if b is None else as_float_array("b", b)
        d = None if d is None else as_float_array("d", d)
        B = None if B is None else as_float_array("B", B)
        D = None if D is None else as_float_array("D", D)
        arrays = [a for a in (F, Q, H, R, m0, P0, b, d, B, D)
                  if a is not None and not isinstance(a, str)]
        dtype = jnp.result_type(*arrays)

        if F.ndim < 2 or F.shape[-1] != F.shape[-2]:
            raise ValueError(f"F must have shape (..., n, n); got F.shape = {F.shape}")
        n = F.shape[-1]
        if H.ndim < 2:
            raise ValueError(f"H must have shape (..., m, n); got H.shape = {H.shape}")
        m = H.shape[-2]

        def need(name, x, core):
            if x.ndim < len(core) or tuple(x.shape[x.ndim - len(core):]) != core:
                ref = f"H.shape = {H.shape}" if name in ("R", "d") else f"F.shape = {F.shape}"
                raise ValueError(
                    f"{name} must have trailing shape {core} (n = {n}, m = {m}); "
                    f"got {name}.shape = {x.shape} with {ref}"
                )

        need("H", H, (m, n))
        need("Q", Q, (n, n))
        need("R", R, (m, m))
        need("m0", m0, (n,))
        if b is not None:
            need("b", b, (n,))
        if d is not None:
            need("d", d, (m,))
        _check_input_weights(B, D, n, m)

        if stationary:
            for name, x in (("F", F), ("Q", Q)):
                _, t_len = _split_axes(name, x.shape)
                if t_len not in (None, 1):
                    raise ValueError(
                        "P0='stationary' needs time-invariant F and Q; "
                        f"got {name}.shape = {x.shape}"
                    )
            F_c = F if F.ndim == 2 else F[..., 0, :, :]
            Q_c = Q if Q.ndim == 2 else Q[..., 0, :, :]
            P0 = dlyap(F_c, Q_c)
            P0 = 0.5 * (P0 + jnp.swapaxes(P0, -1, -2))
        need("P0", P0, (n, n))

        if b is None:
            b = jnp.zeros((n,), dtype)
        if d is None:
            d = jnp.zeros((m,), dtype)

        values = dict(F=F, Q=Q, H=H, R=R, m0=m0, P0=P0, b=b, d=d, B=B, D=D)
        values = {name: x for name, x in values.items() if x is not None}
        self._check_axes(values)
        for name in _FIELDS:
            setattr(self, name, None if name not in values else jnp.asarray(values[name], dtype))
        self.diffuse = _normalise_diffuse(diffuse, n)

    # -- pytree ------------------------------------------------------------------------------
    def tree_flatten(self):
        return tuple(getattr(self, f) for f in _FIELDS), self.diffuse

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for name, value in zip(_FIELDS, children):
            setattr(obj, name, value)
        obj.diffuse = aux
        return obj

    def replace(self, **changes) -> "LinearGaussianSSM":
        """A copy with some fields replaced (no re-validation; use the constructor for that).

        Args:
            **changes: new values of some of ``F, Q, H, R, m0, P0, b, d, B, D, diffuse``.

        Returns:
            A new model; the fields not named are shared with ``self``.

        Raises:
            ValueError: for a name that is not a field.

        Example:
            >>> import jax.numpy as jnp
            >>> from statespace import LinearGaussianSSM
            >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
            ...                           m0=[0.0], P0=[[1.0]])
            >>> model.replace(R=jnp.array([[4.0]])).R.tolist(), model.R.tolist()
            ([[4.0]], [[1.0]])
        """
        unknown = set(changes) - set(_FIELDS) - {"diffuse"}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        children = tuple(changes.get(f, getattr(self, f)) for f in _FIELDS)
        diffuse = self.diffuse
        if "diffuse" in changes:
            diffuse = _normalise_diffuse(changes["diffuse"], children[0].shape[-1])
        return self.tree_unflatten(diffuse, children)

    # -- shape helpers -----------------------------------------------------------------------
    @staticmethod
    def _check_axes(values: dict) -> None:
        batches, lengths = [], {}
        for name, x in values.items():
            batch, t_len = _split_axes(name, tuple(x.shape))
            batches.append((name, batch, x.shape))
            if t_len is not None and t_len != 1:
                lengths[name] = (t_len, x.shape)
        if len({t for t, _ in lengths.values()}) > 1:
            described = ", ".join(f"{k}.shape = {s}" for k, (_, s) in lengths.items())
            raise ValueError(f"time-axis lengths disagree: {described}")
        shape: tuple = ()
        for name, batch, full in batches:
            try:
                shape = np.broadcast_shapes(shape, batch)
            except ValueError:
                described = ", ".join(f"{k}.shape = {s}" for k, _, s in batches)
                raise ValueError(
                    f"batch axes of the parameters do not broadcast ({name}.shape = {full}): "
                    f"{described}"
                ) from None

    @property
    def state_dim(self) -> int:
        """``n``."""
        return self.F.shape[-1]

    @property
    def obs_dim(self) -> int:
        """``m``."""
        return self.H.shape[-2]

    @property
    def num_timesteps(self) -> int | None:
        """Length of the time axis of the time-varying parameters (``None`` if none, or all 1)."""
        for name in _TIME_PARAMS:
            if getattr(self, name) is None:
                continue
            _, t_len = _split_axes(name, tuple(getattr(self, name).shape))
            if t_len is not None and t_len != 1:
                return t_len
        return None

    @property
    def input_dim(self) -> int | None:
        """``p``, the width of the inputs ``B`` and ``D`` take (``None`` without inputs)."""
        return _input_width(self.B, self.D)

    @property
    def batch_shape(self) -> tuple:
        """Broadcast batch shape of the parameters (``()`` for a single model)."""
        shape: tuple = ()
        for name in _FIELDS:
            if getattr(self, name) is not None:
                batch, _ = _split_axes(name, tuple(getattr(self, name).shape))
                shape = np.broadcast_shapes(shape, batch)
        return tuple(shape)

    def leaf_batch_ndims(self) -> tuple:
        """Number of leading batch axes of each pytree child (``tree_flatten`` order): what the
        entry points map over.

        Example:
            >>> import jax.numpy as jnp
            >>> from statespace import LinearGaussianSSM
            >>> model = LinearGaussianSSM(F=jnp.full((3, 1, 1, 1), 0.5), Q=[[1.0]], H=[[1.0]],
            ...                           R=[[1.0]], m0=[0.0], P0=[[1.0]])
            >>> model.batch_shape, model.leaf_batch_ndims()
            ((3,), (1, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        """
        return tuple(0 if getattr(self, name) is None
                     else len(_split_axes(name, tuple(getattr(self, name).shape))[0])
                     for name in _FIELDS)

    @property
    def diffuse_mask(self):
        """Boolean NumPy mask ``(n,)`` of the diffuse states, or ``None``."""
        return None if self.diffuse is None else np.asarray(self.diffuse)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{f}={tuple(getattr(self, f).shape)}" for f in _FIELDS
                           if getattr(self, f) is not None)
        return f"LinearGaussianSSM({shapes}, diffuse={self.diffuse})"

    def check(self) -> "LinearGaussianSSM":
        """Eager validation: raise a clear error for a model without a density (what the
        filter reports as a ``-inf`` log-likelihood under ``jit``).

        Returns:
            ``self``, so ``model = LinearGaussianSSM(...).check()`` works.

        Raises:
            ValueError: if ``Q``, ``R`` or ``P0`` (any time step or batch member) is not
                symmetric positive semi-definite, e.g. a negative variance or the
                ``P0="stationary"`` of an unstable ``F``; the message names the matrix and its
                smallest eigenvalue.

        Example:
            >>> from statespace import LinearGaussianSSM
            >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[-1.0]],
            ...                           m0=[0.0], P0=[[1.0]])
            >>> model.check()
            Traceback (most recent call last):
                ...
            ValueError: R must be symmetric positive semi-definite; its smallest eigenvalue is -1...
        """
        for name in ("Q", "R", "P0"):
            _raise_if_indefinite(name, getattr(self, name))
        return self

    # -- simulation --------------------------------------------------------------------------
    @full_precision
    def simulate(self, key, num_steps: int, inputs=None):
        """Draw states and observations from the model.

        Diffuse states start at their ``m0`` entries (an improper prior cannot be sampled).
        Singular ``Q``, ``R`` or ``P0`` are allowed (a symmetric eigen-decomposition gives the
        square roots).

        Args:
            key: a ``jax.random`` key.
            num_steps: ``T``; must equal the model's time-axis length if it is time-varying.
            inputs: ``(T, p)`` inputs for a model with ``B`` or ``D`` (see the class docstring).

        Returns:
            ``(states, observations)`` with shapes ``(T, n)`` and ``(T, m)``; NaN when ``Q``,
            ``R`` or ``P0`` is not positive semi-definite (the model has no density).

        Raises:
            ValueError: for a batched model (use ``jax.vmap``), a ``num_steps`` that does not
                match the time-varying parameters, or inputs that do not match the model (as
                in :func:`statespace.kalman_filter`).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from statespace import LinearGaussianSSM
            >>> model = LinearGaussianSSM(F=0.9 * jnp.eye(2), Q=jnp.eye(2), H=[[1.0, -1.0]],
            ...                           R=[[0.0]], m0=jnp.zeros(2), P0="stationary")
            >>> x, y = model.simulate(jax.random.key(1), 100)
            >>> x.shape, y.shape
            ((100, 2), (100, 1))
            >>> bool(jnp.allclose(y, x @ model.H.T))  # R = 0: y = H x exactly
            True
        """
        if self.batch_shape:
            raise ValueError(
                f"simulate needs a single model; this one has batch shape {self.batch_shape} "
                "(use jax.vmap over the model)"
            )
        T = int(num_steps)
        if self.num_timesteps is not None and self.num_timesteps != T:
            raise ValueError(
                f"num_steps = {T} does not match the time-varying parameters' length "
                f"{self.num_timesteps}"
            )
        _check_inputs(self, inputs, T)
        model = _with_inputs(self, None if inputs is None else jnp.asarray(inputs))
        n, m = model.state_dim, model.obs_dim
        seq = {name: _per_step(name, getattr(model, name), T) for name in _STEP_PARAMS}
        P0 = self.P0
        if self.diffuse is not None:
            keep = jnp.asarray(~self.diffuse_mask, P0.dtype)
            P0 = P0 * keep[:, None] * keep[None, :]
        k0, kw, kv = jax.random.split(key, 3)
        x0 = self.m0 + _psd_sqrt(P0) @ jax.random.normal(k0, (n,), P0.dtype)
        zw = jax.random.normal(kw, (T, n), P0.dtype)
        zv = jax.random.normal(kv, (T, m), P0.dtype)
        Q_sqrt = _psd_sqrt(seq["Q"])
        R_sqrt = _psd_sqrt(seq["R"])

        def step(x, inputs):
            F, Qs, b, H, Rs, d, w, v = inputs
            y = H @ x + d + Rs @ v
            return F @ x + b + Qs @ w, (x, y)

        _, (states, obs) = jax.lax.scan(
            step, x0, (seq["F"], Q_sqrt, seq["b"], seq["H"], R_sqrt, seq["d"], zw, zv)
        )
        # an indefinite covariance has no square root: NaN draws (its log-likelihood is -inf)
        bad = _indefinite(P0) | jnp.any(_indefinite(seq["Q"])) | jnp.any(_indefinite(seq["R"]))
        return jnp.where(bad, jnp.nan, states), jnp.where(bad, jnp.nan, obs)


def _check_input_weights(B, D, n: int, m: int) -> None:
    """``B (..., n, p)`` and ``D (..., m, p)`` agree with the model and with each other.

    Raises:
        ValueError: naming the shapes.
    """
    for name, x, rows in (("B", B, n), ("D", D, m)):
        if x is not None and (x.ndim < 2 or x.shape[-2] != rows):
            raise ValueError(f"{name} must have shape (..., {rows}, p) ({'n' if name == 'B' else 'm'}"
                             f" = {rows}); got {name}.shape = {x.shape}")
    if B is not None and D is not None and B.shape[-1] != D.shape[-1]:
        raise ValueError(f"B and D must take inputs of one width p; got B.shape = {B.shape}, "
                         f"D.shape = {D.shape}")


def _input_width(B, D) -> int | None:
    """``p`` of input weights ``B (..., n, p)`` and/or ``D (..., m, p)``; ``None`` for neither."""
    weights = B if B is not None else D
    return None if weights is None else weights.shape[-1]


def _check_inputs(model, inputs, T: int) -> None:
    """Static checks of ``inputs (..., T, p)`` against a model's ``B``, ``D`` (its
    ``input_dim``).

    Raises:
        ValueError: inputs without input weights or the reverse, or a wrong length or width
            (naming the shapes).
    """
    p = model.input_dim
    if inputs is None:
        if p is not None:
            raise ValueError(f"the model has input weights (B or D, width p = {p}): pass inputs "
                             f"of shape (T, {p})")
        return
    shape = jnp.shape(inputs)
    if p is None:
        raise ValueError(f"inputs given (inputs.shape = {shape}) but the model has no input "
                         "weights: give LinearGaussianSSM B and/or D")
    if len(shape) < 2 or shape[-2:] != (T, p):
        raise ValueError(f"inputs must have shape (..., T, p) = (..., {T}, {p}); got "
                         f"inputs.shape = {shape}")


def _with_inputs(model, inputs=None):
    """The model with its inputs ``u (T, p)`` folded into time-varying offsets:
    ``b[k] + B[k] u[k]``, ``d[k] + D[k] u[k]`` (then ``B = D = None``); unchanged without.
    For one model; leading axes of ``u`` become batch axes of the offsets when ``B`` and ``D``
    have none (as in ``ContinuousLinearSSM.to_discrete``)."""
    if inputs is None:
        return model
    changes = {"B": None, "D": None}
    if model.B is not None:
        changes["b"] = model.b + _weighted(model.B, inputs)
    if model.D is not None:
        changes["d"] = model.d + _weighted(model.D, inputs)
    return model.replace(**changes)


# input weights with at most this many entries are applied elementwise (below)
_ELEMENTWISE_WEIGHTS_MAX = 64


def _weighted(W, u):
    """``W u`` per step for weights ``W (..., r, p)`` and inputs ``u (..., p)``. Small ``W``
    as ``p`` elementwise products added up, which XLA fuses (forward and reverse): as dots, the
    (T, p) x (p, r) products of a small model cost several µs of dispatch each on XLA:CPU, and
    from ~4 states on a reduction over ``p`` became a library (YNNPACK) call of about as much."""
    p = W.shape[-1]
    if 0 < p and p * W.shape[-2] <= _ELEMENTWISE_WEIGHTS_MAX:
        out = W[..., :, 0] * u[..., None, 0]
        for k in range(1, p):
            out = out + W[..., :, k] * u[..., None, k]
        return out
    return jnp.einsum("...ij,...j->...i", W, u)


def _per_step(name: str, x, T: int):
    """Parameter ``name`` of ONE model broadcast to a leading time axis of length ``T``.

    Raises:
        ValueError: ``x`` has batch axes, or a time axis whose length is neither ``T`` nor 1.
    """
    base = _BASE_RANK[name]
    if x.ndim == base:
        return jnp.broadcast_to(x, (T,) + x.shape)
    if x.ndim == base + 1 and x.shape[0] in (1, T):
        return jnp.broadcast_to(x, (T,) + x.shape[1:])
    raise ValueError(
        f"{name} must have rank {base} (constant) or {base + 1} with a leading time axis of "
        f"length T = {T} (or 1); got {name}.shape = {x.shape}. Batches of models go through "
        "jax.vmap or the public entry points, which map over batch axes."
    )


def _psd_sqrt(A):
    """A square root ``S`` with ``S S^T = A`` for symmetric positive semi-definite ``A``."""
    w, V = jnp.linalg.eigh(A)
    return V * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]


def _raise_if_indefinite(name, value):
    """Eager form of :func:`_indefinite` for ``check()`` methods.

    Raises:
        ValueError: naming the matrix and its smallest eigenvalue.
    """
    if bool(jnp.any(_indefinite(value))):
        w = np.linalg.eigvalsh(np.asarray(0.5 * (value + jnp.swapaxes(value, -1, -2))))
        raise ValueError(f"{name} must be symmetric positive semi-definite; its smallest "
                         f"eigenvalue is {np.min(w):.6g}")


# Relative tolerance (times n eps) below which a negative eigenvalue of a covariance counts as
# rounding: loose enough for PSD matrices computed by a Lyapunov solve or a discretisation
# (errors of a few hundred eps), tight enough for every invalid variance that is not itself
# lost in rounding next to the largest entry.
_PSD_RTOL = 100


def _indefinite(A):
    """Traced test: ``True`` where the finite ``A (..., n, n)`` is clearly not positive
    semi-definite, i.e. ``lambda_min(S) < -tol`` for its symmetric part ``S = (A + Aᵀ)/2``,
    with ``tol = 100 n eps max|A_ij|``.

    Decided by one Cholesky factorisation of ``S + tol I`` (it succeeds iff
    ``lambda_min(S) > -tol``): for ``n <= 8`` unrolled, so it fuses and needs no LAPACK
    call; no derivative flows through it. Non-finite ``A`` gives ``False``: NaN parameters are
    reported as NaN, not as an invalid model.
    """
    A = jax.lax.stop_gradient(A)
    n = A.shape[-1]
    if n == 0:
        return jnp.zeros(A.shape[:-2], bool)
    finite = jnp.all(jnp.isfinite(A), axis=(-2, -1))
    info = jnp.finfo(A.dtype)
    tol = (_PSD_RTOL * n * info.eps) * jnp.max(jnp.abs(A), axis=(-2, -1)) + info.tiny
    if n > 8:
        S = 0.5 * (A + jnp.swapaxes(A, -1, -2))
        S = jnp.where(finite[..., None, None], S, 0.0) + tol[..., None, None] * jnp.eye(n, dtype=A.dtype)
        return finite & ~jnp.all(jnp.isfinite(jnp.linalg.cholesky(S)), axis=(-2, -1))
    # Right-looking, on A itself: the pivot is the diagonal entry plus tol (the diagonal of
    # S + tol I), the column below it that of S (the mean of A's column and row), and the
    # trailing block minus the column's outer product keeps S's Schur complement as its
    # symmetric part. ~10 whole-block operations per column instead of ~n²/2 scalar ones,
    # and no (..., n, n) temporaries: in the programs of long series XLA wrote out S,
    # S + tol I and a select of the non-finite entries (3.8 ms of a 51 ms Matérn-3/2 gradient
    # at N = 1e5 in the profile; same process, the log-likelihood at N = 1e5 took 0.89x the
    # time, the gradient within noise; (8, 4, 1000) compiled in 0.75x / 0.86x). Non-finite
    # entries need no select: their comparisons are False, and ``finite`` decides.
    ok = jnp.ones(A.shape[:-2], bool)
    B = A
    for column_index in range(n):
        pivot = B[..., 0, 0] + tol
        positive = pivot > 0
        ok = ok & positive
        if column_index == n - 1:
            break
        below = 0.5 * (B[..., 1:, 0] + B[..., 0, 1:])
        column = below / jnp.sqrt(jnp.where(positive, pivot, 1.0))[..., None]
        B = B[..., 1:, 1:] - column[..., :, None] * column[..., None, :]
    return finite & ~ok


def _normalise_diffuse(diffuse, n: int):
    """The static form of a ``diffuse`` argument, shared by every model class: ``None`` (no
    diffuse state) or a tuple of ``n`` bools (hashable pytree auxiliary data).

    Raises:
        TypeError: a traced mask (the mask decides the program's structure: it must be concrete).
        ValueError: a mask that is not boolean of shape ``(n,)``.
    """
    if diffuse is None or diffuse is False:
        return None
    if diffuse is True:
        return (True,) * n
    try:
        mask = np.asarray(diffuse)
    except Exception as err:  # a tracer
        raise TypeError("diffuse must be None, True or a concrete boolean mask of shape (n,)"
                        ) from err
    if mask.dtype != bool or mask.shape not in ((), (n,)):
        raise ValueError(
            f"diffuse must be None, True, or a boolean mask of shape ({n},); "
            f"got {mask.dtype} array of shape {mask.shape}"
        )
    mask = np.broadcast_to(mask, (n,))
    if not mask.any():
        return None
    return tuple(bool(v) for v in mask)


# ------------------------------------------------------------------------------------------
# What the filters and smoothers read from a model: the discrete model, its batch axes, its
# time-constant and per-step parameters, and from which step on an indefinite covariance
# leaves it without a density
# ------------------------------------------------------------------------------------------
@runtime_checkable
class DiscretizableModel(Protocol):
    """A model that becomes a discrete-time :class:`LinearGaussianSSM` at given times.

    Every entry point that takes ``times`` (:func:`statespace.kalman_filter`,
    :func:`statespace.log_likelihood`, :func:`statespace.rts_smoother`,
    :func:`statespace.sample_posterior`, :func:`statespace.predict`,
    :class:`statespace.numpyro.LinearGaussianStateSpace`) accepts any object with this method;
    :class:`statespace.ContinuousLinearSSM` is the package's own. To be passed through ``jit``
    the object must be a pytree (e.g. ``jax.tree_util.register_pytree_node_class``). Batched
    models may also define ``batch_shape`` and ``leaf_batch_ndims()`` (as
    :class:`LinearGaussianSSM` does); without them the object counts as one model.

    Example:
        >>> import jax.numpy as jnp
        >>> from statespace import DiscretizableModel, LinearGaussianSSM, log_likelihood
        >>> class RandomWalk:  # x(t) Brownian with rate q, observed with unit noise
        ...     def __init__(self, q):
        ...         self.q = q
        ...     def to_discrete(self, times):
        ...         dt = jnp.append(jnp.diff(times), 0.0)
        ...         disc = LinearGaussianSSM(F=jnp.ones((len(times), 1, 1)),
        ...                                  Q=self.q * dt[:, None, None], H=[[1.0]], R=[[1.0]],
        ...                                  m0=[0.0], P0=[[1.0]])
        ...         return disc, jnp.all(dt >= 0)
        >>> isinstance(RandomWalk(1.0), DiscretizableModel)
        True
        >>> y, times = jnp.zeros((2, 1)), jnp.array([0.0, 2.0])
        >>> # y ~ N(0, [[2, 1], [1, 4]]): log density at 0 = -log(2 pi) - log(7) / 2
        >>> round(float(log_likelihood(RandomWalk(1.0), y, times)), 6)
        -2.810832
    """

    def to_discrete(self, times) -> tuple[LinearGaussianSSM, jax.Array]:
        """The discrete model at ``times (T,)`` and a boolean ``ok`` (scalar or batch-shaped):
        where ``ok`` is ``False`` the model has no density at these times and the filter
        reports a ``-inf`` log-likelihood. ``F[k], Q[k], b[k]`` map ``times[k] -> times[k+1]``
        (entry ``T-1`` unused); ``H[k], R[k], d[k]`` give ``y[k]``. A model that takes inputs
        also accepts ``inputs=`` ``(..., T, p)`` and folds them into the discrete model's
        offsets (as :meth:`statespace.ContinuousLinearSSM.to_discrete` does)."""
        ...


def _as_discrete(model, times, inputs=None):
    """``(disc, ok)``: the discrete model to filter and an ``ok`` flag (``None`` for discrete
    models). A :class:`DiscretizableModel` takes ``inputs`` in ``to_discrete(times,
    inputs=inputs)`` and returns them folded in; a discrete model (``ok is None``) leaves them
    to the caller, which folds them per member (:func:`_with_inputs`).

    Raises:
        ValueError: ``times`` given for a discrete model, or missing for a
            :class:`DiscretizableModel`.
        TypeError: ``model`` is neither.
    """
    if isinstance(model, DiscretizableModel):
        if times is None:
            raise ValueError(f"{type(model).__name__} is a continuous-time model: pass times")
        if inputs is None:
            return model.to_discrete(times)
        return model.to_discrete(times, inputs=inputs)
    if times is not None:
        raise ValueError(
            "times is only meaningful for continuous-time models; got a discrete model"
        )
    if not isinstance(model, LinearGaussianSSM):
        raise TypeError("expected a LinearGaussianSSM or a DiscretizableModel (an object with "
                        f"a to_discrete(times) method); got {type(model)}")
    return model, None


def _series_arguments(model, batch_shape: tuple, y, inputs=None) -> tuple:
    """``y`` (and ``inputs``, cast to the dtype of model and ``y``, if given) broadcast to
    ``batch_shape``: the per-member arguments :func:`_map_batch` maps with the model."""
    y = jnp.asarray(y)
    args = (jnp.broadcast_to(y, batch_shape + y.shape[-2:]),)
    if inputs is None:
        return args
    inputs = jnp.asarray(inputs).astype(jnp.result_type(model.F.dtype, y.dtype))
    return args + (jnp.broadcast_to(inputs, batch_shape + inputs.shape[-2:]),)


def _model_batch_shape(model) -> tuple:
    """A model's batch shape (``()`` for a model that does not declare one)."""
    return tuple(getattr(model, "batch_shape", ()))


def _joint_batch_shape(model, y, inputs=None) -> tuple:
    """Broadcast batch shape of the model, of ``y`` (``batch + (T, m)``) and of ``inputs``
    (``batch + (T, p)``, if given).

    Raises:
        ValueError: ``y`` of rank < 2, or batch axes that do not broadcast (naming the shapes).
    """
    if jnp.ndim(y) < 2:
        raise ValueError(f"y must have shape (T, m) (or batch + (T, m)); got y.shape = {jnp.shape(y)}")
    try:
        extra = () if inputs is None else jnp.shape(inputs)[:-2]
        return tuple(np.broadcast_shapes(jnp.shape(y)[:-2], extra, _model_batch_shape(model)))
    except ValueError:
        children = model.tree_flatten()[0]
        described = ", ".join(str(jnp.shape(x)) for x in children if x is not None)
        raise ValueError(f"batch axes of y.shape = {jnp.shape(y)}, of the model's parameters "
                         f"({described}) and of the inputs do not broadcast") from None


def _map_batch(fn, model, batch_shape: tuple, *args):
    """``fn(single_model, *single_args)`` mapped over the leading ``batch_shape`` axes.

    The model's children carry the batch axes its ``leaf_batch_ndims()`` names (broadcast to
    ``batch_shape``); children without batch axes are shared, not copied (``in_axes=None``),
    so a batch of series with one model costs no copies of it. Every leaf of ``args`` carries
    exactly ``batch_shape`` in front. One ``vmap`` over the flattened batch.
    """
    if not batch_shape:
        return fn(model, *args)
    size = math.prod(batch_shape)
    children, aux = model.tree_flatten()
    ndims = model.leaf_batch_ndims() if hasattr(model, "leaf_batch_ndims") else (0,) * len(children)
    leaves, axes = [], []
    for x, nb in zip(children, ndims):
        if x is None or nb == 0:
            leaves.append(x)
            axes.append(None)
        else:
            core = x.shape[nb:]
            leaves.append(jnp.broadcast_to(x, batch_shape + core).reshape((size,) + core))
            axes.append(0)
    flat_args = jax.tree_util.tree_map(
        lambda a: a.reshape((size,) + a.shape[len(batch_shape):]), args)
    out = jax.vmap(lambda ch, *a: fn(type(model).tree_unflatten(aux, ch), *a),
                   in_axes=(axes,) + (0,) * len(args))(leaves, *flat_args)
    return jax.tree_util.tree_map(lambda a: a.reshape(batch_shape + a.shape[1:]), out)


def _check_times(times, y):
    """``times`` must have one entry per row of ``y`` (a static check: shapes only).

    Raises:
        ValueError: naming both shapes.
    """
    if times is not None and tuple(jnp.shape(times)) != (y.shape[-2],):
        raise ValueError(f"times must have shape (T,) with T = {y.shape[-2]} rows of y; got "
                         f"times.shape = {jnp.shape(times)}, y.shape = {y.shape}")


def _from_first(flags):
    """``flags`` (boolean, time on axis 0) made True from their first True on, per column.

    What ``lax.cummax`` gives, as one reduction and a comparison: on XLA:CPU a cumulative
    maximum over ``T`` lowers to a tree of windowed reductions and pads (several kernel
    launches per call; this is one reduction, the comparison fuses into its consumer).
    Measured at T = 1000 against the cumulative maximum, same process: discrete (2, 1)
    log-likelihood 0.77x the time, (4, 2) 0.98x; continuous (2, 1) log-likelihood 0.91x and
    gradient 0.95x; Matérn-3/2 gradient 0.93x.
    """
    index = lax.broadcasted_iota(jnp.int32, flags.shape, 0)
    first = jnp.min(jnp.where(flags, index, flags.shape[0]), axis=0, initial=flags.shape[0])
    return index >= first


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
    return _from_first(bad)


def _steps_params(model: LinearGaussianSSM):
    """Split parameters into constants and per-step (scanned) arrays."""
    const, scanned = {}, {}
    for name in _STEP_PARAMS:
        x = getattr(model, name)
        if x.ndim == _BASE_RANK[name]:
            const[name] = x
        elif x.shape[0] == 1:
            const[name] = x[0]
        else:
            scanned[name] = x
    return const, scanned
