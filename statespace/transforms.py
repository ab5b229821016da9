"""Stable drift matrices as a NumPyro transform, and pytree helpers for NumPyro transforms.

Positive scales, intervals and covariance matrices are NumPyro's own
(``numpyro.distributions.transforms``, ``numpyro.distributions.constraints`` and
``biject_to``): e.g. ``biject_to(constraints.positive)`` is ``ExpTransform()``,
``SoftplusTransform()`` maps onto ``constraints.softplus_positive``,
``biject_to(constraints.interval(a, b))`` is a sigmoid followed by an affine map, and
``biject_to(constraints.positive_definite)`` maps ``n(n+1)/2`` reals onto covariance
matrices. This module adds only what NumPyro lacks:

- :class:`StableMatrix`, a ``numpyro.distributions.transforms.Transform`` from ``ℝ^{n²}`` onto
  drift matrices ``A`` all of whose eigenvalues have real part ``< -eps``, and its codomain
  :class:`StableMatrixConstraint` (:data:`stable_matrix` is the instance with the size taken
  from the value and ``eps = 0``), registered with ``biject_to`` so that
  ``biject_to(stable_matrix)`` is a :class:`StableMatrix`. Both therefore work in
  ``numpyro.param(name, init, constraint=stable_matrix)``, as the support of a
  ``TransformedDistribution`` sampled by NUTS, and with ``TransformReparam``.
- :func:`constrain` and :func:`unconstrain`: apply a pytree of NumPyro transforms or
  constraints (a constraint stands for ``biject_to(constraint)``) to a matching pytree of
  values, as ``statespace.fit(..., constraints=...)`` does.

The stable-matrix map: with ``u ∈ ℝ^{n²}`` split into a lower-triangular ``L`` (the first
``n(n+1)/2`` entries, filled row by row, diagonal on the log scale so ``L_ii = exp(u_ii) > 0``)
and a strictly lower-triangular ``S`` (the last ``n(n-1)/2`` entries, row by row),

    ``A = -(L Lᵀ + eps I) + (S - Sᵀ)``.

The symmetric part ``(A + Aᵀ)/2 = -(L Lᵀ + eps I)`` is negative definite, so for any
eigenpair ``A v = λ v``: ``Re λ ‖v‖² = Re(vᴴ A v) = vᴴ (A + Aᵀ)/2 v < -eps ‖v‖²``. Hence every
eigenvalue has ``Re λ < -eps`` and moreover ``‖e^{A t}‖₂ <= e^{-eps t}`` (the flow is a
contraction). This covers the *dissipative* stable matrices, not every Hurwitz matrix: e.g.
``[[-1, 10], [0, -1]]`` is stable but its symmetric part is indefinite, so the inverse returns
NaN for it. The map is one-to-one onto its image (``n²`` parameters, like ``A``), which keeps
NUTS posteriors free of flat directions.

Example:
    >>> import jax.numpy as jnp
    >>> from numpyro.distributions import constraints
    >>> from statespace import transforms as T
    >>> spec = {"sigma": constraints.positive, "A": T.StableMatrix(2)}
    >>> u = {"sigma": jnp.zeros(()), "A": jnp.zeros(4)}
    >>> p = T.constrain(spec, u)           # sigma = exp(0); A = -I
    >>> float(p["sigma"]), p["A"].tolist()
    (1.0, [[-1.0, 0.0], [0.0, -1.0]])
    >>> back = T.unconstrain(spec, p)      # equals u up to rounding
    >>> bool(jnp.allclose(back["A"], u["A"])), round(float(back["sigma"]), 6)
    (True, 0.0)
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform, biject_to

__all__ = [
    "StableMatrix",
    "StableMatrixConstraint",
    "stable_matrix",
    "constrain",
    "unconstrain",
]


def _check_size(n, eps):
    """Validated ``(n, eps)``: ``n`` a positive int or ``None``, ``eps`` a float ``>= 0``."""
    if n is not None:
        try:
            n = operator.index(n)
        except TypeError:
            raise TypeError(f"n must be an int or None, got {type(n).__name__}") from None
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return n, eps


def _num_tril(n: int) -> int:
    return n * (n + 1) // 2


def _fill_tril(vec, n: int, k: int = 0):
    """``(..., n, n)`` matrix with the (``k``-shifted) lower triangle filled row by row."""
    rows, cols = jnp.tril_indices(n, k=k)
    out = jnp.zeros(vec.shape[:-1] + (n, n), dtype=vec.dtype)
    return out.at[..., rows, cols].set(vec)


def _all_or_nothing(vec):
    """All-NaN where any entry of the last axis is NaN (a failed Cholesky is partly NaN)."""
    ok = jnp.all(jnp.isfinite(vec), axis=-1, keepdims=True)
    return jnp.where(ok, vec, jnp.nan)


def _size_of_vector(shape, n):
    """Matrix size of an unconstrained ``(..., n²)`` shape (checked against ``n``)."""
    shape = tuple(shape)
    size = shape[-1] if shape else None
    root = math.isqrt(size) if size is not None else None
    if size is None or root * root != size or (n is not None and root != n):
        want = "n²" if n is None else f"n² = {n * n}"
        raise ValueError(
            f"StableMatrix expects an unconstrained array whose last axis has length {want}, "
            f"got shape {shape}"
        )
    return root


def _size_of_matrix(shape, n):
    """Matrix size of a constrained ``(..., n, n)`` shape (checked against ``n``)."""
    shape = tuple(shape)
    if len(shape) < 2 or shape[-1] != shape[-2] or (n is not None and shape[-1] != n):
        want = "(..., n, n)" if n is None else f"(..., {n}, {n})"
        raise ValueError(f"expected a square matrix of shape {want}, got shape {shape}")
    return shape[-1]


class StableMatrixConstraint(constraints.Constraint):
    """Matrices ``A`` whose symmetric part is ``< -eps I`` (so ``Re λ(A) < -eps``).

    This is the codomain of :class:`StableMatrix` (see the module docstring), registered with
    ``numpyro.distributions.transforms.biject_to``: ``biject_to(StableMatrixConstraint(n, eps))``
    is ``StableMatrix(n, eps)``. :data:`stable_matrix` is ``StableMatrixConstraint()``.

    Args:
        n: matrix size, or ``None`` to take it from the value.
        eps: margin of stability (``>= 0``).

    Raises:
        ValueError: ``n < 1`` or ``eps < 0``; calling it on a value that is not a square
            ``(..., n, n)`` array.
        TypeError: ``n`` is not an integer.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro.distributions.transforms import biject_to
        >>> from statespace.transforms import StableMatrixConstraint, stable_matrix
        >>> c = StableMatrixConstraint(2, eps=0.1)
        >>> bool(c(jnp.array([[-1.0, 3.0], [-3.0, -1.0]]))), bool(c(-0.05 * jnp.eye(2)))
        (True, False)
        >>> biject_to(c)
        StableMatrix(n=2, eps=0.1)
        >>> # stable but not dissipative: the symmetric part is indefinite
        >>> bool(stable_matrix(jnp.array([[-1.0, 10.0], [0.0, -1.0]])))
        False
    """

    event_dim = 2

    def __init__(self, n: int | None = None, eps: float = 0.0):
        self.n, self.eps = _check_size(n, eps)

    def __call__(self, x):
        x = jnp.asarray(x)
        n = _size_of_matrix(x.shape, self.n)
        sym = (x + jnp.swapaxes(x, -1, -2)) / 2 + self.eps * jnp.eye(n, dtype=x.dtype)
        return jnp.linalg.eigvalsh(sym)[..., -1] < 0

    def feasible_like(self, prototype):
        prototype = jnp.asarray(prototype)
        n = _size_of_matrix(prototype.shape, self.n)
        eye = jnp.eye(n, dtype=prototype.dtype)
        return jnp.broadcast_to(-(1.0 + self.eps) * eye, prototype.shape)

    def tree_flatten(self):
        return (), ((), {"n": self.n, "eps": self.eps})

    def eq(self, other, static=False):
        return (isinstance(other, StableMatrixConstraint) and other.n == self.n
                and other.eps == self.eps)

    def __hash__(self):
        return hash((StableMatrixConstraint, self.n, self.eps))

    def __repr__(self):
        return f"StableMatrixConstraint(n={self.n}, eps={self.eps})"


#: ``StableMatrixConstraint()``: size taken from the value, ``eps = 0``.
stable_matrix = StableMatrixConstraint()


class StableMatrix(Transform):
    """``ℝ^{n²} → `` drift matrices with every eigenvalue's real part ``< -eps``.

    ``A = -(L Lᵀ + eps I) + (S - Sᵀ)`` with ``L`` lower triangular (positive diagonal, from
    the first ``n(n+1)/2`` entries of ``u``, diagonal on the log scale) and ``S`` strictly lower
    triangular (the last ``n(n-1)/2`` entries); see the module docstring. A NumPyro
    ``Transform``: ``t(u)`` is the forward map, ``t.inv(A)`` the inverse (NaN for a matrix whose
    symmetric part is not ``< -eps I``), ``t.log_abs_det_jacobian(u, A)`` the closed-form
    ``log |det ∂A/∂u|`` (flattened ``A``),
    ``n(n+1)/2 · log 2 + Σ_{i=1..n} (n - i + 2) · log L_ii``. Extra leading (batch) axes are
    allowed and it works under ``jit``, ``vmap`` and ``grad``.

    Args:
        n: matrix size, or ``None`` to take it from the input (``u`` has ``n²`` entries).
        eps: margin of stability (``>= 0``); ``eps = 0`` allows eigenvalues arbitrarily close
            to the imaginary axis.

    Raises:
        ValueError: ``n < 1`` or ``eps < 0``; an input whose last axis is not ``n²`` (forward)
            or that is not ``(..., n, n)`` (inverse).
        TypeError: ``n`` is not an integer.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from statespace.transforms import StableMatrix
        >>> t = StableMatrix(2)
        >>> u = jnp.array([0.0, 0.3, -0.2, 1.5])
        >>> A = t(u)
        >>> A.shape, bool(jnp.all(jnp.linalg.eigvals(A).real < 0))
        ((2, 2), True)
        >>> bool(jnp.allclose(t.inv(A), u))
        True
        >>> _, logdet = jnp.linalg.slogdet(jax.jacfwd(t)(u).reshape(4, 4))
        >>> bool(jnp.allclose(t.log_abs_det_jacobian(u, A), logdet))
        True
    """

    domain = constraints.real_vector

    def __init__(self, n: int | None = None, eps: float = 0.0):
        self.n, self.eps = _check_size(n, eps)

    @property
    def codomain(self):
        return StableMatrixConstraint(self.n, self.eps)

    def __call__(self, x):
        u = jnp.asarray(x)
        n = _size_of_vector(u.shape, self.n)
        k = _num_tril(n)
        chol = _fill_tril(u[..., :k], n)
        diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
        chol = chol + jnp.vectorize(jnp.diag, signature="(n)->(n,n)")(jnp.exp(diag) - diag)
        strict = _fill_tril(u[..., k:], n, k=-1)
        sym = chol @ jnp.swapaxes(chol, -1, -2) + self.eps * jnp.eye(n, dtype=chol.dtype)
        return -sym + (strict - jnp.swapaxes(strict, -1, -2))

    def _inverse(self, y):
        a = jnp.asarray(y)
        n = _size_of_matrix(a.shape, self.n)
        at = jnp.swapaxes(a, -1, -2)
        sym = -(a + at) / 2 - self.eps * jnp.eye(n, dtype=a.dtype)
        skew = (a - at) / 2
        chol = jnp.linalg.cholesky(sym)
        diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
        chol = chol + jnp.vectorize(jnp.diag, signature="(n)->(n,n)")(jnp.log(diag) - diag)
        rows, cols = jnp.tril_indices(n)
        strict_rows, strict_cols = jnp.tril_indices(n, k=-1)
        vec = jnp.concatenate(
            [chol[..., rows, cols], skew[..., strict_rows, strict_cols]], axis=-1
        )
        return _all_or_nothing(vec)

    def log_abs_det_jacobian(self, x, y=None, intermediates=None):
        """``log |det ∂ vec(A) / ∂ u|``, shape ``u.shape[:-1]`` (``y`` and ``intermediates``
        are not needed)."""
        u = jnp.asarray(x)
        n = _size_of_vector(u.shape, self.n)
        # (A_ij, A_ji), i > j, are -sym_ij ± skew_ij: |det| 2 per pair; L ↦ vech(L Lᵀ) has
        # |det| 2ⁿ ∏ L_ii^(n-i+1) (1-based i); L_ii = exp(u_ii) adds ∏ L_ii
        i = jnp.arange(n)
        diag_index = i * (i + 3) // 2  # position of L_ii in the row-by-row fill
        weights = (n + 1 - i).astype(u.dtype)
        return _num_tril(n) * math.log(2.0) + jnp.sum(weights * u[..., diag_index], axis=-1)

    def forward_shape(self, shape):
        n = _size_of_vector(shape, self.n)
        return tuple(shape[:-1]) + (n, n)

    def inverse_shape(self, shape):
        n = _size_of_matrix(shape, self.n)
        return tuple(shape[:-2]) + (n * n,)

    def tree_flatten(self):
        return (), ((), {"n": self.n, "eps": self.eps})

    def eq(self, other, static=False):
        return isinstance(other, StableMatrix) and other.n == self.n and other.eps == self.eps

    def __hash__(self):  # static (n, eps): usable as a jit-compiled callable
        return hash((StableMatrix, self.n, self.eps))

    def __repr__(self):
        return f"StableMatrix(n={self.n}, eps={self.eps})"


@biject_to.register(StableMatrixConstraint)
def _biject_to_stable_matrix(constraint):
    return StableMatrix(constraint.n, constraint.eps)


def _is_spec_leaf(x):
    return isinstance(x, (Transform, constraints.Constraint))


def _as_transform(spec):
    """``spec`` itself for a NumPyro transform, ``biject_to(spec)`` for a constraint."""
    if isinstance(spec, Transform):
        return spec
    if isinstance(spec, constraints.Constraint):
        try:
            return biject_to(spec)
        except NotImplementedError:
            raise TypeError(f"NumPyro has no bijection onto the constraint {spec!r}") from None
    raise TypeError(
        "expected a numpyro.distributions.transforms.Transform or a "
        f"numpyro.distributions.constraints.Constraint, got {type(spec).__name__}"
    )


def _map(specs, values, fn, what):
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=_is_spec_leaf)
    try:
        value_leaves = treedef.flatten_up_to(values)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{what} must have the structure of the transforms {treedef}: {err}"
        ) from None
    out = [fn(_as_transform(s), v) for s, v in zip(leaves, value_leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def constrain(transforms, unconstrained):
    """Apply a pytree of NumPyro transforms or constraints to matching unconstrained values.

    Args:
        transforms: a pytree (e.g. a dict) whose leaves are
            ``numpyro.distributions.transforms.Transform`` objects or
            ``numpyro.distributions.constraints.Constraint`` objects (a constraint ``c`` means
            ``biject_to(c)``; use ``constraints.real`` for a free parameter).
        unconstrained: a pytree with the structure of ``transforms`` (arrays at its leaves).

    Returns:
        The pytree of constrained values, ``t(u)`` leaf by leaf.

    Raises:
        ValueError: the two pytrees' structures differ.
        TypeError: a leaf of ``transforms`` is neither a transform nor a constraint, or
            NumPyro has no bijection onto the constraint.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro.distributions import constraints
        >>> from statespace.transforms import StableMatrix, constrain
        >>> p = constrain({"s": constraints.positive, "A": StableMatrix(1)},
        ...               {"s": jnp.zeros(()), "A": jnp.zeros(1)})
        >>> float(p["s"]), p["A"].tolist()
        (1.0, [[-1.0]])
    """
    return _map(transforms, unconstrained, lambda t, u: t(u), "unconstrained")


def unconstrain(transforms, constrained):
    """Inverse of :func:`constrain`: ``t.inv(x)`` leaf by leaf.

    Args:
        transforms: as for :func:`constrain`.
        constrained: a pytree with the structure of ``transforms``.

    Returns:
        The pytree of unconstrained values.

    Raises:
        ValueError: the two pytrees' structures differ.
        TypeError: a leaf of ``transforms`` is neither a transform nor a constraint.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro.distributions import constraints
        >>> from statespace.transforms import StableMatrix, unconstrain
        >>> u = unconstrain({"s": constraints.positive, "A": StableMatrix(1)},
        ...                 {"s": jnp.exp(2.0), "A": -jnp.exp(2.0) * jnp.ones((1, 1))})
        >>> round(float(u["s"]), 6), jnp.round(u["A"], 6).tolist()   # A = −L² with L = e^u
        (2.0, [1.0])
    """
    return _map(transforms, constrained, lambda t, x: t.inv(x), "constrained")
