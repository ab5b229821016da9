"""Hand-written reverse pass (adjoint recursion) for the sequential Kalman log-likelihood.

Autodiff through ``lax.scan`` stores and replays every small operation of every step. The
adjoint below needs only the predicted moments of each step: the reverse pass is two affine
backward recursions (one for the mean's cotangent, one for the covariance's) whose
coefficients, and every parameter's cotangent, are computed for all steps at once outside any
loop (see the comment above :func:`_update`).

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

import jax
import jax.numpy as jnp
from jax import lax

from rules._precision import full_precision
from statespace._kalman import (
    _SMALL_M,
    _chol_solve,
    _filter_single,
    _mm,
    _mmm,
    _mask_observation,
    _spd_solve_small,
    _steps_params,
    _symmetrise,
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


def _T(A):
    return jnp.swapaxes(A, -1, -2)


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def _spd_solve(S, B):
    """``S^{-1} B`` for symmetric positive definite ``S (..., m, m)``, ``B (..., m, k)``: the
    filter's scalar ``L D L^T`` for ``m <= 2``, else its Cholesky (unrolled while small, so a
    loop's step holds no LAPACK call), ``S^{-1} B = L^{-T} (L^{-1} B)``."""
    m = S.shape[-1]
    if m <= _SMALL_M:
        return _spd_solve_small(S, B)[0]
    eye = jnp.broadcast_to(jnp.eye(m, dtype=S.dtype), S.shape)
    Y = _chol_solve(S, jnp.concatenate([B, eye], axis=-1))[1]
    return _T(Y[..., B.shape[-1]:]) @ Y[..., :B.shape[-1]]


def _affine_recursion(A, c, x_end, reverse):
    """Forward ``x[k+1] = A[k] x[k] + c[k]`` from ``x[0] = x_end``, or (``reverse``) backward
    ``x[k] = A[k]^T x[k+1] (A[k] if x is a matrix) + c[k]`` from ``x[T] = x_end``.

    Returns ``(x[T], x[0..T-1])`` forward, ``(x[0], x[1..T])`` backward.
    """
    def step(x, xs):
        Ak, ck = xs
        if x.ndim == 2:
            x = _mmm(Ak.T, x, Ak) + ck
        else:
            x = _mm(Ak.T if reverse else Ak, x) + ck
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
    Z = _spd_solve(S, jnp.concatenate([HP, eye], axis=-1))
    n = P.shape[-1]
    return w, Hm, HP, Z[..., :n], Z[..., n:]


def _predicted_covariances(P0, par, observed):
    """Predicted covariances of every step by the covariance recursion alone (it does not
    depend on the data): ``P+ = F (P - (H P)^T K^T) F^T + Q``."""
    per_step = {k: par[k] for k in ("F", "Q", "H", "R") if par[k].ndim == 3}

    def step(P, xs):
        xs = {**par, **xs}
        _, Hm, Rm = _mask_observation(xs["H"], xs["R"], xs["o"])
        HP = _mm(Hm, P)
        Kt = _spd_solve(_mm(HP, Hm.T) + Rm, HP)
        return _mm(_mm(xs["F"], P - _mm(HP.T, Kt)), xs["F"].T) + xs["Q"], P

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
# was 80-90 % of the gradient's time (Matern-3/2, N = 1e4: 13 ms -> 3.4 ms). Rows/columns of
# missing entries are masked out of Hb, Rb, vb exactly as the forward step masks H, R, v.
# The square-root form uses the same recursion with P = L L^T rebuilt from its stored factors:
# the gradient is a property of the function, not of the algorithm that evaluated it.
def _adjoint(y, m0, P, par):
    """Predicted means, then the cotangents of the start ``(m0, P0)`` and per-step cotangents
    of every parameter and of ``y`` (dicts of ``(T, ...)`` arrays), given the predicted
    covariances ``P``."""
    F, b, d = par["F"], par["b"], par["d"]
    observed = ~jnp.isnan(y)
    w, Hm, HP, Kt, Sinv = _gain(P, par["H"], par["R"], observed)
    n = P.shape[-1]
    A = _bmm(F, jnp.eye(n, dtype=P.dtype) - _bmm(_T(Kt), Hm))  # F (I - K H)
    # predicted means: m+ = F (m + K v) + b = A m + F K (y - d) + b (v = 0 where y is missing)
    y_d = jnp.where(observed, y - d, 0.0)
    _, m = _affine_recursion(A, _bmv(F, _bmv(_T(Kt), y_d)) + b, m0, reverse=False)
    v = jnp.where(observed, y_d - _bmv(par["H"], m), 0.0)
    alpha = _bmv(Sinv, v)
    m_f, P_f = m + _bmv(_T(Kt), v), P - _bmm(_T(HP), Kt)

    a = _bmv(_T(Hm), alpha)
    mb0, mb_next = _affine_recursion(A, a, jnp.zeros_like(m0), reverse=True)
    mb_f = _bmv(_T(F), mb_next)
    u = _bmv(Kt, mb_f)
    ua = _outer(u, alpha)
    D = 0.5 * (_outer(alpha, alpha) - Sinv - ua - _T(ua))
    G = _bmm(_bmm(_T(Hm), D), Hm) + _symmetrise(_outer(mb_f, a))
    Pb0, Pb_next = _affine_recursion(A, G, jnp.zeros((n, n), P.dtype), reverse=True)

    Pb_f = _bmm(_bmm(_T(F), Pb_next), F)
    KtPb_f = _bmm(Kt, Pb_f)
    Sb = D + _bmm(KtPb_f, _T(Kt))
    vb = (u - alpha) * w
    grads = {
        "F": _outer(mb_next, m_f) + 2.0 * _bmm(_bmm(Pb_next, F), P_f),
        "Q": Pb_next,
        "b": mb_next,
        "R": Sb * _outer(w, w),
        "H": (_outer(alpha, _bmv(P, mb_f)) + 2.0 * _bmm(_bmm(Sb, Hm) - KtPb_f, P)
              - _outer(vb, m)) * w[..., :, None],
        "d": -vb,
        "y": vb,
    }
    return mb0, Pb0, grads


