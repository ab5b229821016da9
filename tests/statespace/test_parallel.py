"""Parallel-in-time (associative-scan) filter and smoother against the dense oracle and the
sequential filter/smoother: values, missing data, offsets, time-varying parameters, float32,
gradients, failures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from statespace._kalman import kalman_filter
from statespace._model import LinearGaussianSSM
from statespace._parallel import _prefix_scan, parallel_filter, parallel_smoother
from statespace._smoother import rts_smoother
from tests.statespace import dense_oracle as oracle

FORMS = ("cov", "sqrt")

# Shared jitted entry points: tests with equal shapes reuse one compilation.
_filter = jax.jit(parallel_filter, static_argnames=("form",))
_smoother = jax.jit(parallel_smoother, static_argnames=("form",))

# name -> (n, m, T, time_varying, offsets, missing fraction, missing rows)
CASES = {
    "basic": (2, 1, 9, False, False, 0.0, ()),
    "offsets_missing": (3, 2, 11, False, True, 0.25, (0, 4)),
    "time_varying": (3, 2, 10, True, True, 0.2, (2, 9)),
    "more_obs_than_states": (2, 3, 8, ("H", "R", "d"), True, 0.3, (5,)),
}


def _case(name, seed=0):
    n, m, T, tv, offsets, missing, rows = CASES[name]
    rng = np.random.default_rng(seed)
    params = oracle.random_model(rng, n, m, T=T, time_varying=tv, offsets=offsets)
    y = oracle.random_observations(rng, params, T, missing=missing, missing_rows=rows)
    return params, y


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


# The square-root form is slower to compile (rules.tria): it runs on the case that covers
# missing entries and rows, offsets and time-varying parameters; m > n is covered by the
# float32 test.
@pytest.mark.parametrize(
    "case, form",
    [(c, "cov") for c in sorted(CASES)] + [pytest.param("time_varying", "sqrt", marks=[pytest.mark.slow, pytest.mark.timeout(300)])],
)
def test_filter_and_smoother_match_dense_oracle(case, form):
    params, y = _case(case)
    model = LinearGaussianSSM(**params)
    out = _filter(model, y, form=form)
    assert type(out).__name__ == "FilterResult"
    assert _rel(out.log_likelihood, oracle.dense_log_likelihood(params, y)) < 1e-9
    np.testing.assert_allclose(out.log_likelihoods.sum(), out.log_likelihood, rtol=1e-12)
    fm, fP = oracle.dense_filtered(params, y)
    pm, pP = oracle.dense_predicted(params, y)
    np.testing.assert_allclose(out.filtered_means, fm, atol=1e-8, rtol=0)
    np.testing.assert_allclose(out.filtered_covs, fP, atol=1e-8, rtol=0)
    np.testing.assert_allclose(out.predicted_means, pm, atol=1e-8, rtol=0)
    np.testing.assert_allclose(out.predicted_covs, pP, atol=1e-8, rtol=0)

    smoothed = _smoother(model, y, out, form=form)
    sm, sP, sC = oracle.dense_smoothed(params, y)
    np.testing.assert_allclose(smoothed.smoothed_means, sm, atol=1e-8, rtol=0)
    np.testing.assert_allclose(smoothed.smoothed_covs, sP, atol=1e-8, rtol=0)
    np.testing.assert_allclose(smoothed.smoothed_cross_covs, sC, atol=1e-8, rtol=0)
    # Exactly symmetric covariances.
    for covs in (out.filtered_covs, out.predicted_covs, smoothed.smoothed_covs):
        np.testing.assert_array_equal(covs, np.swapaxes(covs, -1, -2))


@pytest.mark.parametrize("form", ["cov", pytest.param("sqrt", marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_matches_sequential_filter_and_smoother(form):

    params, y = _case("time_varying", seed=3)
    model = LinearGaussianSSM(**params)
    seq = jax.jit(lambda mdl: kalman_filter(mdl, y, form=form))(model)
    par = _filter(model, y, form=form)
    assert _rel(par.log_likelihood, seq.log_likelihood) < 1e-9
    np.testing.assert_allclose(par.log_likelihoods, seq.log_likelihoods, atol=1e-9, rtol=0)
    for name in ("filtered_means", "filtered_covs", "predicted_means", "predicted_covs"):
        np.testing.assert_allclose(getattr(par, name), getattr(seq, name), atol=1e-8, rtol=0)
    seq_s = jax.jit(lambda mdl: rts_smoother(mdl, y, form=form))(model)
    par_s = _smoother(model, y, par, form=form)
    for name in ("smoothed_means", "smoothed_covs", "smoothed_cross_covs"):
        np.testing.assert_allclose(getattr(par_s, name), getattr(seq_s, name), atol=1e-8, rtol=0)


@pytest.mark.parametrize("form", ["cov", pytest.param("sqrt", marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_float32_on_well_conditioned_model(form):
    rng = np.random.default_rng(7)
    n, m, T = (3, 2, 32) if form == "cov" else (2, 3, 16)
    params = oracle.random_model(rng, n, m, offsets=True)
    y = oracle.random_observations(rng, params, T, missing=0.1)
    model32 = LinearGaussianSSM(**{k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
    y32 = jnp.asarray(y, jnp.float32)
    out = _filter(model32, y32, form=form)
    assert out.filtered_means.dtype == jnp.float32
    ll = oracle.dense_log_likelihood(params, y)
    assert _rel(out.log_likelihood, ll) < 1e-3
    fm, fP = oracle.dense_filtered(params, y)
    np.testing.assert_allclose(out.filtered_means, fm, atol=1e-3 * np.abs(fm).max())
    np.testing.assert_allclose(out.filtered_covs, fP, atol=1e-3 * np.abs(fP).max())
    smoothed = _smoother(model32, y32, out, form=form)
    sm, sP, _ = oracle.dense_smoothed(params, y)
    np.testing.assert_allclose(smoothed.smoothed_means, sm, atol=1e-3 * np.abs(sm).max())
    np.testing.assert_allclose(smoothed.smoothed_covs, sP, atol=1e-3 * np.abs(sP).max())
    # Covariances stay positive definite.
    assert np.all(np.linalg.eigvalsh(np.asarray(smoothed.smoothed_covs, np.float64)) > 0)


# the quick run keeps test_gradient_matches_sequential for the parallel gradient
@pytest.mark.parametrize("form", [pytest.param("cov", marks=[pytest.mark.slow, pytest.mark.timeout(300)]), pytest.param("sqrt", marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_gradients_through_parallel_path(form):
    # One scalar mixing the log-likelihood and the smoothed moments, so one reverse pass
    # (one compilation) checks both scans. T = 6 with missing entries, a missing row, offsets.
    rng = np.random.default_rng(5)
    n, m, T = 3, 2, (6 if form == "cov" else 4)
    params = oracle.random_model(rng, n, m, offsets=True)
    y = jnp.asarray(oracle.random_observations(rng, params, T, missing=0.25, missing_rows=(2,)))
    params = {k: jnp.asarray(v) for k, v in params.items()}

    def objective(F, H, Q_half, R_half, b):
        model = LinearGaussianSSM(F=F, Q=Q_half @ Q_half.T + 0.1 * jnp.eye(n), H=H,
                                  R=R_half @ R_half.T + 0.1 * jnp.eye(m),
                                  m0=params["m0"], P0=params["P0"], b=b, d=params["d"])
        filtered = parallel_filter(model, y, form=form)
        smoothed = parallel_smoother(model, y, filtered, form=form)
        return (filtered.log_likelihood + 0.1 * jnp.sum(smoothed.smoothed_means ** 2)
                + 0.1 * jnp.sum(smoothed.smoothed_covs) + 0.1 * jnp.sum(smoothed.smoothed_cross_covs))

    args = (params["F"], params["H"], jnp.linalg.cholesky(params["Q"]),
            jnp.linalg.cholesky(params["R"]), params["b"])
    check_grads(jax.jit(objective), args, order=1, modes=("rev",))


def test_gradient_matches_sequential():
    params, y = _case("time_varying", seed=2)

    def ll(F, parallel):
        model = LinearGaussianSSM(**dict(params, F=F))
        if parallel:
            return parallel_filter(model, y).log_likelihood
        return kalman_filter(model, y).log_likelihood

    F = jnp.asarray(params["F"])
    grad = jax.jit(jax.grad(ll), static_argnums=1)
    np.testing.assert_allclose(grad(F, True), grad(F, False), rtol=1e-8, atol=1e-10)


def test_all_missing_and_single_step():
    params, _ = _case("basic")
    model = LinearGaussianSSM(**params)
    y = np.full((6, 1), np.nan)
    out = _filter(model, y)
    assert float(out.log_likelihood) == 0.0
    pm, pP = oracle.dense_predicted(params, y)
    np.testing.assert_allclose(out.predicted_covs, pP, atol=1e-10)
    y1 = np.array([[0.7]])
    one = _filter(model, y1)
    assert _rel(one.log_likelihood, oracle.dense_log_likelihood(params, y1)) < 1e-12
    s = _smoother(model, y1, one)
    assert s.smoothed_cross_covs.shape == (0, 2, 2)
    np.testing.assert_allclose(s.smoothed_means, one.filtered_means)


def test_vmap_over_series_with_different_gaps():
    params, y = _case("offsets_missing", seed=4)
    model = LinearGaussianSSM(**params)
    ys = np.stack([y, np.where(np.arange(len(y))[:, None] % 3 == 0, np.nan, y)])
    lls = jax.vmap(lambda obs: _filter(model, obs).log_likelihood)(ys)
    for k in range(2):
        assert _rel(lls[k], oracle.dense_log_likelihood(params, ys[k])) < 1e-9


def test_not_positive_definite_gives_minus_inf():
    params, y = _case("basic")
    params = dict(params, R=-np.eye(1) * 10.0)
    out = _filter(LinearGaussianSSM(**params), y)
    assert float(out.log_likelihood) == -np.inf
    assert np.all(np.asarray(out.log_likelihoods) == -np.inf)


def test_input_errors():
    params, y = _case("basic")
    model = LinearGaussianSSM(**params)
    with pytest.raises(ValueError, match="y.shape"):
        parallel_filter(model, y[:, None])
    with pytest.raises(ValueError, match="form"):
        parallel_filter(model, y, form="info")
    with pytest.raises(ValueError, match="F.shape"):
        parallel_filter(LinearGaussianSSM(**dict(params, F=np.stack([params["F"]] * 4))), y)
    with pytest.raises(NotImplementedError, match="diffuse"):
        parallel_filter(LinearGaussianSSM(**params, diffuse=True), y)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_public_functions_route_parallel_true_here():
    import statespace

    params, y = _case("offsets_missing", seed=3)
    model = LinearGaussianSSM(**params)
    sequential = statespace.kalman_filter(model, y)
    parallel = statespace.kalman_filter(model, y, parallel=True)
    assert _rel(parallel.log_likelihood, sequential.log_likelihood) < 1e-9
    np.testing.assert_allclose(parallel.filtered_covs, sequential.filtered_covs, atol=1e-8)
    assert _rel(statespace.log_likelihood(model, y, parallel=True), sequential.log_likelihood) < 1e-9

    gp = statespace.models.matern32(0.7, 1.3, noise_var=0.1)
    rng = np.random.default_rng(4)
    times = np.sort(rng.uniform(0.0, 10.0, 12))
    obs = rng.standard_normal((12, 1))
    assert _rel(
        statespace.log_likelihood(gp, obs, times, parallel=True),
        statespace.log_likelihood(gp, obs, times),
    ) < 1e-9
    with pytest.raises(NotImplementedError, match="diffuse"):
        statespace.log_likelihood(model.replace(diffuse=True), y, parallel=True)


def test_blocked_scan_equals_sequential_products_and_program_size_is_fixed(monkeypatch):
    # A non-commutative associative operation (composition of affine maps x -> A x + v) at
    # lengths that exercise one block, padding of the last block, and several doubling levels,
    # in both directions, against the products accumulated one by one in NumPy.
    def combine(earlier, later):
        return later[0] @ earlier[0], later[0] @ earlier[1] + later[1]

    scan = jax.jit(lambda elems, reverse: _prefix_scan(combine, elems, reverse=reverse),
                   static_argnums=1)
    rng = np.random.default_rng(0)
    for T, reverse in ((1, False), (17, False), (16, True), (50, True)):
        A, v = 0.6 * rng.standard_normal((T, 3, 3)), rng.standard_normal((T, 3))
        order = range(T - 1, -1, -1) if reverse else range(T)
        expected_A, expected_v = np.empty_like(A), np.empty_like(v)
        acc = None
        for k in order:
            acc = (A[k], v[k]) if acc is None else combine(acc, (A[k], v[k]))
            expected_A[k], expected_v[k] = acc
        got_A, got_v = scan((jnp.asarray(A), jnp.asarray(v)), reverse)
        np.testing.assert_allclose(got_A, expected_A, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_v, expected_v, rtol=1e-12, atol=1e-12)

    # The lowered log-likelihood has (nearly: the padding of the last block) the same number of
    # operations at T = 64 and T = 65536; lax.associative_scan adds two copies of the
    # combination per doubling of T. Without the CPU batching of the LAPACK calls (its
    # while loops appear once a batch outgrows the chunk size; tested separately).
    import statespace._parallel as par

    monkeypatch.setattr(par, "_cpu_chunk", lambda d: None)
    params, _ = _case("basic")

    def ops(T):
        y = jax.ShapeDtypeStruct((T, 1), jnp.float64)
        loglik = jax.jit(lambda model, y: parallel_filter(model, y).log_likelihood)
        return loglik.lower(LinearGaussianSSM(**params), y).as_text().count(
            "stablehlo.")

    short, long = ops(64), ops(65536)
    assert abs(short - long) < 0.02 * short, (short, long)


@pytest.mark.parametrize(
    "grad", [False, pytest.param(True, marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_cpu_chunked_batches_match_one_vmap(monkeypatch, grad):
    # On CPU the per-element functions run in batches small enough for jaxlib's LAPACK kernels
    # to stay on the calling thread (their thread-pool path deadlocked XLA:CPU at T = 1e5;
    # see statespace._parallel._cpu_chunk). Forcing tiny batches (with padding: 11 = 3 x 4 - 1)
    # must give the one-vmap log-likelihood (and gradient: slow to compile).
    import statespace._parallel as par

    params, y = _case("offsets_missing")
    model = LinearGaussianSSM(**params)

    def run(chunk):
        monkeypatch.setattr(par, "_cpu_chunk", lambda d: chunk)
        # A new function per setting, so each is traced afresh.
        loglik = lambda F: parallel_filter(model.replace(F=F), y).log_likelihood
        fn = jax.value_and_grad(loglik) if grad else lambda F: (loglik(F),)
        return jax.jit(fn)(jnp.asarray(params["F"]))

    for a, b in zip(run(4), run(None)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
