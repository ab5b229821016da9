"""Batched products of small matrices as one primitive with bilinear derivative rules.

Why a primitive: on XLA:CPU (jax 0.10) a batched ``(T, 4, 4) @ (T, 4, 4)`` runs at about
1 GFlop/s whichever way it is written. ``jnp.matmul`` is a batched dot; the broadcast-multiply-
reduce ``sum(a[..., :, :, None] * b[..., None, :, :], -2)`` is handed to a reduction kernel
that materialises the ``(T, n, n, n)`` product. The sum of ``n`` outer products
``Σ_k a[..., :, k, None] * b[..., None, k, :]`` is plain elementwise work that XLA fuses and
vectorises: 3-4× faster (measured in ``rules/_expm.py`` and for the per-step compositions of
``statespace.discretize``). Autodiff of that form is slow, though: the reverse pass of each
column slice is a ``pad`` to the full operand, and a product's VJP became 3× its forward.

So the product is a primitive whose forward lowering is the outer-product sum and whose JVP
and transpose are again the primitive (``ad.defbilinear``): for ``C = A B``,
``dC = dA B + A dB``, ``Ā = C̄ Bᵀ``, ``B̄ = Aᵀ C̄`` (Giles 2008, section 2.2.2). Forward mode,
reverse mode and every higher order stay products of the same fast kind.

Above ``SMALL_MATMUL_MAX`` (n = 8 in ``statespace.discretize``) the lowering is a batched dot
between optimisation barriers. Without them XLA folds the transposes of the derivative rules
(``Bᵀ``, ``Aᵀ``, and the transposed results) into the dot's dimension numbers, and XLA:CPU ran
those transposed batched dots 3-4× slower than plain ones. Measured for the compositions of
the n = 8 discretisation at T = 1000: VJP 2.66 → 1.63 ms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["small_matmul", "SMALL_MATMUL_MAX"]

# Up to this size the unrolled outer-product sum is used (n² (2n−1) scalar operations per
# product unrolled into the program); beyond it a batched dot is as fast and compiles to less.
SMALL_MATMUL_MAX = 6
# The unrolled form compiles to ~6n HLO operations per product instead of 3; it is used only
# for stacks this deep, where it pays (the per-interval compositions of a whole series), so
# small step-independent products -- and second-order programs full of them -- keep their
# compile time (the unrolled form everywhere added 18-28 s to two second-order tests).
_UNROLL_MIN_BATCH = 128


def _lowering(a, b):
    """A sum of ``n`` outer products for deep stacks of tiny matrices, one reduction for
    shallow ones, and a batched dot behind an optimisation barrier for larger matrices."""
    if max(a.shape[-2:] + b.shape[-1:]) > SMALL_MATMUL_MAX:
        # The barrier keeps XLA from folding the transposes of the derivative rules (Bᵀ, Aᵀ)
        # into the dot: a batched dot with a transposed operand ran 3-4× slower on XLA:CPU
        # (reverse pass of three (1000, 8, 8) products: 3.1 ms folded, 0.9 ms with it).
        a, b = lax.optimization_barrier((a, b))
        # explicit precision: a lowering is traced outside any default_matmul_precision
        # context (rules/_precision.py), and float32 on tensor-core GPUs would get TF32
        return lax.optimization_barrier(jnp.matmul(a, b, precision=lax.Precision.HIGHEST))
    if int(np.prod(a.shape[:-2])) < _UNROLL_MIN_BATCH:
        return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)
    return sum(a[..., :, k, None] * b[..., None, k, :] for k in range(a.shape[-1]))


_small_matmul_p = Primitive("small_matmul")
_small_matmul_p.def_impl(jax.jit(_lowering))


@_small_matmul_p.def_abstract_eval
def _abstract_eval(a, b):
    return jax.core.ShapedArray(a.shape[:-1] + b.shape[-1:], a.dtype)


mlir.register_lowering(_small_matmul_p, mlir.lower_fun(_lowering, multiple_results=False))


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


# d(A B) = dA B + A dB; transposes: Ā = C̄ Bᵀ, B̄ = Aᵀ C̄ (operands have equal batch shapes).
ad.defbilinear(
    _small_matmul_p,
    lambda ct, a, b: _small_matmul_p.bind(ct, _swap(b)),
    lambda ct, a, b: _small_matmul_p.bind(_swap(a), ct),
)


def _batch_rule(args, dims):
    a, b = args
    da, db = dims
    size = a.shape[da] if da is not None else b.shape[db]

    def batch_first(x, d):
        if d is None:
            return jnp.broadcast_to(x, (size,) + x.shape)
        return jnp.moveaxis(x, d, 0)

    return _small_matmul_p.bind(batch_first(a, da), batch_first(b, db)), 0


batching.primitive_batchers[_small_matmul_p] = _batch_rule


def small_matmul(a, b):
    """``a @ b`` for stacks of small matrices, fast on XLA:CPU in every derivative order.

    Args:
        a: ``(..., n, k)`` array.
        b: ``(..., k, p)`` array of the same dtype; leading axes broadcast against ``a``'s.

    Returns:
        ``(..., n, p)``: the batched product (an outer-product sum up to
        :data:`SMALL_MATMUL_MAX`, a batched dot beyond).

    Raises:
        ValueError: if the inner dimensions differ.

    Example:
        >>> import jax.numpy as jnp
        >>> from rules._smallmm import small_matmul
        >>> a = jnp.arange(60.0).reshape(10, 2, 3)
        >>> b = jnp.arange(6.0).reshape(3, 2)
        >>> small_matmul(a, b).shape
        (10, 2, 2)
        >>> bool(jnp.allclose(small_matmul(a, b), a @ b))
        True
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"small_matmul needs (..., n, k) @ (..., k, p); got {a.shape} @ {b.shape}")
    dtype = jnp.result_type(a, b)
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = jnp.broadcast_to(a.astype(dtype), batch + a.shape[-2:])
    b = jnp.broadcast_to(b.astype(dtype), batch + b.shape[-2:])
    return _small_matmul_p.bind(a, b)
