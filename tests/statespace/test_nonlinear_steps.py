"""The nonlinear filter's substep exponential and its ``max_step`` grid refinement.

* ``_substep_expm`` (a degree-16 Taylor polynomial in its range, scaling and squaring beyond
  it) against mpmath's ``expm`` at 30 digits (SciPy's was off by 4e-13 on one of these
  blocks, ours by 1e-15) on Van Loan blocks of random drifts across the range boundary,
  float64 and float32, and its derivatives: ``check_grads`` to second order in both modes on
  each branch, and against ``rules.expm``'s Fréchet rules.
* ``refined_grid``: the grid against a direct construction, its edge cases and errors.
* ``max_step`` through the front ends: equal to the series with NaN rows added by hand
  (gathered back), to ``substeps = c`` where every gap gets ``c`` parts, to the exact linear
  filter for a linear drift; the smoother's cross-covariances; a traced ``times`` refused;
  the NumPyro distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import mpmath
from jax.test_util import check_grads

import rules
import statespace
from statespace import NonlinearSDE
from statespace._nonlinear import _MAX_SQUARINGS, _TAYLOR_THETA, _substep_expm, refined_grid
from statespace.numpyro import NonlinearStateSpace


def _block(rng, n, norm, dtype=np.float64):
    """A Van Loan block ``[[−J, Q, 0], [0, Jᵀ, 0], [0, fᵀ, 0]]`` with ``max(‖J‖₁, ‖J‖∞) = norm``."""
    J = rng.normal(size=(n, n))
    J *= norm / max(np.abs(J).sum(0).max(), np.abs(J).sum(1).max())
    Q = rng.normal(size=(n, n))
    Q = Q @ Q.T / n
    f = rng.normal(size=n)
    block = np.zeros((2 * n + 1, 2 * n + 1))
    block[:n, :n], block[:n, n:2 * n], block[n:2 * n, n:2 * n], block[2 * n, n:2 * n] = -J, Q, J.T, f
    return block.astype(dtype), J.astype(dtype)


# ------------------------------------------------------------------------------------------
# 1. The substep exponential
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype,rtol,largest", [(np.float64, 1e-13, 500.0),
                                                 (np.float32, 3e-5, 30.0)])
def test_substep_expm_matches_mpmath_across_its_range(dtype, rtol, largest):
    rng = np.random.default_rng(0)
    theta = _TAYLOR_THETA[np.dtype(dtype)]
    fn = jax.jit(_substep_expm)
    # inside the polynomial's range, at its edge, and 1, 3 and 9 (float32: 5) squarings beyond
    for n in (1, 2, 4):
        for norm in (1e-3, 0.3 * theta, theta, 1.7 * theta, 7.0 * theta, largest * theta):
            block, J = _block(rng, n, norm, dtype)
            got, out_of_range = fn(jnp.asarray(block), jnp.asarray(J))
            with mpmath.workdps(30):
                ref = np.array(mpmath.expm(mpmath.matrix(block.astype(np.float64).tolist())).tolist(),
                               dtype=np.float64)
            assert not bool(out_of_range)
            scale = np.abs(ref).max()
            np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=rtol,
                                       atol=rtol * scale, err_msg=f"n={n} norm={norm}")


@pytest.mark.timeout(60)
def test_substep_expm_flags_blocks_beyond_the_squarings_or_overflowing():
    block, J = _block(np.random.default_rng(1), 2, 1.01 * 0.55 * 2.0 ** _MAX_SQUARINGS)
    _, out_of_range = _substep_expm(jnp.asarray(block), jnp.asarray(J))
    assert bool(out_of_range)
    # float32 overflows (e^{|λ| τ} > 3e38) long before the squarings run out
    block, J = _block(np.random.default_rng(1), 2, 500.0, np.float32)
    out, overflow = _substep_expm(jnp.asarray(block), jnp.asarray(J))
    assert bool(overflow) and not np.all(np.isfinite(out))
    block, J = _block(np.random.default_rng(1), 2, 5.0, np.float32)
    assert not bool(_substep_expm(jnp.asarray(block), jnp.asarray(J))[1])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("norm", [0.2, 3.0], ids=["taylor", "squared"])
def test_substep_expm_derivatives(norm):
    """check_grads (second order, both modes) on each branch, and the first derivatives
    against ``rules.expm``'s Fréchet rules (the exponential's exact derivative)."""
    block, J = _block(np.random.default_rng(2), 2, norm)
    block = jnp.asarray(block)
    mask = jnp.asarray(block != 0, block.dtype)  # keep the structure (zero blocks)

    def ours(b):
        return _substep_expm(b, -b[:2, :2])[0]

    check_grads(ours, (block,), order=2, modes=("fwd", "rev"))
    direction = jnp.asarray(np.random.default_rng(3).normal(size=block.shape)) * mask
    got = jax.jvp(ours, (block,), (direction,))[1]
    ref = jax.jvp(rules.expm, (block,), (direction,))[1]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * float(jnp.abs(ref).max()))
    cot = jnp.asarray(np.random.default_rng(4).normal(size=block.shape))
    got = jax.vjp(ours, block)[1](cot)[0]
    ref = jax.vjp(rules.expm, block)[1](cot)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * float(jnp.abs(ref).max()))


# ------------------------------------------------------------------------------------------
# 2. The refined grid
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_refined_grid_splits_only_the_long_gaps():
    rng = np.random.default_rng(5)
    times = np.cumsum(rng.exponential(0.2, size=40))
    fine, rows = refined_grid(times, 0.25)
    np.testing.assert_array_equal(fine[rows], times)
    gaps = np.diff(times)
    np.testing.assert_array_equal(np.diff(rows), np.maximum(1, np.ceil(gaps / 0.25)))
    assert np.all(np.diff(fine) <= 0.25 + 1e-15) and np.all(np.diff(fine) > 0)
    for k in range(times.size - 1):  # equal parts
        parts = np.diff(fine[rows[k]:rows[k + 1] + 1])
        np.testing.assert_allclose(parts, gaps[k] / parts.size, rtol=1e-12)
    # no gap longer than max_step: the same grid
    same, rows = refined_grid(times, 10.0)
    np.testing.assert_array_equal(same, times)
    np.testing.assert_array_equal(rows, np.arange(times.size))
    assert refined_grid(np.zeros(0), 0.1)[0].size == 0
    np.testing.assert_allclose(refined_grid(np.array([0, 1]), 0.5)[0], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(refined_grid(np.array([3.0]), 0.1)[1], [0])
    # NaN and decreasing times are left for the filter to reject
    fine, rows = refined_grid(np.array([0.0, np.nan, 1.0, 0.5]), 0.1)
    assert fine.size == 4 and np.isnan(fine[1])


@pytest.mark.timeout(60)
def test_refined_grid_errors():
    for bad in (0.0, -1.0, np.nan, np.inf, True, "0.1", None):
        with pytest.raises(ValueError, match="max_step"):
            refined_grid(np.arange(3.0), bad)
    with pytest.raises(ValueError, match=r"times must have shape \(T,\)"):
        refined_grid(np.zeros((2, 3)), 0.1)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda t: refined_grid(t, 0.1)[0].size)(jnp.arange(3.0))


# ------------------------------------------------------------------------------------------
# 3. max_step through the front ends
# ------------------------------------------------------------------------------------------
def _oscillator(params=None):
    """A Van der Pol oscillator with its position observed."""
    def drift(x, t, p):
        return jnp.stack([x[1], p["mu"] * (1.0 - x[0] ** 2) * x[1] - p["omega"] ** 2 * x[0]])

    params = {"mu": jnp.array(1.0), "omega": jnp.array(1.2)} if params is None else params
    return NonlinearSDE(drift, jnp.diag(jnp.array([0.01, 0.2])), lambda x, t, p: x[:1],
                        0.05 * jnp.eye(1), jnp.array([1.0, 0.0]), 0.3 * jnp.eye(2),
                        params=params)


def _series(seed=6, T=12):
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(0.2, size=T - 1)
    gaps[[3, 8]] += 1.0
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    y = np.cos(1.2 * times)[:, None] + 0.2 * rng.normal(size=(T, 1))
    y[5] = np.nan
    return times, y


@pytest.mark.timeout(300)
@pytest.mark.parametrize("form", ["cov", pytest.param("sqrt", marks=pytest.mark.slow)])
def test_max_step_equals_nan_rows_added_by_hand(form):
    model = _oscillator()
    times, y = _series()
    fine, rows = refined_grid(times, 0.3)
    assert fine.size > times.size + 4  # the two long gaps and a few more are split
    y_fine = np.full((fine.size, 1), np.nan)
    y_fine[rows] = y
    ours = statespace.rts_smoother(model, y, times, max_step=0.3, form=form)
    ref = statespace.rts_smoother(model, y_fine, fine, form=form)
    np.testing.assert_allclose(ours.log_likelihood, ref.log_likelihood, rtol=1e-12)
    for name in ("smoothed_means", "smoothed_covs", "filtered_means", "filtered_covs"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name)[rows], rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    # lag-one cross-covariances across a split gap: Cov(x_c, x_a) = P_c (G_a ⋯ G_{c-1})ᵀ on the
    # fine grid, with the smoother gains G_j = Cov(x_{j+1}, x_j)ᵀ P_{j+1}^{-1}
    gains = np.linalg.solve(np.asarray(ref.smoothed_covs[1:]),
                            np.asarray(ref.smoothed_cross_covs)).transpose(0, 2, 1)
    for k in range(times.size - 1):
        a, c = rows[k], rows[k + 1]
        chain = np.eye(2)
        for j in range(a, c):
            chain = chain @ gains[j]
        np.testing.assert_allclose(ours.smoothed_cross_covs[k],
                                   np.asarray(ref.smoothed_covs[c]) @ chain.T, rtol=1e-7,
                                   atol=1e-10, err_msg=f"interval {k}")
    filtered = statespace.kalman_filter(model, y, times, max_step=0.3, form=form)
    by_hand = statespace.kalman_filter(model, y_fine, fine, form=form)
    for name in ("predicted_means", "predicted_covs", "log_likelihoods"):
        np.testing.assert_allclose(getattr(filtered, name), getattr(by_hand, name)[rows],
                                   rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.slow  # quick-run time: the test above covers max_step through the front ends
@pytest.mark.timeout(300)
def test_max_step_with_equal_gaps_is_substeps():
    """Gaps of 0.5 with max_step 0.2: three parts each, as substeps=3; plus a linear drift,
    where any refinement gives the exact continuous-time filter."""
    model = _oscillator()
    times = 0.5 * np.arange(8.0)
    y = np.sin(times)[:, None]
    ours = statespace.rts_smoother(model, y, times, max_step=0.2)
    ref = statespace.rts_smoother(model, y, times, substeps=3)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    A = jnp.array([[0.0, 1.0], [-1.0, -0.3]])
    linear = NonlinearSDE(lambda x, t, p: p @ x, jnp.diag(jnp.array([0.0, 0.2])),
                          lambda x, t, p: x[:1], 0.05 * jnp.eye(1), jnp.zeros(2), jnp.eye(2),
                          params=A)
    exact = statespace.ContinuousLinearSSM(A, jnp.diag(jnp.array([0.0, 0.2])), jnp.eye(1, 2),
                                           0.05 * jnp.eye(1), jnp.zeros(2), jnp.eye(2))
    np.testing.assert_allclose(statespace.log_likelihood(linear, y, times, max_step=0.15),
                               statespace.log_likelihood(exact, y, times), rtol=1e-12)
    # predict refines the merged grid: near the many-substep prediction (second order)
    new_times = np.array([0.25, 1.7, 4.2])
    fine = statespace.predict(model, y, times, new_times, max_step=0.05)
    many = statespace.predict(model, y, times, new_times, substeps=16)
    coarse = statespace.predict(model, y, times, new_times)
    for name in ("means", "covs"):
        err = np.max(np.abs(getattr(fine, name) - getattr(many, name)))
        assert err < 0.1 * np.max(np.abs(getattr(coarse, name) - getattr(many, name))), name


@pytest.mark.timeout(300)
def test_max_step_under_jit_gradient_and_numpyro():
    """Under jit with the times closed over (traced times are refused), its gradient against
    central differences, and the NumPyro distribution's log_prob."""
    times, y = _series()

    def loglik(params):
        return statespace.log_likelihood(_oscillator(params), y, times, max_step=0.3)

    params = {"mu": jnp.array(1.0), "omega": jnp.array(1.2)}
    value, grad = jax.jit(jax.value_and_grad(loglik))(params)
    np.testing.assert_allclose(value, loglik(params), rtol=1e-12)
    for name in params:
        h = 1e-6
        up = loglik({**params, name: params[name] + h})
        down = loglik({**params, name: params[name] - h})
        np.testing.assert_allclose(grad[name], (up - down) / (2 * h), rtol=1e-6)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda t: statespace.log_likelihood(_oscillator(), y, t, max_step=0.3))(times)
    dist = NonlinearStateSpace(_oscillator(), times, max_step=0.3)
    np.testing.assert_allclose(dist.log_prob(jnp.asarray(y)), value, rtol=1e-12)
    with pytest.raises(ValueError, match="max_step"):
        NonlinearStateSpace(_oscillator(), times, max_step=-1.0)
