"""Hand-written reverse pass (adjoint recursion) for the sequential Kalman log-likelihood.

Autodiff through ``lax.scan`` stores and replays every small operation of every step. The
adjoint below needs only the predicted moments of each step. Two drivers run the same
recursion: for small states (``n <= _SPLIT_MAX_N``) it is split into four short loops (the
data-free covariance recursion, the affine mean recursion and the two affine cotangent
recursions) with everything else computed for all steps at once (see the comment above
:func:`_gain_terms`); for larger states one backward loop whose fused step
(:func:`_adjoint_step`) costs about a forward step.

The rule is a ``jax.custom_jvp`` on the scalar ``total = log p(y)``: its JVP computes the value
AND the whole gradient ``g`` (forward filter + the adjoint, both plain JAX) and returns the
tangent ``sum_i <g_i, p_dot_i>``. That tangent is linear in ``p_dot``, so JAX transposes it
for reverse mode (``grad`` costs one forward filter and the adjoint), ``jax.jvp`` works, and
second order (``jax.hessian``, forward-over-reverse) works by differentiating the rule's own
code, which is ordinary differentiable JAX. No ``custom_vjp`` is involved.

Only the total log-likelihood takes this path (``log_likelihood``, NumPyro's ``log_prob``);
per-step log-likelihoods, moments, diffuse starts and the parallel filter use plain autodiff.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules._precision import full_precision
from rules._unrolled import UNROLL_MAX
from statespace._model import _steps_params
from statespace._sequential import filter_log_likelihoods, filter_predictions
from statespace._steps import (
    _SMALL_M,
    _chol_solve,
    _mask_observation,
    _mm,
    _mm_fused,
    _mmm,
    _pack,
    _spd_solve_small,
    _symmetrise,
    _unpack,
)


# ------------------------------------------------------------------------------------------
# Helpers. Outside the loops every array has a leading step axis; a product with an inner
# dimension up to 4 is a sum of outer products (one fused elementwise pass over all steps: on
# XLA:CPU 2-20x faster than a batched ``dot`` at n = 4, T = 1e4), a larger one a batched
# ``dot`` (the unrolled sum compiled ~35 % slower at n = 8 for ~2x less run time).
# Inside a loop's step, small products are the filter's fused broadcast-multiply-sums (``_mm``).
# ------------------------------------------------------------------------------------------
_OUTER_SUM_MAX = 4


def _bmm(A, B):
    """``A @ B`` over the last two axes (leading axes broadcast)."""
    inner = A.shape[-1]
    if inner > _OUTER_SUM_MAX:
        return A @ B
    return sum(A[..., :, k, None] * B[..., None, k, :] for k in range(inner))


def _bmv(A, x):
    """``A @ x`` for matrices ``A (..., p, q)`` and vectors ``x (..., q)``."""
    inner = A.shape[-1]
    if inner > _OUTER_SUM_MAX:
        return (A @ x[..., None])[..., 0]
    return sum(A[..., :, k] * x[..., k, None] for k in range(inner))


def _inverse_cholesky(S):
    """``L^{-1}`` with ``L = chol(S)`` (fused factorisation and substitution for small sizes)."""
    return _chol_solve(S, jnp.eye(S.shape[-1], dtype=S.dtype))[1]


class LoopOps(NamedTuple):
    """The small products and solves inside the adjoint's loops (a static argument).

    :data:`FUSED` holds the filter's fused ones (broadcast-multiply-sums and unrolled
    solves); ``benchmarks.kalman --unfused`` passes plain ones (``@``, LAPACK) to measure what
    fusing buys.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace._adjoint import FUSED
        >>> FUSED._fields
        ('mm', 'mm_fused', 'mmm', 'spd_solve_small', 'inverse_cholesky')
        >>> A, B = jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[0.5, 0.0], [1.0, 1.0]])
        >>> bool(np.allclose(FUSED.mm(A, B), A @ B))
        True
        >>> bool(np.allclose(FUSED.mmm(A, B, A), A @ B @ A))
        True
        >>> S = jnp.array([[2.0, 0.5], [0.5, 1.0]])
        >>> X, det, pd = FUSED.spd_solve_small(S, B)  # S⁻¹ B, det S, positive definite
        >>> bool(np.allclose(S @ X, B)), round(float(det), 6), bool(pd)
        (True, 1.75, True)
        >>> Li = FUSED.inverse_cholesky(S)  # L⁻¹ with S = L Lᵀ
        >>> bool(np.allclose(Li @ S @ Li.T, np.eye(2)))
        True
    """

    mm: Callable  # A @ B (B a matrix or a vector)
    mm_fused: Callable  # A @ B as one broadcast-multiply-sum whatever the size
    mmm: Callable  # A @ B @ C
    spd_solve_small: Callable  # (S^{-1} B, det S, pd) for m <= _SMALL_M
    inverse_cholesky: Callable  # L^{-1} with L = chol(S)


FUSED = LoopOps(_mm, _mm_fused, _mmm, _spd_solve_small, _inverse_cholesky)


def _T(A):
    return jnp.swapaxes(A, -1, -2)


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def _affine_recursion(A, c, x_end, reverse, ops):
    """Forward ``x[k+1] = A[k] x[k] + c[k]`` from ``x[0] = x_end``, or (``reverse``) backward
    ``x[k] = A[k]^T x[k+1] (A[k] if x is a matrix) + c[k]`` from ``x[T] = x_end``.

    Returns ``(x[T], x[0..T-1])`` forward, ``(x[0], x[1..T])`` backward.
    """
    def step(x, xs):
        Ak, ck = xs
        if x.ndim == 2:
            x = ops.mmm(Ak.T, x, Ak) + ck
        else:
            x = ops.mm(Ak.T if reverse else Ak, x) + ck
        return x, x  # the new value as the output: no copy of the carry per step

    last, xs = lax.scan(step, x_end, (A, c), reverse=reverse)
    if reverse:  # xs holds x[0..T-1]
        return last, jnp.concatenate([xs[1:], x_end[None]], axis=0)
    return last, jnp.concatenate([x_end[None], xs[:-1]], axis=0)  # xs holds x[1..T]


def _gain(P, H, R, observed):
    """For predicted covariances ``P (..., n, n)``: ``w, H_masked, H P, K^T = S^{-1} H P`` and
    ``S^{-1}``, with ``S = H P H^T + R`` (missing entries masked as the filter masks them)."""
    w, Hm, Rm = _mask_observation(H, R, observed)
    HP = _bmm(Hm, P)
    S = _bmm(HP, _T(Hm)) + Rm
    eye = jnp.broadcast_to(jnp.eye(S.shape[-1], dtype=S.dtype), S.shape)
    B = jnp.concatenate([HP, eye], axis=-1)
    if S.shape[-1] <= _SMALL_M:  # the filter's scalar L D L^T
        Z = _spd_solve_small(S, B)[0]
    else:  # its Cholesky (unrolled while small): S^{-1} B = L^{-T} (L^{-1} B), L^{-1} from I
        Y = _chol_solve(S, B)[1]
        Z = _T(Y[..., HP.shape[-1]:]) @ Y
    n = P.shape[-1]
    return w, Hm, HP, Z[..., :n], Z[..., n:]


def _predicted_covariances(P0, const, scanned, observed, ops):
    """Predicted covariances of every step by the covariance recursion alone (it does not
    depend on the data): ``P+ = F (P - (H P)^T K^T) F^T + Q``."""
    per_step = {k: scanned[k] for k in ("F", "Q", "H", "R") if k in scanned}

    def step(P, xs):
        xs = {**const, **xs}
        _, Hm, Rm = _mask_observation(xs["H"], xs["R"], xs["o"])
        HP = ops.mm(Hm, P)
        S = ops.mm(HP, Hm.T) + Rm
        if S.shape[-1] <= _SMALL_M:
            P_f = P - ops.mm(HP.T, ops.spd_solve_small(S, HP)[0])
        else:  # whitened: (H P)^T S^{-1} H P = W^T W with W = L^{-1} H P
            W = _chol_solve(S, HP)[1]
            P_f = P - ops.mm(W.T, W)
        return ops.mm(ops.mm(xs["F"], P_f), xs["F"].T) + xs["Q"], P

    return _symmetrise(lax.scan(step, P0, dict(per_step, o=observed))[1])


# ------------------------------------------------------------------------------------------
# The adjoint pass
# ------------------------------------------------------------------------------------------
# Forward step k (predicted mean m, covariance P; missing entries masked by _mask_observation):
#     v = y - H m - d,  S = H P H^T + R,  K = P H^T S^{-1},  alpha = S^{-1} v,
#     m_f = m + K v,    P_f = P - K S K^T = P - K H P,
#     ell = -1/2 (v^T alpha + log|S| + m_obs log 2 pi),
#     m+ = F m_f + b,   P+ = F P_f F^T + Q.
# Reverse step (cotangents of the total; mb = m-bar etc., all covariance cotangents symmetric).
# Derivation: the filter of Särkkä, "Bayesian Filtering and Smoothing" (2013), section 4.3,
# differentiated in reverse with the matrix rules of Giles (2008), "Collected matrix derivative
# results for forward and reverse mode algorithmic differentiation" (d log|S| = tr(S^{-1} dS),
# d S^{-1} = -S^{-1} dS S^{-1}); the forward-mode counterpart is the sensitivity recursion of
# Gupta & Mehra (1974, IEEE TAC 19(6)). With ell-bar = 1 for every step and (mb+, Pb+) the
# cotangents of step k+1's predicted moments (zero after the last step):
#     mb_f = F^T mb+,  Pb_f = F^T Pb+ F,  u = K^T mb_f,  vb = u - alpha,  a = H^T alpha,
#     D = 1/2 (alpha alpha^T - S^{-1} - u alpha^T - alpha u^T),  Sb = D + K^T Pb_f K,
#     mb = J^T mb_f + a,  Pb = J^T Pb_f J + H^T D H + sym(mb_f a^T),  J = I - K H,
# and the parameters' cotangents
#     Fb = mb+ m_f^T + 2 Pb+ F P_f,  Qb = Pb+,  bb = mb+,  Rb = Sb,  db = -vb,  yb = vb,
#     Hb = alpha (P mb_f)^T + 2 (Sb H - K^T Pb_f) P - vb m^T.
# With the closed-loop transition A_k = F_k J_k this is two AFFINE backward recursions,
#     mb[k] = A_k^T mb[k+1] + a_k,      Pb[k] = A_k^T Pb[k+1] A_k + G_k,
#     G_k = H^T D_k H + sym(mb_f a^T)   (D_k depends on mb[k+1] only, not on Pb),
# whose coefficients depend on the forward pass alone. The forward quantities split the same
# way: the predicted covariances follow a recursion that does not involve the data, and then
# the predicted means the affine one m+ = A_k m + F K (y - d) + b. So the pass is four short
# loops (covariances, means, mb, Pb) and everything else is computed for all steps at once,
# outside any loop. Why: XLA:CPU compiles a while loop whose one iteration touches under
# ~1 KiB (`xla_cpu_small_while_loop_byte_threshold`, 1024 bytes in jaxlib 0.10) into one
# function; a larger body pays a runtime dispatch per operation per step, which at small n
# was 80-90 % of the gradient's time (Matern-3/2, N = 1e4: 13 ms -> 3.4 ms). From n = 4 on a
# step's matrices alone pass that size, and one fused loop (_adjoint_step) is faster; jaxlib
# 0.12 compiles far larger loops into one function by default, and there the split costs
# 10-40 % at n <= 3 against the one loop (measured, accepted: 0.10 is what pip gives 3.11).
# The one-loop step restates the formulas with unbatched fused products: written with the
# split's batched helpers it ran 2-3x slower ((4, 2, 1000): 4.8 against 2.0 ms). Rows/columns
# of missing entries are masked out of Hb, Rb, vb exactly as the forward step masks H, R, v.
# The square-root form uses the same recursion with P = L L^T rebuilt from its stored factors:
# the gradient is a property of the function, not of the algorithm that evaluated it.
def _gain_terms(P, par, observed):
    """Forward quantities that depend on the predicted covariances only (any leading axes)."""
    w, Hm, HP, Kt, Sinv = _gain(P, par["H"], par["R"], observed)
    eye = jnp.eye(P.shape[-1], dtype=P.dtype)
    return dict(w=w, Hm=Hm, HP=HP, Kt=Kt, Sinv=Sinv, P=P, P_f=P - _bmm(_T(HP), Kt),
                A=_bmm(par["F"], eye - _bmm(_T(Kt), Hm)))  # A = F (I - K H)


def _mean_terms(y, m, par, g, observed):
    """Forward quantities that also depend on the predicted means."""
    v = jnp.where(observed, y - par["d"] - _bmv(par["H"], m), 0.0)
    alpha = _bmv(g["Sinv"], v)
    return dict(m=m, alpha=alpha, m_f=m + _bmv(_T(g["Kt"]), v), a=_bmv(_T(g["Hm"]), alpha))


def _mean_cotangent_terms(g, f, F, mb_next):
    """``mb_f``, ``u``, ``D`` and the covariance recursion's source ``G`` given ``mb[k+1]``."""
    mb_f = _bmv(_T(F), mb_next)
    u = _bmv(g["Kt"], mb_f)
    ua = _outer(u, f["alpha"])
    D = 0.5 * (_outer(f["alpha"], f["alpha"]) - g["Sinv"] - ua - _T(ua))
    G = _bmm(_bmm(_T(g["Hm"]), D), g["Hm"]) + _symmetrise(_outer(mb_f, f["a"]))
    return dict(mb_f=mb_f, u=u, D=D, G=G)


