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
    """Lower Cholesky factor; NaN (never an exception) when ``S`` is not positive definite.

    Example:
        >>> from rules._unrolled import UNROLL_MAX, cholesky
        >>> import jax.numpy as jnp, numpy as np
        >>> S = jnp.array([[4.0, 2.0, 0.4], [2.0, 5.0, 1.0], [0.4, 1.0, 3.0]])
        >>> bool(np.allclose(cholesky(S), np.linalg.cholesky(S)))
        True
        >>> cholesky(jnp.stack([S, 4 * S])).shape  # leading axes batch
        (2, 3, 3)
        >>> bool(jnp.isnan(cholesky(jnp.array([[1.0, 2.0], [2.0, 1.0]]))).any())  # indefinite
        True
        >>> big = 4.0 * jnp.eye(UNROLL_MAX + 1)  # larger than UNROLL_MAX: LAPACK
        >>> bool(np.allclose(cholesky(big), 2.0 * np.eye(UNROLL_MAX + 1)))
        True
    """
    m = S.shape[-1]
    if m > UNROLL_MAX:
        return jnp.linalg.cholesky(S)
    return assemble_lower(cholesky_entries(S), S)


def cholesky_entries(S):
    """Unrolled Cholesky of a small ``S`` as nested lists of scalars ``cols[i][j]`` (i >= j).

    Example:
        >>> from rules._unrolled import cholesky_entries
        >>> import jax.numpy as jnp, numpy as np
        >>> S = jnp.array([[4.0, 2.0, 0.4], [2.0, 5.0, 1.0], [0.4, 1.0, 3.0]])
        >>> cols = cholesky_entries(S)  # L[0, 0] = sqrt(4), L[1, 0] = 2 / 2; none above
        >>> round(float(cols[0][0]), 6), round(float(cols[1][0]), 6), cols[0][1]
        (2.0, 1.0, None)
    """
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
    zeros above the diagonal (``like``: an array ``(..., m, m)``, e.g. the factored matrix,
    whose leading axes and dtype the zeros take).

    Example:
        >>> from rules._unrolled import assemble_lower, cholesky_entries
        >>> import jax.numpy as jnp, numpy as np
        >>> S = jnp.array([[4.0, 2.0, 0.4], [2.0, 5.0, 1.0], [0.4, 1.0, 3.0]])
        >>> L = assemble_lower(cholesky_entries(S), S)
        >>> bool(np.allclose(L, np.linalg.cholesky(S))), bool(np.allclose(L @ L.T, S))
        (True, True)
    """
    m = len(cols)
    zero = jnp.zeros_like(like[..., 0, 0])
    rows = [
        jnp.stack([cols[i][j] if j <= i else zero for j in range(m)], axis=-1) for i in range(m)
    ]
    return jnp.stack(rows, axis=-2)