def _value_and_grad(model, y, form):
    """Log-likelihood and its gradient (a model-shaped pytree and ``y``-shaped array) by the
    forward filter and the adjoint recursions."""
    const, scanned = _steps_params(model)
    dtype = y.dtype
    # Q and R enter the forward pass through their symmetric part; their cotangents below are
    # symmetric, so the symmetrisation's transpose is the identity.
    par = {k: _symmetrise(v.astype(dtype)) if k in ("Q", "R") else v.astype(dtype)
           for k, v in {**const, **scanned}.items()}
    if form == "sqrt":  # the square-root filter's own predictions (lower factors)
        total, _, _, chols = _filter_single(model, y, form, "predicted")
        P = _bmm(chols, _T(chols))
    else:
        total = _filter_single(model, y, form, False)[0]
        P = _predicted_covariances(_symmetrise(model.P0.astype(dtype)), par, ~jnp.isnan(y))
    mb0, Pb0, per_step = _adjoint(y, model.m0.astype(dtype), P, par)
    grads = {"m0": mb0, "P0": Pb0}
    for name in const:
        grads[name] = jnp.sum(per_step[name], axis=0).reshape(getattr(model, name).shape)
    for name in scanned:
        grads[name] = per_step[name]
    # A failed factorisation (-inf) has no gradient: NaN everywhere, never a finite value.
    bad = jnp.isneginf(total)
    grads = {k: jnp.where(bad, jnp.nan, g).astype(getattr(model, k).dtype)
             for k, g in grads.items()}
    y_bar = jnp.where(bad, jnp.nan, per_step["y"])
    return total, model.replace(**grads), y_bar


@jax.custom_jvp
def _loglik_cov(model, y):
    return _filter_single(model, y, "cov", False)[0]


@jax.custom_jvp
def _loglik_sqrt(model, y):
    return _filter_single(model, y, "sqrt", False)[0]


def _make_jvp(form):
    @full_precision
    def jvp(primals, tangents):
        model, y = primals
        model_dot, y_dot = tangents
        total, g_model, g_y = _value_and_grad(model, y, form)
        leaves_g = jax.tree_util.tree_leaves(g_model)
        leaves_t = jax.tree_util.tree_leaves(model_dot)
        tangent = sum(jnp.sum(g * t.astype(g.dtype)) for g, t in zip(leaves_g, leaves_t))
        observed = ~jnp.isnan(y)
        tangent = tangent + jnp.sum(jnp.where(observed, g_y * y_dot.astype(g_y.dtype), 0.0))
        return total, tangent.astype(total.dtype)

    return jvp


_loglik_cov.defjvp(_make_jvp("cov"))
_loglik_sqrt.defjvp(_make_jvp("sqrt"))


def adjoint_log_likelihood(model, y, form: str):
    """Total log-likelihood of one series whose derivatives use the adjoint recursion.

    Args:
        model: a non-diffuse :class:`LinearGaussianSSM` without batch axes, parameters cast
            to ``y``'s dtype.
        y: ``(T, m)`` observations, NaN = missing.
        form: ``"cov"`` or ``"sqrt"`` (the forward pass; the reverse pass is the same
            covariance-form recursion for both, with ``P = L L^T`` in the sqrt form).

    Returns:
        The scalar log-likelihood; ``-inf`` on a failed factorisation (its gradient is NaN).
    """
    return (_loglik_cov if form == "cov" else _loglik_sqrt)(model, y)
