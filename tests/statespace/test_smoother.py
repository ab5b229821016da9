"""RTS smoother and forward-filtering backward-sampling against the dense joint-Gaussian oracle.

Two layers:
* the backward passes alone (``_rts_backward_cov``, ``_rts_backward_sqrt``, ``_ffbs``) fed with
  the oracle's exact filtered/predicted moments, so a smoother bug cannot hide behind a filter bug;
* the public ``rts_smoother`` / ``sample_posterior`` end to end (filter included): smoothed
  moments equal the dense Gaussian conditionals to 1e-9, samples match them within Monte-Carlo
  error, gradients check, vmap over series with different NaN gaps, singular Q.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import statespace
from statespace import _smoother
from statespace._model import _per_step as _per_step_model
from tests.statespace.dense_oracle import (
    dense_filtered,
    dense_predicted,
    dense_smoothed,
    random_model,
    random_observations,
)

CASES = {
    "plain": dict(n=2, m=1, T=7, time_varying=False, offsets=False, missing=0.0, rows=()),
    "missing": dict(n=3, m=2, T=9, time_varying=False, offsets=False, missing=0.3, rows=(2, 3)),
    "offsets": dict(n=2, m=2, T=6, time_varying=False, offsets=True, missing=0.2, rows=(0,)),
    "time_varying": dict(n=3, m=2, T=8, time_varying=True, offsets=True, missing=0.25, rows=(5,)),
    "tv_partial": dict(n=2, m=3, T=5, time_varying=("F", "Q"), offsets=True, missing=0.0, rows=(4,)),
}


def _case(name, seed=0):
    c = CASES[name]
    rng = np.random.default_rng(seed)
    p = random_model(rng, c["n"], c["m"], c["T"], c["time_varying"], c["offsets"])
    y = random_observations(rng, p, c["T"], missing=c["missing"], missing_rows=c["rows"])
    return p, y


def _per_step(p, name, T):
    return _per_step_model(name, jnp.asarray(p[name]), T)


def _assert_moments(got, want, rtol=1e-9, atol=1e-10):
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol)


def _assert_symmetric(P):
    P = np.asarray(P)
    np.testing.assert_array_equal(P, np.swapaxes(P, -1, -2))


# ---------------------------------------------------------------------------------------------
# Backward passes on exact (oracle) filter moments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_backward_passes_match_dense_oracle(name):
    p, y = _case(name)
    T = y.shape[0]
    fm, fP = map(jnp.asarray, dense_filtered(p, y))
    pm, pP = map(jnp.asarray, dense_predicted(p, y))
    want = dense_smoothed(p, y)
    F, Q = _per_step(p, "F", T), _per_step(p, "Q", T)
    got = _smoother._rts_backward_cov(fm, fP, pm, pP, F, Q)
    _assert_moments(got, want)
    _assert_symmetric(got[1])
    got = _smoother._rts_backward_sqrt(fm, jnp.linalg.cholesky(fP), pm, F, jnp.linalg.cholesky(Q))
    _assert_moments(got, want)
    _assert_symmetric(got[1])


def _check_samples(xs, means, covs, cross, z=5.0, cov_tol=0.1):
    xs = np.asarray(xs)
    num, T, n = xs.shape
    sd = np.sqrt(np.diagonal(covs, axis1=-2, axis2=-1))
    err = np.abs(xs.mean(0) - means)
    assert np.all(err <= z * sd / np.sqrt(num) + 1e-12), np.max(err / (sd / np.sqrt(num) + 1e-300))
    flat = xs.reshape(num, T * n)
    emp = np.cov(flat, rowvar=False)
    scale = np.maximum(np.max(sd), 1e-12) ** 2
    for k in range(T):
        blk = emp[k * n : (k + 1) * n, k * n : (k + 1) * n]
        assert np.max(np.abs(blk - covs[k])) < cov_tol * scale
        if k < T - 1:
            blk = emp[(k + 1) * n : (k + 2) * n, k * n : (k + 1) * n]
            assert np.max(np.abs(blk - cross[k])) < cov_tol * scale


@pytest.mark.parametrize("name", ["missing", "time_varying"])
def test_backward_sampling_matches_dense_oracle(name):
    p, y = _case(name, seed=1)
    T = y.shape[0]
    fm, fP = map(jnp.asarray, dense_filtered(p, y))
    pm, pP = map(jnp.asarray, dense_predicted(p, y))
    F, Q = _per_step(p, "F", T), _per_step(p, "Q", T)
    xs = _smoother._ffbs(jax.random.key(3), fm, fP, pm, pP, F, Q, 4000)
    assert xs.shape == (4000, T, p["m0"].shape[0])
    _check_samples(xs, *dense_smoothed(p, y))


# ---------------------------------------------------------------------------------------------
# End to end: filter + smoother / sampler
# ---------------------------------------------------------------------------------------------
def _model(p):
    return statespace.LinearGaussianSSM(**p)


# Jitted entry points: one compile per shape instead of many small eager ones (test speed).
_smooth = jax.jit(statespace.rts_smoother, static_argnames=("form", "parallel"))
_sample = jax.jit(statespace.sample_posterior, static_argnames=("num_samples", "form"))


@pytest.mark.parametrize(
    "name, form",
    [(name, "cov") for name in CASES] + [(name, "sqrt") for name in ("missing", "time_varying")],
)
def test_rts_smoother_matches_dense_oracle(name, form):
    p, y = _case(name, seed=4)
    out = _smooth(_model(p), y, form=form)
    assert isinstance(out, statespace.SmootherResult)
    means, covs, cross = dense_smoothed(p, y)
    _assert_moments((out.smoothed_means, out.smoothed_covs, out.smoothed_cross_covs), (means, covs, cross))
    _assert_symmetric(out.smoothed_covs)
    _assert_moments((out.filtered_means, out.filtered_covs), dense_filtered(p, y))
    from tests.statespace.dense_oracle import dense_log_likelihood

    np.testing.assert_allclose(out.log_likelihood, dense_log_likelihood(p, y), rtol=1e-10)


def test_parallel_smoother_matches_sequential():
    # Wiring only: statespace._parallel has its own tests (both forms).
    form = "cov"
    p, y = _case("time_varying", seed=5)
    seq = _smooth(_model(p), y, form=form)
    par = _smooth(_model(p), y, form=form, parallel=True)
    for a, b in zip(seq, par):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-11)
    _assert_moments(par[:3], dense_smoothed(p, y))


def test_single_step_and_bad_form():
    p, y = _case("missing", seed=6)
    out = _smooth(_model(p), y[:1])
    assert out.smoothed_cross_covs.shape == (0, 3, 3)
    means, covs = dense_filtered(p, y[:1])
    _assert_moments((out.smoothed_means, out.smoothed_covs), (means, covs))
    xs = statespace.sample_posterior(jax.random.key(0), _model(p), y[:1], 3)
    assert xs.shape == (3, 1, 3) and np.all(np.isfinite(xs))
    with pytest.raises(ValueError, match="form"):
        _smooth(_model(p), y, form="chol")
    with pytest.raises(ValueError, match="form"):
        statespace.sample_posterior(jax.random.key(0), _model(p), y, 2, form="chol")


@pytest.mark.parametrize("form", ["cov"])
def test_posterior_samples_match_smoothed_moments(form):
    p, y = _case("time_varying", seed=7)
    xs = jax.jit(
        lambda key, model, obs: statespace.sample_posterior(key, model, obs, 4000, form=form)
    )(jax.random.key(11), _model(p), jnp.asarray(y))
    assert xs.shape == (4000,) + (y.shape[0], p["m0"].shape[0])
    _check_samples(xs, *dense_smoothed(p, y))


def _local_linear_trend(T, q=0.3, r=0.5, level_noise=0.0):
    p = dict(
        F=np.array([[1.0, 1.0], [0.0, 1.0]]),
        Q=np.diag([level_noise, q]),
        H=np.array([[1.0, 0.0]]),
        R=np.array([[r]]),
        m0=np.array([0.5, -0.2]),
        P0=np.diag([2.0, 1.0]),
    )
    rng = np.random.default_rng(9)
    y = random_observations(rng, p, T, missing=0.0, missing_rows=(3, 4))
    return p, y


@pytest.mark.parametrize("form", ["cov", "sqrt"])
def test_singular_Q_smoother_and_sampler(form):
    # Local linear trend: Q = diag(0, q) (the level has no own noise).
    p, y = _local_linear_trend(12)
    out = _smooth(_model(p), y, form=form)
    want = dense_smoothed(p, y)
    _assert_moments((out.smoothed_means, out.smoothed_covs, out.smoothed_cross_covs), want)
    xs = _sample(jax.random.key(2), _model(p), y, num_samples=4000, form=form)
    _check_samples(xs, *want)


def test_sampler_with_deterministic_dynamics():
    # Q = 0: given x[0] every path is fixed, so each sample obeys x[k+1] = F x[k] + b exactly
    # (a jitter-based sampler would not), and x[0] still follows the smoothed law.
    p, y = _local_linear_trend(8, q=0.0)
    p["b"] = np.array([0.1, 0.05])
    xs = np.asarray(_sample(jax.random.key(5), _model(p), y, num_samples=4000))
    assert np.all(np.isfinite(xs))
    resid = xs[:, 1:] - (xs[:, :-1] @ p["F"].T + p["b"])
    assert np.max(np.abs(resid)) < 1e-9
    _check_samples(xs, *dense_smoothed(p, y))


def test_sampler_with_known_initial_component():
    # P0 singular (first state known exactly) and Q singular: P_{k|k} and P_{k+1|k} can be
    # singular; the pseudo-inverse gain and PSD square roots keep the sampler exact.
    p, y = _local_linear_trend(6, q=0.2)
    p["P0"] = np.diag([0.0, 1.0])
    xs = np.asarray(_sample(jax.random.key(6), _model(p), y, num_samples=4000))
    assert np.all(np.isfinite(xs))
    np.testing.assert_allclose(xs[:, 0, 0], p["m0"][0], atol=1e-10)
    _check_samples(xs, *dense_smoothed(p, y))


def test_vmap_over_series_with_different_gaps():
    p, _ = _case("offsets", seed=8)
    rng = np.random.default_rng(12)
    ys = np.stack([
        random_observations(rng, p, 6, missing=0.0),
        random_observations(rng, p, 6, missing=0.4, missing_rows=(1,)),
        random_observations(rng, p, 6, missing=0.0, missing_rows=(0, 4, 5)),
    ])
    model = _model(p)

    @jax.jit
    def run(model, ys, keys):
        mapped = jax.vmap(lambda obs: statespace.rts_smoother(model, obs))(ys)
        batched = statespace.rts_smoother(model, ys)  # batch axes of y are mapped over too
        samples = jax.vmap(lambda k, obs: statespace.sample_posterior(k, model, obs, 3))(keys, ys)
        return mapped, batched, samples

    out, batched, xs = run(model, jnp.asarray(ys), jax.random.split(jax.random.key(0), 3))
    for i, y in enumerate(ys):
        want = dense_smoothed(p, y)
        got = (out.smoothed_means[i], out.smoothed_covs[i], out.smoothed_cross_covs[i])
        _assert_moments(got, want)
        got = (batched.smoothed_means[i], batched.smoothed_covs[i], batched.smoothed_cross_covs[i])
        _assert_moments(got, want)
    assert xs.shape == (3, 3, 6, 2) and np.all(np.isfinite(xs))


def _sym_param(A):
    return 0.5 * (A + A.T)


@pytest.mark.parametrize("form", ["cov", pytest.param("sqrt", marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_gradients_of_smoothed_functional(form):
    rng = np.random.default_rng(13)
    T = 4
    p = random_model(rng, 2, 1, T, offsets=True)
    y = random_observations(rng, p, T, missing_rows=(1,))
    w_mean = rng.standard_normal((T, 2))
    w_cov = rng.standard_normal((T, 2, 2))
    w_cross = rng.standard_normal((T - 1, 2, 2))

    def functional(F, Q, H, R, m0, P0, b, d):
        model = statespace.LinearGaussianSSM(
            F, _sym_param(Q), H, _sym_param(R), m0, _sym_param(P0), b=b, d=d
        )
        out = statespace.rts_smoother(model, y, form=form)
        return (
            jnp.sum(w_mean * out.smoothed_means)
            + jnp.sum(w_cov * out.smoothed_covs)
            + jnp.sum(w_cross * out.smoothed_cross_covs)
        )

    args = tuple(jnp.asarray(p[k]) for k in ("F", "Q", "H", "R", "m0", "P0", "b", "d"))
    check_grads(jax.jit(functional), args, order=1, modes=("rev",))


def _van_loan(A, Qc, dt):
    """Exact discretisation by SciPy (independent of the package): F = e^{A dt}, Qd by Van Loan."""
    import scipy.linalg

    n = A.shape[0]
    M = np.block([[-A, Qc], [np.zeros((n, n)), A.T]]) * dt
    E = scipy.linalg.expm(M)
    F = E[n:, n:].T
    return F, F @ E[:n, n:]


def test_continuous_model_at_irregular_times():
    import scipy.linalg

    rng = np.random.default_rng(21)
    A = np.array([[-0.7, 0.4], [-0.5, -0.3]])
    Qc = np.array([[0.6, 0.1], [0.1, 0.4]])
    H = np.array([[1.0, 0.5]])
    R = np.array([[0.2]])
    times = np.array([0.0, 0.3, 0.3, 1.1, 1.15, 2.6, 3.0])  # includes a repeated time (dt = 0)
    T = times.size
    dts = np.append(np.diff(times), 0.0)
    F, Qd = zip(*(_van_loan(A, Qc, dt) for dt in dts))
    p = dict(F=np.stack(F), Q=np.stack(Qd), H=H, R=R, m0=np.zeros(2),
             P0=scipy.linalg.solve_continuous_lyapunov(A, -Qc))
    y = random_observations(rng, p, T, missing_rows=(4,))
    cmodel = statespace.ContinuousLinearSSM(A, Qc, H, R)
    @jax.jit
    def run(model, y, times):
        smoothed = statespace.rts_smoother(model, y, times)
        return smoothed, statespace.sample_posterior(jax.random.key(1), model, y, 5, times)

    out, xs = run(cmodel, y, times)
    _assert_moments((out.smoothed_means, out.smoothed_covs, out.smoothed_cross_covs),
                    dense_smoothed(p, y), rtol=1e-8, atol=1e-10)
    xs = np.asarray(xs)
    # equal times are the same state: every sample repeats it exactly
    np.testing.assert_allclose(xs[:, 2], xs[:, 1], atol=1e-12)


def test_diffuse_model_smoothed_once_identified():
    # Exact diffuse start (local linear trend, both states diffuse): from the first step whose
    # filtered moments are proper (here k = 1) the backward pass is exact; it equals the limit of
    # the dense oracle with P0 = kappa I as kappa grows (error O(1/kappa)).
    p, y = _local_linear_trend(7, level_noise=0.1)
    out = _smooth(statespace.LinearGaussianSSM(**p, diffuse=True), y)
    got = (out.smoothed_means[1:], out.smoothed_covs[1:], out.smoothed_cross_covs[1:])
    errors = []
    for kappa in (1e4, 1e6):
        want = dense_smoothed(dict(p, P0=kappa * np.eye(2)), y)
        errors.append(max(np.max(np.abs(np.asarray(g) - w[1:])) for g, w in zip(got, want)))
    assert errors[1] < 1e-6 and errors[1] < 0.05 * errors[0]


def test_batched_model_parameters():
    # Three models sharing Q, R, P0 with their own F (batch axis, time axis of length 1),
    # time-varying H (batch, T) and m0; the smoother maps over the batch like the filter.
    rng = np.random.default_rng(14)
    T = 5
    ps = [random_model(rng, 2, 1, T, time_varying=("H",)) for _ in range(3)]
    shared = {k: ps[0][k] for k in ("Q", "R", "P0")}
    y = random_observations(rng, ps[0], T, missing=0.2)
    model = statespace.LinearGaussianSSM(
        F=np.stack([p["F"] for p in ps])[:, None], H=np.stack([p["H"] for p in ps]),
        m0=np.stack([p["m0"] for p in ps]), **shared,
    )
    out = _smooth(model, y)
    assert out.smoothed_means.shape == (3, T, 2) and out.log_likelihood.shape == (3,)
    for i, p in enumerate(ps):
        want = dense_smoothed(dict(p, **shared), y)
        _assert_moments([a[i] for a in out[:3]], want)
    xs = _sample(jax.random.key(0), model, y, num_samples=4)
    assert xs.shape == (3, 4, T, 2)
    # Each batch member gets its own key: with three identical members a reused key would
    # show as identical draws (members that differ would give different draws anyway).
    same = statespace.LinearGaussianSSM(
        F=np.stack([ps[0]["F"]] * 3)[:, None], H=np.stack([ps[0]["H"]] * 3),
        m0=np.stack([ps[0]["m0"]] * 3), **shared,
    )
    xs = np.asarray(_sample(jax.random.key(0), same, y, num_samples=4))
    assert xs.shape == (3, 4, T, 2) and np.all(np.isfinite(xs))
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert not np.any(np.isclose(xs[i], xs[j], rtol=0, atol=1e-12)), (i, j)
    assert not np.any(np.isclose(xs[0, 0], xs[0, 1], rtol=0, atol=1e-12))  # and each draw its own