def _parameter_cotangents(g, f, c, F, mb_next, Pb_next):
    """Every parameter's (and ``y``'s) cotangent at each step."""
    Pb_f = _bmm(_bmm(_T(F), Pb_next), F)
    KtPb_f = _bmm(g["Kt"], Pb_f)
    Sb = c["D"] + _bmm(KtPb_f, _T(g["Kt"]))
    w, alpha, P = g["w"], f["alpha"], g["P"]
    vb = (c["u"] - alpha) * w
    return {
        "F": _outer(mb_next, f["m_f"]) + 2.0 * _bmm(_bmm(Pb_next, F), g["P_f"]),
        "Q": Pb_next,
        "b": mb_next,
        "R": Sb * _outer(w, w),
        "H": (_outer(alpha, _bmv(P, c["mb_f"])) + 2.0 * _bmm(_bmm(Sb, g["Hm"]) - KtPb_f, P)
              - _outer(vb, f["m"])) * w[..., :, None],
        "d": -vb,
        "y": vb,
    }


def _adjoint_split(y, m0, P, par, ops):
    """The adjoint as four short loops, everything else for all steps at once (small ``n``).

    Given the predicted covariances ``P``: the predicted means, then the cotangents of the
    start ``(m0, P0)`` and per-step cotangents of every parameter and of ``y``.
    """
    n = P.shape[-1]
    observed = ~jnp.isnan(y)
    g = _gain_terms(P, par, observed)
    # predicted means: m+ = F (m + K v) + b = A m + F K (y - d) + b (v = 0 where y is missing)
    y_d = jnp.where(observed, y - par["d"], 0.0)
    source = _bmv(par["F"], _bmv(_T(g["Kt"]), y_d)) + par["b"]
    m = _affine_recursion(g["A"], source, m0, False, ops)[1]
    f = _mean_terms(y, m, par, g, observed)
    mb0, mb_next = _affine_recursion(g["A"], f["a"], jnp.zeros_like(m0), True, ops)
    c = _mean_cotangent_terms(g, f, par["F"], mb_next)
    Pb0, Pb_next = _affine_recursion(g["A"], c["G"], jnp.zeros((n, n), P.dtype), True, ops)
    return mb0, Pb0, _parameter_cotangents(g, f, c, par["F"], mb_next, Pb_next)


