"""Custom forward- and reverse-mode derivative rules for the matrix functions that
continuous-time state-space models need.

Every function here works under ``jit`` and ``vmap``, accepts leading batch dimensions,
runs in float32 and float64, and has derivative rules defined on the solution (not by
differentiating an iteration), so ``jax.jvp``, ``jax.vjp`` and second derivatives all work.
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
