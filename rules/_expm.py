r"""Matrix exponential and its Fréchet derivative, with forward- and reverse-mode rules.

Two primitives carry everything:

* ``expm_p(A) = e^A`` by scaling and squaring with Padé approximants, choosing the
  degree and the number of squarings from ``‖A^k‖₁^{1/k}`` (Al-Mohy & Higham 2009a,
  "A new scaling and squaring algorithm for the matrix exponential", SIMAX 31(3),
  Algorithm 5.1), so that non-normal matrices are not overscaled.
* ``frechet_p(A, E) = (e^A, L(A, E))`` with ``L(A, E) = d/dt e^{A + tE}|_{t=0}``, by
  Al-Mohy & Higham 2009b ("Computing the Fréchet derivative of the matrix exponential",
  SIMAX 30(4)), Algorithm 6.4: the Padé pair and its derivative share one LU factorisation,
  then ``R ← R², L ← R L + L R`` per squaring. One change: the degree and ``s`` are chosen
  as for ``expm`` (from ``‖A^k‖^{1/k}`` and the ell correction) against Algorithm 6.4's
  thresholds ℓ_m, instead of from ``‖A‖₁``. Choosing from ``‖A‖₁`` overscales non-normal
  matrices: SciPy's ``expm_frechet`` loses 4e-9 on a triangular matrix with entries 1..1e8
  (ours 1e-15), and the 2n×2n blocks of second derivatives (``[[A, E], [0, A]]`` with a
  large E) came out as zeros or NaN.

Derivative rules (all on the solution, never by differentiating the iteration):

* ``d e^A [Ȧ] = L(A, Ȧ)``: the JVP of ``expm_p`` is one ``frechet_p`` call, linear in Ȧ.
* ``L(A, ·)ᵀ = L(Aᵀ, ·)`` for real A (the adjoint identity), so the transpose of
  ``frechet_p`` in its second argument is ``Ḡ ↦ L(Aᵀ, Ḡ)``: reverse mode stores only ``A``
  (n² numbers per matrix) and recomputes the rest in the backward pass.
* Second and higher order: with the block matrices ``B = [[A, E], [0, A]]`` and
  ``Ḃ = [[Ȧ, Ė], [0, Ȧ]]``, ``e^B = [[e^A, L(A, E)], [0, e^A]]`` and so
  ``L(B, Ḃ) = [[L(A, Ȧ), d L(A, E)[Ȧ, Ė]], [0, L(A, Ȧ)]]``: the JVP of ``frechet_p`` is
  one ``frechet_p`` call on ``2n × 2n`` blocks, so derivatives of any order work.

Batching: both primitives take ``(..., n, n)`` arrays and work on the whole batch at once;
for ``n ≤ 6`` the products and the LU solve are elementwise operations that XLA fuses (XLA:CPU's
batched dot and LU custom calls pay per matrix, which dominated at n = 4; see ``_mm``).
The Padé degree is the batch maximum (one scalar ``lax.switch``, not a ``select`` over all
branches) and the squaring loop runs to the batch maximum of ``s`` with per-matrix masking,
so a batch never pays for branches or squarings beyond what its hardest matrix needs.
``vmap`` folds mapped axes into that leading batch.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from rules._checks import as_float_array, check_same_matrix_shape, check_square, common_dtype

__all__ = ["expm", "expm_frechet"]

_HIGHEST = lax.Precision.HIGHEST

# Padé coefficients b_k of r_m(x) = p_m(x)/p_m(-x), p_m(x) = Σ b_k x^k (Higham 2005).
_PADE = {
    3: (120.0, 60.0, 12.0, 1.0),
    5: (30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0),
    7: (17297280.0, 8648640.0, 1995840.0, 277200.0, 25200.0, 1512.0, 56.0, 1.0),
    9: (17643225600.0, 8821612800.0, 2075673600.0, 302702400.0, 30270240.0,
        2162160.0, 110880.0, 3960.0, 90.0, 1.0),
    13: (64764752532480000.0, 32382376266240000.0, 7771770303897600.0,
         1187353796428800.0, 129060195264000.0, 10559470521600.0, 670442572800.0,
         33522128640.0, 1323241920.0, 40840800.0, 960960.0, 16380.0, 182.0, 1.0),
}

# θ_m: largest ‖2^{-s}A‖ (here: α_p(2^{-s}A)) with backward error ≤ u for r_m.
# Double precision: Al-Mohy & Higham 2009a, Table 3.1 (θ_13 = 4.25 as in their Algorithm 5.1
# and SciPy). Single precision: Higham 2005, Table 2.1 (u = 2^-24), where degree 7 is the
# scaling degree.
_THETA = {
    "double": {3: 1.495585217958292e-2, 5: 2.539398330063230e-1, 7: 9.504178996162932e-1,
               9: 2.097847961257068e0, 13: 4.25},
    "single": {3: 4.258730016922831e-1, 5: 1.880152677804762e0, 7: 3.925724783138660e0},
}
_LOG2_UNIT_ROUNDOFF = {"double": -53.0, "single": -24.0}

# 1/|c_{2m+1}|: the leading coefficient of the backward-error series of r_m (Al-Mohy &
# Higham 2009a, eq. (5.1)); used by ell(A, m), the extra squarings that guard against
# rounding in the evaluation of r_m for strongly non-normal A.
_ELL_COEFF = {3: 100800.0, 5: 10059033600.0, 7: 4487938430976000.0,
              9: 5914384781877411840000.0, 13: 113250775606021113483283660800000000.0}

# ℓ_m for the Fréchet derivative (Al-Mohy & Higham 2009b, Table 6.1, double precision). Also
# used in single precision, where it is conservative (more accurate, a little more work).
_FRECHET_ELL = {3: 1.08e-2, 5: 2.00e-1, 7: 7.83e-1, 9: 1.78e0, 13: 4.74e0}


def _precision_name(dtype) -> str:
    return "double" if jnp.finfo(dtype).bits >= 64 else "single"


# --------------------------------------------------------------------------------------
# Small batched helpers. Every array below is (batch, n, n); per-matrix scalars are (batch,).


# Up to this size a batch of matrix products is faster as elementwise operations that XLA
# fuses than as XLA:CPU's batched dot, which pays per matrix. Measured on 1000 matrices, ten
# chained products: n = 4 dot 1.8 ms, one broadcast-multiply-reduce 0.43 ms, a sum of n outer
# products 0.11 ms; n = 6 dot 3.1 ms, outer products 0.4 ms; at n = 8 the whole Fréchet
# derivative was slower without the dot (8.0 vs 4.7 ms), so n = 8 keeps it. The outer-product
# sum compiles to more code, though: used in all five Padé branches it added ~0.8 s of
# compile time per program, so it is kept (``unroll=True``) for the products compiled once
# and run on every call (powers and norms in the degree choice, the solve's right-hand side,
# the squarings), and the branches use the reduce.
_SMALL_N = 6


def _mm(x, y, unroll=False):
    n = x.shape[-1]
    if n <= _SMALL_N and unroll:
        return sum(x[..., :, k, None] * y[..., None, k, :] for k in range(n))
    if n <= _SMALL_N:
        return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)
    return jnp.matmul(x, y, precision=_HIGHEST)


def _onenorm(x):
    return jnp.max(jnp.sum(jnp.abs(x), axis=-2), axis=-1)


def _bcast(v):
    return v[:, None, None]


def _pow2(e, dtype):
    """``2.0**e`` for an integer array ``e``, exactly, built from the exponent bits (valid for
    the normal range; callers keep ``e`` inside it)."""
    info = jnp.finfo(dtype)
    int_dtype = jnp.int64 if info.bits == 64 else jnp.int32
    e = jnp.clip(e, info.minexp, info.maxexp - 1).astype(int_dtype)
    return lax.bitcast_convert_type((e + (info.maxexp - 1)) << info.nmant, dtype)


def _scale_pow2(x, e):
    """``x * 2**e`` per matrix, exactly (a power of two), for integer ``e`` of any size.

    The factor is applied in three pieces of the same sign so that neither an intermediate
    factor nor an intermediate product overflows unless the result does.
    """
    e1 = e // 3
    e2 = (e - e1) // 2
    e3 = e - e1 - e2
    factor = _pow2(jnp.stack([e1, e2, e3]), x.dtype)
    return x * _bcast(factor[0]) * _bcast(factor[1]) * _bcast(factor[2])


def _eye_like(x):
    return jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape)


def _ceil_int(x, fallback=0):
    """``ceil(x)`` as int32, with NaN/±inf replaced by ``fallback`` and clipped to a range
    that any finite float64 input stays inside (2^±1100)."""
    ok = jnp.isfinite(x)
    return jnp.where(ok, jnp.clip(jnp.ceil(jnp.where(ok, x, 0.0)), -1100, 1100),
                     fallback).astype(jnp.int32)


def _log2_abs_power_norms(abs_a, powers):
    """``log2 ‖ |A|^q ‖₁`` for each q in ``powers``, from row vectors ``1ᵀ |A|^q``.

    ``‖|A|^q‖₁ = max_j (1ᵀ |A|^q)_j`` since |A|^q is nonnegative. Callers pass ``‖A‖₁ ≤ 1``
    (pre-scaled), so entries only shrink: no overflow, and underflow to 0 only where the
    norm is negligible anyway (then ell = 0, the right answer). ``1ᵀ|A|^q`` is built as
    ``(1ᵀ|A|^{q - 2^j}) |A|^{2^j}`` from the repeated squares ``|A|^{2^j}``: for the double
    precision powers 7, 11, 15, 19, 27 that is 4 matrix products and 7 row-vector products
    instead of 27 dependent row-vector products. That pays only for small n, where each
    product is a cheap fused loop; above ``_SMALL_N`` the n³ squares would cost more than
    the q n² chain, which is used there.
    """
    if abs_a.shape[-1] > _SMALL_N:
        row = jnp.ones(abs_a.shape[:-1], abs_a.dtype)
        out = {}
        for k in range(1, max(powers) + 1):
            row = jnp.einsum("bi,bij->bj", row, abs_a, precision=_HIGHEST)
            if k in powers:
                out[k] = jnp.log2(jnp.max(row, axis=-1))
        return out
    squares = {1: abs_a}
    while 2 * max(squares) < max(powers):
        top = max(squares)
        squares[2 * top] = _mm(squares[top], squares[top], unroll=True)
    rows = {1: jnp.sum(abs_a, axis=-2)}

    def row(q):
        if q not in rows:
            step = max(k for k in squares if k < q)
            prev = row(q - step)
            rows[q] = jnp.sum(prev[:, :, None] * squares[step], axis=-2)
        return rows[q]

    return {q: jnp.log2(jnp.max(row(q), axis=-1)) for q in powers}


def _lu_factor(x):
    """LU with partial pivoting of a (batch, n, n) array, in a form :func:`_lu_solve` takes.

    For ``n <= _SMALL_N`` the elimination is unrolled into elementwise operations on rows
    (batch, n): XLA fuses them, while the LAPACK-style custom calls pay per matrix (at n = 4,
    batch 1000, factor and two solves took longer than the whole Padé evaluation).
    """
    n = x.shape[-1]
    if n > _SMALL_N:
        lu, _, perm = lax.linalg.lu(x)
        return lu, perm
    rows = [x[:, i, :] for i in range(n)]
    steps = []
    for k in range(n - 1):
        swaps, rows = _pivot(rows, k)
        mult = [rows[i][:, k] / rows[k][:, k] for i in range(k + 1, n)]
        for i, l in zip(range(k + 1, n), mult):
            rows[i] = rows[i] - l[:, None] * rows[k]
        steps.append((swaps, mult))
    return rows, steps


def _pivot(rows, k):
    """Swap row k with the row of the largest |entry| in column k at or below it."""
    n = len(rows)
    piv = k + jnp.argmax(jnp.stack([jnp.abs(r[:, k]) for r in rows[k:]], axis=-1), axis=-1)
    swaps = [piv == i for i in range(k + 1, n)]
    return swaps, _apply_swaps(rows, k, swaps)


def _apply_swaps(rows, k, swaps):
    rows = list(rows)
    top = rows[k]
    for i, swap in zip(range(k + 1, len(rows)), swaps):
        rows[k] = jnp.where(swap[:, None], rows[i], rows[k])
        rows[i] = jnp.where(swap[:, None], top, rows[i])
    return rows


def _lu_solve(factors, b):
    """``X`` with ``x X = b`` for the ``x`` that :func:`_lu_factor` factored."""
    if not isinstance(factors[0], list):
        lu, perm = factors
        b = jnp.take_along_axis(b, perm[..., None], axis=-2)
        y = lax.linalg.triangular_solve(lu, b, left_side=True, lower=True, unit_diagonal=True)
        return lax.linalg.triangular_solve(lu, y, left_side=True, lower=False)
    rows, steps = factors
    n = len(rows)
    rhs = [b[:, i, :] for i in range(n)]
    for k, (swaps, mult) in enumerate(steps):
        rhs = _apply_swaps(rhs, k, swaps)
        for i, l in zip(range(k + 1, n), mult):
            rhs[i] = rhs[i] - l[:, None] * rhs[k]
    out = [None] * n
    for k in reversed(range(n)):
        acc = rhs[k]
        for j in range(k + 1, n):
            acc = acc - rows[k][:, j, None] * out[j]
        out[k] = acc / rows[k][:, k, None]
    return jnp.stack(out, axis=-2)


def _pade_uv(m, a, a2, a4, a6, a8):
    """Odd and even parts ``U``, ``V`` of ``p_m(A) = V + U`` (powers supplied)."""
    b = _PADE[m]
    ident = _eye_like(a)
    if m == 13:
        w1 = b[13] * a6 + b[11] * a4 + b[9] * a2
        w2 = b[7] * a6 + b[5] * a4 + b[3] * a2 + b[1] * ident
        z1 = b[12] * a6 + b[10] * a4 + b[8] * a2
        z2 = b[6] * a6 + b[4] * a4 + b[2] * a2 + b[0] * ident
        u = _mm(a, _mm(a6, w1) + w2)
        v = _mm(a6, z1) + z2
        return u, v
    even = [ident, a2, a4, a6, a8][: (m + 1) // 2]
    u = _mm(a, sum(b[2 * j + 1] * p for j, p in enumerate(even)))
    v = sum(b[2 * j] * p for j, p in enumerate(even))
    return u, v


# --------------------------------------------------------------------------------------
# Degree and scaling: Al-Mohy & Higham 2009a, Algorithm 5.1, on a batch.


def _select(a, theta, log2_u):
    """Choose the Padé degree (batch maximum) and per-matrix squarings ``s``.

    Returns ``(finite, index, s, e, powers)``: ``finite`` flags matrices without NaN/inf,
    ``index`` the position of the batch's degree in ``tuple(theta)``, ``powers`` the
    matrices ``(A', A'^2, A'^4, A'^6)`` of the pre-scaled ``A' = 2^{-p} A``, and
    ``e = p - s`` (per matrix) so that ``(2^{-s} A)^k = 2^{k e} A'^k`` exactly.
    """
    degrees = tuple(theta)  # ascending; the last one is the scaling degree
    top = degrees[-1]
    finite = jnp.all(jnp.isfinite(a), axis=(-2, -1))
    a = jnp.where(_bcast(finite), a, 0.0)

    # Pre-scale by an exact power of two so that powers up to A^6 cannot overflow even for
    # huge ‖A‖ (the norms below are then offset by p in log2).
    norm = _onenorm(a)
    p = jnp.where(norm > 1.0, _ceil_int(jnp.log2(jnp.where(norm > 1.0, norm, 1.0))), 0)
    a1 = _scale_pow2(a, -p)
    a2 = _mm(a1, a1, unroll=True)
    a4 = _mm(a2, a2, unroll=True)
    a6 = _mm(a4, a2, unroll=True)
    pf = p.astype(a.dtype)
    log2_norm = {k: jnp.log2(_onenorm(x)) for k, x in ((1, a1), (2, a2), (4, a4), (6, a6))}
    # log2 d_k, d_k = ‖A^k‖₁^{1/k}: exact for k = 4, 6; for k = 8, 10 the submultiplicative
    # bounds ‖A^8‖ ≤ min(‖A^4‖², ‖A^2‖‖A^6‖), ‖A^10‖ ≤ ‖A^4‖‖A^6‖ (upper bounds, so never
    # underscaling; 2009a uses norm estimates here, this saves the A^8 product).
    log2_norm8 = jnp.minimum(2 * log2_norm[4], log2_norm[2] + log2_norm[6])
    d4 = pf + log2_norm[4] / 4
    d6 = pf + log2_norm[6] / 6
    d8 = pf + log2_norm8 / 8
    d10 = pf + jnp.minimum(log2_norm[4] + log2_norm[6], log2_norm[2] + log2_norm8) / 10

    # ell(2^{-s}A, m) = max(0, ⌈log2(α/u) / 2m⌉), α = |c_{2m+1}| ‖|2^{-s}A|^{2m+1}‖ / ‖2^{-s}A‖.
    # In log2 with A = 2^p A': log2 α = 2m (p - s) + log2‖|A'|^{2m+1}‖ - log2‖A'‖ - log2 c.
    nonzero = norm > 0
    abs_norms = _log2_abs_power_norms(jnp.abs(a1), sorted(2 * m + 1 for m in degrees))

    def ell(m, s):
        x = (abs_norms[2 * m + 1] - log2_norm[1] - math.log2(_ELL_COEFF[m]) - log2_u) / (2 * m)
        x = jnp.where(nonzero, x + (pf - s.astype(a.dtype)), -jnp.inf)
        return jnp.maximum(_ceil_int(x), 0)

    zero = jnp.zeros_like(p)
    eta_small = jnp.maximum(d4, d6)  # degrees 3 and 5
    eta_mid = jnp.maximum(d6, d8)  # degrees 7 and 9
    eta_top = jnp.minimum(eta_mid, jnp.maximum(d8, d10))
    etas = {3: eta_small, 5: eta_small, 7: eta_mid, 9: eta_mid}

    index = jnp.full(p.shape, len(degrees) - 1, jnp.int32)
    for i in reversed(range(len(degrees) - 1)):
        m = degrees[i]
        ok = (etas[m] <= math.log2(theta[m])) & (ell(m, zero) == 0)
        index = jnp.where(ok, i, index)
    s = jnp.maximum(_ceil_int(eta_top - math.log2(theta[top])), 0)
    s = s + ell(top, s)
    batch_index = jnp.max(index)
    s = jnp.where(finite & (batch_index == len(degrees) - 1), s, 0)
    return finite, batch_index, s, p - s, (a1, a2, a4, a6)


def _scaled_powers(m, e, powers):
    """Powers ``2^{-s}A, (2^{-s}A)^2, ...`` needed by degree m (None where not needed)."""
    needed = {1: True, 2: True, 4: m >= 5, 6: m >= 7}
    scaled = [_scale_pow2(x, k * e) if needed[k] else None for k, x in zip((1, 2, 4, 6), powers)]
    scaled.append(_mm(scaled[2], scaled[2]) if m == 9 else None)  # A^8 only for degree 9
    return tuple(scaled)


def _expm_batched(a):
    """e^A for a (batch, n, n) array."""
    # Lower-triangular A: compute (e^{Aᵀ})ᵀ. For upper-triangular V - U partial pivoting
    # never swaps rows, so the LU solve keeps the triangular structure; for lower-triangular
    # V - U with large off-diagonal entries it swaps rows and fills in, and the squarings
    # amplify that (measured: 1e-11 instead of 1e-16 on a 4×4 Jordan-like block at ‖A‖₁ = 1e3).
    lower = jnp.all(jnp.triu(a, 1) == 0, axis=(-2, -1))
    n = a.shape[-1]
    below = jnp.tril(jnp.ones((n, n), bool), -1)
    finite = jnp.all(jnp.isfinite(a), axis=(-2, -1))  # non-finite input stays all-NaN
    diagonal = finite & lower & jnp.all(jnp.where(below, a, 0.0) == 0, axis=(-2, -1))
    a = jnp.where(_bcast(lower), _swap_last(a), a)
    r = _expm_general(a)
    # Exact zeros of e^A that the squarings turn into NaN once an entry overflows (inf * 0):
    # below the diagonal of an upper-triangular A (lower ones arrive transposed), off the
    # diagonal of a diagonal one (whose diagonal is exp(a_ii)).
    upper = finite & jnp.all(jnp.where(below, a, 0.0) == 0, axis=(-2, -1))
    eye = jnp.eye(n, dtype=bool)
    exact = jnp.where(eye, jnp.exp(jnp.diagonal(a, axis1=-2, axis2=-1))[..., None, :], 0.0)
    r = jnp.where(_bcast(diagonal), exact, jnp.where(_bcast(upper) & below, 0.0, r))
    return jnp.where(_bcast(lower), _swap_last(r), r)


def _expm_general(a):
    prec = _precision_name(a.dtype)
    theta = _THETA[prec]
    finite, batch_index, s, e, powers = _select(a, theta, _LOG2_UNIT_ROUNDOFF[prec])

    def branch(m, powers):
        return _pade_uv(m, *_scaled_powers(m, e, powers))

    u, v = lax.switch(batch_index, [partial(branch, m) for m in theta], powers)
    # r_m = (V - U)⁻¹ (V + U) = I + 2 (V - U)⁻¹ U: the second form keeps the small
    # correction apart from I, so tiny ‖A‖ gives correctly rounded I + A + ….
    r = _eye_like(u) + 2.0 * _lu_solve(_lu_factor(v - u), u)

    triangular = _Triangular(jnp.where(_bcast(finite), a, 0.0))
    r = triangular.fix(r, s, s >= 0)

    def square(i, x):
        active = i < s
        return triangular.fix(jnp.where(_bcast(active), _mm(x, x, unroll=True), x), s - i - 1, active)

    r = lax.fori_loop(0, jnp.max(s), square, r)
    return jnp.where(_bcast(finite), r, jnp.nan)


# Upper-triangular A (lower-triangular A arrive transposed): Al-Mohy & Higham 2009a, Code
# Fragment 2.1 (what SciPy does). After each squaring r ≈ e^{2^{-k} A} for the current k; for
# upper-triangular A the diagonal of e^{2^{-k}A} is exp(2^{-k} a_ii) and its superdiagonal is
#   2^{-k} a_{i,i+1} (e^{x_{i+1}} - e^{x_i}) / (x_{i+1} - x_i),   x = 2^{-k} diag(A)
# (Higham 2008, eq. (10.42)), evaluated without cancellation or early overflow as
#   2^{-k} a_{i,i+1} e^{max(x_i, x_{i+1})} (1 - e^{-|δ|}) / |δ|,   δ = x_{i+1} - x_i.
# Overwriting these entries stops the rounding errors of the squarings from compounding on
# the diagonal, which dominates the error for strongly non-normal triangular matrices.
class _Triangular:
    """Exact diagonal and superdiagonal of e^{2^{-k}A} for the upper-triangular matrices of a
    batch (other matrices are left alone)."""

    def __init__(self, a):
        n = a.shape[-1]
        self.upper = jnp.all(jnp.tril(a, -1) == 0, axis=(-2, -1))
        self.any = (n > 1) & jnp.any(self.upper)
        self.diag = jnp.diagonal(a, axis1=-2, axis2=-1)
        self.superdiag = jnp.diagonal(a, 1, axis1=-2, axis2=-1)

    def fix(self, r, k, active):
        """Overwrite the known entries of ``r ≈ e^{2^{-k} A}`` where ``active``."""
        return lax.cond(self.any, partial(self._fix, k=k, active=active), lambda r: r, r)

    def _fix(self, r, k, active):
        n = r.shape[-1]
        x = _scale_pow2(self.diag[:, :, None], -k)[..., 0]
        superdiag = _scale_pow2(self.superdiag[:, :, None], -k)[..., 0]
        delta = jnp.abs(x[:, 1:] - x[:, :-1])
        equal = delta == 0
        divided = jnp.where(equal, 1.0, -jnp.expm1(-delta) / jnp.where(equal, 1.0, delta))
        superdiag = superdiag * jnp.exp(jnp.maximum(x[:, 1:], x[:, :-1])) * divided
        ok = (active & self.upper)[:, None]
        i = jnp.arange(n)
        r = r.at[:, i, i].set(jnp.where(ok, jnp.exp(x), r[:, i, i]))
        return r.at[:, i[:-1], i[1:]].set(jnp.where(ok, superdiag, r[:, i[:-1], i[1:]]))


# --------------------------------------------------------------------------------------
# Fréchet derivative: Al-Mohy & Higham 2009b, Algorithm 6.4, on a batch.


def _pade_uv_frechet(m, e, a, a2, a4, a6, a8):
    """``U, V, L_U, L_V``: the Padé parts and their derivatives in direction E."""
    b = _PADE[m]
    ident = _eye_like(a)
    m2 = _mm(a, e) + _mm(e, a)
    if m == 13:
        m4 = _mm(a2, m2) + _mm(m2, a2)
        m6 = _mm(a4, m2) + _mm(m4, a2)
        w1 = b[13] * a6 + b[11] * a4 + b[9] * a2
        w2 = b[7] * a6 + b[5] * a4 + b[3] * a2 + b[1] * ident
        z1 = b[12] * a6 + b[10] * a4 + b[8] * a2
        z2 = b[6] * a6 + b[4] * a4 + b[2] * a2 + b[0] * ident
        w = _mm(a6, w1) + w2
        u = _mm(a, w)
        v = _mm(a6, z1) + z2
        lw1 = b[13] * m6 + b[11] * m4 + b[9] * m2
        lw2 = b[7] * m6 + b[5] * m4 + b[3] * m2
        lz1 = b[12] * m6 + b[10] * m4 + b[8] * m2
        lz2 = b[6] * m6 + b[4] * m4 + b[2] * m2
        lw = _mm(a6, lw1) + _mm(m6, w1) + lw2
        lu = _mm(a, lw) + _mm(e, w)
        lv = _mm(a6, lz1) + _mm(m6, z1) + lz2
        return u, v, lu, lv
    a_pows = [ident, a2, a4, a6, a8][: (m + 1) // 2]
    m_pows = [None, m2]
    while len(m_pows) < len(a_pows):
        k = len(m_pows)  # next: M_{2k}, the derivative of A^{2k} = A^{2h} A^{2(k-h)}
        half = k // 2
        m_pows.append(_mm(a_pows[half], m_pows[k - half]) + _mm(m_pows[half], a_pows[k - half]))
    w = sum(b[2 * j + 1] * x for j, x in enumerate(a_pows))
    u = _mm(a, w)
    v = sum(b[2 * j] * x for j, x in enumerate(a_pows))
    lw = sum(b[2 * j + 1] * x for j, x in enumerate(m_pows) if j > 0)
    lu = _mm(a, lw) + _mm(e, w)
    lv = sum(b[2 * j] * x for j, x in enumerate(m_pows) if j > 0)
    return u, v, lu, lv


def _frechet_batched(a, e):
    """(e^A, L(A, E)) for (batch, n, n) arrays."""
    prec = _precision_name(a.dtype)
    finite_e = jnp.all(jnp.isfinite(e), axis=(-2, -1))
    finite, batch_index, s, scale, powers = _select(a, _FRECHET_ELL, _LOG2_UNIT_ROUNDOFF[prec])
    finite = finite & finite_e
    e = _scale_pow2(jnp.where(_bcast(finite), e, 0.0), -s)

    def branch(m, powers):
        return _pade_uv_frechet(m, e, *_scaled_powers(m, scale, powers))

    u, v, lu, lv = lax.switch(batch_index, [partial(branch, m) for m in _FRECHET_ELL], powers)
    # One LU of (V - U), used twice: R = (V-U)^{-1}(V+U), L = (V-U)^{-1}(L_U + L_V + (L_U - L_V) R).
    factors = _lu_factor(v - u)
    r = _eye_like(u) + 2.0 * _lu_solve(factors, u)
    el = _lu_solve(factors, lu + lv + _mm(lu - lv, r, unroll=True))

    def square(i, carry):
        r, el = carry
        active = _bcast(i < s)
        return (jnp.where(active, _mm(r, r, unroll=True), r),
                jnp.where(active, _mm(r, el, unroll=True) + _mm(el, r, unroll=True), el))

    r, el = lax.fori_loop(0, jnp.max(s), square, (r, el))
    nan_unless_finite = partial(jnp.where, _bcast(finite))
    return nan_unless_finite(r, jnp.nan), nan_unless_finite(el, jnp.nan)


# --------------------------------------------------------------------------------------
# Impls on arbitrary leading dims.


def _expm_impl(a):
    if a.size == 0:
        return a
    shape = a.shape
    n = shape[-1]
    return _expm_batched(a.reshape((-1, n, n))).reshape(shape)


def _frechet_impl(a, e):
    if a.size == 0:
        return [a, e]
    shape = a.shape
    n = shape[-1]
    r, el = _frechet_batched(a.reshape((-1, n, n)), e.reshape((-1, n, n)))
    return [r.reshape(shape), el.reshape(shape)]


# Eager calls: one compiled program per (batch size, n, dtype), whatever the leading dims.
_expm_flat = jax.jit(_expm_batched)
_frechet_flat = jax.jit(_frechet_batched)


def _expm_eager(a):
    if a.size == 0:
        return a
    n = a.shape[-1]
    return _expm_flat(a.reshape((-1, n, n))).reshape(a.shape)


def _frechet_eager(a, e):
    if a.size == 0:
        return [a, e]
    n = a.shape[-1]
    r, el = _frechet_flat(a.reshape((-1, n, n)), e.reshape((-1, n, n)))
    return [r.reshape(a.shape), el.reshape(a.shape)]


def _swap_last(x):
    return jnp.swapaxes(x, -1, -2)


# --------------------------------------------------------------------------------------
# The primitives.

expm_p = Primitive("rules_expm")
expm_p.def_impl(_expm_eager)
expm_p.def_abstract_eval(lambda a: jax.core.ShapedArray(a.shape, a.dtype))
mlir.register_lowering(expm_p, mlir.lower_fun(_expm_impl, multiple_results=False))

frechet_p = Primitive("rules_expm_frechet")
frechet_p.multiple_results = True
frechet_p.def_impl(_frechet_eager)
frechet_p.def_abstract_eval(
    lambda a, e: [jax.core.ShapedArray(a.shape, a.dtype), jax.core.ShapedArray(e.shape, e.dtype)]
)
mlir.register_lowering(frechet_p, mlir.lower_fun(_frechet_impl, multiple_results=True))


# d e^A [Ȧ] = L(A, Ȧ)  (definition of the Fréchet derivative).
def _expm_jvp(primals, tangents):
    (a,), (a_dot,) = primals, tangents
    out = expm_p.bind(a)
    if type(a_dot) is ad.Zero:
        return out, ad.Zero.from_primal_value(out)
    _, out_dot = frechet_p.bind(a, a_dot)
    return out, out_dot


ad.primitive_jvps[expm_p] = _expm_jvp


# e^{[[A, E], [0, A]]} = [[e^A, L(A, E)], [0, e^A]] (Al-Mohy & Higham 2009b, eq. (2.2)), so
# differentiating both sides in direction (Ȧ, Ė) gives
#   L([[A, E], [0, A]], [[Ȧ, Ė], [0, Ȧ]]) = [[L(A, Ȧ), dL(A, E)[Ȧ, Ė]], [0, L(A, Ȧ)]].
def _frechet_jvp(primals, tangents):
    a, e = primals
    a_dot, e_dot = tangents
    r, el = frechet_p.bind(a, e)
    if type(a_dot) is ad.Zero:
        if type(e_dot) is ad.Zero:
            return [r, el], [ad.Zero.from_primal_value(r), ad.Zero.from_primal_value(el)]
        # e^A does not depend on E, and L is linear in E.
        _, el_dot = frechet_p.bind(a, e_dot)
        return [r, el], [ad.Zero.from_primal_value(r), el_dot]
    e_dot = ad.instantiate_zeros(e_dot)
    n = a.shape[-1]
    # Balance the block: [[A, E/c], [0, A]] = D⁻¹ [[A, E], [0, A]] D with D = diag(I, I/c), so
    # L(A, E) and its derivative are c times the top-right blocks computed with E/c, Ė/c.
    # Without it a large E (e.g. a cotangent of size ‖e^A‖) makes the block so non-normal
    # that pivoting in the Padé solve mixes the scales and the squarings amplify the error.
    c = lax.stop_gradient(_balancing_factor(a, e))
    zeros = jnp.zeros_like(a)
    block = jnp.concatenate(
        [jnp.concatenate([a, e / c], axis=-1), jnp.concatenate([zeros, a], axis=-1)], axis=-2
    )
    block_dot = jnp.concatenate(
        [jnp.concatenate([a_dot, e_dot / c], axis=-1), jnp.concatenate([zeros, a_dot], axis=-1)],
        axis=-2,
    )
    _, block_l = frechet_p.bind(block, block_dot)
    return [r, el], [block_l[..., :n, :n], c * block_l[..., :n, n:]]


def _balancing_factor(a, e):
    """A power of two ``c`` (shape ``(..., 1, 1)``) with ``‖E / c‖₁ ≈ max(‖A‖₁, 1)``."""
    norm_a = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)
    norm_e = jnp.max(jnp.sum(jnp.abs(e), axis=-2), axis=-1)
    ratio = norm_e / jnp.maximum(norm_a, 1.0)
    ok = jnp.isfinite(ratio) & (ratio > 0)
    exponent = jnp.where(ok, jnp.round(jnp.log2(jnp.where(ok, ratio, 1.0))), 0.0)
    exponent = jnp.clip(exponent, -1000, 1000).astype(jnp.int32)
    return jnp.ldexp(jnp.ones(exponent.shape, a.dtype), exponent)[..., None, None]


ad.primitive_jvps[frechet_p] = _frechet_jvp


# Adjoint identity (real A): <Ḡ, L(A, E)> = <L(Aᵀ, Ḡ), E>, so the transpose of E ↦ L(A, E)
# is Ḡ ↦ L(Aᵀ, Ḡ) (Al-Mohy & Higham 2009b, §6; Najfeld & Havel 1995). The first output e^A
# does not depend on E, so its cotangent contributes nothing.
def _frechet_transpose(cts, a, e):
    if ad.is_undefined_primal(a):
        raise NotImplementedError("frechet(A, E) is linear in E only, not in A")
    _, ct_el = cts
    if type(ct_el) is ad.Zero:
        return [None, ad.Zero(e.aval)]
    _, ct_e = frechet_p.bind(_swap_last(a), ct_el)
    return [None, ct_e]


ad.primitive_transposes[frechet_p] = _frechet_transpose


# vmap: move mapped axes to the front; the implementation treats every leading axis as batch.
def _move_to_front(x, dim, size):
    if dim is None:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, dim, 0)


def _expm_batch(args, dims):
    (a,), (dim,) = args, dims
    return expm_p.bind(jnp.moveaxis(a, dim, 0)), 0


def _frechet_batch(args, dims):
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    a, e = (_move_to_front(x, d, size) for x, d in zip(args, dims))
    return frechet_p.bind(a, e), [0, 0]


batching.primitive_batchers[expm_p] = _expm_batch
batching.primitive_batchers[frechet_p] = _frechet_batch


# --------------------------------------------------------------------------------------
# Public functions.


def expm(A):
    r"""Matrix exponential ``e^A = Σ_k A^k / k!`` over any leading batch dims.

    Scaling and squaring with Padé approximants: ``e^A = r_m(2^{-s} A)^{2^s}`` with degree
    ``m`` and ``s`` chosen from ``d_k = ‖A^k‖₁^{1/k}`` (Al-Mohy & Higham 2009a), so strongly
    non-normal matrices are not overscaled. Double precision uses ``m ∈ {3, 5, 7, 9, 13}``,
    single precision ``m ∈ {3, 5, 7}`` (Higham 2005's single-precision thresholds). For a
    batch, one degree (the batch maximum) is evaluated, and each matrix is squared only its
    own ``s`` times inside a loop that runs to the batch maximum.

    Derivatives: forward mode is the Fréchet derivative ``Ȧ ↦ L(A, Ȧ)``, reverse mode its
    adjoint ``Ḡ ↦ L(Aᵀ, Ḡ)`` (see :func:`expm_frechet`); reverse mode stores only ``A``
    (``n²`` numbers per matrix). Second and higher derivatives work (block formula).

    Structured operators: if ``A`` has a method ``__rules_expm__`` (for instance
    ``rules.KroneckerSum``, where ``e^{A ⊕ B} = e^A ⊗ e^B``), ``expm(A)`` returns
    ``A.__rules_expm__()`` and does nothing else.

    Args:
        A: real array of shape ``(..., n, n)`` (integers are promoted to float), or an
            object with a ``__rules_expm__()`` method.

    Returns:
        ``e^A`` with the shape and dtype of ``A``. Matrices containing NaN or ±inf give all-NaN
        results (other matrices of the batch are unaffected). Results that overflow are inf; the
        exact zeros of a triangular ``A``'s exponential stay 0 (a full matrix whose
        exponential overflows may get NaN where inf meets 0).

    Raises:
        ValueError: if ``A`` is not of shape ``(..., n, n)`` (the message names the shape).
        TypeError: if ``A`` is complex or not numeric.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, rules
        >>> np.round(rules.expm(jnp.array([[0.0, 1.0], [0.0, 0.0]])), 6).tolist()  # I + N
        [[1.0, 1.0], [0.0, 1.0]]
        >>> round(float(rules.expm(jnp.array([[1.0]]))[0, 0]), 6)  # e
        2.718282
        >>> g = jax.grad(lambda a: rules.expm(a).trace())(jnp.diag(jnp.array([0.0, 1.0])))
        >>> np.round(g, 6).tolist()  # d tr(e^A)/dA = (e^A)ᵀ
        [[1.0, 0.0], [0.0, 2.718282]]
    """
    if hasattr(A, "__rules_expm__"):
        return A.__rules_expm__()
    A = as_float_array("A", A)
    check_square("A", A)
    return expm_p.bind(A)


def expm_frechet(A, E):
    r"""The matrix exponential and its Fréchet derivative: ``(e^A, L(A, E))``.

    ``L(A, E) = d/dt e^{A + tE}|_{t=0} = ∫₀¹ e^{sA} E e^{(1-s)A} ds``, computed by
    Al-Mohy & Higham 2009b, Algorithm 6.4 (what ``scipy.linalg.expm_frechet`` implements):
    the Padé pair and its derivative share one LU, and each squaring does
    ``L ← R L + L R, R ← R²``. The scaling ``s`` comes from ``‖A^k‖₁^{1/k}`` as in
    :func:`expm` rather than from ``‖A‖₁``, so non-normal matrices are not overscaled.
    Single precision uses the double-precision thresholds (conservative). Cost is about three times :func:`expm` (the ``2n × 2n`` block
    ``e^{[[A, E], [0, A]]}`` gives the same numbers at about eight times the cost).

    Derivatives: linear in ``E``; the transpose in ``E`` is ``Ḡ ↦ L(Aᵀ, Ḡ)``; the derivative in
    ``A`` uses the block identity ``e^{[[A, E], [0, A]]} = [[e^A, L(A, E)], [0, e^A]]``, so all
    orders work in both modes.

    Args:
        A: real array of shape ``(..., n, n)``.
        E: real array whose trailing shape is ``(n, n)``; leading dims broadcast with ``A``'s.

    Returns:
        ``(expm_A, frechet_AE)``, both of the broadcast shape ``(..., n, n)``. A matrix pair
        with NaN or ±inf in ``A`` or ``E`` gives NaN in both.

    Raises:
        ValueError: if ``A`` is not square or ``E``'s trailing shape differs (shapes named).
        TypeError: if an input is complex or not numeric.

    Example:
        >>> import jax.numpy as jnp, rules
        >>> A = jnp.array([[1.0, 2.0], [0.0, -1.0]])
        >>> expA, L = rules.expm_frechet(A, jnp.eye(2))  # L = e^A for E = I (A and I commute)
        >>> bool(jnp.allclose(L, expA)), bool(jnp.allclose(expA, rules.expm(A)))
        (True, True)
        >>> _, L = rules.expm_frechet(A, jnp.array([[0.0, 1.0], [0.0, 0.0]]))
        >>> t = 1e-6  # a central difference of e^{A + tE}
        >>> E = jnp.array([[0.0, 1.0], [0.0, 0.0]])
        >>> fd = (rules.expm(A + t * E) - rules.expm(A - t * E)) / (2 * t)
        >>> bool(jnp.allclose(L, fd, atol=1e-6))
        True
    """
    A = as_float_array("A", A)
    E = as_float_array("E", E)
    check_square("A", A)
    check_same_matrix_shape("A", A, "E", E)
    dtype = common_dtype(A, E)
    shape = jnp.broadcast_shapes(A.shape, E.shape)
    A = jnp.broadcast_to(A.astype(dtype), shape)
    E = jnp.broadcast_to(E.astype(dtype), shape)
    expm_a, frechet_ae = frechet_p.bind(A, E)
    return expm_a, frechet_ae
