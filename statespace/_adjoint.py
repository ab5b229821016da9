"""Hand-written reverse pass (adjoint recursion) for the sequential Kalman log-likelihood.

Autodiff through ``lax.scan`` stores and replays every small operation of every step; the
adjoint recursion below needs only the predicted moments of each step and runs one backward
scan whose step costs about what a forward step costs (DESIGN.md section 5).

The rule is a ``jax.custom_jvp`` on the scalar ``total = log p(y)``: its JVP computes the value
AND the whole gradient ``g`` (forward filter + one backward adjoint scan, both plain JAX) and
returns the tangent ``sum_i <g_i, p_dot_i>``. That tangent is linear in ``p_dot``, so JAX
transposes it for reverse mode (``grad`` costs one forward and one adjoint scan), ``jax.jvp``
works, and second order (``jax.hessian``, forward-over-reverse) works by differentiating the
rule's own code, which is ordinary differentiable JAX. No ``custom_vjp`` is involved.

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
    _UNROLL_MAX,
    _chol_solve,
    _filter_single,
    _mask_observation,
    _mm,
    _mm_fused,
    _mmm,
    _spd_solve_small,
    _steps_params,
    _symmetrise,
)


# ------------------------------------------------------------------------------------------
# Fused small-matrix helpers (broadcast-multiply-sum / unrolled loops below _UNROLL_MAX, so
# XLA merges the adjoint step into few kernels, like the forward step)
# ------------------------------------------------------------------------------------------
def _outer(a, b):
    """``a b^T`` for vectors."""
    return a[:, None] * b[None, :]


def _mtm(A, B):
    """``A^T @ B`` (the transpose is folded into the fused product)."""
    return _mm(A.T, B)


def _mmt(A, B):
    """``A @ B^T``."""
    return _mm(A, B.T)


def _inverse_cholesky(S):
    """``L^{-1}`` with ``L = chol(S)`` (fused factorisation and substitution for small sizes)."""
    return _chol_solve(S, jnp.eye(S.shape[-1], dtype=S.dtype))[1]


# what the forward pass stores per step (the rest of ``xs`` are time-varying parameters)
_STEP_DATA = ("y", "m", "P", "Xf", "Z")


# ------------------------------------------------------------------------------------------
# The adjoint step
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
# Gupta & Mehra (1974, IEEE TAC 19(6)). With ell-bar = 1 for every step:
#   prediction, given (mb+, Pb+) of step k+1 (zero after the last step):
#     Fb = mb+ m_f^T + 2 Pb+ F P_f,  Qb = Pb+,  bb = mb+,
#     mb_f = F^T mb+,                Pb_f = F^T Pb+ F;
#   update, with c = H P mb_f, u = S^{-1} c, J = I - K H:
#     vb = u - alpha                               (db = -vb, yb = vb)
#     Sb = 1/2 (alpha alpha^T - S^{-1} - u alpha^T - alpha u^T) + K^T Pb_f K   (Rb = Sb)
#     Hb = alpha (P mb_f)^T + 2 (Sb H - K^T Pb_f) P - vb m^T
#     mb = mb_f - H^T vb
#     Pb = J^T Pb_f J + H^T D H + sym(mb_f (H^T alpha)^T),  D = Sb - K^T Pb_f K,
# and at the start m0b = mb, P0b = Pb of step 0. Rows/columns of missing entries are masked out
# of Hb, Rb, vb exactly as the forward step masks H, R, v. The square-root form uses the same
# recursion with P = L L^T rebuilt from its stored factors: the gradient is a property of the
# function, not of the algorithm that evaluated it.
def _adjoint_step(const, sqrt, carry, xs):
    """One reverse step; ``carry`` holds the cotangents of step k+1's predicted moments and the
    accumulated gradients of the time-constant parameters."""
    Xb_next, acc = carry  # [mb+ | Pb+] in one array (one loop-carried copy, not two)
    mb_next, Pb_next = Xb_next[:, 0], Xb_next[:, 1:]
    par = {**const, **{k: v for k, v in xs.items() if k not in _STEP_DATA}}
    y, m, P = xs["y"], xs["m"], xs["P"]
    if sqrt:  # the square-root filter stored lower factors
        P = _mmt(P, P)
    F, b, H, d, R = par["F"], par["b"], par["H"], par["d"], par["R"]
    observed = ~jnp.isnan(y)
    w, Hm, Rm = _mask_observation(H, R, observed)

    # the update: stored by the forward's packed step, else recomputed (cheap, fused)
    n, k = P.shape[0], Hm.shape[0]
    if "Z" in xs:
        # stored by the forward's packed step: [m_f | P_f] and S^{-1} [v | H P | I]
        Z = xs["Z"]
        alpha, K, Sinv = Z[:, 0], Z[:, 1:n + 1].T, Z[:, n + 1:]
        m_f, P_f = xs["Xf"][:, 0], xs["Xf"][:, 1:]
    elif k <= _SMALL_M and n + 1 <= _UNROLL_MAX:
        # as the forward's packed step: products on [m | P], S^{-1} by the scalar L D L^T
        # solve, [K v | K H P] in one product (fewer XLA kernels per step)
        X = jnp.concatenate([m[:, None], P], axis=1)
        HX = _mm_fused(H, X)
        v = jnp.where(observed, y - HX[:, 0] - d, 0.0)
        HP = HX[:, 1:] * w[:, None]
        S = _mm_fused(HP, Hm.T) + Rm
        # one solve S^{-1} [v | H P | I] (one kernel)
        B = jnp.concatenate([v[:, None], HP, jnp.eye(k, dtype=S.dtype)], axis=1)
        Z = _spd_solve_small(S, B)[0]
        alpha, K, Sinv = Z[:, 0], Z[:, 1:n + 1].T, Z[:, n + 1:]  # S^{-1} v, P H^T S^{-1}
        corr = _mm_fused(HP.T, Z[:, :n + 1])
        m_f = m + corr[:, 0]
        P_f = P - corr[:, 1:]
    else:
        v = jnp.where(observed, y - _mm(H, m) - d, 0.0)
        HP = _mm(Hm, P)
        S = _mmt(HP, Hm) + Rm
        Linv = _inverse_cholesky(S)
        Sinv = _mtm(Linv, Linv)
        K = _mmm(HP.T, Linv.T, Linv)  # P H^T S^{-1}, (n, m)
        alpha = _mm(Sinv, v)
        m_f = m + _mm(K, v)
        P_f = P - _mm(K, HP)

    # prediction adjoint
    grads = {
        "F": _outer(mb_next, m_f) + 2.0 * _mmm(Pb_next, F, P_f),
        "Q": Pb_next,
        "b": mb_next,
    }
    mb_f = _mm(F.T, mb_next)
    Pb_f = _mmm(F.T, Pb_next, F)

    # update adjoint
    u = _mm(K.T, mb_f)  # S^{-1} H P mb_f
    vb = (u - alpha) * w
    D = 0.5 * (_outer(alpha, alpha) - Sinv - _outer(u, alpha) - _outer(alpha, u))
    Sb = D + _mmm(K.T, Pb_f, K)
    grads["R"] = Sb * _outer(w, w)
    grads["H"] = (
        _outer(alpha, _mm(P, mb_f)) + 2.0 * (_mmm(Sb, Hm, P) - _mmm(K.T, Pb_f, P)) - _outer(vb, m)
    ) * w[:, None]
    grads["d"] = -vb
    mb = mb_f - _mm(Hm.T, vb)
    J = jnp.eye(P.shape[0], dtype=P.dtype) - _mm(K, Hm)
    a = _mm(Hm.T, alpha)
    Pb = _mmm(J.T, Pb_f, J) + _mmm(Hm.T, D, Hm) + _symmetrise(_outer(mb_f, a))

    # one flat accumulator for all time-constant parameters: one fused update per step
    # instead of one kernel per parameter
    if const:
        acc = acc + jnp.concatenate([grads[k].ravel() for k in sorted(const)])
    per_step = {k: grads[k] for k in xs if k not in _STEP_DATA}
    per_step["y"] = vb
    return (jnp.concatenate([mb[:, None], Pb], axis=1), acc), per_step


def _value_and_grad(model, y, form):
    """Log-likelihood and its gradient (a model-shaped pytree and ``y``-shaped array) by the
    forward filter and one adjoint scan."""
    total, _, means, covs, update = _filter_single(model, y, form, "predicted")
    const, scanned = _steps_params(model)
    dtype = y.dtype
    const = {k: v.astype(dtype) for k, v in const.items()}
    scanned = {k: v.astype(dtype) for k, v in scanned.items()}
    # Q and R enter the forward pass through their symmetric part; their cotangents below are
    # symmetric, so the symmetrisation's transpose is the identity.
    const = {k: _symmetrise(v) if k == "R" else v for k, v in const.items()}
    scanned = {k: _symmetrise(v) if k == "R" else v for k, v in scanned.items()}
    n = model.state_dim
    names = sorted(const)
    sizes = [const[k].size for k in names]
    acc0 = jnp.zeros((sum(sizes),), dtype)
    carry0 = (jnp.zeros((n, n + 1), dtype), acc0)
    xs = dict(scanned, y=y, m=means, P=covs)
    if update is not None:
        xs["Xf"], xs["Z"] = update
    (Xb0, acc), per_step = lax.scan(
        lambda c, x: _adjoint_step(const, form == "sqrt", c, x), carry0, xs, reverse=True
    )
    mb0, Pb0 = Xb0[:, 0], Xb0[:, 1:]
    grads = {"m0": mb0, "P0": Pb0}
    for name in const:
        x = getattr(model, name)
        start = sum(sizes[: names.index(name)])
        grads[name] = acc[start:start + const[name].size].reshape(x.shape)
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