# ------------------------------------------------------------------------------------------
# The one-loop driver: the adjoint step (same recursion as above, every product fused)
# ------------------------------------------------------------------------------------------
def _solution_blocks(Z, n):
    """The column blocks of ``Z = S^{-1} [v | H P | I]`` (``n`` states): ``alpha = S^{-1} v``,
    ``K^T = S^{-1} H P``, ``S^{-1}``, and ``[alpha | K^T]`` as one block."""
    return Z[:, 0], Z[:, 1:n + 1], Z[:, n + 1:], Z[:, :n + 1]


def _recomputed_update(ops, y, observed, m, P, H, d, w, Hm, Rm):
    """The forward update of one step from its stored prediction ``(m, P)``, for the reverse
    step: ``(alpha = S^{-1} v, K = P H^T S^{-1}, S^{-1}, m_f, P_f)``."""
    n, k = P.shape[0], Hm.shape[0]
    if k <= _SMALL_M and n + 1 <= UNROLL_MAX:
        # as the forward's packed step: products on [m | P], S^{-1} by the scalar L D L^T
        # solve, [K v | K H P] in one product (fewer XLA kernels per step)
        X = _pack(m, P)
        HX = ops.mm_fused(H, X)
        v = jnp.where(observed, y - HX[:, 0] - d, 0.0)
        HP = HX[:, 1:] * w[:, None]
        S = ops.mm_fused(HP, Hm.T) + Rm
        # one solve S^{-1} [v | H P | I] (one kernel)
        B = jnp.concatenate([v[:, None], HP, jnp.eye(k, dtype=S.dtype)], axis=1)
        Z = ops.spd_solve_small(S, B)[0]
        alpha, Kt, Sinv, alpha_Kt = _solution_blocks(Z, n)
        K = Kt.T  # P H^T S^{-1}
        Kv, KHP = _unpack(ops.mm_fused(HP.T, alpha_Kt))  # [K v | K H P]
        return alpha, K, Sinv, m + Kv, P - KHP
    v = jnp.where(observed, y - ops.mm(H, m) - d, 0.0)
    HP = ops.mm(Hm, P)
    S = ops.mm(HP, Hm.T) + Rm
    Linv = ops.inverse_cholesky(S)
    Sinv = ops.mm(Linv.T, Linv)
    K = ops.mmm(HP.T, Linv.T, Linv)  # P H^T S^{-1}, (n, m)
    alpha = ops.mm(Sinv, v)
    return alpha, K, Sinv, m + ops.mm(K, v), P - ops.mm(K, HP)


