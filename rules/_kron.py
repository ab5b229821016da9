"""Lazy Kronecker products and Kronecker sums, stored as pytrees of their factors.

Convention (row-major, as ``jnp.kron`` and ``x.reshape``): for ``K = A ⊗ B``

    (A ⊗ B) x = (A X Bᵀ).ravel(),   X = x.reshape(nA_cols, nB_cols),

and with more factors each one acts on its own axis of ``x.reshape(c₁, …, c_N)``.

Why no dense product and no custom rule is needed for gradients: every operation is written
on the factors (one contraction per factor along its own axis, factor-wise solves, factor
determinants), so JAX differentiates each factor's contraction separately. For ``Y = A X Bᵀ``
the cotangents are ``Ā = Ȳ B Xᵀ``, ``B̄ = Ȳᵀ A X``, ``X̄ = Aᵀ Ȳ B``: arrays of the
size of a factor or of x, never of the ``(nA nB)²`` product. The gradient with respect to a
factor is the *structural* gradient: if ``G = ∂f/∂K`` is the dense (*natural*) gradient, then
``∂f/∂A = Σ_{jl} G[(i,j),(k,l)] B[j,l]`` (the contraction of G with B), which is exactly what
``jax.grad`` of the same computation written with ``jnp.kron`` returns. Solves go through
:func:`rules.solve`, whose rules reuse one factorisation per factor.
"""

from __future__ import annotations

import math
from functools import reduce

import jax
import jax.numpy as jnp

from rules._checks import as_float_array, check_square
from rules._expm import expm
from rules._linalg import inv, solve
from rules._precision import full_precision


def _as_factor(i: int, factor) -> jnp.ndarray:
    factor = as_float_array(f"factors[{i}]", factor)
    if factor.ndim != 2:
        raise ValueError(
            f"every Kronecker factor must be a matrix (2-d; vmap over batches); "
            f"got factors[{i}].shape = {factor.shape}"
        )
    return factor


def _apply_factorwise(ops, sizes_in, x):
    """Apply ``ops[i]`` (a map on ``(sizes_in[i], m)`` matrices) along axis i of x.

    x has shape ``(prod(sizes_in),)`` or ``(prod(sizes_in), m)``; the result has the output
    sizes of the ops in the same layout.
    """
    vector = x.ndim == 1
    columns = 1 if vector else x.shape[1]
    t = x.reshape(tuple(sizes_in) + (columns,))
    for axis, op in enumerate(ops):
        moved = jnp.moveaxis(t, axis, 0)
        rest = moved.shape[1:]
        out = op(moved.reshape(moved.shape[0], -1))
        t = jnp.moveaxis(out.reshape((out.shape[0],) + rest), 0, axis)
    out = t.reshape(-1, columns)
    return out[:, 0] if vector else out


def _check_operand(name: str, shape, x, side: str = "right") -> jnp.ndarray:
    x = as_float_array("x", x)
    n = shape[1] if side == "right" else shape[0]
    if x.ndim not in (1, 2) or x.shape[0] != n:
        raise ValueError(
            f"{name} needs x of shape ({n},) or ({n}, m); got {name}.shape = {shape}, "
            f"x.shape = {x.shape}"
        )
    return x


