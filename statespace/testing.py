"""Derivative checks users can call in their own notebooks.

``check_derivatives(f, args)`` compares a function's forward-mode (JVP) and reverse-mode (VJP)
derivatives with a reference directional derivative along random directions and reports
the relative error per direction. The reference is, in order of preference:

1. ``reference``: a high-precision version of ``f`` that you supply (for example written
   with mpmath at 30+ digits). The directional derivative is then a central difference of
   the high-precision function with a tiny step, ``(f(x + h v) − f(x − h v)) / 2h`` with
   ``h = 10^(−dps/3)``, whose truncation error ``O(h²)`` and rounding error ``O(10^−dps / h)``
   both sit far below float64 resolution.
2. Otherwise Richardson-extrapolated central differences of ``f`` itself in float64
   (three steps, error ``O(h⁶)``), which are good to roughly 1e-10 relative on smooth,
   well-scaled functions. That is enough to tell a correct derivative (errors ~1e-12)
   from a wrong one, but not to rank two correct ones: use a high-precision reference for
   that.

The VJP is checked through the duality ``⟨ū, J v⟩ = ⟨Jᵀ ū, v⟩``: for a random output
cotangent ``ū`` the reverse-mode result contracted with ``v`` must equal ``ū`` contracted
with the reference directional derivative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DerivativeReport", "check_derivatives", "relative_error"]


class DerivativeReport(NamedTuple):
    """Relative errors of a function's derivatives, one entry per random direction.

    Attributes:
        jvp_errors: ``‖J v − ref‖ / ‖ref‖`` for each direction ``v`` (forward mode).
        vjp_errors: ``|⟨Jᵀū, v⟩ − ⟨ū, ref⟩| / (‖ū‖ ‖ref‖)`` for each direction (reverse mode).
        reference: ``"high-precision"`` or ``"richardson"``.

    Example:
        >>> import numpy as np
        >>> from statespace.testing import DerivativeReport
        >>> report = DerivativeReport(np.array([1e-12, 3e-11]), np.array([2e-10]), "richardson")
        >>> report.max_error
        2e-10
        >>> print(report)
        DerivativeReport(reference=richardson, jvp=[1.00e-12, 3.00e-11], vjp=[2.00e-10])
    """

    jvp_errors: np.ndarray
    vjp_errors: np.ndarray
    reference: str

    @property
    def max_error(self) -> float:
        """The largest error over both modes and all directions."""
        return float(max(np.max(self.jvp_errors), np.max(self.vjp_errors)))

    def __str__(self) -> str:
        fmt = lambda errors: ", ".join(f"{e:.2e}" for e in errors)  # noqa: E731
        return (
            f"DerivativeReport(reference={self.reference}, "
            f"jvp=[{fmt(self.jvp_errors)}], vjp=[{fmt(self.vjp_errors)}])"
        )


def relative_error(value, reference) -> float:
    """``‖value − reference‖ / ‖reference‖`` in float64 (Frobenius over all entries).

    Args:
        value: array-like.
        reference: array-like of the same shape.

    Returns:
        The relative error as a Python float; the absolute error ``‖value‖`` where the
        reference is exactly zero.

    Example:
        >>> from statespace.testing import relative_error
        >>> round(relative_error([3.0, 4.0], [3.0, 0.0]), 6)   # ‖(0, 4)‖ / ‖(3, 0)‖
        1.333333
        >>> relative_error([3.0, 4.0], [0.0, 0.0])   # absolute: ‖(3, 4)‖
        5.0
    """
    value = np.asarray(value, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    scale = np.linalg.norm(reference)
    error = np.linalg.norm(value - reference)
    return float(error / scale) if scale > 0 else float(error)


def _richardson_directional(f: Callable, x: np.ndarray, v: np.ndarray, step: float) -> np.ndarray:
    """Central differences at h, h/2, h/4 combined to cancel the h² and h⁴ terms."""

    def central(h):
        return (np.asarray(f(x + h * v), np.float64) - np.asarray(f(x - h * v), np.float64)) / (2 * h)

    d1, d2, d4 = central(step), central(step / 2), central(step / 4)
    # Richardson: D(h/2) + (D(h/2) − D(h))/3 cancels h²; repeat with factor 15 for h⁴.
    r1 = d2 + (d2 - d1) / 3.0
    r2 = d4 + (d4 - d2) / 3.0
    return r2 + (r2 - r1) / 15.0


def _high_precision_directional(reference: Callable, x: np.ndarray, v: np.ndarray, dps: int):
    import mpmath

    with mpmath.workdps(dps):
        h = mpmath.mpf(10) ** (-(dps // 3))
        xp = [mpmath.mpf(float(a)) + h * mpmath.mpf(float(b)) for a, b in zip(x.ravel(), v.ravel())]
        xm = [mpmath.mpf(float(a)) - h * mpmath.mpf(float(b)) for a, b in zip(x.ravel(), v.ravel())]
        fp = reference(np.array(xp, dtype=object).reshape(x.shape))
        fm = reference(np.array(xm, dtype=object).reshape(x.shape))
        diff = (np.asarray(fp, dtype=object) - np.asarray(fm, dtype=object)) / (2 * h)
        return np.vectorize(float, otypes=[np.float64])(diff)


def check_derivatives(
    f: Callable,
    args: Sequence,
    *,
    argnum: int = 0,
    num_directions: int = 3,
    reference: Callable | None = None,
    dps: int = 40,
    step: float | None = None,
    seed: int = 0,
) -> DerivativeReport:
    """Compare ``jax.jvp`` and ``jax.vjp`` of ``f`` with a reference along random directions.

    Args:
        f: a JAX function of ``args``; the output may be any array (or scalar).
        args: the point at which to differentiate.
        argnum: which argument to perturb (the others stay fixed).
        num_directions: how many random unit directions (and output cotangents) to try.
        reference: optional high-precision version of ``f`` restricted to argument
            ``argnum``: it receives a numpy object array of ``mpmath.mpf`` with the argument's
            shape and returns an array-like of ``mpf`` with ``f``'s output shape. Without it,
            float64 Richardson extrapolation of ``f`` is the reference.
        dps: decimal digits for the high-precision reference.
        step: the Richardson base step (default ``1e-3 · max(1, ‖x‖_∞)``).
        seed: seed for the random directions.

    Returns:
        A :class:`DerivativeReport` with one JVP and one VJP relative error per direction.

    Raises:
        ValueError: if ``argnum`` is out of range or ``num_directions < 1``.

    Example:
        >>> import jax.numpy as jnp, rules
        >>> from statespace.testing import check_derivatives
        >>> A = jnp.array([[-1.0, 0.3], [0.0, -2.0]])
        >>> report = check_derivatives(rules.expm, (A,))
        >>> report.reference, len(report.jvp_errors), report.max_error < 1e-8
        ('richardson', 3, True)

        Against a high-precision reference (``mpmath``, here elementwise ``exp``):

        >>> import mpmath, numpy as np
        >>> report = check_derivatives(jnp.exp, (jnp.array([0.5, -1.0]),),
        ...                            reference=np.vectorize(mpmath.exp, otypes=[object]))
        >>> report.reference, report.max_error < 1e-13
        ('high-precision', True)
    """
    args = list(args)
    if not 0 <= argnum < len(args):
        raise ValueError(f"argnum={argnum} is out of range for {len(args)} arguments")
    if num_directions < 1:
        raise ValueError(f"num_directions must be >= 1; got {num_directions}")
    x = np.asarray(args[argnum], dtype=np.float64)

    def f_of_x(value):
        call_args = list(args)
        call_args[argnum] = jnp.asarray(value, dtype=jnp.asarray(args[argnum]).dtype)
        return f(*call_args)

    rng = np.random.default_rng(seed)
    if step is None:
        step = 1e-3 * max(1.0, float(np.max(np.abs(x))) if x.size else 1.0)
    primal_out, vjp_fn = jax.vjp(f_of_x, jnp.asarray(x))
    jvp_errors, vjp_errors = [], []
    for _ in range(num_directions):
        v = rng.standard_normal(x.shape)
        v /= max(np.linalg.norm(v), 1e-300)
        if reference is not None:
            ref = _high_precision_directional(reference, x, v, dps)
        else:
            ref = _richardson_directional(lambda z: f_of_x(z), x, v, step)
        _, tangent = jax.jvp(f_of_x, (jnp.asarray(x),), (jnp.asarray(v),))
        jvp_errors.append(relative_error(tangent, ref))
        cotangent = rng.standard_normal(np.shape(primal_out))
        (pulled,) = vjp_fn(jnp.asarray(cotangent, dtype=jnp.asarray(primal_out).dtype))
        lhs = float(np.sum(np.asarray(pulled, np.float64) * v))
        rhs = float(np.sum(cotangent * ref))
        scale = np.linalg.norm(cotangent) * max(np.linalg.norm(ref), 1e-300)
        vjp_errors.append(abs(lhs - rhs) / scale)
    return DerivativeReport(
        jvp_errors=np.array(jvp_errors),
        vjp_errors=np.array(vjp_errors),
        reference="high-precision" if reference is not None else "richardson",
    )