def _adjoint_step(const, sqrt, ops, carry, xs):
    """One reverse step; ``carry`` holds the cotangents of step k+1's predicted moments and the
    accumulated gradients of the time-constant parameters."""
    Xb_next, acc = carry  # [mb+ | Pb+] in one array (one loop-carried copy, not two)
    mb_next, Pb_next = _unpack(Xb_next)
    par = {**const, **{k: v for k, v in xs.items() if k not in ("y", "m", "P")}}
    y, m, P = xs["y"], xs["m"], xs["P"]
    if sqrt:  # the square-root filter stored lower factors
        P = ops.mm(P, P.T)
    F, H, d, R = par["F"], par["H"], par["d"], par["R"]
    observed = ~jnp.isnan(y)
    w, Hm, Rm = _mask_observation(H, R, observed)

    # the update, recomputed from the stored predictions (cheap, fused)
    alpha, K, Sinv, m_f, P_f = _recomputed_update(ops, y, observed, m, P, H, d, w, Hm, Rm)

    # prediction adjoint
    grads = {
        "F": _outer(mb_next, m_f) + 2.0 * ops.mmm(Pb_next, F, P_f),
        "Q": Pb_next,
        "b": mb_next,
    }
    mb_f = ops.mm(F.T, mb_next)
    Pb_f = ops.mmm(F.T, Pb_next, F)

    # update adjoint
    u = ops.mm(K.T, mb_f)  # S^{-1} H P mb_f
    vb = (u - alpha) * w
    D = 0.5 * (_outer(alpha, alpha) - Sinv - _outer(u, alpha) - _outer(alpha, u))
    Sb = D + ops.mmm(K.T, Pb_f, K)
    grads["R"] = Sb * _outer(w, w)
    grads["H"] = (
        _outer(alpha, ops.mm(P, mb_f)) + 2.0 * (ops.mmm(Sb, Hm, P) - ops.mmm(K.T, Pb_f, P))
        - _outer(vb, m)
    ) * w[:, None]
    grads["d"] = -vb
    mb = mb_f - ops.mm(Hm.T, vb)
    J = jnp.eye(P.shape[0], dtype=P.dtype) - ops.mm(K, Hm)
    a = ops.mm(Hm.T, alpha)
    Pb = ops.mmm(J.T, Pb_f, J) + ops.mmm(Hm.T, D, Hm) + _symmetrise(_outer(mb_f, a))

    # one flat accumulator for all time-constant parameters: one fused update per step
    # instead of one kernel per parameter
    if const:
        acc = acc + jnp.concatenate([grads[k].ravel() for k in sorted(const)])
    per_step = {k: grads[k] for k in xs if k not in ("y", "m", "P")}
    per_step["y"] = vb
    return (_pack(mb, Pb), acc), per_step