@jax.tree_util.register_pytree_node_class
class Kronecker:
    """Lazy ``F₁ ⊗ F₂ ⊗ … ⊗ F_N`` (N ≥ 2), stored as its factors.

    A registered pytree whose leaves are the factors, so it passes through ``jit``, ``vmap``
    (vmap a batch of factors), ``grad`` (the gradient of a function of a ``Kronecker`` is a
    ``Kronecker`` of per-factor gradients) and optax. Factors may be square or rectangular.
    Nothing here forms the dense product except :meth:`to_dense`.

    Args:
        *factors: two or more 2-d arrays.

    Raises:
        ValueError: fewer than two factors, or a factor that is not 2-d.

    Example:
        >>> import jax
        >>> from rules import kron
        >>> import jax.numpy as jnp, numpy as np
        >>> A = jnp.array([[2.0, 1.0], [0.5, 3.0]])
        >>> B = jnp.array([[1.0, 0.2, 0.0], [0.1, 2.0, 0.3], [0.0, 0.4, 1.5]])
        >>> K = kron(A, B)  # nothing formed
        >>> K, K.shape
        (Kronecker((2, 2) ⊗ (3, 3)), (6, 6))
        >>> x = jnp.arange(6.0)
        >>> bool(np.allclose(K @ x, np.kron(A, B) @ x))
        True
        >>> bool(np.allclose(K.solve(x), np.linalg.solve(np.kron(A, B), x)))
        True
        >>> round(float(K.logdet()), 6), round(float(np.linalg.slogdet(np.kron(A, B))[1]), 6)
        (7.208882, 7.208882)
        >>> # d logdet(A ⊗ B) / dA = nB A^{-T}
        >>> gA, gB = jax.grad(lambda A, B: kron(A, B).logdet(), (0, 1))(A, B)
        >>> bool(np.allclose(gA, 3 * np.linalg.inv(A).T))
        True
        >>> type(jax.grad(lambda K: K.logdet())(K)).__name__  # a Kronecker of factor gradients
        'Kronecker'
    """

    # Makes ``numpy_array @ K`` defer to :meth:`__rmatmul__` instead of coercing K.
    __array_ufunc__ = None

    def __init__(self, *factors):
        if len(factors) < 2:
            raise ValueError(f"Kronecker needs at least two factors; got {len(factors)}")
        self.factors = tuple(_as_factor(i, f) for i, f in enumerate(factors))

    # pytree protocol: the factors are the children; there is no static data.
    def tree_flatten(self):
        return self.factors, None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.factors = tuple(children)
        return obj

    # ----------------------------------------------------------------- structure
    @property
    def shape(self) -> tuple[int, int]:
        """``(Π rows, Π cols)`` of the (never formed) product."""
        return (
            math.prod(f.shape[0] for f in self.factors),
            math.prod(f.shape[1] for f in self.factors),
        )

    @property
    def dtype(self):
        return jnp.result_type(*self.factors)

    @property
    def T(self) -> Kronecker:
        """``(F₁ ⊗ … ⊗ F_N)ᵀ = F₁ᵀ ⊗ … ⊗ F_Nᵀ``."""
        return Kronecker(*(f.T for f in self.factors))

    def __repr__(self) -> str:
        shapes = " ⊗ ".join(str(tuple(f.shape)) for f in self.factors)
        return f"Kronecker({shapes})"

    def _require_square(self, what: str) -> None:
        for i, f in enumerate(self.factors):
            if f.shape[0] != f.shape[1]:
                raise ValueError(
                    f"Kronecker.{what} needs square factors; got factors[{i}].shape = {f.shape}"
                )

    # ----------------------------------------------------------------- products
    @full_precision
    def matmul(self, x):
        """``K @ x`` for x of shape ``(n,)`` or ``(n, m)`` (columns), ``n = K.shape[1]``."""
        x = _check_operand("K", self.shape, x)
        ops = [(lambda f: (lambda t: f @ t))(f) for f in self.factors]
        return _apply_factorwise(ops, [f.shape[1] for f in self.factors], x)

    def __matmul__(self, x):
        if isinstance(x, Kronecker):
            return self.kron_matmul(x)
        return self.matmul(x)

    def __rmatmul__(self, x):
        """``x @ K`` for x of shape ``(m,)`` or ``(p, m)``, as ``(Kᵀ @ xᵀ)ᵀ``."""
        x = as_float_array("x", x)
        if x.ndim not in (1, 2) or x.shape[-1] != self.shape[0]:
            raise ValueError(
                f"x @ K needs x of shape ({self.shape[0]},) or (p, {self.shape[0]}); "
                f"got K.shape = {self.shape}, x.shape = {x.shape}"
            )
        return (self.T.matmul(x.T)).T

    @full_precision
    def kron_matmul(self, other: Kronecker) -> Kronecker:
        """``(⊗ Aᵢ)(⊗ Bᵢ) = ⊗ (Aᵢ Bᵢ)`` for matching factor structure."""
        if len(other.factors) != len(self.factors) or any(
            a.shape[1] != b.shape[0] for a, b in zip(self.factors, other.factors)
        ):
            raise ValueError(
                f"factor-wise product needs matching factors; got {self!r} @ {other!r}"
            )
        return Kronecker(*(a @ b for a, b in zip(self.factors, other.factors)))

    def to_dense(self) -> jnp.ndarray:
        """The dense ``(Π rows, Π cols)`` product (for tests and small sizes only)."""
        return reduce(jnp.kron, self.factors)

    # ----------------------------------------------------------------- solves
    def solve(self, b, *, assume_a: str = "gen"):
        """``K⁻¹ b = (F₁⁻¹ ⊗ … ⊗ F_N⁻¹) b`` by one factor-wise :func:`rules.solve` per factor.

        Args:
            b: ``(n,)`` or ``(n, m)``.
            assume_a: passed to :func:`rules.solve` for every factor (``"pos"`` for
                symmetric positive definite factors).

        Returns:
            x with ``K x = b``, b's shape; NaN if a factor is singular.
        """
        self._require_square("solve")
        b = _check_operand("K.solve", self.shape, b)
        ops = [(lambda f: (lambda t: solve(f, t, assume_a=assume_a)))(f) for f in self.factors]
        return _apply_factorwise(ops, [f.shape[0] for f in self.factors], b)

    def inv(self, *, assume_a: str = "gen") -> Kronecker:
        """``K⁻¹ = F₁⁻¹ ⊗ … ⊗ F_N⁻¹`` (a ``Kronecker``), each by :func:`rules.inv`."""
        self._require_square("inv")
        return Kronecker(*(inv(f, assume_a=assume_a) for f in self.factors))

    def cholesky(self) -> Kronecker:
        """Lower Cholesky factor ``chol(F₁) ⊗ … ⊗ chol(F_N)`` (factors symmetric positive
        definite; a Kronecker of lower-triangular factors is lower triangular)."""
        self._require_square("cholesky")
        return Kronecker(*(jnp.linalg.cholesky(f) for f in self.factors))

    # ----------------------------------------------------------------- scalars
    def slogdet(self):
        """``(sign, log|det K|)`` with ``log|det K| = Σᵢ (n / nᵢ) log|det Fᵢ|``, ``n = Π nᵢ``,
        and ``sign = Π sign(det Fᵢ)^(n / nᵢ)``."""
        self._require_square("slogdet")
        n = self.shape[0]
        sign = jnp.ones((), self.dtype)
        logabs = jnp.zeros((), self.dtype)
        for f in self.factors:
            s, l = jnp.linalg.slogdet(f)
            power = n // f.shape[0]
            sign = sign * (s if power % 2 else s * s)
            logabs = logabs + power * l
        return sign, logabs

    def logdet(self):
        """``log det K``; NaN if ``det K < 0`` and ``-inf`` if K is singular."""
        sign, logabs = self.slogdet()
        return jnp.where(sign > 0, logabs, jnp.where(sign == 0, -jnp.inf, jnp.nan))

    def diag(self) -> jnp.ndarray:
        """The diagonal, ``diag(F₁) ⊗ … ⊗ diag(F_N)`` (a vector of length n)."""
        self._require_square("diag")
        return reduce(lambda a, b: (a[:, None] * b[None, :]).ravel(),
                      [jnp.diagonal(f) for f in self.factors])

    def trace(self):
        """``tr K = Π tr Fᵢ``."""
        self._require_square("trace")
        return reduce(lambda a, b: a * b, [jnp.trace(f) for f in self.factors])


