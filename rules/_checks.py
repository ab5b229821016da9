"""Shared input checks for the rules: shapes and dtypes are checked eagerly (they are static
under ``jit``), and every error names the offending shapes."""

from __future__ import annotations

import jax.numpy as jnp


def as_float_array(name: str, x) -> jnp.ndarray:
    """Return ``x`` as a JAX array of a floating dtype (integers are promoted).

    Args:
        name: the argument's name, for the error message.
        x: array-like.

    Returns:
        ``x`` as a JAX array; integer and boolean inputs are promoted to JAX's default
        floating dtype, floating inputs keep theirs.

    Raises:
        TypeError: if ``x`` is complex or not numeric.

    Example:
        >>> import jax.numpy as jnp
        >>> from rules._checks import as_float_array
        >>> bool(jnp.issubdtype(as_float_array("A", [[1, 2], [3, 4]]).dtype, jnp.floating))
        True
        >>> as_float_array("A", jnp.ones(2, jnp.float32)).dtype
        dtype('float32')
        >>> as_float_array("A", jnp.ones(2, jnp.complex64))
        Traceback (most recent call last):
            ...
        TypeError: A must be real; got dtype complex64
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

    Args:
        name: the argument's name, for the error message.
        a: array.

    Returns:
        ``n``, the size of the trailing square matrices.

    Raises:
        ValueError: naming the shape, if ``a`` has rank < 2 or is not square.

    Example:
        >>> import jax.numpy as jnp
        >>> from rules._checks import check_square
        >>> check_square("A", jnp.zeros((5, 3, 3)))
        3
        >>> check_square("A", jnp.zeros((3, 2)))
        Traceback (most recent call last):
            ...
        ValueError: A must have shape (..., n, n); got A.shape = (3, 2)
    """
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must have shape (..., n, n); got {name}.shape = {a.shape}")
    return a.shape[-1]


def check_same_matrix_shape(name_a: str, a: jnp.ndarray, name_b: str, b: jnp.ndarray) -> None:
    """Check that the trailing matrix dims of ``a`` and ``b`` agree.

    Args:
        name_a: the first argument's name, for the error message.
        a: array of shape ``(..., n, m)``.
        name_b: the second argument's name.
        b: array whose trailing shape must be ``(n, m)``; leading dims are not compared.

    Raises:
        ValueError: naming both shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> from rules._checks import check_same_matrix_shape
        >>> check_same_matrix_shape("A", jnp.zeros((4, 2, 2)), "Q", jnp.eye(2))  # passes
        >>> check_same_matrix_shape("A", jnp.zeros((2, 2)), "Q", jnp.eye(3))
        Traceback (most recent call last):
            ...
        ValueError: Q must have the same trailing (n, n) shape as A; got A.shape = (2, 2), Q.shape = (3, 3)
    """
    if b.ndim < 2 or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(
            f"{name_b} must have the same trailing (n, n) shape as {name_a}; "
            f"got {name_a}.shape = {a.shape}, {name_b}.shape = {b.shape}"
        )


def common_dtype(*arrays: jnp.ndarray):
    """The floating dtype the arrays are promoted to.

    Args:
        *arrays: floating arrays.

    Returns:
        Their common dtype under JAX's promotion rules.

    Example:
        >>> import jax.numpy as jnp
        >>> from rules._checks import common_dtype
        >>> common_dtype(jnp.ones(2, jnp.float32), jnp.ones(2, jnp.float32))
        dtype('float32')
    """
    return jnp.result_type(*arrays)