def _adjoint_loop(y, m, P, const, scanned, sqrt, ops):
    """The adjoint as one backward loop over the filter's stored predictions ``m``, ``P``
    (lower factors when ``sqrt``), for larger ``n``: there the products dominate, and one fused
    step beats the split's traffic through memory. Same outputs as :func:`_adjoint_split`
    (the time-constant parameters' cotangents summed over the steps)."""
    n = P.shape[-1]
    names = sorted(const)
    sizes = [const[k].size for k in names]
    carry0 = (jnp.zeros((n, n + 1), P.dtype), jnp.zeros((sum(sizes),), P.dtype))
    (Xb0, acc), per_step = lax.scan(lambda c, x: _adjoint_step(const, sqrt, ops, c, x), carry0,
                                    dict(scanned, y=y, m=m, P=P), reverse=True)
    offsets = np.cumsum([0] + sizes)
    for k, start, stop in zip(names, offsets[:-1], offsets[1:]):
        per_step[k] = acc[start:stop].reshape(const[k].shape)[None]  # summed already
    mb0, Pb0 = _unpack(Xb0)
    return mb0, Pb0, per_step


# The split driver's loops are short only while the state is small; from this size on one
# fused loop is faster (jaxlib 0.10, (n, m, T) = (6, 2, 1000): 2.6 against 3.5 ms).
_SPLIT_MAX_N = 3


def _value_and_grad(model, y, form, split=None, ops=None):
    """Log-likelihood and its gradient (a model-shaped pytree and ``y``-shaped array) by the
    forward filter and the adjoint recursions (``split``: which driver, default by size;
    ``ops``: the products and solves inside the loops, default :data:`FUSED`)."""
    ops = FUSED if ops is None else ops
    const, scanned = _steps_params(model)
    dtype = y.dtype
    # Q and R enter the forward pass through their symmetric part; their cotangents below are
    # symmetric, so the symmetrisation's transpose is the identity.
    const, scanned = ({k: _symmetrise(v.astype(dtype)) if k in ("Q", "R") else v.astype(dtype)
                       for k, v in d.items()} for d in (const, scanned))
    if split is None:
        split = model.state_dim <= _SPLIT_MAX_N
    m0 = model.m0.astype(dtype)
    sqrt = form == "sqrt"
    if not split:
        fwd = filter_predictions(model, y, form)
        total = fwd.log_likelihood
        stored = fwd.predicted_chols if sqrt else fwd.predicted_covs
        mb0, Pb0, per_step = _adjoint_loop(y, fwd.predicted_means, stored, const, scanned, sqrt,
                                           ops)
    else:
        if sqrt:  # the square-root filter's own predictions (lower factors)
            fwd = filter_predictions(model, y, form)
            total, chols = fwd.log_likelihood, fwd.predicted_chols
            P = _bmm(chols, _T(chols))
        else:  # the total (and its -inf/NaN rules) from the filter, P from the short loop
            total = filter_log_likelihoods(model, y, form)[0]
            P = _predicted_covariances(_symmetrise(model.P0.astype(dtype)), const, scanned,
                                       ~jnp.isnan(y), ops)
        mb0, Pb0, per_step = _adjoint_split(y, m0, P, {**const, **scanned}, ops)
    grads = {"m0": mb0, "P0": Pb0}
    for name in const:  # per-step cotangents (the loop driver: one row, the sum)
        grads[name] = jnp.sum(per_step[name], axis=0).reshape(getattr(model, name).shape)
    for name in scanned:
        grads[name] = per_step[name]
    # A failed factorisation (-inf) has no gradient: NaN everywhere, never a finite value.
    bad = jnp.isneginf(total)
    grads = {k: jnp.where(bad, jnp.nan, g).astype(getattr(model, k).dtype)
             for k, g in grads.items()}
    y_bar = jnp.where(bad, jnp.nan, per_step["y"])
    return total, model.replace(**grads), y_bar


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _loglik(model, y, form, ops):
    return filter_log_likelihoods(model, y, form)[0]


@_loglik.defjvp
@full_precision
def _loglik_jvp(form, ops, primals, tangents):
    model, y = primals
    model_dot, y_dot = tangents
    total, g_model, g_y = _value_and_grad(model, y, form, ops=ops)
    leaves_g = jax.tree_util.tree_leaves(g_model)
    leaves_t = jax.tree_util.tree_leaves(model_dot)
    tangent = sum(jnp.sum(g * t.astype(g.dtype)) for g, t in zip(leaves_g, leaves_t))
    observed = ~jnp.isnan(y)
    tangent = tangent + jnp.sum(jnp.where(observed, g_y * y_dot.astype(g_y.dtype), 0.0))
    return total, tangent.astype(total.dtype)


def adjoint_log_likelihood(model, y, form: str, ops: LoopOps = FUSED):
    """Total log-likelihood of one series whose derivatives use the adjoint recursion.

    Args:
        model: a non-diffuse :class:`LinearGaussianSSM` without batch axes, parameters cast
            to ``y``'s dtype.
        y: ``(T, m)`` observations, NaN = missing.
        form: ``"cov"`` or ``"sqrt"`` (the forward pass; the reverse pass is the same
            covariance-form recursion for both, with ``P = L L^T`` in the sqrt form).
        ops: the products and solves inside the adjoint's loops (:class:`LoopOps`); the
            default :data:`FUSED` is what the filter uses, a benchmark may pass plain ones.

    Returns:
        The scalar log-likelihood; ``-inf`` on a failed factorisation (its gradient is NaN).

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from statespace import LinearGaussianSSM, log_likelihood
        >>> from statespace._adjoint import adjoint_log_likelihood
        >>> model = LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
        ...                           m0=[0.0], P0=[[1.0]])
        >>> y = jnp.array([[0.3], [-0.2], [1.1]])
        >>> round(float(adjoint_log_likelihood(model, y, "cov")), 6)
        -4.201405
        >>> # its gradient (sqrt forward pass here) equals autodiff through the filter's scan
        >>> adjoint = jax.grad(lambda Q: adjoint_log_likelihood(model.replace(Q=Q), y, "sqrt"))
        >>> auto = jax.grad(lambda Q: log_likelihood(model.replace(Q=Q), y, gradient="autodiff"))
        >>> round(float(adjoint(model.Q)[0, 0]), 6)
        -0.341018
        >>> bool(np.allclose(adjoint(model.Q), auto(model.Q)))
        True
    """
    return _loglik(model, y, form, ops)