@jax.tree_util.register_pytree_node_class
class KroneckerSum:
    """Lazy Kronecker sum ``A ⊕ B = A ⊗ I_nB + I_nA ⊗ B`` of square A and B.

    ``(A ⊕ B) x = (A X + X Bᵀ).ravel()`` with ``X = x.reshape(nA, nB)``; the vectorised
    Lyapunov operator is ``A ⊕ A``. ``rules.expm`` of a Kronecker sum is
    ``kron(expm(A), expm(B))`` (the two terms commute), through :meth:`__rules_expm__`.

    Args:
        A: ``(nA, nA)``.
        B: ``(nB, nB)``.

    Raises:
        ValueError: if A or B is not a square matrix.

    Example:
        >>> from rules import kron_sum
        >>> import jax.numpy as jnp, numpy as np
        >>> A = jnp.array([[2.0, 1.0], [0.5, 3.0]])
        >>> B = jnp.array([[1.0, 0.2, 0.0], [0.1, 2.0, 0.3], [0.0, 0.4, 1.5]])
        >>> S = kron_sum(A, B)
        >>> bool(np.allclose(S.to_dense(), np.kron(A, np.eye(3)) + np.kron(np.eye(2), B)))
        True
        >>> x = jnp.arange(6.0)  # (A ⊕ B) x = (A X + X Bᵀ).ravel()
        >>> X = x.reshape(2, 3)
        >>> bool(np.allclose(S @ x, (A @ X + X @ B.T).ravel()))
        True
    """

    def __init__(self, A, B):
        A, B = _as_factor(0, A), _as_factor(1, B)
        check_square("A", A)
        check_square("B", B)
        self.A, self.B = A, B

    def tree_flatten(self):
        return (self.A, self.B), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.A, obj.B = children
        return obj

    @property
    def shape(self) -> tuple[int, int]:
        n = self.A.shape[0] * self.B.shape[0]
        return (n, n)

    @property
    def dtype(self):
        return jnp.result_type(self.A, self.B)

    @property
    def T(self) -> KroneckerSum:
        return KroneckerSum(self.A.T, self.B.T)

    def __repr__(self) -> str:
        return f"KroneckerSum({tuple(self.A.shape)} ⊕ {tuple(self.B.shape)})"

    @full_precision
    def matmul(self, x):
        """``(A ⊕ B) x`` for x of shape ``(n,)`` or ``(n, m)``."""
        x = _check_operand("KroneckerSum", self.shape, x)
        nA, nB = self.A.shape[0], self.B.shape[0]
        vector = x.ndim == 1
        X = x.reshape(nA, nB, -1)
        Y = jnp.einsum("ij,jkm->ikm", self.A, X) + jnp.einsum("lk,jkm->jlm", self.B, X)
        Y = Y.reshape(nA * nB, -1)
        return Y[:, 0] if vector else Y

    def __matmul__(self, x):
        return self.matmul(x)

    def to_dense(self) -> jnp.ndarray:
        nA, nB = self.A.shape[0], self.B.shape[0]
        dtype = self.dtype
        return jnp.kron(self.A, jnp.eye(nB, dtype=dtype)) + jnp.kron(
            jnp.eye(nA, dtype=dtype), self.B
        )

    def __rules_expm__(self) -> Kronecker:
        """``expm(A ⊕ B) = expm(A) ⊗ expm(B)``: what ``rules.expm`` returns for this type."""
        return Kronecker(expm(self.A), expm(self.B))


