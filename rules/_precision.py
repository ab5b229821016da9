"""Full float32 precision for every matrix product this package traces.

On GPUs with tensor cores (A100, H100, H200), XLA runs a float32 matrix product at JAX's
default precision with its inputs rounded to TensorFloat-32 (a 10-bit mantissa), i.e. about
1e-3 relative error per product. On an H200 (jax 0.11.2) that made float32
``lyap(method="sign")`` wrong by 1e-2 and ``dlyap(method="doubling")`` by 0.34 at n = 64, and
``discretize``'s ``Qd`` at small steps wrong by 2e-4. Every public entry point and every
derivative rule is therefore traced under ``jax.default_matmul_precision("highest")``
(products written with an explicit ``precision=`` keep theirs). On CPU, and in float64, this
changes nothing.

The decorator has to sit on derivative rules too, not only on entry points: a rule JAX traces
later (e.g. a ``custom_jvp`` rule reached by ``jax.grad(jax.jit(f))``) is traced outside the
entry point's ``with`` block. ``tests/test_precision.py`` walks the traced programs of the
public functions and their derivatives and fails on any product left at the default.
"""

from __future__ import annotations

import functools

import jax

__all__ = ["full_precision"]


def full_precision(fn):
    """Trace ``fn`` with float32 matrix products at full precision (no TF32 rounding).

    Args:
        fn: function whose body is traced by JAX.

    Returns:
        A function with ``fn``'s signature, name and docstring that runs ``fn`` under
        ``jax.default_matmul_precision("highest")``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from rules._precision import full_precision
        >>> @full_precision
        ... def product(a, b):
        ...     return a @ b
        >>> a = jnp.ones((2, 2), jnp.float32)
        >>> "HIGHEST" in str(jax.make_jaxpr(product)(a, a))      # recorded in the program
        True
        >>> "HIGHEST" in str(jax.make_jaxpr(lambda a, b: a @ b)(a, a))  # the default
        False
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped
