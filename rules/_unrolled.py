"""Unrolled small dense linear algebra: Cholesky factors written as scalar arithmetic.

For matrices up to ``UNROLL_MAX`` the factorisation is a short chain of scalar operations
that XLA fuses into its consumers (inside a ``lax.scan`` step: no LAPACK call, no kernel of
its own); larger ones go through LAPACK. Leading axes batch.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["UNROLL_MAX", "assemble_lower", "cholesky", "cholesky_entries"]

# Matrices up to this size are factored / solved with unrolled scalar code that XLA fuses
# into the scan step; larger ones go through LAPACK.
UNROLL_MAX = 8


def cholesky(S):
    """Lower Cholesky factor; NaN (never an exception) when ``S`` is not positive definite."""
    m = S.shape[-1]
    if m > UNROLL_MAX:
        return jnp.linalg.cholesky(S)
    return assemble_lower(cholesky_entries(S), S)


def cholesky_entries(S):
    """Unrolled Cholesky of a small ``S`` as nested lists of scalars ``cols[i][j]`` (i >= j)."""
    m = S.shape[-1]
    cols = [[None] * m for _ in range(m)]
    for j in range(m):
        acc = S[..., j, j]
        for k in range(j):
            acc = acc - cols[j][k] * cols[j][k]
        ljj = jnp.sqrt(acc)
        cols[j][j] = ljj
        inv = 1.0 / ljj
        for i in range(j + 1, m):
            acc = S[..., i, j]
            for k in range(j):
                acc = acc - cols[i][k] * cols[j][k]
            cols[i][j] = acc * inv
    return cols


def assemble_lower(cols, like):
    """The lower-triangular matrix ``(..., m, m)`` with entries ``cols[i][j]`` (i >= j) and
    zeros above the diagonal (``like``: an array of the entries' shape and dtype)."""
    m = len(cols)
    zero = jnp.zeros_like(like[..., 0, 0])
    rows = [
        jnp.stack([cols[i][j] if j <= i else zero for j in range(m)], axis=-1) for i in range(m)
    ]
    return jnp.stack(rows, axis=-2)
