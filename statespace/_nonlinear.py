r"""Nonlinear SDEs observed at irregular times: local-linearisation Kalman filtering.

The model (:class:`NonlinearSDE`)::

    dx = f(x, t, θ) dt + dW,   Cov(dW) = Q(x, t, θ) dt,
    y_k = h(x(t_k), t_k, θ) + v_k,   v_k ~ N(0, R),   x(t_0) ~ N(m0, P0).

**Prediction** (local linearisation: Ozaki 1992, "A bridge between nonlinear time series
models and nonlinear stochastic dynamical systems: a local linearization approach", Statistica
Sinica 2; Jimenez & Biscay 2002, Stoch. Anal. Appl. 20(4); Särkkä & Solin 2019, "Applied
Stochastic Differential Equations", §9.3). Over a substep of length ``h`` from the moments
``(m, P)`` the drift is replaced by its linearisation ``f(x) ≈ f(m) + J (x − m)`` and that
linear SDE is solved exactly. ``J = ∂f/∂x`` (and a state-dependent ``Q``) is taken at the
substep's Euler midpoint ``m + (h/2) f(m)``, not at ``m``: over the substep the true
``J(m(t))`` moves by ``O(h)``, which makes the covariance first order in ``h`` when ``J`` is
frozen at ``m`` and second order at the midpoint (``tests/statespace/test_nonlinear.py``
measures order 2.0 against the moment equations solved by SciPy; on a Van der Pol
oscillator, ``T = 300``, the log-likelihood's error fell from 0.23 to 0.011 at 4 substeps
and from 0.090 to 1.3e-4 at 8)::

    m⁺ = m + Ψ f(m),   Ψ = ∫_0^h e^{Js} ds,
    P⁺ = F P Fᵀ + Qd,  F = e^{Jh},  Qd = ∫_0^h e^{Js} Q e^{Jᵀs} ds.

For a linear drift ``f(x) = A x + b`` this is the exact discretisation (``Ψ A = F − I``, so
``m + Ψ (A m + b) = F m + Ψ b``, singular ``A`` included). The three come from one exponential
of a ``(2n+1)``-square block (Van Loan 1978, with a row for the drift)::

    exp(τ [[−J, Q, 0], [0, Jᵀ, 0], [0, fᵀ, 0]]) = [[e^{−Jτ}, G, 0], [0, F(τ)ᵀ, 0], [0, (Ψ(τ) f)ᵀ, 1]],
    Qd(τ) = F(τ) G,

evaluated at ``τ = h / 2^K`` (K = 4) and brought to ``h`` by ``K`` exact doublings
``Qd ← F Qd Fᵀ + Qd``, ``Ψf ← F Ψf + Ψf``, ``F ← F²``. At ``τ`` the block is small in the
common case (``τ ‖J‖ <= 0.55`` in float64, i.e. ``h ‖J‖ <= 8.8``), and there its exponential is
a degree-16 Taylor polynomial (Paterson–Stockmeyer, six products of the small block): every
block's remainder is below the unit roundoff (bound above ``_TAYLOR_THETA``), and the program
is a short straight line with no degree choice, solve or loop, which made the Van der Pol
gradient ~1.5x faster and its compile 2x shorter than with ``rules.expm`` (Padé with a
degree switch, an LU solve and a squaring loop, and their Fréchet rules in reverse). Beyond
that range the block is scaled by ``2^{−s}`` and squared ``s <= 10`` times (a branch taken
only then); beyond ``h ‖J‖ ≈ 9000``, or on overflow, the substep is rejected (``-inf``: use
more ``substeps``). Derivatives are those of the polynomial and the squarings (the Fréchet
derivative of the Taylor polynomial is the degree-15 truncation of the exponential's, within
the same bound; ``tests/statespace/test_nonlinear_steps.py`` checks both branches against
``rules.expm``'s Fréchet rules and mpmath).

Longer intervals are split into ``substeps`` equal substeps (a ``lax.scan``: the program
does not grow with them), each relinearised; as ``substeps`` grows the moments converge to
those of the continuous-discrete EKF's moment equations ``dm/dt = f(m)``,
``dP/dt = J(m) P + P J(m)ᵀ + Q(m)``, at second order. ``max_step`` (concrete times) splits
only the gaps longer than it, into ``ceil(gap / max_step)`` equal parts with a missing
observation at each inner point (:func:`refined_grid`): the filter's error sits after the long
gaps (a prediction carried through a long stretch of a nonlinear cycle), so this buys the
accuracy of many substeps for a few more steps. The results are reported at the observation
times, each gap's transition composed over its parts for the smoother.

**Update** at ``t_k``: ``method="ekf"`` linearises ``h`` at the predicted mean
(``H = ∂h/∂x(m)``, innovation ``y − h(m)``) and applies the linear update of
``statespace._steps``. ``method="ukf"`` uses sigma points ``X_i = m + L ξ_i`` (``L Lᵀ = P``,
``ξ = ±√n e_j``: the third-degree spherical-radial cubature rule, Arasaratnam & Haykin 2009,
i.e. the unscented transform with ``α = 1, β = 0, κ = 0``): with ``Y_i = h(X_i)``,
``ŷ = mean Y_i``, ``Ξ = (1/2n) Σ ξ_i (Y_i − ŷ)ᵀ`` and ``S_y = (1/2n) Σ (Y_i − ŷ)(Y_i − ŷ)ᵀ``
the observation is statistically linearised as ``H L = Ξᵀ`` with noise ``R + S_y − ΞᵀΞ``
(positive semi-definite), and the same linear update gives the UKF's
``S = S_y + R``, ``C = L Ξ``, ``m_f = m + C S⁻¹ (y − ŷ)``, ``P_f = P − C S⁻¹ Cᵀ``. Missing
entries (NaN) are masked as in the linear filter.

Derivatives: everything is ``jax`` code, so ``jax.grad``, ``jax.jvp`` and higher orders work
through the scan (``J`` is ``jax.jacfwd`` of the drift: a gradient differentiates it once
more).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rules import tria
from rules._checks import as_float_array
from rules._precision import full_precision
from rules._smallmm import small_matmul
from statespace._continuous import _compose
from statespace._model import _from_first, _indefinite
from statespace._steps import (
    FilterResult,
    _check_form,
    _float_leaves,
    _log_likelihood_term,
    _mask_observation,
    _psd_cholesky,
    _reject,
    _symmetrise,
    _update_cov,
    _update_cov_moments,
    _update_sqrt,
    _update_sqrt_loadings,
)

METHODS = ("ekf", "ukf")

# Doublings after the block exponential over h / 2^K (see the module docstring).
_HALVINGS = 4

# The substep's block exponential: a degree-16 Taylor polynomial where ``τ ‖J‖ <= θ``
# (‖J‖ = max(‖J‖₁, ‖J‖∞), since ``Jᵀ`` is a block too). The diagonal blocks are ``e^{∓τJ}``;
# the others are linear in ``Q`` or ``f``, their k-th Taylor term bounded by
# ``τ ‖Q‖ θ^(k−1) / (k−1)!``. So every block's remainder, relative to 1 or to its linear
# factor, is at most ``θ^16 e^θ / 16!``: below the unit roundoff for the θ here (float64:
# 0.55^16 e^0.55 / 16! = 6e-18; float32: 2^16 e^2 / 16! = 2e-8), where ``e^{−Jτ}`` cannot
# overflow either. Beyond θ (long or stiff substeps) the block is scaled by ``2^{−s}`` and
# squared ``s`` times (``s <= _MAX_SQUARINGS``, in a branch taken only then); beyond that the
# substep is rejected (``e^{−Jτ}`` would overflow soon after anyway: 0.55 · 2^10 · 16 ≈ 9000
# for ``h ‖J‖``; more ``substeps`` shorten it). Derivatives are those of the polynomial and
# the squarings (the polynomial's Fréchet derivative is the degree-15 truncation of the
# exponential's: the same bound).
_TAYLOR_THETA = {np.dtype(np.float64): 0.55, np.dtype(np.float32): 2.0}
_MAX_SQUARINGS = 10
_TAYLOR_COEFFS = tuple(1.0 / float(np.prod(np.arange(1, k + 1))) for k in range(17))


@jax.tree_util.register_pytree_node_class
class NonlinearSDE:
    r"""A nonlinear SDE observed with Gaussian noise at irregular times.

    ::

        dx = drift(x, t, params) dt + dW,   Cov(dW) = Q dt,
        y_k = observe(x(t_k), t_k, params) + v_k,   v_k ~ N(0, R),   x(t_0) ~ N(m0, P0),

    with ``Q`` a constant matrix or ``diffusion(x, t, params) -> (n, n)`` (evaluated at the
    filter's mean). Filter with :func:`statespace.log_likelihood`,
    :func:`statespace.kalman_filter`, :func:`statespace.rts_smoother` and
    :func:`statespace.predict` (``method="ekf" | "ukf"``, ``substeps``, ``max_step`` for the
    long gaps; see ``statespace/_nonlinear.py`` for the local-linearisation scheme); sample with
    :meth:`simulate`.

    A registered pytree: ``params`` (any pytree of arrays), the matrix ``Q``, ``R``, ``m0`` and
    ``P0`` are its children (differentiable, ``vmap``-able), the functions its static part.

    Args:
        drift: ``f(x, t, params) -> (n,)``.
        diffusion: ``Q (n, n)``, or ``callable(x, t, params) -> (n, n)``.
        observe: ``h(x, t, params) -> (m,)``.
        R: ``(m, m)`` observation noise covariance.
        m0, P0: ``(n,)``, ``(n, n)``: the state at the first observation time.
        params: the parameters passed to the three functions (a pytree; ``None`` allowed).

    Raises:
        TypeError: a function argument that is not callable.
        ValueError: badly shaped ``R``, ``m0``, ``P0`` or matrix ``Q``; a function whose output
            has the wrong shape (checked with ``jax.eval_shape`` at ``m0``).

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import NonlinearSDE, ContinuousLinearSSM, log_likelihood
        >>> A = jnp.array([[-0.5, 1.0], [-1.0, -0.5]])
        >>> sde = NonlinearSDE(lambda x, t, p: p @ x, 0.1 * jnp.eye(2),
        ...                    lambda x, t, p: x[:1], 0.05 * jnp.eye(1),
        ...                    jnp.zeros(2), jnp.eye(2), params=A)
        >>> times = jnp.array([0.0, 0.3, 1.1, 1.5])
        >>> y = jnp.array([[0.2], [0.1], [np.nan], [-0.3]])
        >>> linear = ContinuousLinearSSM(A, 0.1 * jnp.eye(2), jnp.array([[1.0, 0.0]]),
        ...                              0.05 * jnp.eye(1), jnp.zeros(2), jnp.eye(2))
        >>> # a linear drift: the exact continuous-time filter
        >>> bool(np.isclose(log_likelihood(sde, y, times), log_likelihood(linear, y, times)))
        True
    """

    def __init__(self, drift, diffusion, observe, R, m0, P0, *, params=None):
        for name, fn in (("drift", drift), ("observe", observe)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable as {name}(x, t, params); got {type(fn).__name__}")
        self.drift, self.observe, self.params = drift, observe, params
        if callable(diffusion):
            self.diffusion_fn, self.Q = diffusion, None
        else:
            self.diffusion_fn, self.Q = None, as_float_array("Q", diffusion)
        self.R = as_float_array("R", R)
        self.m0 = as_float_array("m0", m0)
        self.P0 = as_float_array("P0", P0)
        n = self.m0.shape[-1] if self.m0.ndim == 1 else None
        if n is None:
            raise ValueError(f"m0 must have shape (n,); got m0.shape = {self.m0.shape}")
        for name, value, size in (("P0", self.P0, n), ("Q", self.Q, n),
                                  ("R", self.R, self.R.shape[-1] if self.R.ndim else 0)):
            if value is not None and value.shape != (size, size):
                raise ValueError(f"{name} must have shape ({size}, {size}) for n = {n} states "
                                 f"(m0.shape = {self.m0.shape}); got {name}.shape = {value.shape}")
        if self.R.ndim != 2:
            raise ValueError(f"R must have shape (m, m); got R.shape = {self.R.shape}")
        _check_functions(self)

    def tree_flatten(self):
        return (self.params, self.Q, self.R, self.m0, self.P0), (self.drift, self.diffusion_fn, self.observe)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.params, obj.Q, obj.R, obj.m0, obj.P0 = children
        obj.drift, obj.diffusion_fn, obj.observe = aux
        return obj

    def __repr__(self):
        return (f"NonlinearSDE(state_dim={self.state_dim}, obs_dim={self.obs_dim}, "
                f"drift={getattr(self.drift, '__name__', self.drift)!s})")

    @property
    def state_dim(self) -> int:
        return self.m0.shape[-1]

    @property
    def obs_dim(self) -> int:
        return self.R.shape[-1]

    @property
    def dtype(self):
        return jnp.result_type(self.R, self.m0, self.P0, *([] if self.Q is None else [self.Q]))

    def diffusion(self, x, t):
        """``Q(x, t)`` (symmetrised), the constant matrix when there is one."""
        Q = self.Q if self.diffusion_fn is None else self.diffusion_fn(x, t, self.params)
        return _symmetrise(jnp.asarray(Q, x.dtype))

    def replace(self, **changes) -> "NonlinearSDE":
        """A copy with some children replaced (``params``, ``Q``, ``R``, ``m0``, ``P0``)."""
        children, aux = self.tree_flatten()
        named = dict(zip(("params", "Q", "R", "m0", "P0"), children))
        unknown = set(changes) - set(named)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; NonlinearSDE has {sorted(named)}")
        named.update(changes)
        return NonlinearSDE.tree_unflatten(aux, tuple(named.values()))

    def simulate(self, key, times, substeps: int = 1):
        """Draw a path at ``times`` by the local-linearisation scheme at the sampled state:
        ``x⁺ ~ N(x + Ψ f(x), Qd(x))`` per substep (exact in law for a linear drift, weak
        order one otherwise; refine with ``substeps``).

        Args:
            key: a ``jax.random`` key.
            times: ``(T,)`` non-decreasing times; ``x[0] ~ N(m0, P0)`` at ``times[0]``.
            substeps: substeps per interval.

        Returns:
            ``(states (T, n), observations (T, m))``.
        """
        times = _checked_times(times, None)
        _check_substeps(substeps)
        dtype = self.dtype
        n, m = self.state_dim, self.obs_dim
        T = times.shape[0]
        k0, k_path, k_obs = jax.random.split(key, 3)
        x0 = self.m0.astype(dtype) + _psd_cholesky(_symmetrise(self.P0.astype(dtype))) @ jax.random.normal(k0, (n,), dtype)
        dt = jnp.diff(times.astype(dtype))

        def interval(x, xs):
            t, h, k = xs
            for j, kj in enumerate(jax.random.split(k, substeps)):
                F, Qd, shift, _ = _transition(self, x, t + j * h / substeps, h / substeps)
                x = x + shift + _psd_cholesky(Qd) @ jax.random.normal(kj, (n,), dtype)
            return x, x

        _, rest = lax.scan(interval, x0, (times[:-1].astype(dtype), dt, jax.random.split(k_path, max(T - 1, 0))))
        states = jnp.concatenate([x0[None], rest])[:T]
        LR = _psd_cholesky(_symmetrise(self.R.astype(dtype)))
        noise = jax.random.normal(k_obs, (T, m), dtype) @ LR.T
        means = jax.vmap(lambda x, t: self.observe(x, t, self.params))(states, times.astype(dtype))
        return states, means + noise


def _check_functions(model: NonlinearSDE):
    """Raises:
        ValueError: drift, observe or diffusion give an output of the wrong shape at ``m0``.
    """
    n, m = model.state_dim, model.obs_dim
    x = jax.ShapeDtypeStruct((n,), model.dtype)
    t = jax.ShapeDtypeStruct((), model.dtype)
    checks = [("drift", model.drift, (n,)), ("observe", model.observe, (m,))]
    if model.diffusion_fn is not None:
        checks.append(("diffusion", model.diffusion_fn, (n, n)))
    for name, fn, shape in checks:
        out = jax.eval_shape(lambda x_, t_, p: fn(x_, t_, p), x, t, model.params)
        got = getattr(out, "shape", None)
        if got != shape:
            raise ValueError(f"{name}(x, t, params) must return shape {shape} for x.shape = ({n},) "
                             f"(n = {n} states, m = {m} observed, from m0 and R); got {got}")


def _check_substeps(substeps):
    if not isinstance(substeps, (int, np.integer)) or isinstance(substeps, bool) or substeps < 1:
        raise ValueError(f"substeps must be a positive integer; got {substeps!r}")


def _checked_times(times, T):
    times = as_float_array("times", times)
    if times.ndim != 1 or (T is not None and times.shape[0] != T):
        want = "(T,)" if T is None else f"(T,) = ({T},) as y"
        raise ValueError(f"times must have shape {want}; got times.shape = {times.shape}")
    return times


# ------------------------------------------------------------------------------------------
# Step functions
# ------------------------------------------------------------------------------------------

# Paterson & Stockmeyer (1973): Σ_{k<=16} M^k / k! = B0 + M⁴ (B1 + M⁴ (B2 + M⁴ (B3 + c16 M⁴))),
# B_j = Σ_{i<4} c_{4j+i} M^i: six products (M², M³, M⁴ and three), each an unrolled small
# product (rules._smallmm) that XLA fuses instead of a dot call per product.
def _taylor16(block):
    c = _TAYLOR_COEFFS
    eye = jnp.eye(block.shape[-1], dtype=block.dtype)
    m2 = small_matmul(block, block)
    m3, m4 = small_matmul(m2, block), small_matmul(m2, m2)

    def part(j):
        return c[4 * j] * eye + c[4 * j + 1] * block + c[4 * j + 2] * m2 + c[4 * j + 3] * m3

    out = part(3) + c[16] * m4
    for j in (2, 1, 0):
        out = part(j) + small_matmul(m4, out)
    return out


def _substep_expm(block, J_scaled):
    """``(exp(block), out_of_range)`` for the Van Loan block of one substep, ``J_scaled = τ J``
    (``out_of_range``: beyond the squarings, or an entry overflowed):
    the Taylor polynomial in its range (most substeps: a short straight-line program), with
    scaling and squaring outside it. Under ``vmap`` the branches become a select and both run.
    """
    norm = jnp.maximum(jnp.max(jnp.sum(jnp.abs(J_scaled), axis=-2)),
                       jnp.max(jnp.sum(jnp.abs(J_scaled), axis=-1)))
    theta = _TAYLOR_THETA.get(np.dtype(block.dtype), _TAYLOR_THETA[np.dtype(np.float32)])

    def scaled(block):
        squarings = jnp.clip(jnp.ceil(jnp.log2(norm / theta)), 1, _MAX_SQUARINGS).astype(jnp.int32)
        out = _taylor16(block * (0.5 ** squarings).astype(block.dtype))
        return lax.fori_loop(0, _MAX_SQUARINGS, lambda i, E: jnp.where(
            i < squarings, small_matmul(E, E), E), out)

    out = lax.cond(norm > theta, scaled, _taylor16, block)  # NaN norm: the polynomial
    return out, (norm > theta * 2.0 ** _MAX_SQUARINGS) | ~jnp.all(jnp.isfinite(out))


# Local linearisation over one substep (module docstring):
#   exp(τ [[−J, Q, 0], [0, Jᵀ, 0], [0, fᵀ, 0]]) = [[·, G, 0], [0, Fᵀ, 0], [0, (Ψf)ᵀ, 1]],
#   Qd = F G (Van Loan 1978), then K doublings (exact semigroup identities).
def _transition(model: NonlinearSDE, x, t, h):
    """``(F, Qd, Ψ f(x), bad)`` over ``[t, t + h]`` of the drift linearised around ``x``
    with the Jacobian at the substep's midpoint (module docstring); ``bad`` flags a non-finite
    drift or Jacobian, or a clearly indefinite diffusion."""
    n = x.shape[-1]
    f = model.drift(x, t, model.params)
    # J and Q at the Euler midpoint (second order in h; at x itself the covariance is first
    # order: J(m(t)) moves by O(h) over the substep)
    x_mid, t_mid = x + 0.5 * h * f, t + 0.5 * h
    J = jax.jacfwd(model.drift)(x_mid, t_mid, model.params)
    Q = model.diffusion(x_mid, t_mid)
    tau = h / 2.0 ** _HALVINGS
    zeros = jnp.zeros((n, n), x.dtype)
    block = jnp.concatenate([
        jnp.concatenate([-J, Q, jnp.zeros((n, 1), x.dtype)], axis=1),
        jnp.concatenate([zeros, J.T, jnp.zeros((n, 1), x.dtype)], axis=1),
        jnp.concatenate([jnp.zeros((1, n), x.dtype), f[None], jnp.zeros((1, 1), x.dtype)], axis=1),
    ])
    E, out_of_range = _substep_expm(tau * block, tau * J)
    F, G, shift = E[n:2 * n, n:2 * n].T, E[:n, n:2 * n], E[2 * n, n:2 * n]
    mm = small_matmul
    Qd = mm(F, G)
    for _ in range(_HALVINGS):
        Qd = mm(mm(F, Qd), F.T) + Qd
        shift = F @ shift + shift
        F = mm(F, F)
    bad = ~(jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(J))) | out_of_range
    if model.diffusion_fn is not None:  # a constant Q is checked once by the filter
        bad = bad | _indefinite(Q)
    return F, _symmetrise(Qd), shift, bad


def _predict(model: NonlinearSDE, mean, cov, t, dt, substeps: int, sqrt: bool):
    """The moments at ``t + dt`` from those at ``t`` (``cov`` a lower factor when ``sqrt``),
    ``substeps`` relinearisations, and the composed transition ``(F, Qd)`` of the linearised
    SDE over ``dt`` (for the smoother), and a ``bad`` flag."""
    h = dt / substeps
    n = mean.shape[-1]

    def advance(cov, F, Qd):
        if sqrt:
            return tria(jnp.concatenate([small_matmul(F, cov), _psd_cholesky(Qd)], axis=1))
        return _symmetrise(small_matmul(small_matmul(F, cov), F.T) + Qd)

    def substep(carry, j):
        mean, cov, F_all, Q_all, bad = carry
        F, Qd, shift, bad_j = _transition(model, mean, t + j * h, h)
        F_all, Q_all, _ = _compose((F_all, Q_all, None), (F, Qd, None))
        return (mean + shift, advance(cov, F, Qd), F_all, Q_all, bad | bad_j), None

    if substeps == 1:
        F, Qd, shift, bad = _transition(model, mean, t, h)
        return mean + shift, advance(cov, F, Qd), F, Qd, bad
    carry = (mean, cov, jnp.eye(n, dtype=mean.dtype), jnp.zeros((n, n), mean.dtype),
             jnp.zeros((), bool))
    # a loop, not unrolled: the program (and its compile time) does not grow with substeps
    return lax.scan(substep, carry, jnp.arange(substeps, dtype=mean.dtype))[0]


def _cubature_statistics(model: NonlinearSDE, mean, L, t):
    """``(ŷ, Ξᵀ = H L, Ω = S_y − ΞᵀΞ)`` of the cubature rule (module docstring)."""
    n = mean.shape[-1]
    xi = np.sqrt(n) * np.concatenate([np.eye(n), -np.eye(n)])  # (2n, n)
    xi = jnp.asarray(xi, mean.dtype)
    points = mean + xi @ L.T
    Y = jax.vmap(lambda x: model.observe(x, t, model.params))(points)
    y_hat = jnp.mean(Y, axis=0)
    centred = Y - y_hat
    Xi = xi.T @ centred / (2 * n)  # (n, m)
    S_y = centred.T @ centred / (2 * n)
    return y_hat, Xi.T, _symmetrise(S_y - Xi.T @ Xi)


def _update(model: NonlinearSDE, mean, cov, y, t, method: str, sqrt: bool):
    """The update with ``y`` at ``t``: ``(Update, w, bad)`` (``w`` the observed indicator,
    ``bad`` a non-finite observation function or Jacobian)."""
    observed = ~jnp.isnan(y)
    R = _symmetrise(model.R.astype(mean.dtype))
    if method == "ekf":
        y_hat = model.observe(mean, t, model.params)
        H = jax.jacfwd(model.observe)(mean, t, model.params)
        w, Hm, Rm = _mask_observation(H, R, observed)
        v = jnp.where(observed, y - y_hat, 0.0)
        upd = _update_sqrt(mean, cov, H, Hm, Rm, v) if sqrt else _update_cov(mean, cov, Hm, Rm, v)
        bad = ~(jnp.all(jnp.isfinite(H)) & jnp.all(jnp.isfinite(y_hat)))
        return upd, w, bad
    L = cov if sqrt else _psd_cholesky(cov)
    y_hat, HL, Omega = _cubature_statistics(model, mean, L, t)
    w, HLm, Rm = _mask_observation(HL, R + Omega, observed)
    v = jnp.where(observed, y - y_hat, 0.0)
    if sqrt:
        upd = _update_sqrt_loadings(mean, cov, HLm, Rm, v)
        upd = upd._replace(finite=jnp.isfinite(Rm).all() & jnp.isfinite(HLm).all() & jnp.isfinite(cov).all())
    else:
        upd = _update_cov_moments(mean, cov, HLm @ L.T, HLm @ HLm.T + Rm, v)
    bad = ~(jnp.all(jnp.isfinite(y_hat)) & jnp.all(jnp.isfinite(HL)))
    return upd, w, bad


def observation_moments(model: NonlinearSDE, means, covs, times, method: str):
    """``(E[y], Cov[y])`` of a new observation at ``times (N,)`` given state moments
    ``means (N, n)``, ``covs (N, n, n)``, by the update's linearisation: ``(h(m), H P Hᵀ + R)``
    for ``"ekf"``, ``(ŷ, S_y + R)`` of the cubature rule for ``"ukf"``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from statespace import NonlinearSDE
        >>> from statespace._nonlinear import observation_moments
        >>> sde = NonlinearSDE(lambda x, t, p: -x, jnp.eye(2), lambda x, t, p: x[:1] ** 2,
        ...                    0.1 * jnp.eye(1), jnp.zeros(2), jnp.eye(2))
        >>> means, covs, times = jnp.array([[1.0, 0.0]]), 0.5 * jnp.eye(2)[None], jnp.zeros(1)
        >>> ekf = observation_moments(sde, means, covs, times, "ekf")  # h = 1, H = [2, 0]
        >>> [float(v) for v in (ekf[0][0, 0], ekf[1][0, 0, 0])]
        [1.0, 2.1]
        >>> ukf = observation_moments(sde, means, covs, times, "ukf")  # E[x²] = 1.5 exactly
        >>> round(float(ukf[0][0, 0]), 6)
        1.5
    """
    R = _symmetrise(model.R.astype(means.dtype))

    def single(mean, cov, t):
        if method == "ekf":
            H = jax.jacfwd(model.observe)(mean, t, model.params)
            return model.observe(mean, t, model.params), H @ cov @ H.T + R
        y_hat, HL, Omega = _cubature_statistics(model, mean, _psd_cholesky(_symmetrise(cov)), t)
        return y_hat, HL @ HL.T + Omega + R

    obs_means, obs_covs = jax.vmap(single)(means, covs, times)
    return obs_means, _symmetrise(obs_covs)


# ------------------------------------------------------------------------------------------
# Driver: the scan over observation times
# ------------------------------------------------------------------------------------------

class NonlinearPass(NamedTuple):
    """The filter over one series: its :class:`FilterResult` and the linearised transitions
    ``F[k]``, ``Q[k]`` over ``[t_k, t_{k+1}]`` (the extended RTS smoother's; the last is
    ``(I, 0)``).

    Example:
        >>> import jax.numpy as jnp
        >>> from statespace import NonlinearSDE
        >>> from statespace._nonlinear import nonlinear_pass
        >>> sde = NonlinearSDE(lambda x, t, p: -x, 2.0 * jnp.eye(1), lambda x, t, p: x,
        ...                    jnp.eye(1), jnp.zeros(1), jnp.eye(1))
        >>> out = nonlinear_pass(sde, jnp.array([[0.3], [0.1]]), jnp.array([0.0, 1.0]))
        >>> # the predicted covariance is F P_f Fᵀ + Q over the interval (here exact: linear)
        >>> P_f, F, Q = out.result.filtered_covs[0], out.F[0], out.Q[0]
        >>> bool(jnp.allclose(out.result.predicted_covs[1], F @ P_f @ F.T + Q))
        True
    """

    result: FilterResult
    F: jax.Array
    Q: jax.Array


def _scan(model: NonlinearSDE, y, times, method, substeps, form) -> NonlinearPass:
    """The filter over one series ``y (T, m)``: update at ``t_k``, then prediction to
    ``t_{k+1}``; ``-inf`` (NaN gradient) from the first step that uses a rejected quantity."""
    sqrt = form == "sqrt"
    dtype = jnp.result_type(model.dtype, y.dtype, times.dtype)
    y, times = y.astype(dtype), times.astype(dtype)
    T = y.shape[0]
    dt = jnp.concatenate([jnp.diff(times), jnp.zeros((1,), dtype)])[:T]
    P0 = _symmetrise(model.P0.astype(dtype))
    cov0 = _psd_cholesky(P0) if sqrt else P0

    def step(carry, xs):
        mean, cov, failed = carry
        yk, t, h = xs
        upd, w, bad_obs = _update(model, mean, cov, yk, t, method, sqrt)
        ok = jnp.all(jnp.abs(upd.diag) > 0)
        failed = failed | (upd.finite & ~ok)
        ll = jnp.where(failed, -jnp.inf, _log_likelihood_term(upd.e, upd.diag, w))
        mean_next, cov_next, F, Qd, bad_pred = _predict(model, upd.mean, upd.cov, t, h, substeps, sqrt)
        return (mean_next, cov_next, failed), (ll, bad_obs, bad_pred | (h < 0), mean, cov, upd.mean, upd.cov, F, Qd)

    carry0 = (model.m0.astype(dtype), cov0, jnp.zeros((), bool))
    _, (ll, bad_obs, bad_pred, pm, pc, fm, fc, F, Qd) = lax.scan(step, carry0, (y, times, dt))
    # a bad prediction over [t_k, t_{k+1}] is first used by step k + 1 (the one after the
    # last observation by none)
    bad = bad_obs | jnp.concatenate([jnp.zeros((1,), bool), bad_pred[:-1]])[:T]
    invalid = _indefinite(model.R) | _indefinite(model.P0)
    if model.Q is not None:
        invalid = invalid | _indefinite(model.Q)
    bad_steps = _from_first(bad) | invalid
    leaves = _float_leaves(model)
    ll = _reject(ll, bad_steps, *leaves)
    total = _reject(jnp.sum(ll), jnp.any(bad_steps) | invalid, *leaves)
    full = (lambda L: L @ jnp.swapaxes(L, -1, -2)) if sqrt else (lambda P: P)
    result = FilterResult(total, ll, fm, full(fc), pm, full(pc),
                          fc if sqrt else None, pc if sqrt else None)
    return NonlinearPass(result, F, Qd)


def nonlinear_options(model, method, substeps, max_step=None, **linear_only):
    """``(method, substeps, max_step)`` with their defaults for a :class:`NonlinearSDE`,
    ``None`` for another model (the front ends' dispatch).

    Raises:
        ValueError: ``method``/``substeps``/``max_step`` for another model, or an option of the
            linear filters (``inputs``, ``new_inputs``, ``parallel``, ``gradient="adjoint"``)
            given for a ``NonlinearSDE``.

    Example:
        >>> import jax.numpy as jnp
        >>> from statespace import NonlinearSDE
        >>> from statespace._nonlinear import nonlinear_options
        >>> sde = NonlinearSDE(lambda x, t, p: -x, jnp.eye(1), lambda x, t, p: x, jnp.eye(1),
        ...                    jnp.zeros(1), jnp.eye(1))
        >>> nonlinear_options(sde, None, None, parallel=False), nonlinear_options(object(), None, None)
        (('ekf', 1, None), None)
    """
    if not isinstance(model, NonlinearSDE):
        if method is not None or substeps is not None or max_step is not None:
            raise ValueError("method, substeps and max_step apply to a NonlinearSDE only; got "
                             f"method={method!r}, substeps={substeps!r}, max_step={max_step!r} "
                             f"for a {type(model).__name__}")
        return None
    given = [name for name, value in linear_only.items()
             if value is not None and not (name == "parallel" and value is False)
             and not (name == "gradient" and value == "autodiff")]
    if given:
        raise ValueError(f"a NonlinearSDE does not take {sorted(given)} (inputs enter through the "
                         "drift's t and params; gradients are autodiff through the filter)")
    return ("ekf" if method is None else method), (1 if substeps is None else substeps), max_step


def _check_max_step(max_step):
    if (isinstance(max_step, bool) or not isinstance(max_step, (int, float, np.integer, np.floating))
            or not (np.isfinite(max_step) and max_step > 0)):
        raise ValueError(f"max_step must be a positive finite number or None; got {max_step!r}")
    return float(max_step)


def refined_grid(times, max_step):
    """``(fine_times, rows)``: ``times (T,)`` with equally spaced points added inside every gap
    longer than ``max_step`` (a gap is split into ``ceil(gap / max_step)`` equal parts), and the
    positions ``rows (T,)`` of the observation times in it (NumPy arrays).

    Filtering the observations placed at ``rows`` of an otherwise missing (NaN) series on the
    fine grid gives the same numbers as splitting each gap into that many substeps: a missing
    observation's update changes nothing.

    Raises:
        ValueError: ``max_step`` not a positive finite number, ``times`` not 1-D.
        TypeError: traced ``times`` (the grid's length depends on their values).

    Example:
        >>> from statespace._nonlinear import refined_grid
        >>> fine, rows = refined_grid([0.0, 0.1, 1.0, 1.2], 0.3)
        >>> fine.round(3).tolist(), rows.tolist()
        ([0.0, 0.1, 0.4, 0.7, 1.0, 1.2], [0, 1, 4, 5])
    """
    max_step = _check_max_step(max_step)
    try:
        t = np.asarray(times)
    except jax.errors.TracerArrayConversionError:
        raise TypeError("max_step needs the observation times as concrete values (the refined "
                        "grid's length depends on them); under jax.jit close over the times "
                        "instead of passing them as a traced argument") from None
    if t.ndim != 1:
        raise ValueError(f"times must have shape (T,); got times.shape = {t.shape}")
    if not np.issubdtype(t.dtype, np.floating):  # integer times: inner points are not integers
        t = t.astype(np.float64)
    if t.size == 0:
        return t, np.zeros(0, np.int64)
    gaps = np.diff(t)
    with np.errstate(invalid="ignore"):  # NaN or decreasing times: left for the filter to reject
        long = np.isfinite(gaps) & (gaps > max_step)
        counts = np.where(long, np.ceil(np.where(long, gaps, 0.0) / max_step), 1).astype(np.int64)
    rows = np.concatenate([[0], np.cumsum(counts)])
    part = np.arange(rows[-1]) - np.repeat(rows[:-1], counts)  # position inside its gap
    fine = np.repeat(t[:-1], counts) + np.repeat(gaps, counts) * part / np.repeat(counts, counts)
    return np.append(fine, t[-1]).astype(t.dtype, copy=False), rows


# A pass on the refined grid seen at the observation ``rows``: the moments and log-likelihood
# terms there; each gap's transition is the composition of its pieces' (restarted at each
# observation row), as ``substeps`` composes them.
def _coarsen(passed: NonlinearPass, rows) -> NonlinearPass:
    def compose(carry, xs):
        F, Q, start = xs
        F_acc, Q_acc, _ = _compose((*carry, None), (F, Q, None))
        carry = (jnp.where(start, F, F_acc), jnp.where(start, Q, Q_acc))
        return carry, carry

    n = passed.F.shape[-1]
    starts = jnp.zeros(passed.F.shape[0], bool).at[rows].set(True)
    eye, zeros = jnp.eye(n, dtype=passed.F.dtype), jnp.zeros((n, n), passed.F.dtype)
    F, Q = lax.scan(compose, (eye, zeros), (passed.F, passed.Q, starts))[1]
    ends = jnp.append(rows[1:] - 1, rows[-1:])  # each gap's last piece (the last row: itself)
    r = passed.result
    at = lambda a: None if a is None else a[rows]  # noqa: E731
    result = FilterResult(r.log_likelihood, *(at(a) for a in r[1:]))
    return NonlinearPass(result, F[ends], Q[ends])


def _refined_scan(model, y, times, rows, method, substeps, form):
    return _coarsen(_scan(model, y, times, method, substeps, form), rows)


# Eager calls compile once per model functions, shapes and options (the functions are the
# model's static part), not once per call.
_scan_jit = jax.jit(_scan, static_argnums=(3, 4, 5))
_refined_scan_jit = jax.jit(_refined_scan, static_argnums=(4, 5, 6))


def _checked_call(model, y, times, method, substeps, form):
    """``(y, times)`` checked for the nonlinear filter.

    Raises:
        ValueError: unknown ``method`` or ``form``, bad ``substeps``, ``y`` not ``(..., T, m)``
            with the model's ``m``, ``times`` missing or not ``(T,)``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    _check_form(form)
    _check_substeps(substeps)
    y = as_float_array("y", y)
    if y.ndim < 2 or y.shape[-1] != model.obs_dim:
        raise ValueError(f"y must have shape (..., T, m) with m = {model.obs_dim} (R.shape = "
                         f"{model.R.shape}); got y.shape = {y.shape}")
    if times is None:
        raise ValueError("times is required for a NonlinearSDE: the observation times (T,)")
    return y, _checked_times(times, y.shape[-2])


def _over_series(fn, y):
    """``fn(y_single)`` mapped over the leading axes of ``y (..., T, m)``."""
    for _ in range(y.ndim - 2):
        fn = jax.vmap(fn)
    return fn(y)


@full_precision
def nonlinear_pass(model: NonlinearSDE, y, times, *, method="ekf", substeps=1, form="cov",
                   max_step=None) -> NonlinearPass:
    """The local-linearisation filter over ``y (..., T, m)`` at ``times (T,)`` with the
    linearised transitions (see the module docstring); leading axes of ``y`` batch.

    ``max_step`` (concrete ``times`` only) first splits every gap longer than it into
    ``ceil(gap / max_step)`` equal parts (:func:`refined_grid`), each with ``substeps``
    relinearisations: the cost grows with the long gaps only. The result is reported at the
    observation times, the transitions composed over each gap.

    Raises:
        ValueError: as :func:`_checked_call`; a bad ``max_step``.
        TypeError: ``max_step`` with traced ``times``.

    Example:
        >>> import jax.numpy as jnp
        >>> from statespace import NonlinearSDE
        >>> from statespace._nonlinear import nonlinear_pass
        >>> sde = NonlinearSDE(lambda x, t, p: -x ** 3, jnp.eye(1), lambda x, t, p: x,
        ...                    0.1 * jnp.eye(1), jnp.ones(1), jnp.eye(1))
        >>> y, times = jnp.array([[1.0], [0.5]]), jnp.array([0.0, 0.2])
        >>> out = nonlinear_pass(sde, y, times, substeps=4)
        >>> out.result.filtered_means.shape, out.F.shape  # F[0]: the linearised e^{J dt}
        ((2, 1), (2, 1, 1))
        >>> bool(out.F[0, 0, 0] < 1.0) and bool(jnp.all(out.F[-1] == 1.0))  # the last: dt = 0
        True
        >>> split = nonlinear_pass(sde, y, times, max_step=0.05)  # four pieces of one substep
        >>> bool(jnp.allclose(split.F, out.F, rtol=1e-12, atol=0))
        True
    """
    # the grid from the times as given: converted to a JAX array under jit they are traced
    fine, rows = (None, None) if max_step is None else refined_grid(times, max_step)
    y, times = _checked_call(model, y, times, method, substeps, form)
    if max_step is None:
        return _over_series(lambda yy: _scan_jit(model, yy, times, method, substeps, form), y)
    y_fine = jnp.full(y.shape[:-2] + (fine.shape[0], y.shape[-1]), jnp.nan, y.dtype)
    y_fine = y_fine.at[..., rows, :].set(y)
    return _over_series(lambda yy: _refined_scan_jit(model, yy, fine, rows, method, substeps,
                                                     form), y_fine)


__all__ = ["METHODS", "NonlinearSDE", "NonlinearPass", "nonlinear_options", "nonlinear_pass",
           "observation_moments", "refined_grid"]
