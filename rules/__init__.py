"""Custom forward- and reverse-mode derivative rules for the matrix functions that
continuous-time state-space models need.

Every function here works under ``jit`` and ``vmap``, accepts leading batch dimensions,
runs in float32 and float64, and has derivative rules defined on the solution (not by
differentiating an iteration), so ``jax.jvp``, ``jax.vjp`` and second derivatives all work.

Example:
    >>> import jax, jax.numpy as jnp, rules
    >>> A = jnp.array([[-1.0, 0.5], [0.0, -2.0]])
    >>> P = rules.lyap(A, jnp.eye(2))              # A P + P Aᵀ + I = 0
    >>> # d tr(P) / dA = 2 S P with S = lyap(Aᵀ, I), a second Lyapunov solve
    >>> g = jax.grad(lambda A: jnp.trace(rules.lyap(A, jnp.eye(2))))(A)
    >>> bool(jnp.allclose(g, 2 * rules.lyap(A.T, jnp.eye(2)) @ P))
    True
    >>> d2 = jax.hessian(lambda a: jnp.trace(rules.expm(a * A)))(1.0)   # Σ λ² e^{λ}
    >>> round(float(d2), 6) == round(float(jnp.exp(-1.0) + 4 * jnp.exp(-2.0)), 6)
    True
"""

from rules._expm import expm, expm_frechet
from rules._kron import Kronecker, KroneckerSum, kron, kron_sum
from rules._linalg import inv, solve
from rules._lyap import dlyap, lyap
from rules._tria import tria

__all__ = [
    "Kronecker",
    "KroneckerSum",
    "dlyap",
    "expm",
    "expm_frechet",
    "inv",
    "kron",
    "kron_sum",
    "lyap",
    "solve",
    "tria",
]
