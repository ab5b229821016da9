"""Shared input checks for the rules: shapes and dtypes are checked eagerly (they are static
under ``jit``), and every error names the offending shapes."""

from __future__ import annotations

import jax.numpy as jnp


def as_float_array(name: str, x) -> jnp.ndarray:
    """Return ``x`` as a JAX array of a floating dtype (integers are promoted).

    Raises:
        TypeError: if ``x`` is complex or not numeric.
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real; got dtype {x.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == bool:
            x = x.astype(jnp.result_type(float))
        else:
            raise TypeError(f"{name} must be a real floating array; got dtype {x.dtype}")
    return x


def check_square(name: str, a: jnp.ndarray) -> int:
    """Check that ``a`` has shape ``(..., n, n)`` and return ``n``.

    Raises:
        ValueError: naming the shape, if ``a`` has rank < 2 or is not square.
    """
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must have shape (..., n, n); got {name}.shape = {a.shape}")
    return a.shape[-1]


def check_same_matrix_shape(name_a: str, a: jnp.ndarray, name_b: str, b: jnp.ndarray) -> None:
    """Check that the trailing matrix dims of ``a`` and ``b`` agree.

    Raises:
        ValueError: naming both shapes.
    """
    if b.ndim < 2 or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(
            f"{name_b} must have the same trailing (n, n) shape as {name_a}; "
            f"got {name_a}.shape = {a.shape}, {name_b}.shape = {b.shape}"
        )


def common_dtype(*arrays: jnp.ndarray):
    """The floating dtype the arrays are promoted to."""
    return jnp.result_type(*arrays)
