"""Dense float64 oracle for linear-Gaussian state-space models (tests only; NumPy/SciPy, not JAX).

The model is written as one joint Gaussian over the stacked vector
``[x_0, ..., x_{T-1}, y_0, ..., y_{T-1}]`` and every filtering/smoothing quantity is a plain
Gaussian conditional of it. This costs O((T (n + m))^3) and is meant for T <= ~50.

Convention (the package's)::

    x[0]   ~ N(m0, P0)
    x[k+1] = F[k] x[k] + b[k] + w[k],   w[k] ~ N(0, Q[k])     (k = 0 .. T-2)
    y[k]   = H[k] x[k] + d[k] + v[k],   v[k] ~ N(0, R[k])     (k = 0 .. T-1)

``y[0]`` observes ``x[0]`` (no prediction step before it). A parameter given with one extra
leading axis of length T is time-varying: ``F[k], Q[k], b[k]`` map ``k -> k+1`` (entry T-1 is
unused), ``H[k], R[k], d[k]`` give ``y[k]``. ``b`` and ``d`` may be ``None`` (zeros). NaN entries
of ``y`` are missing and are left out of every conditional and of the likelihood.

A model is anything with attributes (or dict keys) ``F, Q, H, R, m0, P0`` and optionally
``b, d``; ``P0 = "stationary"`` means ``P0 = dlyap(F, Q)`` for time-invariant ``F, Q``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

_MATRIX_RANK = {"F": 2, "Q": 2, "H": 2, "R": 2, "b": 1, "d": 1}


def _get(model, name):
    if isinstance(model, dict):
        return model.get(name)
    return getattr(model, name, None)


def _param_at(model, name: str, k: int, default):
    """Parameter ``name`` at step ``k`` as a float64 array (time-varying if it has an extra axis)."""
    value = _get(model, name)
    if value is None:
        return default
    value = np.asarray(value, dtype=np.float64)
    base_rank = _MATRIX_RANK[name]
    if value.ndim == base_rank:
        return value
    if value.ndim == base_rank + 1:
        return value[k]
    raise ValueError(f"oracle: {name} has shape {value.shape}; expected rank {base_rank} or {base_rank + 1}")


def _initial(model):
    m0 = np.asarray(_get(model, "m0"), dtype=np.float64)
    P0 = _get(model, "P0")
    if isinstance(P0, str):
        if P0 != "stationary":
            raise ValueError(f"oracle: unknown P0 = {P0!r}")
        F = np.asarray(_get(model, "F"), dtype=np.float64)
        Q = np.asarray(_get(model, "Q"), dtype=np.float64)
        if F.ndim != 2 or Q.ndim != 2:
            raise ValueError("oracle: P0='stationary' needs time-invariant F and Q")
        P0 = scipy.linalg.solve_discrete_lyapunov(F, Q)
    P0 = np.asarray(P0, dtype=np.float64)
    return m0, P0


def _sizes(model):
    H = np.asarray(_get(model, "H"), dtype=np.float64)
    return H.shape[-1], H.shape[-2]


def dense_joint(model, T: int):
    """Mean and covariance of the stacked vector ``[x_0 .. x_{T-1}, y_0 .. y_{T-1}]``.

    Built from independent sources ``z = [x_0, w_0 .. w_{T-2}, v_0 .. v_{T-1}]`` and the linear
    map ``L`` with ``[x; y] = L z``: mean ``L E[z]``, covariance ``L Cov(z) L^T``.

    Args:
        model: object or dict with ``F, Q, H, R, m0, P0`` (and optionally ``b, d``).
        T: number of time steps.

    Returns:
        ``(mean, cov)`` with shapes ``(T (n + m),)`` and ``(T (n + m), T (n + m))``; the first
        ``T n`` entries are the states in time order, then ``T m`` observations.
    """
    n, m = _sizes(model)
    m0, P0 = _initial(model)
    nz = n + (T - 1) * n + T * m
    z_mean = np.zeros(nz)
    z_cov = np.zeros((nz, nz))
    z_mean[:n] = m0
    z_cov[:n, :n] = P0
    w_at = lambda k: n + k * n  # noqa: E731  (offset of w_k in z)
    v_at = lambda k: n + (T - 1) * n + k * m  # noqa: E731
    for k in range(T - 1):
        s = w_at(k)
        z_mean[s : s + n] = _param_at(model, "b", k, np.zeros(n))
        z_cov[s : s + n, s : s + n] = _param_at(model, "Q", k, None)
    for k in range(T):
        s = v_at(k)
        z_mean[s : s + m] = _param_at(model, "d", k, np.zeros(m))
        z_cov[s : s + m, s : s + m] = _param_at(model, "R", k, None)

    L = np.zeros((T * (n + m), nz))
    row = np.zeros((n, nz))
    row[:, :n] = np.eye(n)
    for k in range(T):
        if k > 0:
            F = _param_at(model, "F", k - 1, None)
            row = F @ row
            row[:, w_at(k - 1) : w_at(k - 1) + n] += np.eye(n)
        L[k * n : (k + 1) * n] = row
        H = _param_at(model, "H", k, None)
        y_rows = H @ row
        y_rows[:, v_at(k) : v_at(k) + m] += np.eye(m)
        L[T * n + k * m : T * n + (k + 1) * m] = y_rows
    mean = L @ z_mean
    cov = L @ z_cov @ L.T
    return mean, 0.5 * (cov + cov.T)


def _observed_index(y: np.ndarray, T: int, n: int, upto: int | None = None) -> np.ndarray:
    """Indices (into the stacked joint) of the observed entries of ``y[0 .. upto-1]``."""
    y = np.asarray(y, dtype=np.float64)
    upto = T if upto is None else upto
    mask = ~np.isnan(y[:upto]).reshape(-1)
    return T * n + np.flatnonzero(mask)


def _condition(mean, cov, target, observed, values):
    """Mean and covariance of ``joint[target]`` given ``joint[observed] = values``."""
    mu_t = mean[target]
    S_tt = cov[np.ix_(target, target)]
    if observed.size == 0:
        return mu_t, S_tt
    S_to = cov[np.ix_(target, observed)]
    S_oo = cov[np.ix_(observed, observed)]
    c = scipy.linalg.cho_factor(S_oo, lower=True)
    gain_t = scipy.linalg.cho_solve(c, S_to.T).T
    mu = mu_t + gain_t @ (values - mean[observed])
    S = S_tt - gain_t @ S_to.T
    return mu, 0.5 * (S + S.T)


def _check_y(model, y):
    y = np.asarray(y, dtype=np.float64)
    n, m = _sizes(model)
    if y.ndim != 2 or y.shape[1] != m:
        raise ValueError(f"oracle: y must have shape (T, {m}); got {y.shape}")
    return y, y.shape[0], n, m


def dense_log_likelihood(model, y) -> float:
    """Gaussian log-density of the observed (non-NaN) entries of ``y`` under the model.

    Returns 0.0 when every entry is missing.
    """
    y, T, n, m = _check_y(model, y)
    mean, cov = dense_joint(model, T)
    obs = _observed_index(y, T, n)
    if obs.size == 0:
        return 0.0
    values = y.reshape(-1)[obs - T * n]
    resid = values - mean[obs]
    c, lower = scipy.linalg.cho_factor(cov[np.ix_(obs, obs)], lower=True)
    alpha = scipy.linalg.solve_triangular(c, resid, lower=True)
    logdet = 2.0 * np.sum(np.log(np.diag(c)))
    return float(-0.5 * (obs.size * np.log(2.0 * np.pi) + logdet + alpha @ alpha))


def dense_diffuse_log_likelihood(model, y, diffuse) -> float:
    """Exact diffuse log-likelihood ``log ∫ p(y | δ) dδ`` (flat prior, no ``2π`` for ``δ``).

    Convention, stated because two are in use: this is the value statsmodels' exact diffuse
    initialisation and KFAS report (Durbin & Koopman's, as issue 21 adopts it; e.g. Nile local
    level at (15099, 1469.1): −632.5456). It has no ``−(q/2) log 2π`` term: the large-prior
    limit ``lim_{κ→∞} [log p(y; P0 = κ I on the diffuse states) + (q/2) log κ]`` equals this
    value minus ``(q/2) log 2π`` (the package's convention before issue 21).

    The states marked in ``diffuse`` start at ``m0 + δ`` with a flat prior on ``δ ∈ ℝ^q``; the
    others as ``N(m0, P0)`` (rows and columns of ``P0`` of diffuse states are ignored; the two
    groups are independent). With ``y = μ + Z δ + e``, ``e ~ N(0, Σ)`` (``Z`` the effect of the
    diffuse initial states on the observed entries), the integral is Gaussian:
    ``−(N−q)/2 log 2π − ½ log|Σ| − ½ log|Zᵀ Σ⁻¹ Z| − ½ (rᵀ Σ⁻¹ r − gᵀ (Zᵀ Σ⁻¹ Z)⁻¹ g)``,
    ``r = y − μ``, ``g = Zᵀ Σ⁻¹ r``, ``N`` observed entries.

    Raises:
        ValueError: if the observed entries do not identify the diffuse states (rank of ``Z``).
    """
    y, T, n, m = _check_y(model, y)
    diffuse = np.asarray(diffuse, dtype=bool)
    m0, P0 = _initial(model)
    P0 = np.where(diffuse[:, None] | diffuse[None, :], 0.0, P0)
    base = dict(model) if isinstance(model, dict) else {k: _get(model, k) for k in ("F", "Q", "H", "R", "b", "d")}
    mean, cov = dense_joint(dict(base, m0=m0, P0=P0), T)
    obs = _observed_index(y, T, n)
    Z = np.stack([dense_joint(dict(base, m0=m0 + np.eye(n)[i], P0=P0), T)[0] - mean
                  for i in np.flatnonzero(diffuse)], axis=1)[obs]
    q = Z.shape[1]
    if np.linalg.matrix_rank(Z) < q:
        raise ValueError(f"oracle: the observed entries do not identify the {q} diffuse states")
    r = y.reshape(-1)[obs - T * n] - mean[obs]
    c = scipy.linalg.cho_factor(cov[np.ix_(obs, obs)], lower=True)
    Si_r, Si_Z = scipy.linalg.cho_solve(c, r), scipy.linalg.cho_solve(c, Z)
    C = Z.T @ Si_Z
    g = Z.T @ Si_r
    logdet_S = 2.0 * np.sum(np.log(np.diag(c[0])))
    logdet_C = np.linalg.slogdet(C)[1]
    quad = r @ Si_r - g @ np.linalg.solve(C, g)
    return float(-0.5 * ((obs.size - q) * np.log(2.0 * np.pi) + logdet_S + logdet_C + quad))


def _state_moments_given(model, y, upto_of_k):
    y, T, n, m = _check_y(model, y)
    mean, cov = dense_joint(model, T)
    flat_y = y.reshape(-1)
    means = np.zeros((T, n))
    covs = np.zeros((T, n, n))
    for k in range(T):
        obs = _observed_index(y, T, n, upto=upto_of_k(k))
        target = np.arange(k * n, (k + 1) * n)
        means[k], covs[k] = _condition(mean, cov, target, obs, flat_y[obs - T * n])
    return means, covs


def dense_filtered(model, y):
    """Moments of ``x[k]`` given the observed entries of ``y[0 .. k]``.

    Returns:
        ``(means, covs)`` with shapes ``(T, n)`` and ``(T, n, n)``.
    """
    return _state_moments_given(model, y, lambda k: k + 1)


def dense_predicted(model, y):
    """Moments of ``x[k]`` given the observed entries of ``y[0 .. k-1]`` (``k = 0``: ``(m0, P0)``).

    Returns:
        ``(means, covs)`` with shapes ``(T, n)`` and ``(T, n, n)``.
    """
    return _state_moments_given(model, y, lambda k: k)


def dense_smoothed(model, y):
    """Moments of the states given all observed entries of ``y``.

    Returns:
        ``(means, covs, cross_covs)`` with shapes ``(T, n)``, ``(T, n, n)``, ``(T-1, n, n)``;
        ``cross_covs[k] = Cov(x[k+1], x[k] | y)`` (row index: x[k+1], column index: x[k]).
    """
    y, T, n, m = _check_y(model, y)
    mean, cov = dense_joint(model, T)
    obs = _observed_index(y, T, n)
    states = np.arange(T * n)
    mu, S = _condition(mean, cov, states, obs, y.reshape(-1)[obs - T * n])
    means = mu.reshape(T, n)
    covs = np.stack([S[k * n : (k + 1) * n, k * n : (k + 1) * n] for k in range(T)])
    cross = np.stack(
        [S[(k + 1) * n : (k + 2) * n, k * n : (k + 1) * n] for k in range(T - 1)]
    ) if T > 1 else np.zeros((0, n, n))
    return means, covs, cross


def dense_sample(rng: np.random.Generator, model, T: int, num_samples: int = 1):
    """Joint samples ``(x, y)`` with shapes ``(num_samples, T, n)`` and ``(num_samples, T, m)``."""
    n, m = _sizes(model)
    mean, cov = dense_joint(model, T)
    z = rng.multivariate_normal(mean, cov, size=num_samples, method="eigh")
    return z[:, : T * n].reshape(num_samples, T, n), z[:, T * n :].reshape(num_samples, T, m)


def _spd(rng, size, scale=1.0, floor=0.1):
    A = rng.standard_normal((size, size))
    return scale * (A @ A.T / size + floor * np.eye(size))


def _stable(rng, n, radius=0.9):
    A = rng.standard_normal((n, n))
    rho = np.max(np.abs(np.linalg.eigvals(A)))
    return A * (radius * rng.uniform(0.5, 1.0) / max(rho, 1e-12))


_ALL_TV = ("F", "Q", "H", "R", "b", "d")


def random_model(
    rng: np.random.Generator,
    n: int,
    m: int,
    T: int | None = None,
    time_varying=False,
    offsets: bool = False,
) -> dict:
    """Parameters of a random stable, well-conditioned model as a dict of float64 arrays.

    Args:
        rng: ``np.random.default_rng(seed)``.
        n, m: state and observation dimensions.
        T: number of steps; required when ``time_varying``.
        time_varying: ``False``, ``True`` (every one of F, Q, H, R and, with offsets, b, d gets a
            leading T axis) or a collection of those names.
        offsets: include ``b`` (n,) and ``d`` (m,) (or (T, n)/(T, m) when time-varying).

    Returns:
        dict with keys ``F, Q, H, R, m0, P0`` and, with ``offsets``, ``b, d``; usable as
        ``LinearGaussianSSM(**params)`` and directly by the oracle functions.
    """
    if time_varying is True:
        tv = set(_ALL_TV)
    elif not time_varying:
        tv = set()
    else:
        tv = set(time_varying)
        unknown = tv - set(_ALL_TV)
        if unknown:
            raise ValueError(f"random_model: unknown time-varying names {sorted(unknown)}")
    if tv and T is None:
        raise ValueError("random_model: T is required for time-varying parameters")

    makers = {
        "F": lambda: _stable(rng, n),
        "Q": lambda: _spd(rng, n, scale=0.5),
        "H": lambda: rng.standard_normal((m, n)),
        "R": lambda: _spd(rng, m, scale=0.3),
        "b": lambda: 0.5 * rng.standard_normal(n),
        "d": lambda: 0.5 * rng.standard_normal(m),
    }
    names = ["F", "Q", "H", "R"] + (["b", "d"] if offsets else [])
    params = {}
    for name in names:
        if name in tv:
            params[name] = np.stack([makers[name]() for _ in range(T)])
        else:
            params[name] = makers[name]()
    params["m0"] = rng.standard_normal(n)
    params["P0"] = _spd(rng, n, scale=1.0, floor=0.2)
    return params


def random_observations(
    rng: np.random.Generator, model, T: int, missing: float = 0.0, missing_rows=()
) -> np.ndarray:
    """One draw of ``y`` (T, m) from the model with a fraction of entries and given rows set to NaN."""
    _, y = dense_sample(rng, model, T, 1)
    y = y[0]
    if missing > 0:
        y[rng.uniform(size=y.shape) < missing] = np.nan
    for r in missing_rows:
        y[r] = np.nan
    return y