def kron(*factors) -> Kronecker:
    """Lazy Kronecker product ``F₁ ⊗ … ⊗ F_N`` of two or more matrices.

    Args:
        *factors: 2-d arrays (square or rectangular).

    Returns:
        A :class:`Kronecker` operator (``@``, ``.T``, ``.solve``, ``.inv``, ``.cholesky``,
        ``.logdet``, ``.diag``, ``.trace``, ``.to_dense``).

    Raises:
        ValueError: fewer than two factors, or a factor that is not 2-d.

    Example:
        >>> import jax
        >>> from rules import kron
        >>> import jax.numpy as jnp, numpy as np
        >>> A = jnp.array([[2.0, 1.0], [0.5, 3.0]])
        >>> B = jnp.array([[1.0, 0.2, 0.0], [0.1, 2.0, 0.3], [0.0, 0.4, 1.5]])
        >>> x, y = jnp.ones(6), jnp.arange(6.0)
        >>> loss = lambda A, B: 0.5 * jnp.sum((kron(A, B) @ x - y) ** 2)
        >>> gA, gB = jax.grad(loss, (0, 1))(A, B)  # per-factor (structural) gradients
        >>> dense = lambda A, B: 0.5 * jnp.sum((jnp.kron(A, B) @ x - y) ** 2)
        >>> dA, dB = jax.grad(dense, (0, 1))(A, B)  # the same through the dense product
        >>> gA.shape, gB.shape, bool(np.allclose(gA, dA)), bool(np.allclose(gB, dB))
        ((2, 2), (3, 3), True, True)
    """
    return Kronecker(*factors)


def kron_sum(A, B) -> KroneckerSum:
    """Lazy Kronecker sum ``A ⊕ B = A ⊗ I + I ⊗ B`` (A, B square).

    Example:
        >>> from scipy.linalg import expm
        >>> import rules
        >>> import jax.numpy as jnp, numpy as np
        >>> A = jnp.array([[2.0, 1.0], [0.5, 3.0]])
        >>> B = jnp.array([[1.0, 0.2, 0.0], [0.1, 2.0, 0.3], [0.0, 0.4, 1.5]])
        >>> S = rules.kron_sum(A, B)
        >>> S, S.shape
        (KroneckerSum((2, 2) ⊕ (3, 3)), (6, 6))
        >>> E = rules.expm(S)  # == kron(expm(A), expm(B)), a Kronecker
        >>> type(E).__name__, bool(np.allclose(E.to_dense(), expm(S.to_dense())))
        ('Kronecker', True)
    """
    return KroneckerSum(A, B)
