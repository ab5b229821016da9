"""Ready-made continuous-time models: each builder returns a :class:`ContinuousLinearSSM`.

Every stationary builder returns ``P0=None`` (stationary start ``P∞ = rules.lyap(A, Q)``), so an
invalid traced hyperparameter (e.g. a negative lengthscale or variance) gives a ``-inf``
log-likelihood under ``jit`` rather than an exception; one given as a Python or NumPy number is
checked at once (``ValueError`` for a lengthscale, variance, frequency, quality factor, period
or decay time ``<= 0``, or a ``noise_var < 0``). The scalar builders observe one scalar: ``H`` is the
component's observation row (``(1, n)``) and ``R = [[noise_var]]``. Hyperparameters may be
traced (builders are meant to be called inside the loss that ``jax.grad`` differentiates).

Covariance functions (``τ = |t − t'|``) of the observed scalar ``H x``:

=================  =================================================================
``matern12``       ``σ² e^{−τ/ℓ}``
``matern32``       ``σ² (1 + √3 τ/ℓ) e^{−√3 τ/ℓ}``
``matern52``       ``σ² (1 + √5 τ/ℓ + 5τ²/(3ℓ²)) e^{−√5 τ/ℓ}``
``sho``            ``S e^{−ωτ/(2Q)} (cos ηωτ + sin(ηωτ)/(2ηQ))``, ``η = √(1 − 1/(4Q²))`` (celerite)
``quasi_periodic`` a sum of SHOs at the harmonics of one period with a common decay time
``carma``          Kelly et al. (2014), eq. 4
=================  =================================================================

Example:
    >>> import statespace
    >>> from statespace import models
    >>> model = models.sum_of(models.local_linear_trend(0.1, 0.01),
    ...                       models.quasi_periodic(period=1.0, decay_time=20.0, variances=[1.0]),
    ...                       noise_var=0.05)
    >>> model.state_dim, model.obs_dim, model.diffuse   # the trend starts diffuse
    (4, 1, (True, True, False, False))
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import rules
from rules._checks import as_float_array
from statespace._continuous import ContinuousLinearSSM

__all__ = [
    "carma",
    "local_level",
    "local_linear_trend",
    "matern12",
    "matern32",
    "matern52",
    "ou",
    "product_of",
    "quasi_periodic",
    "sho",
    "sum_of",
]


def _scalar(name, value):
    value = as_float_array(name, value)
    if value.ndim != 0:
        raise ValueError(f"{name} must be a scalar; got {name}.shape = {value.shape}")
    return value


def _static_values(value):
    """``value`` as a NumPy array if it is static (Python or NumPy numbers, or a list of them),
    else ``None`` (a JAX array, possibly traced: checked by the filter under ``jit``)."""
    numbers = (int, float, np.generic)
    if isinstance(value, (list, tuple)) and all(isinstance(v, numbers) for v in value):
        return np.asarray(value, dtype=float)
    if isinstance(value, (*numbers, np.ndarray)):
        return np.asarray(value, dtype=float)
    return None


def _check_positive(**values):
    """Static hyperparameters (Python/NumPy numbers) must be > 0: a clear error up front.

    Raises:
        ValueError: naming the hyperparameter and its value.
    """
    for name, value in values.items():
        static = _static_values(value)
        if static is not None and not np.all(static > 0):
            raise ValueError(f"{name} must be > 0; got {name} = {value!r}")


def _check_noise(noise_var):
    """A static ``noise_var`` must be >= 0.

    Raises:
        ValueError: naming the value.
    """
    static = _static_values(noise_var)
    if static is not None and not np.all(static >= 0):
        raise ValueError(f"noise_var must be >= 0; got noise_var = {noise_var!r}")


def _dtype(*values):
    return jnp.result_type(*values)


def _scalar_obs(n, noise_var, dtype, first=True):
    H = jnp.zeros((1, n), dtype).at[0, 0].set(1.0)
    R = jnp.reshape(jnp.asarray(noise_var, dtype), (1, 1))
    return H, R


def ou(drift, diffusion, H=None, noise_var=0.0):
    """Multivariate Ornstein–Uhlenbeck process ``dx = A x dt + dW``, ``Cov(dW) = Q dt``.

    The ctsem parametrisation: ``drift`` is the full drift matrix ``A`` (DRIFT), ``diffusion``
    the covariance rate ``Q`` (ctsem's DIFFUSION covariance, i.e. ``L Lᵀ`` of its Cholesky
    factor). Stationary start ``P∞ = lyap(A, Q)``.

    Args:
        drift: ``(n, n)`` drift matrix ``A`` (stable for the stationary start).
        diffusion: ``(n, n)`` covariance rate ``Q``.
        H: ``(m, n)`` observation matrix; ``None`` observes all states (``H = I``).
        noise_var: observation noise variance; ``R = noise_var · I_m``.

    Returns:
        :class:`ContinuousLinearSSM`.

    Raises:
        ValueError: on inconsistent shapes.

    Example:
        >>> import jax.numpy as jnp, rules
        >>> from statespace.models import ou
        >>> model = ou(jnp.array([[-1.0, 0.3], [0.0, -0.5]]), jnp.eye(2), noise_var=0.1)
        >>> model.state_dim, model.obs_dim, model.R.tolist()
        (2, 2, [[0.1, 0.0], [0.0, 0.1]])
        >>> ou(jnp.array([[-2.0]]), jnp.array([[1.0]])).P0 is None   # stationary start
        True
        >>> round(float(rules.lyap(jnp.array([[-2.0]]), jnp.array([[1.0]]))[0, 0]), 6)  # Q / 2|A|
        0.25
    """
    _check_noise(noise_var)
    A = as_float_array("drift", drift)
    Q = as_float_array("diffusion", diffusion)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"drift must have shape (n, n); got drift.shape = {A.shape}")
    n = A.shape[0]
    dtype = _dtype(A, Q)
    H = jnp.eye(n, dtype=dtype) if H is None else as_float_array("H", H)
    if H.ndim != 2:
        raise ValueError(f"H must have shape (m, n); got H.shape = {H.shape}")
    R = jnp.asarray(noise_var, dtype) * jnp.eye(H.shape[0], dtype=dtype)
    return ContinuousLinearSSM(A, Q, H, R)


def matern12(lengthscale, variance, noise_var=0.0):
    """Matérn-1/2 (exponential / OU) kernel ``k(τ) = σ² e^{−τ/ℓ}``: ``A = −1/ℓ``, ``Q = 2σ²/ℓ``.

    Args:
        lengthscale: ``ℓ > 0``.
        variance: ``σ² > 0``.
        noise_var: observation noise variance.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = 1``.

    Example:
        >>> import rules
        >>> from statespace.models import matern12
        >>> model = matern12(1.0, 2.0)
        >>> P = rules.lyap(model.A, model.Q)   # the stationary covariance P∞
        >>> def k(tau):                         # the covariance H e^{Aτ} P∞ Hᵀ
        ...     return round(float((model.H @ rules.expm(model.A * tau) @ P @ model.H.T)[0, 0]), 6)
        >>> model.state_dim, k(0.0), k(1.0)   # σ², σ² e^{−1}
        (1, 2.0, 0.735759)
    """
    _check_positive(lengthscale=lengthscale, variance=variance)
    _check_noise(noise_var)
    ell, var = _scalar("lengthscale", lengthscale), _scalar("variance", variance)
    dtype = _dtype(ell, var, noise_var)
    A = jnp.reshape(-1.0 / ell, (1, 1)).astype(dtype)
    Q = jnp.reshape(2.0 * var / ell, (1, 1)).astype(dtype)
    H, R = _scalar_obs(1, noise_var, dtype)
    return ContinuousLinearSSM(A, Q, H, R)


def matern32(lengthscale, variance, noise_var=0.0):
    """Matérn-3/2 kernel ``k(τ) = σ² (1 + λτ) e^{−λτ}``, ``λ = √3/ℓ``.

    State ``(f, f')``: ``A = [[0, 1], [−λ², −2λ]]``, ``Q = diag(0, 4λ³σ²)``,
    ``P∞ = diag(σ², λ²σ²)`` (Hartikainen & Särkkä 2010).

    Args:
        lengthscale: ``ℓ > 0``.
        variance: ``σ² > 0``.
        noise_var: observation noise variance.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = 2``.

    Example:
        >>> import rules
        >>> from statespace.models import matern32
        >>> model = matern32(1.0, 2.0)
        >>> P = rules.lyap(model.A, model.Q)   # the stationary covariance P∞
        >>> def k(tau):                         # the covariance H e^{Aτ} P∞ Hᵀ
        ...     return round(float((model.H @ rules.expm(model.A * tau) @ P @ model.H.T)[0, 0]), 6)
        >>> model.state_dim, k(0.0), k(1.0)   # σ², σ² (1 + √3) e^{−√3}
        (2, 2.0, 0.966715)
    """
    _check_positive(lengthscale=lengthscale, variance=variance)
    _check_noise(noise_var)
    ell, var = _scalar("lengthscale", lengthscale), _scalar("variance", variance)
    dtype = _dtype(ell, var, noise_var)
    lam = jnp.sqrt(jnp.asarray(3.0, dtype)) / ell
    zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
    A = jnp.stack([jnp.stack([zero, one]), jnp.stack([-(lam**2), -2.0 * lam])]).astype(dtype)
    Q = jnp.zeros((2, 2), dtype).at[1, 1].set(4.0 * lam**3 * var)
    H, R = _scalar_obs(2, noise_var, dtype)
    return ContinuousLinearSSM(A, Q, H, R)


def matern52(lengthscale, variance, noise_var=0.0):
    """Matérn-5/2 kernel ``k(τ) = σ² (1 + λτ + λ²τ²/3) e^{−λτ}``, ``λ = √5/ℓ``.

    State ``(f, f', f'')``: companion ``A`` with last row ``(−λ³, −3λ², −3λ)``,
    ``Q = diag(0, 0, 16σ²λ⁵/3)``.

    Args:
        lengthscale: ``ℓ > 0``.
        variance: ``σ² > 0``.
        noise_var: observation noise variance.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = 3``.

    Example:
        >>> import rules
        >>> from statespace.models import matern52
        >>> model = matern52(1.0, 2.0)
        >>> P = rules.lyap(model.A, model.Q)   # the stationary covariance P∞
        >>> def k(tau):                         # the covariance H e^{Aτ} P∞ Hᵀ
        ...     return round(float((model.H @ rules.expm(model.A * tau) @ P @ model.H.T)[0, 0]), 6)
        >>> model.state_dim, k(0.0), k(1.0)   # σ², σ² (1 + √5 + 5/3) e^{−√5}
        (3, 2.0, 1.047988)
    """
    _check_positive(lengthscale=lengthscale, variance=variance)
    _check_noise(noise_var)
    ell, var = _scalar("lengthscale", lengthscale), _scalar("variance", variance)
    dtype = _dtype(ell, var, noise_var)
    lam = jnp.sqrt(jnp.asarray(5.0, dtype)) / ell
    A = jnp.zeros((3, 3), dtype).at[0, 1].set(1.0).at[1, 2].set(1.0)
    A = A.at[2].set(jnp.stack([-(lam**3), -3.0 * lam**2, -3.0 * lam]).astype(dtype))
    Q = jnp.zeros((3, 3), dtype).at[2, 2].set(16.0 / 3.0 * var * lam**5)
    H, R = _scalar_obs(3, noise_var, dtype)
    return ContinuousLinearSSM(A, Q, H, R)


def sho(omega, quality, variance, noise_var=0.0):
    """Stochastically driven damped harmonic oscillator (celerite's SHO term).

    ``f'' + (ω/Q) f' + ω² f = white noise``, state ``(f, f')``: ``A = [[0, 1], [−ω², −ω/Q]]``,
    ``Q_diff = diag(0, 2ω³ S/Q)`` so that ``Var f = S`` (``P∞ = diag(S, ω² S)``). Kernel::

        k(τ) = S e^{−ωτ/(2Q)} (cos ηωτ  + sin(ηωτ)/(2ηQ)),   η = √(1 − 1/(4Q²)),  Q > 1/2
        k(τ) = S e^{−ωτ} (1 + ωτ),                                              Q = 1/2
        k(τ) = S e^{−ωτ/(2Q)} (cosh ηωτ + sinh(ηωτ)/(2ηQ)), η = √(1/(4Q²) − 1), Q < 1/2

    (Foreman-Mackey et al. 2017, eq. 23, with ``S = S0 ω Q``.) One state-space form covers all three.

    Args:
        omega: undamped angular frequency ``ω > 0``.
        quality: quality factor ``Q > 0``.
        variance: ``S = k(0) > 0``.
        noise_var: observation noise variance.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = 2``.

    Example:
        >>> import math, rules
        >>> from statespace.models import sho
        >>> model = sho(2.0, 5.0, 1.0)
        >>> P = rules.lyap(model.A, model.Q)   # the stationary covariance P∞
        >>> def k(tau):                         # the covariance H e^{Aτ} P∞ Hᵀ
        ...     return round(float((model.H @ rules.expm(model.A * tau) @ P @ model.H.T)[0, 0]), 6)
        >>> eta = math.sqrt(1 - 1 / 100)   # ω = 2, Q = 5, τ = 1 in the formula above
        >>> celerite = math.exp(-0.2) * (math.cos(2 * eta) + math.sin(2 * eta) / (10 * eta))
        >>> model.state_dim, k(0.0), k(1.0) == round(celerite, 6)
        (2, 1.0, True)
    """
    _check_positive(omega=omega, quality=quality, variance=variance)
    _check_noise(noise_var)
    w, q, var = _scalar("omega", omega), _scalar("quality", quality), _scalar("variance", variance)
    dtype = _dtype(w, q, var, noise_var)
    zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
    A = jnp.stack([jnp.stack([zero, one]), jnp.stack([-(w**2), -w / q])]).astype(dtype)
    Qm = jnp.zeros((2, 2), dtype).at[1, 1].set(2.0 * w**3 * var / q)
    H, R = _scalar_obs(2, noise_var, dtype)
    return ContinuousLinearSSM(A, Qm, H, R)


def quasi_periodic(period, decay_time, variances, noise_var=0.0):
    """Quasi-periodic component: SHOs at the harmonics ``j = 1..J`` of ``period``.

    Harmonic ``j`` is an :func:`sho` whose covariance is
    ``v_j e^{−τ/τ_d} (cos(2πjτ/P) + sin(2πjτ/P)/(2η_j Q_j))``: its oscillation frequency is
    exactly ``2πj/P`` and its envelope decays with ``decay_time`` ``τ_d``
    (``ω_j = √((2πj/P)² + 1/τ_d²)``, ``Q_j = ω_j τ_d / 2``). Several harmonics give a
    non-sinusoidal seasonal shape (e.g. the yearly CO₂ cycle).

    Args:
        period: ``P > 0``.
        decay_time: ``τ_d > 0`` (large: nearly periodic).
        variances: scalar or ``(J,)`` variances of the harmonics.
        noise_var: observation noise variance.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = 2J`` (a :func:`sum_of` of SHOs).

    Example:
        >>> import rules
        >>> from statespace.models import quasi_periodic
        >>> model = quasi_periodic(1.0, 10.0, [1.0, 0.3])
        >>> P = rules.lyap(model.A, model.Q)
        >>> model.state_dim, round(float((model.H @ P @ model.H.T)[0, 0]), 6)   # Σ variances
        (4, 1.3)
    """
    _check_positive(period=period, decay_time=decay_time, variances=variances)
    _check_noise(noise_var)
    P, td = _scalar("period", period), _scalar("decay_time", decay_time)
    v = jnp.atleast_1d(as_float_array("variances", variances))
    if v.ndim != 1:
        raise ValueError(f"variances must be a scalar or have shape (J,); got variances.shape = {v.shape}")
    parts = []
    for j in range(v.shape[0]):
        nu = 2.0 * jnp.pi * (j + 1) / P
        w = jnp.sqrt(nu**2 + 1.0 / td**2)
        parts.append(sho(w, w * td / 2.0, v[j]))
    return sum_of(*parts, noise_var=noise_var)


def carma(ar_coefs, ma_coefs, sigma, noise_var=0.0):
    """CARMA(p, q) process (Kelly et al. 2014, convention of their eq. 1)::

        f^{(p)} + α_1 f^{(p−1)} + … + α_p f = σ (β_0 ε + β_1 ε' + … + β_q ε^{(q)})

    with ``ε`` unit white noise, ``ar_coefs = (α_1, …, α_p)`` (the monic AR polynomial
    ``α(s) = s^p + α_1 s^{p−1} + … + α_p``, stable iff all its roots have negative real part)
    and ``ma_coefs = (β_0, …, β_q)``, ``q < p`` (``β(s) = β_0 + β_1 s + … + β_q s^q``; Kelly
    et al. fix ``β_0 = 1``). Power spectrum ``σ² |β(iν)|² / |α(iν)|²``.

    State space (controllable canonical form): ``A`` is the companion matrix with last row
    ``(−α_p, …, −α_1)``, ``Q = σ² e_p e_pᵀ``, ``H = (β_0, …, β_q, 0, …, 0)``.

    Args:
        ar_coefs: ``(p,)`` AR coefficients ``α_1 … α_p``.
        ma_coefs: ``(q+1,)`` MA coefficients ``β_0 … β_q`` with ``q < p``.
        sigma: driving-noise amplitude ``σ``.
        noise_var: observation noise variance.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = p``.

    Raises:
        ValueError: if the coefficient vectors are not 1-D or ``q ≥ p``.

    Example:
        >>> import jax.numpy as jnp, rules
        >>> from statespace.models import carma
        >>> model = carma(jnp.array([1.5, 0.8]), jnp.array([1.0, 0.2]), 1.0)
        >>> model.state_dim, model.A.tolist()     # companion matrix
        (2, [[0.0, 1.0], [-0.8, -1.5]])
        >>> # CARMA(2, 1) variance σ² (β_0² + β_1² α_2) / (2 α_1 α_2) = 1.032 / 2.4
        >>> round(float((model.H @ rules.lyap(model.A, model.Q) @ model.H.T)[0, 0]), 6)
        0.43
    """
    _check_noise(noise_var)
    alpha = as_float_array("ar_coefs", ar_coefs)
    beta = as_float_array("ma_coefs", ma_coefs)
    sig = _scalar("sigma", sigma)
    if alpha.ndim != 1 or beta.ndim != 1 or alpha.shape[0] < 1 or beta.shape[0] < 1:
        raise ValueError(f"ar_coefs and ma_coefs must be non-empty 1-D; got shapes {alpha.shape}, {beta.shape}")
    p, q1 = alpha.shape[0], beta.shape[0]
    if q1 > p:
        raise ValueError(f"CARMA needs q < p; got ar_coefs.shape = {alpha.shape}, ma_coefs.shape = {beta.shape}")
    dtype = _dtype(alpha, beta, sig, noise_var)
    A = jnp.eye(p, k=1, dtype=dtype).at[p - 1].set(-alpha[::-1].astype(dtype))
    Q = jnp.zeros((p, p), dtype).at[p - 1, p - 1].set(sig**2)
    H = jnp.zeros((1, p), dtype).at[0, :q1].set(beta.astype(dtype))
    R = jnp.reshape(jnp.asarray(noise_var, dtype), (1, 1))
    return ContinuousLinearSSM(A, Q, H, R)


def local_level(sigma, noise_var=0.0, *, m0=None, P0=None):
    """Local level (Brownian motion / random walk) ``dx = σ dW``, observed directly.

    ``A = 0`` is singular, so there is no stationary start: the initial state is diffuse
    (exact diffuse initialisation) unless ``P0`` is given.

    Args:
        sigma: ``σ``, the level's diffusion (``Q = σ²``).
        noise_var: observation noise variance.
        m0: initial mean ``(1,)`` (with ``P0``).
        P0: initial covariance ``(1, 1)``; ``None`` = diffuse.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = 1``.

    Example:
        >>> from statespace.models import local_level
        >>> model = local_level(0.3, noise_var=0.5)
        >>> model.diffuse, round(float(model.Q[0, 0]), 6), round(float(model.R[0, 0]), 6)
        ((True,), 0.09, 0.5)
        >>> local_level(0.3, m0=[0.0], P0=[[1.0]]).diffuse is None   # a proper start
        True
    """
    _check_noise(noise_var)
    sig = _scalar("sigma", sigma)
    dtype = _dtype(sig, noise_var)
    A = jnp.zeros((1, 1), dtype)
    Q = jnp.reshape(sig**2, (1, 1)).astype(dtype)
    H, R = _scalar_obs(1, noise_var, dtype)
    return ContinuousLinearSSM(A, Q, H, R, m0, P0, diffuse=True if P0 is None else None)


def local_linear_trend(sigma_level, sigma_slope, noise_var=0.0, *, m0=None, P0=None):
    """Local linear trend: level ``l`` and slope ``s`` with ``dl = s dt + σ_l dW_1``, ``ds = σ_s dW_2``.

    ``A = [[0, 1], [0, 0]]`` (singular, defective), ``Q = diag(σ_l², σ_s²)``, ``H = (1, 0)``.
    ``σ_l = 0`` gives the integrated random walk (cubic smoothing spline prior). Diffuse
    initial state unless ``P0`` is given.

    Args:
        sigma_level: ``σ_l``.
        sigma_slope: ``σ_s``.
        noise_var: observation noise variance.
        m0: initial mean ``(2,)`` (with ``P0``).
        P0: initial covariance ``(2, 2)``; ``None`` = diffuse.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = 2``.

    Example:
        >>> from statespace.models import local_linear_trend
        >>> model = local_linear_trend(0.1, 0.01)
        >>> model.state_dim, model.A.tolist()   # the level integrates the slope
        (2, [[0.0, 1.0], [0.0, 0.0]])
        >>> import numpy as np
        >>> model.diffuse, np.round(np.sqrt(np.diag(model.Q)), 6).tolist()   # Q = diag(σ_l², σ_s²)
        ((True, True), [0.1, 0.01])
    """
    _check_noise(noise_var)
    sl, ss = _scalar("sigma_level", sigma_level), _scalar("sigma_slope", sigma_slope)
    dtype = _dtype(sl, ss, noise_var)
    A = jnp.zeros((2, 2), dtype).at[0, 1].set(1.0)
    Q = jnp.diag(jnp.stack([sl**2, ss**2]).astype(dtype))
    H, R = _scalar_obs(2, noise_var, dtype)
    return ContinuousLinearSSM(A, Q, H, R, m0, P0, diffuse=True if P0 is None else None)


def _block_diag(blocks):
    n = sum(b.shape[-1] for b in blocks)
    dtype = _dtype(*blocks)
    out = jnp.zeros((n, n), dtype)
    i = 0
    for b in blocks:
        k = b.shape[-1]
        out = out.at[i : i + k, i : i + k].set(b.astype(dtype))
        i += k
    return out


def _check_time_invariant(name, c):
    if c.H.ndim != 2 or c.R.ndim != 2 or (c.d is not None and c.d.ndim != 1):
        raise ValueError(f"{name} needs time-invariant H, R, d; got H.shape = {c.H.shape}, R.shape = {c.R.shape}")


def sum_of(*components, noise_var=0.0):
    """Sum of independent components observed through one summed observation.

    States are stacked (``A``, ``Q`` block-diagonal), ``H = [H_1, H_2, …]`` so
    ``y = Σ_i H_i x_i + Σ_i d_i + v`` with ``R = Σ_i R_i + noise_var · I``. Initial state:
    stationary components keep the stationary start, diffuse ones stay diffuse (a partial
    ``diffuse`` mask), components with an explicit ``P0`` keep it.

    Args:
        *components: :class:`ContinuousLinearSSM` with the same observation size ``m``.
        noise_var: extra observation noise variance.

    Returns:
        :class:`ContinuousLinearSSM`.

    Raises:
        ValueError: with no components, or if their observation sizes differ.

    Example:
        >>> import rules
        >>> from statespace.models import matern32, sho, sum_of
        >>> model = sum_of(matern32(1.0, 1.0), sho(2.0, 10.0, 0.5), noise_var=0.1)
        >>> P = rules.lyap(model.A, model.Q)
        >>> model.state_dim, round(float((model.H @ P @ model.H.T)[0, 0]), 6)  # 1 + 0.5
        (4, 1.5)
        >>> round(float(model.R[0, 0]), 6)
        0.1
    """
    _check_noise(noise_var)
    if not components:
        raise ValueError("sum_of needs at least one component")
    m = components[0].obs_dim
    for i, c in enumerate(components):
        _check_time_invariant("sum_of", c)
        if c.obs_dim != m:
            raise ValueError(f"sum_of: component {i} observes m = {c.obs_dim} values, component 0 m = {m}; H shapes {[c.H.shape for c in components]}")
    dtype = _dtype(*[c.dtype for c in components], noise_var)
    A = _block_diag([c.A for c in components])
    Q = _block_diag([c.Q for c in components])
    H = jnp.concatenate([c.H.astype(dtype) for c in components], axis=1)
    R = sum(c.R.astype(dtype) for c in components) + jnp.asarray(noise_var, dtype) * jnp.eye(m, dtype=dtype)
    d = None
    if any(c.d is not None for c in components):
        d = sum(c.d.astype(dtype) for c in components if c.d is not None)
    b = None
    if any(c.b is not None for c in components):
        b = jnp.concatenate([jnp.zeros(c.state_dim, dtype) if c.b is None else c.b.astype(dtype) for c in components])
    mask = np.concatenate([np.zeros(c.state_dim, bool) if c.diffuse is None else c.diffuse_mask
                           for c in components])
    diffuse = mask if mask.any() else None
    if all(c.P0 is None for c in components):
        m0 = None
        if any(c.m0 is not None for c in components):
            if any(c.m0 is None and c.diffuse is None for c in components):
                raise ValueError("sum_of: give m0 for all stationary components or for none")
            m0 = jnp.concatenate([jnp.zeros(c.state_dim, dtype) if c.m0 is None else c.m0.astype(dtype) for c in components])
        return ContinuousLinearSSM(A, Q, H, R, m0, None, b=b, d=d, diffuse=diffuse)
    # Some component has an explicit P0: assemble the whole initial distribution.
    means, covs = [], []
    for c in components:
        m0_c, P0_c, _ = c.initial()
        means.append(m0_c)
        covs.append(P0_c)
    return ContinuousLinearSSM(A, Q, H, R, jnp.concatenate(means), _block_diag(covs), b=b, d=d, diffuse=diffuse)


def product_of(a, b, noise_var=0.0):
    """Product of two independent stationary components: kernel ``k(τ) = k_a(τ) k_b(τ)``.

    The state is ``x_a ⊗ x_b`` (``n = n_a n_b``, row-major Kronecker, built with
    :func:`rules.kron` and :func:`rules.kron_sum`): ``A = A_a ⊕ A_b = A_a ⊗ I + I ⊗ A_b``,
    ``H = H_a ⊗ H_b`` and ``Q = Q_a ⊗ P_b + P_a ⊗ Q_b`` with ``P_a, P_b``
    the components' stationary covariances, so that ``P∞ = P_a ⊗ P_b`` and
    ``H e^{Aτ} P∞ Hᵀ = (H_a e^{A_a τ} P_a H_aᵀ)(H_b e^{A_b τ} P_b H_bᵀ)``. The observation noise
    is ``R = noise_var`` (the components' own ``R`` are not used).

    Args:
        a, b: stationary :class:`ContinuousLinearSSM` components (``P0=None``, no ``b``/``d``)
            observing one scalar each.
        noise_var: observation noise variance.

    Returns:
        :class:`ContinuousLinearSSM` with ``n = n_a n_b``, stationary start.

    Raises:
        ValueError: if a component is diffuse, has offsets, an explicit ``P0`` or ``m0``, or
            observes more than one value; or a static ``noise_var < 0``.

    Example:
        >>> import rules
        >>> from statespace.models import matern32, product_of, sho
        >>> def k(model, tau):                  # the covariance H e^{Aτ} P∞ Hᵀ
        ...     P = rules.lyap(model.A, model.Q)
        ...     return float((model.H @ rules.expm(model.A * tau) @ P @ model.H.T)[0, 0])
        >>> a, b = matern32(1.0, 1.0), sho(2.0, 10.0, 1.0)
        >>> model = product_of(a, b)
        >>> model.state_dim, round(k(model, 0.7), 6) == round(k(a, 0.7) * k(b, 0.7), 6)
        (4, True)
    """
    _check_noise(noise_var)
    for name, c in (("a", a), ("b", b)):
        _check_time_invariant("product_of", c)
        if c.diffuse is not None or c.b is not None or c.d is not None or c.obs_dim != 1:
            raise ValueError(
                f"product_of: component {name} must be stationary, without offsets, observing one "
                f"scalar; got diffuse={c.diffuse}, H.shape = {c.H.shape}"
            )
        if c.P0 is not None or c.m0 is not None:
            # Q = Q_a ⊗ P_b + P_a ⊗ Q_b needs the stationary P_a, P_b: an explicit P0 would
            # silently give a different model
            raise ValueError(
                f"product_of: component {name} must have the stationary start (P0=None, "
                f"m0=None); got P0 {'given' if c.P0 is not None else 'None'}, "
                f"m0 {'given' if c.m0 is not None else 'None'}"
            )
    dtype = _dtype(a.dtype, b.dtype, noise_var)
    _, Pa, _ = a.initial()
    _, Pb, _ = b.initial()
    # The structure is built by rules.kron / rules.kron_sum (row-major, the convention of
    # x.reshape); ContinuousLinearSSM stores dense matrices (the discretisation needs the dense
    # (n_a n_b)² drift), so each lazy operator is formed once here.
    A = rules.kron_sum(a.A.astype(dtype), b.A.astype(dtype)).to_dense()
    Qa, Qb, Pa, Pb = (M.astype(dtype) for M in (a.Q, b.Q, Pa, Pb))
    Q = rules.kron(Qa, Pb).to_dense() + rules.kron(Pa, Qb).to_dense()
    Q = 0.5 * (Q + Q.T)
    H = rules.kron(a.H.astype(dtype), b.H.astype(dtype)).to_dense()
    R = jnp.reshape(jnp.asarray(noise_var, dtype), (1, 1))
    return ContinuousLinearSSM(A.astype(dtype), Q.astype(dtype), H.astype(dtype), R)
