"""Maps between unconstrained real parameters and constrained model parameters.

Optimisers (``statespace.fit``) and NUTS work best on unconstrained ``ℝᵖ``; models need
positive scales, covariance matrices and stable drift matrices. Each transform here is a
small immutable object with

- ``forward(u)``: unconstrained array -> constrained value (also ``transform(u)``),
- ``inverse(x)``: constrained value -> unconstrained array,
- ``log_abs_det_jacobian(u)``: ``log |det ∂ forward / ∂ u|`` (for priors stated on the
  constrained value while sampling the unconstrained one),
- ``unconstrained_shape``: the trailing shape of ``u``.

All accept extra leading (batch) axes on ``u`` and ``x`` and work under ``jit``, ``vmap`` and
``grad``. :func:`constrain` and :func:`unconstrain` apply a dict (or any pytree) of transforms
to a matching pytree of values.

Transforms:

- :class:`Positive`: ``x = softplus(u)`` (default; gradients stay bounded for large ``u``)
  or ``x = exp(u)``, optionally shifted by ``lower``.
- :class:`Interval`: ``x = low + (high - low) · sigmoid(u)``.
- :class:`CholeskyCovariance`: ``u ∈ ℝ^{n(n+1)/2}`` fills a lower-triangular ``L`` row by
  row with the diagonal on the log scale, ``L_ii = exp(u_ii)``; ``Σ = L Lᵀ``. One-to-one onto
  the symmetric positive-definite matrices.
- :class:`StableMatrix`: a drift matrix ``A`` all of whose eigenvalues have real part
  ``<= -eps``. With ``u ∈ ℝ^{n²}`` split into a lower-triangular ``L`` (``n(n+1)/2`` entries,
  log diagonal) and a strictly lower ``S`` (``n(n-1)/2`` entries),

  ``A = -(L Lᵀ + eps I) + (S - Sᵀ)``.

  The symmetric part ``(A + Aᵀ)/2 = -(L Lᵀ + eps I)`` is negative definite, so for any
  eigenpair ``A v = λ v``: ``Re λ ‖v‖² = Re(vᴴ A v) = vᴴ (A + Aᵀ)/2 v <= -eps ‖v‖²``. Hence
  every eigenvalue has ``Re λ <= -eps`` and moreover ``‖e^{A t}‖₂ <= e^{-eps t}`` (the flow
  is a contraction). This covers the *dissipative* stable matrices, not every Hurwitz
  matrix: e.g. ``[[-1, 10], [0, -1]]`` is stable but its symmetric part is indefinite, so
  ``inverse`` returns NaN for it. The map is one-to-one onto its image (``n²`` parameters,
  like ``A``), which keeps NUTS posteriors free of flat directions.

Example:
    >>> import jax.numpy as jnp
    >>> from statespace import transforms as T
    >>> spec = {"sigma": T.Positive(), "A": T.StableMatrix(2)}
    >>> u = {"sigma": jnp.zeros(()), "A": jnp.zeros(4)}
    >>> p = T.constrain(spec, u)           # p["A"] has eigenvalues with negative real part
    >>> u_back = T.unconstrain(spec, p)    # equals u up to rounding
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = [
    "Transform",
    "Identity",
    "Positive",
    "Interval",
    "CholeskyCovariance",
    "StableMatrix",
    "constrain",
    "unconstrain",
    "fill_tril",
    "tril_to_vec",
    "softplus_inverse",
]


def softplus_inverse(x):
    """Inverse of ``softplus``: ``u = x + log(-expm1(-x))`` for ``x > 0`` (NaN for ``x <= 0``).

    Written this way it neither overflows for large ``x`` nor loses digits for small ``x``.
    """
    x = jnp.asarray(x)
    return jnp.where(x > 0, x + jnp.log(-jnp.expm1(-jnp.where(x > 0, x, 1.0))), jnp.nan)


def _num_tril(n: int) -> int:
    return n * (n + 1) // 2


def fill_tril(vec, n: int, *, log_diagonal: bool = False):
    """Fill an ``(..., n, n)`` lower-triangular matrix row by row from ``vec (..., n(n+1)/2)``.

    Args:
        vec: array whose last axis has length ``n(n+1)/2``.
        n: matrix size.
        log_diagonal: exponentiate the diagonal entries (gives a positive diagonal).

    Returns:
        Lower-triangular array of shape ``vec.shape[:-1] + (n, n)``.

    Raises:
        ValueError: the last axis of ``vec`` is not ``n(n+1)/2``.
    """
    vec = jnp.asarray(vec)
    if vec.ndim < 1 or vec.shape[-1] != _num_tril(n):
        raise ValueError(
            f"expected last axis of length n(n+1)/2 = {_num_tril(n)} for n={n}, "
            f"got shape {vec.shape}"
        )
    rows, cols = jnp.tril_indices(n)
    out = jnp.zeros(vec.shape[:-1] + (n, n), dtype=vec.dtype).at[..., rows, cols].set(vec)
    if log_diagonal:
        diag = jnp.diagonal(out, axis1=-2, axis2=-1)
        out = out + jnp.vectorize(jnp.diag, signature="(n)->(n,n)")(jnp.exp(diag) - diag)
    return out


def tril_to_vec(mat, *, log_diagonal: bool = False):
    """Inverse of :func:`fill_tril`: the lower triangle of ``mat (..., n, n)`` row by row."""
    mat = jnp.asarray(mat)
    if mat.ndim < 2 or mat.shape[-1] != mat.shape[-2]:
        raise ValueError(f"expected a square matrix (..., n, n), got shape {mat.shape}")
    n = mat.shape[-1]
    if log_diagonal:
        diag = jnp.diagonal(mat, axis1=-2, axis2=-1)
        mat = mat + jnp.vectorize(jnp.diag, signature="(n)->(n,n)")(jnp.log(diag) - diag)
    rows, cols = jnp.tril_indices(n)
    return mat[..., rows, cols]


def _all_or_nothing(vec):
    """All-NaN where any entry of the last axis is NaN (a failed Cholesky is partly NaN)."""
    ok = jnp.all(jnp.isfinite(vec), axis=-1, keepdims=True)
    return jnp.where(ok, vec, jnp.nan)


class Transform:
    """Base class: subclasses define ``forward``, ``inverse`` and ``unconstrained_shape``."""

    #: trailing shape of the unconstrained array
    unconstrained_shape: tuple = ()
    #: trailing shape of the constrained value
    constrained_shape: tuple = ()

    def forward(self, u):  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, u):
        return self.forward(u)

    def log_abs_det_jacobian(self, u):
        """``log |det ∂ forward(u) / ∂ u|`` over the trailing unconstrained axes.

        The generic version forms the dense Jacobian of the flattened map (fine for the small
        parameter blocks of state-space models); subclasses override it with closed forms.
        """
        u = jnp.asarray(u)
        k = len(self.unconstrained_shape)
        batch = u.shape[: u.ndim - k]

        def single(v):
            flat = v.reshape(-1)

            def f(w):
                return self.forward(w.reshape(v.shape)).reshape(-1)

            jac = jax.jacfwd(f)(flat)
            if jac.shape[0] != jac.shape[1]:
                # embedding into a larger space (e.g. symmetric matrices): use the free
                # coordinates, the image of the lower triangle
                idx = self._free_output_indices()
                jac = jac[idx, :]
            return jnp.linalg.slogdet(jac)[1]

        flat_u = u.reshape((-1,) + u.shape[u.ndim - k :])
        return jax.vmap(single)(flat_u).reshape(batch)

    def _free_output_indices(self):  # pragma: no cover - overridden where needed
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Identity(Transform):
    """``x = u`` (for parameters that are already unconstrained)."""

    def forward(self, u):
        return jnp.asarray(u)

    def inverse(self, x):
        return jnp.asarray(x)

    def log_abs_det_jacobian(self, u):
        return jnp.zeros(jnp.shape(u))


@dataclasses.dataclass(frozen=True)
class Positive(Transform):
    """Positive values ``x = lower + softplus(u)`` (or ``lower + exp(u)``).

    Args:
        kind: ``"softplus"`` (default) or ``"exp"``.
        lower: lower bound (default 0).

    Example:
        >>> Positive().forward(0.0)   # log(2)
        >>> Positive("exp").inverse(1.0)   # 0.0
    """

    kind: str = "softplus"
    lower: float = 0.0

    def __post_init__(self):
        if self.kind not in ("softplus", "exp"):
            raise ValueError(f"kind must be 'softplus' or 'exp', got {self.kind!r}")

    def forward(self, u):
        u = jnp.asarray(u)
        core = jax.nn.softplus(u) if self.kind == "softplus" else jnp.exp(u)
        return self.lower + core

    def inverse(self, x):
        y = jnp.asarray(x) - self.lower
        return softplus_inverse(y) if self.kind == "softplus" else jnp.log(y)

    def log_abs_det_jacobian(self, u):
        u = jnp.asarray(u)
        return jax.nn.log_sigmoid(u) if self.kind == "softplus" else u


@dataclasses.dataclass(frozen=True)
class Interval(Transform):
    """Values in ``(low, high)``: ``x = low + (high - low) · sigmoid(u)``."""

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if not self.high > self.low:
            raise ValueError(f"need high > low, got low={self.low}, high={self.high}")

    def forward(self, u):
        return self.low + (self.high - self.low) * jax.nn.sigmoid(jnp.asarray(u))

    def inverse(self, x):
        p = (jnp.asarray(x) - self.low) / (self.high - self.low)
        return jnp.log(p) - jnp.log1p(-p)

    def log_abs_det_jacobian(self, u):
        u = jnp.asarray(u)
        return jnp.log(self.high - self.low) + jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-u)


@dataclasses.dataclass(frozen=True)
class CholeskyCovariance(Transform):
    """Symmetric positive-definite ``(n, n)`` matrices ``Σ = L Lᵀ``.

    ``u`` (length ``n(n+1)/2``) fills ``L`` row by row; the diagonal is stored on the log
    scale, so ``L_ii = exp(u_ii) > 0`` and the map is one-to-one. ``inverse`` takes the
    Cholesky factor (NaN for a matrix that is not positive definite). ``cholesky(u)`` returns
    ``L`` itself, for square-root filters.

    Args:
        n: matrix size.
    """

    n: int

    @property
    def unconstrained_shape(self):
        return (_num_tril(self.n),)

    @property
    def constrained_shape(self):
        return (self.n, self.n)

    def cholesky(self, u):
        """The lower-triangular factor ``L`` with positive diagonal."""
        return fill_tril(u, self.n, log_diagonal=True)

    def forward(self, u):
        chol = self.cholesky(u)
        return chol @ jnp.swapaxes(chol, -1, -2)

    def inverse(self, x):
        x = jnp.asarray(x)
        if x.shape[-2:] != (self.n, self.n):
            raise ValueError(f"expected (..., {self.n}, {self.n}), got shape {x.shape}")
        return _all_or_nothing(tril_to_vec(jnp.linalg.cholesky(x), log_diagonal=True))

    def _free_output_indices(self):
        rows, cols = jnp.tril_indices(self.n)
        return rows * self.n + cols


@dataclasses.dataclass(frozen=True)
class StableMatrix(Transform):
    """Drift matrices with every eigenvalue's real part ``<= -eps`` (see the module docstring).

    ``A = -(L Lᵀ + eps I) + (S - Sᵀ)`` with ``L`` lower triangular (positive diagonal, from
    the first ``n(n+1)/2`` entries of ``u``, diagonal on the log scale) and ``S`` strictly lower
    triangular (the last ``n(n-1)/2`` entries). ``u`` has ``n²`` entries, as many as ``A``.

    Args:
        n: matrix size.
        eps: margin of stability (``>= 0``); ``eps = 0`` allows eigenvalues arbitrarily close
            to the imaginary axis.

    Example:
        >>> A = StableMatrix(2).forward(jnp.array([0.0, 0.3, -0.2, 1.5]))
        >>> bool(jnp.all(jnp.linalg.eigvals(A).real < 0))   # True
    """

    n: int
    eps: float = 0.0

    def __post_init__(self):
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    @property
    def unconstrained_shape(self):
        return (self.n * self.n,)

    @property
    def constrained_shape(self):
        return (self.n, self.n)

    def _split(self, u):
        u = jnp.asarray(u)
        if u.ndim < 1 or u.shape[-1] != self.n * self.n:
            raise ValueError(
                f"expected last axis of length n² = {self.n * self.n}, got shape {u.shape}"
            )
        k = _num_tril(self.n)
        return u[..., :k], u[..., k:]

    def forward(self, u):
        tril_part, skew_part = self._split(u)
        n = self.n
        chol = fill_tril(tril_part, n, log_diagonal=True)
        rows, cols = jnp.tril_indices(n, k=-1)
        strict = jnp.zeros(skew_part.shape[:-1] + (n, n), dtype=chol.dtype)
        strict = strict.at[..., rows, cols].set(skew_part)
        sym = chol @ jnp.swapaxes(chol, -1, -2) + self.eps * jnp.eye(n, dtype=chol.dtype)
        return -sym + (strict - jnp.swapaxes(strict, -1, -2))

    def inverse(self, x):
        x = jnp.asarray(x)
        n = self.n
        if x.shape[-2:] != (n, n):
            raise ValueError(f"expected (..., {n}, {n}), got shape {x.shape}")
        xt = jnp.swapaxes(x, -1, -2)
        sym = -(x + xt) / 2 - self.eps * jnp.eye(n, dtype=x.dtype)
        skew = (x - xt) / 2
        tril_part = tril_to_vec(jnp.linalg.cholesky(sym), log_diagonal=True)
        rows, cols = jnp.tril_indices(n, k=-1)
        return _all_or_nothing(jnp.concatenate([tril_part, skew[..., rows, cols]], axis=-1))


def _is_transform(x):
    return isinstance(x, Transform)


def constrain(transforms, unconstrained):
    """Apply a pytree of transforms (leaves are :class:`Transform`) to matching values.

    Example:
        >>> constrain({"s": Positive("exp")}, {"s": jnp.zeros(())})   # {"s": 1.0}
    """
    return jax.tree_util.tree_map(
        lambda t, u: t.forward(u), transforms, unconstrained, is_leaf=_is_transform
    )


def unconstrain(transforms, constrained):
    """Inverse of :func:`constrain`."""
    return jax.tree_util.tree_map(
        lambda t, x: t.inverse(x), transforms, constrained, is_leaf=_is_transform
    )
