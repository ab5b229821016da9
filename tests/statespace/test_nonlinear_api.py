"""``statespace.NonlinearSDE`` through the public front ends: derivatives, batching, NumPyro,
simulation, argument checks and the traced rejection of invalid models.

The filter's numbers against oracles (exact linear filters, dense Gaussians, the moment ODEs)
are in ``tests/statespace/test_nonlinear.py``. Here the references are the package's own
calls (a batched call against separate ones, ``log_prob`` against ``log_likelihood``), central
finite differences, equivalent models (a NaN entry against a model that does not observe it,
an all-NaN row at the midpoint of an interval against the interval without it with twice the
substeps), and the exact moments of an Ornstein-Uhlenbeck process.

Compilation, not arithmetic, is the cost (one filter program takes seconds to compile on CPU,
its gradient several times that), so the quick tests share a handful of programs: one damped
pendulum, one data shape, one jitted ``value_and_grad`` whose data and times are arguments
(finite differences, rejected models and decreasing times all run it), and eager calls whose
programs are equal and so come from the persistent compilation cache ``tests/conftest.py``
sets up. ``jax.test_util.check_grads`` for every method and form, the second-order checks,
NUTS and the remaining variants are marked slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import statespace
from statespace import NonlinearSDE
from statespace.numpyro import NonlinearStateSpace

T = 10
N, M = 2, 2
SUBSTEPS = 2  # every filter call here, unless a test says otherwise


# ------------------------------------------------------------------------------------------
# A damped pendulum observed through s sin(angle) and the angular velocity
# ------------------------------------------------------------------------------------------
def _drift(x, t, p):
    return jnp.stack([x[1], -p["g"] * jnp.sin(x[0]) - p["c"] * x[1]])


def _observe(x, t, p):
    return jnp.stack([p["s"] * jnp.sin(x[0]), x[1]])


def _state_diffusion(x, t, p):
    """Q(x) = diag(q + 0.05 x²): state dependent; indefinite where an entry of q is negative."""
    return jnp.diag(p["q"] + 0.05 * x ** 2)


def _theta():
    """The differentiable arguments: drift/observation/diffusion params, Q, R, m0, P0."""
    params = dict(g=jnp.array(2.0), c=jnp.array(0.3), s=jnp.array(1.2), q=jnp.array([0.1, 0.1]))
    Q = jnp.array([[0.05, 0.01], [0.01, 0.1]])
    R = jnp.array([[0.1, 0.02], [0.02, 0.15]])
    return params, Q, R, jnp.array([0.5, -0.2]), jnp.array([[0.2, 0.05], [0.05, 0.3]])


def _model(theta=None, diffusion=None):
    params, Q, R, m0, P0 = _theta() if theta is None else theta
    return NonlinearSDE(_drift, Q if diffusion is None else diffusion, _observe, R, m0, P0,
                        params=params)


def _data(seed=0, missing=True):
    """Irregular times and observations near the pendulum's path, with missing data (a single
    entry and a whole row)."""
    rng = np.random.default_rng(seed)
    times = np.concatenate([[0.0], np.cumsum(rng.uniform(0.1, 0.4, T - 1))])
    y = np.stack([np.sin(0.5 * np.cos(1.4 * times)), -0.7 * np.sin(1.4 * times)], axis=1)
    y = y + 0.3 * rng.normal(size=y.shape)
    if missing:
        y[3, 0] = np.nan
        y[6] = np.nan
    return jnp.asarray(times), jnp.asarray(y)


def _loglik(method="ekf", form="cov", substeps=SUBSTEPS, diffusion=None):
    """``(theta, y, times) -> log_likelihood`` of the pendulum."""
    def f(theta, y, times):
        return statespace.log_likelihood(_model(theta, diffusion), y, times, method=method,
                                         form=form, substeps=substeps)

    return f


# The quick tests' shared programs: value and gradient w.r.t. all of theta (ekf, cov), with
# the constant Q (substeps 2) and with the state-dependent diffusion (substeps 1).
VALUE_AND_GRAD = jax.jit(jax.value_and_grad(_loglik()))
VALUE_AND_GRAD_STATE_Q = jax.jit(jax.value_and_grad(_loglik(substeps=1,
                                                           diffusion=_state_diffusion)))


def _finite_leaves(tree):
    return all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(tree))


def _nan_leaves(tree):
    return all(np.all(np.isnan(np.asarray(g))) for g in jax.tree_util.tree_leaves(tree))


def _central_differences(value_and_grad, theta, y, times, h=1e-6):
    """``(jitted gradient, central differences)`` in every coordinate of ``theta``."""
    flat, unravel = ravel_pytree(theta)
    grad = ravel_pytree(value_and_grad(theta, y, times)[1])[0]

    def value(v):
        return float(value_and_grad(unravel(v), y, times)[0])

    fd = np.array([(value(flat + h * e) - value(flat - h * e)) / (2 * h)
                   for e in np.eye(flat.size)])
    return np.asarray(grad), fd


COMBOS = [
    pytest.param("ekf", "cov", id="ekf-cov"),
    pytest.param("ekf", "sqrt", id="ekf-sqrt"),
    pytest.param("ukf", "cov", id="ukf-cov"),
    pytest.param("ukf", "sqrt", id="ukf-sqrt"),
]


# ------------------------------------------------------------------------------------------
# 1. Gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_jitted_gradient_matches_central_differences():
    """``jax.jit(jax.value_and_grad(...))`` against central differences of the log-likelihood
    (float64, step 1e-6) in every coordinate of the drift and observation params, Q, R, m0
    and P0; substeps 2, a missing entry and a missing row."""
    times, y = _data()
    grad, fd = _central_differences(VALUE_AND_GRAD, _theta(), y, times)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.max(np.abs(fd)))
    # the unused diffusion parameter q gets exactly 0; the others are all reached
    g = VALUE_AND_GRAD(_theta(), y, times)[1]
    assert np.all(np.asarray(g[0]["q"]) == 0.0)
    assert all(np.all(np.asarray(g[0][k]) != 0.0) for k in ("g", "c", "s"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_state_dependent_diffusion_gradient_matches_central_differences():
    """A callable diffusion Q(x) = diag(q + 0.05 x²): its parameter and, through the mean at
    which it is evaluated, every other parameter reach the gradient."""
    times, y = _data()
    grad, fd = _central_differences(VALUE_AND_GRAD_STATE_Q, _theta(), y, times)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.max(np.abs(fd)))
    g = VALUE_AND_GRAD_STATE_Q(_theta(), y, times)[1]
    assert np.all(np.asarray(g[0]["q"]) != 0.0)
    assert np.all(np.asarray(g[1]) == 0.0)  # the constant Q is not used


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method,form", COMBOS)
def test_check_grads_reverse_all_parameters(method, form):
    """Reverse mode against JAX's numerical directional derivatives w.r.t. the drift and
    observation params, Q, R, m0 and P0 together; substeps 2, missing data; eager."""
    times, y = _data()
    f = _loglik(method, form)
    theta = _theta()
    assert np.isfinite(f(theta, y, times))
    check_grads(lambda th: f(th, y, times), (theta,), order=1, modes=("rev",))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method,form", [("ekf", "sqrt"), ("ukf", "cov")])
def test_check_grads_state_dependent_diffusion(method, form):
    times, y = _data()
    f = _loglik(method, form, diffusion=_state_diffusion)
    check_grads(lambda th: f(th, y, times), (_theta(),), order=1, modes=("rev",))


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("method,form", [("ekf", "cov"), ("ukf", "sqrt")])
def test_check_grads_second_order(method, form):
    """Forward and reverse, second order (one substep: the compile of the nested derivatives
    is the cost, minutes on CPU)."""
    times, y = _data()
    f = jax.jit(_loglik(method, form, substeps=1))
    check_grads(lambda th: f(th, y, times), (_theta(),), order=2, modes=("fwd", "rev"))


@pytest.mark.slow
# ------------------------------------------------------------------------------------------
# 2. Batching
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_vmap_over_parameters_of_batched_series():
    """``jax.vmap`` over a drift parameter of ``log_likelihood`` on a batch ``y (2, T, m)``:
    shape ``(3, 2)``, each entry the single call (the jitted program) at that parameter and
    series."""
    times, y1 = _data(0)
    _, y2 = _data(1, missing=False)
    params, *rest = _theta()
    gs = jnp.array([1.5, 2.0, 3.0])

    def at(g):
        model = _model(({**params, "g": g}, *rest))
        return statespace.log_likelihood(model, jnp.stack([y1, y2]), times, substeps=SUBSTEPS)

    mapped = jax.vmap(at)(gs)
    assert mapped.shape == (3, 2)
    separate = [[VALUE_AND_GRAD(({**params, "g": g}, *rest), y, times)[0] for y in (y1, y2)]
                for g in gs]
    np.testing.assert_allclose(mapped, separate, rtol=1e-12)
    assert len(set(np.asarray(mapped).ravel().tolist())) == 6  # g and y both reach the filter


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_batched_y_equals_separate_calls():
    times, y1 = _data(0)
    _, y2 = _data(1, missing=False)
    model = _model()
    batched = statespace.log_likelihood(model, jnp.stack([y1, y2]), times, substeps=SUBSTEPS)
    assert batched.shape == (2,)
    single = [statespace.log_likelihood(model, y, times, substeps=SUBSTEPS) for y in (y1, y2)]
    np.testing.assert_allclose(batched, single, rtol=1e-12)
    filtered = statespace.kalman_filter(model, jnp.stack([y1, y2]), times, substeps=SUBSTEPS)
    assert filtered.filtered_means.shape == (2, T, N)
    assert filtered.log_likelihoods.shape == (2, T)
    np.testing.assert_allclose(filtered.log_likelihood, single, rtol=1e-12)
    d = NonlinearStateSpace(model, times, substeps=SUBSTEPS)
    np.testing.assert_allclose(d.log_prob(jnp.stack([y1, y2])), single, rtol=1e-12)


@pytest.mark.slow
# ------------------------------------------------------------------------------------------
# 3. NumPyro distribution and simulation
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_numpyro_log_prob_equals_log_likelihood_and_sample_shape():
    times, y = _data()
    model = _model()
    d = NonlinearStateSpace(model, times, substeps=SUBSTEPS)
    assert d.event_shape == (T, M) and d.batch_shape == ()
    reference = VALUE_AND_GRAD(_theta(), y, times)[0]
    np.testing.assert_allclose(d.log_prob(y), reference, rtol=1e-12)
    two = d.sample(jax.random.key(1), (2,))
    assert two.shape == (2, T, M)
    assert np.all(np.isfinite(np.asarray(two))) and not np.allclose(two[0], two[1])
    # y[6] is an all-NaN row: it contributes exactly 0 (kalman_filter: the same program)
    out = statespace.kalman_filter(model, y, times, substeps=SUBSTEPS)
    np.testing.assert_allclose(out.log_likelihood, reference, rtol=1e-12)
    terms = np.asarray(out.log_likelihoods)
    assert terms[6] == 0.0 and np.all(terms[np.arange(T) != 6] != 0.0)
    np.testing.assert_allclose(np.sum(terms), reference, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_numpyro_sample_shapes_and_batched_log_prob():
    times, _ = _data()
    d = NonlinearStateSpace(_model(), times, substeps=SUBSTEPS)
    one = d.sample(jax.random.key(0))
    assert one.shape == (T, M)
    many = d.sample(jax.random.key(1), (3,))
    assert many.shape == (3, T, M)
    lp = d.log_prob(many)
    assert lp.shape == (3,) and np.all(np.isfinite(np.asarray(lp)))
    np.testing.assert_allclose(lp, [VALUE_AND_GRAD(_theta(), y, times)[0] for y in many],
                               rtol=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_numpyro_more_sample_shapes_and_jit():
    times, y = _data()
    d = NonlinearStateSpace(_model(), times, method="ukf", form="sqrt", sample_substeps=3)
    assert d.sample(jax.random.key(1), (2, 3)).shape == (2, 3, T, M)
    jitted = jax.jit(lambda dist, value: dist.log_prob(value))(d, y)
    np.testing.assert_allclose(
        jitted, statespace.log_likelihood(_model(), y, times, method="ukf", form="sqrt"),
        rtol=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nuts_short_run():
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    times = jnp.linspace(0.0, 3.0, 12)

    def sde(rate):
        return NonlinearSDE(lambda x, t, p: -p * jnp.sin(x), 0.1 * jnp.eye(1),
                            lambda x, t, p: x, 0.05 * jnp.eye(1), jnp.array([1.0]),
                            0.1 * jnp.eye(1), params=rate)

    y = NonlinearStateSpace(sde(jnp.array(1.5)), times).sample(jax.random.key(0))

    def model(y=None):
        rate = numpyro.sample("rate", dist.LogNormal(0.0, 1.0))
        numpyro.sample("y", NonlinearStateSpace(sde(rate), times), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=50, num_samples=50, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.key(1), y=y)
    rate = np.asarray(mcmc.get_samples()["rate"])
    assert rate.shape == (50,)
    assert np.all(np.isfinite(rate)) and np.all(rate > 0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_simulate_shapes():
    times, _ = _data()
    model = _model()
    states, obs = model.simulate(jax.random.key(0), times, substeps=3)
    assert states.shape == (T, N) and obs.shape == (T, M)
    assert np.all(np.isfinite(np.asarray(states))) and np.all(np.isfinite(np.asarray(obs)))
    states1, obs1 = model.simulate(jax.random.key(0), times[:1])
    assert states1.shape == (1, N) and obs1.shape == (1, M)
    again, _ = model.simulate(jax.random.key(0), times, substeps=3)
    np.testing.assert_array_equal(states, again)
    other, _ = model.simulate(jax.random.key(5), times, substeps=3)
    assert not np.allclose(states, other)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_simulate_linear_drift_has_the_exact_covariance():
    """2000 paths of dx = -θ x dt + σ dW, x(0) ~ N(m0, P0) at three irregular times: sample
    means and covariances within 5 standard errors of the exact ones (mean m0 e^{-θt},
    Var P0 e^{-2θt} + σ²/(2θ)(1 - e^{-2θt}), Cov(x_s, x_t) = e^{-θ(t-s)} Var x_s); the
    observations add R on the diagonal."""
    theta, sigma2, m0, P0, R = 1.3, 0.8, 1.0, 0.2, 0.05
    model = NonlinearSDE(lambda x, t, p: -p * x, sigma2 * jnp.eye(1), lambda x, t, p: x,
                         R * jnp.eye(1), jnp.array([m0]), P0 * jnp.eye(1), params=jnp.array(theta))
    times = np.array([0.0, 0.4, 1.5])
    K = 2000
    keys = jax.random.split(jax.random.key(42), K)
    states, obs = jax.vmap(lambda k: model.simulate(k, jnp.asarray(times)))(keys)
    assert states.shape == (K, 3, 1) and obs.shape == (K, 3, 1)
    mean = m0 * np.exp(-theta * times)
    var = P0 * np.exp(-2 * theta * times) + sigma2 / (2 * theta) * (1 - np.exp(-2 * theta * times))
    earlier = np.minimum.outer(np.arange(3), np.arange(3))
    cov = np.exp(-theta * np.abs(np.subtract.outer(times, times))) * var[earlier]
    pairs = ((np.asarray(states[..., 0]), cov), (np.asarray(obs[..., 0]), cov + R * np.eye(3)))
    for sample, exact in pairs:
        se_mean = np.sqrt(np.diag(exact) / K)
        assert np.all(np.abs(sample.mean(0) - mean) < 5 * se_mean), (sample.mean(0), mean)
        se_cov = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact ** 2) / K)
        sample_cov = np.cov(sample, rowvar=False)
        assert np.all(np.abs(sample_cov - exact) < 5 * se_cov), (sample_cov, exact)


# ------------------------------------------------------------------------------------------
# Smoother and predict front ends (shapes and consistency with the filter)
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoother_and_predict_front_ends():
    times, y = _data()
    model = _model()
    ll = statespace.log_likelihood(model, y, times, substeps=SUBSTEPS)
    sm = statespace.rts_smoother(model, y, times, substeps=SUBSTEPS)
    assert sm.smoothed_means.shape == (T, N) and sm.smoothed_covs.shape == (T, N, N)
    assert sm.smoothed_cross_covs.shape == (T - 1, N, N)
    np.testing.assert_allclose(sm.log_likelihood, ll, rtol=1e-12)
    np.testing.assert_allclose(sm.smoothed_means[-1], sm.filtered_means[-1], rtol=1e-12)
    new_times = jnp.array([times[4], times[-1] + 0.5, jnp.nan])
    pred = statespace.predict(model, y, times, new_times, substeps=SUBSTEPS)
    assert pred.means.shape == (3, N) and pred.covs.shape == (3, N, N)
    assert pred.obs_means.shape == (3, M) and pred.obs_covs.shape == (3, M, M)
    assert np.all(np.isfinite(np.asarray(pred.means[:2])))
    assert np.all(np.isnan(np.asarray(pred.means[2])))  # only the NaN time
    # a new time equal to an observation time comes right after it (dt = 0): its moments
    np.testing.assert_allclose(pred.means[0], sm.smoothed_means[4], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pred.covs[0], sm.smoothed_covs[4], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------
# 4. Bad inputs: exceptions
# ------------------------------------------------------------------------------------------
def _build(**changes):
    params, Q, R, m0, P0 = _theta()
    kw = dict(drift=_drift, diffusion=Q, observe=_observe, R=R, m0=m0, P0=P0)
    kw.update(changes)
    return NonlinearSDE(*kw.values(), params=params)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,fn,shapes", [
    ("drift", lambda x, t, p: jnp.concatenate([x, x[:1]]), r"\(2,\).*got \(3,\)"),
    ("drift", lambda x, t, p: jnp.sum(x), r"\(2,\).*got \(\)"),
    ("observe", lambda x, t, p: x[:1], r"\(2,\).*got \(1,\)"),
    ("diffusion", lambda x, t, p: jnp.eye(3), r"\(2, 2\).*got \(3, 3\)"),
    ("diffusion", lambda x, t, p: jnp.diag(x)[0], r"\(2, 2\).*got \(2,\)"),
], ids=["drift-long", "drift-scalar", "observe", "diffusion", "diffusion-vector"])
def test_function_output_shape_is_checked_at_construction(name, fn, shapes):
    with pytest.raises(ValueError, match=rf"{name}\(x, t, params\) must return shape {shapes}"):
        _build(**{name: fn})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["drift", "observe"])
def test_function_not_callable(name):
    with pytest.raises(TypeError, match=name):
        _build(**{name: jnp.eye(2)})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,value", [
    ("R", jnp.eye(2)[:, :1]),
    ("R", jnp.ones(2)),
    ("R", jnp.array(1.0)),
    ("m0", jnp.zeros((2, 1))),
    ("m0", jnp.array(0.0)),
    ("P0", jnp.eye(3)),
    ("P0", jnp.ones(2)),
    ("diffusion", jnp.eye(3)),
    ("diffusion", jnp.ones(2)),
])
def test_matrix_shapes_are_checked(name, value):
    with pytest.raises(ValueError, match=r"shape"):
        _build(**{name: value})


@pytest.mark.timeout(60)
def test_call_arguments_are_checked():
    times, y = _data()
    model = _model()
    ll = statespace.log_likelihood
    with pytest.raises(ValueError, match=r"m = 2"):
        ll(model, y[:, :1], times)
    with pytest.raises(ValueError, match=r"y must have shape"):
        ll(model, y[:, 0], times)
    with pytest.raises(ValueError, match=r"times must have shape"):
        ll(model, y, times[:-1])
    with pytest.raises(ValueError, match=r"times must have shape"):
        ll(model, y, times[:, None])
    with pytest.raises(ValueError, match="times is required"):
        ll(model, y)
    with pytest.raises(ValueError, match="method"):
        ll(model, y, times, method="pf")
    with pytest.raises(ValueError, match="form"):
        ll(model, y, times, form="information")
    for substeps in (0, -1, 1.5, 2.0, True):
        with pytest.raises(ValueError, match="substeps"):
            ll(model, y, times, substeps=substeps)
        with pytest.raises(ValueError, match="substeps"):
            model.simulate(jax.random.key(0), times, substeps)
    for fn in (statespace.kalman_filter, statespace.rts_smoother):
        with pytest.raises(ValueError, match="method"):
            fn(model, y, times, method="pf")
        with pytest.raises(ValueError, match="substeps"):
            fn(model, y, times, substeps=0)
        with pytest.raises(ValueError, match="form"):
            fn(model, y, times, form="information")
    with pytest.raises(ValueError, match="method"):
        statespace.predict(model, y, times, times[:2], method="pf")
    with pytest.raises(ValueError, match="substeps"):
        statespace.predict(model, y, times, times[:2], substeps=0)
    with pytest.raises(ValueError, match="y must be"):
        statespace.predict(model, y[:, :1], times, times[:2])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kwargs", [dict(parallel=True), dict(gradient="adjoint"),
                                    dict(inputs=np.ones((T, 1)))],
                         ids=["parallel", "adjoint", "inputs"])
def test_linear_filter_options_rejected_for_nonlinear_model(kwargs):
    """The options of the linear filters are refused with a message naming NonlinearSDE
    (``gradient="autodiff"`` is what the nonlinear filter does, and is accepted)."""
    times, y = _data()
    model = _model()
    with pytest.raises(ValueError, match="NonlinearSDE"):
        statespace.log_likelihood(model, y, times, **kwargs)
    if "gradient" not in kwargs:
        for fn in (statespace.kalman_filter, statespace.rts_smoother):
            with pytest.raises(ValueError, match="NonlinearSDE"):
                fn(model, y, times, **kwargs)


@pytest.mark.timeout(60)
def test_single_zero_input_is_not_silently_ignored():
    """``inputs`` whose only entry is 0 (``T = 1``, ``p = 1``) compare equal to ``False``: they
    must be refused like any other inputs, not dropped."""
    times, y = _data()
    with pytest.raises(ValueError, match="NonlinearSDE"):
        statespace.log_likelihood(_model(), y[:1], times[:1], inputs=np.zeros((1, 1)))


@pytest.mark.timeout(60)
def test_other_options_rejected_for_nonlinear_model():
    times, y = _data()
    model = _model()
    u = np.ones((T, 1))
    with pytest.raises(ValueError, match="NonlinearSDE"):
        statespace.predict(model, y, times, times[:2], inputs=u, new_inputs=u[:2])
    with pytest.raises(TypeError, match="unexpected keyword"):
        statespace.log_likelihood(model, y, times, substep=2)
    with pytest.raises(ValueError, match="unknown fields"):
        model.replace(H=jnp.eye(2))


@pytest.mark.timeout(60)
def test_nonlinear_options_rejected_for_linear_model():
    linear = statespace.LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
                                          m0=[0.0], P0=[[1.0]])
    continuous = statespace.ContinuousLinearSSM(-jnp.eye(1), jnp.eye(1), jnp.eye(1), jnp.eye(1),
                                                jnp.zeros(1), jnp.eye(1))
    y, times = jnp.ones((3, 1)), jnp.arange(3.0)
    for kwargs in (dict(method="ekf"), dict(substeps=2), dict(method="ukf", substeps=1),
                   dict(max_step=0.5)):
        for fn in (statespace.log_likelihood, statespace.kalman_filter, statespace.rts_smoother):
            with pytest.raises(ValueError, match="NonlinearSDE"):
                fn(linear, y, **kwargs)
            with pytest.raises(ValueError, match="NonlinearSDE"):
                fn(continuous, y, times, **kwargs)
        with pytest.raises(ValueError, match="NonlinearSDE"):
            statespace.predict(continuous, y, times, times[:1], **kwargs)


@pytest.mark.timeout(60)
def test_numpyro_distribution_arguments_are_checked():
    times, _ = _data()
    model = _model()
    linear = statespace.LinearGaussianSSM(F=[[0.5]], Q=[[1.0]], H=[[1.0]], R=[[1.0]],
                                          m0=[0.0], P0=[[1.0]])
    with pytest.raises(TypeError, match="NonlinearSDE"):
        NonlinearStateSpace(linear, times)
    with pytest.raises(ValueError, match="method"):
        NonlinearStateSpace(model, times, method="pf")
    with pytest.raises(ValueError, match="form"):
        NonlinearStateSpace(model, times, form="information")
    with pytest.raises(ValueError, match="times"):
        NonlinearStateSpace(model, times[None])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kwargs", [dict(substeps=0), dict(substeps=1.5), dict(sample_substeps=0)])
def test_numpyro_distribution_checks_substeps_at_construction(kwargs):
    """Documented: ``Raises: ValueError: bad times, method, form or substeps``."""
    times, _ = _data()
    with pytest.raises(ValueError, match="substeps"):
        NonlinearStateSpace(_model(), times, **kwargs)


# ------------------------------------------------------------------------------------------
# 4. Bad values under tracing: -inf and a NaN gradient, never an exception
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_indefinite_constant_diffusion_and_decreasing_times_give_minus_inf():
    times, y = _data()
    params, Q, R, m0, P0 = _theta()
    bad_Q = jnp.array([[0.05, 0.2], [0.2, 0.1]])  # eigenvalues of both signs
    assert np.min(np.linalg.eigvalsh(bad_Q)) < 0
    for theta, t in (((params, bad_Q, R, m0, P0), times),
                     (_theta(), times.at[4].set(times[2]))):  # t4 < t3
        value, grad = VALUE_AND_GRAD(theta, y, t)
        assert float(value) == -np.inf
        assert _nan_leaves(grad)
    # equal times are fine (dt = 0)
    value, grad = VALUE_AND_GRAD(_theta(), y, times.at[4].set(times[3]))
    assert np.isfinite(value) and _finite_leaves(grad)


@pytest.mark.timeout(300)
def test_decreasing_interval_rejects_from_the_step_that_uses_it():
    """``kalman_filter``'s contract: ``-inf`` "for the first step that uses it and all later
    ones". The interval [t3, t4] (here of negative length) is first used by the term of
    ``y[4]``; the terms of ``y[0..3]`` do not depend on it."""
    times, y = _data()
    out = statespace.kalman_filter(_model(), y, times.at[4].set(times[2]), substeps=SUBSTEPS)
    terms = np.asarray(out.log_likelihoods)
    assert float(out.log_likelihood) == -np.inf
    assert np.all(terms[4:] == -np.inf)
    assert np.all(np.isfinite(terms[:4])), terms


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prediction_beyond_the_last_observation_is_not_checked():
    """A Brownian bridge pinned at t = 1, dx = (b - x)/(1 - t) dt + dW, observed at t = 1: the
    filter only evaluates the drift at the start of each substep (t < 1), so the likelihood is
    finite; the drift at t = 1 itself (the padded prediction after the last observation, which
    no term uses) is infinite and must not reject the model."""
    bridge = NonlinearSDE(lambda x, t, p: (p - x) / (1.0 - t), 0.1 * jnp.eye(1),
                          lambda x, t, p: x, 0.05 * jnp.eye(1), jnp.zeros(1), 0.01 * jnp.eye(1),
                          params=jnp.array(0.5))
    out = statespace.kalman_filter(bridge, jnp.array([[0.0], [0.2], [0.4], [0.5]]),
                                   jnp.array([0.0, 0.3, 0.6, 1.0]))
    assert np.all(np.isfinite(np.asarray(out.log_likelihoods))), out.log_likelihoods
    assert np.isfinite(out.log_likelihood)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method,form", COMBOS)
def test_indefinite_constant_diffusion_and_decreasing_times_eager(method, form):
    times, y = _data()
    model = _model()
    kw = dict(method=method, form=form, substeps=SUBSTEPS)
    assert np.isfinite(statespace.log_likelihood(model, y, times, **kw))
    bad = model.replace(Q=jnp.array([[0.05, 0.2], [0.2, 0.1]]))
    assert float(statespace.log_likelihood(bad, y, times, **kw)) == -np.inf
    assert float(statespace.log_likelihood(model, y, times.at[4].set(times[2]), **kw)) == -np.inf
    out = statespace.kalman_filter(model, y, times.at[4].set(times[2]), **kw)
    # the steps before the bad interval [t3, t4] keep their terms
    assert np.all(np.isfinite(np.asarray(out.log_likelihoods[:3])))
    assert np.all(np.asarray(out.log_likelihoods[4:]) == -np.inf)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_indefinite_callable_diffusion_gives_minus_inf():
    """Q(x) = diag(q + 0.05 x²) with q = (0.1, -1): indefinite at every mean the filter meets."""
    times, y = _data()
    params, *rest = _theta()
    value, grad = VALUE_AND_GRAD_STATE_Q(({**params, "q": jnp.array([0.1, -1.0])}, *rest), y, times)
    assert float(value) == -np.inf
    assert _nan_leaves(grad[0]) and _nan_leaves(grad[2:])  # grad[1]: the unused constant Q


def _scalar_drift(x, t, p):
    """a sqrt|x| - x + log b: an infinite slope at x = 0, an infinite value at b = 0."""
    return p["a"] * jnp.sqrt(jnp.abs(x)) - x + jnp.log(p["b"])


SCALAR_TIMES = jnp.array([0.0, 0.3, 0.7, 1.0])
SCALAR_Y = jnp.array([[jnp.nan], [0.1], [-0.2], [0.3]])  # y[0] missing: the mean stays m0


def _scalar_model(m0=1.0, a=0.5, b=1.0):
    return NonlinearSDE(_scalar_drift, 0.1 * jnp.eye(1), lambda x, t, p: x, 0.1 * jnp.eye(1),
                        jnp.array([m0]), jnp.eye(1), params=dict(a=jnp.array(a), b=jnp.array(b)))


# finite; the Jacobian of sqrt|x| at the filter's mean 0 (y[0] missing, m0 = 0); log(0)
SCALAR_CASES = [(dict(), True), (dict(m0=0.0), False), (dict(b=0.0), False)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_non_finite_drift_or_jacobian_gives_minus_inf():
    for case, finite in SCALAR_CASES:
        value = float(statespace.log_likelihood(_scalar_model(**case), SCALAR_Y, SCALAR_TIMES))
        assert np.isfinite(value) if finite else value == -np.inf, (case, value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_non_finite_drift_or_jacobian_gives_nan_gradient():
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda mdl: statespace.log_likelihood(mdl, SCALAR_Y, SCALAR_TIMES, method="ukf",
                                              form="sqrt", substeps=2)))
    for case, finite in SCALAR_CASES:
        value, grad = value_and_grad(_scalar_model(**case))
        if finite:
            assert np.isfinite(value) and _finite_leaves(grad)
        else:
            assert float(value) == -np.inf and _nan_leaves(grad), case


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["ekf", "ukf"])
def test_missing_rows_equal_removing_midpoints(method):
    """All-NaN rows contribute exactly 0 to ``log_likelihoods``; at the midpoints of
    ``[t_{k-1}, t_{k+1}]`` they give the same filter as the series without them with twice the
    substeps (the same relinearisation points)."""
    _check_midpoint(method)


def _check_midpoint(method):
    model = _model()
    times = jnp.arange(T) * 0.25
    _, y = _data(2, missing=False)
    y = y.at[1::2].set(jnp.nan)  # every other row missing
    out = statespace.kalman_filter(model, y, times, method=method, substeps=SUBSTEPS)
    assert np.all(np.asarray(out.log_likelihoods)[1::2] == 0.0)
    assert np.all(np.asarray(out.log_likelihoods)[::2] != 0.0)
    np.testing.assert_allclose(np.sum(out.log_likelihoods), out.log_likelihood, rtol=1e-12)
    # without the missing rows: the last interval [t8, t9] is gone (nothing after t9 to predict)
    removed = statespace.log_likelihood(model, y[::2], times[::2], method=method,
                                        substeps=2 * SUBSTEPS)
    np.testing.assert_allclose(out.log_likelihood, removed, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["ekf", "ukf"])
def test_missing_entry_equals_a_model_without_it(method):
    """NaN in the first column at every step = a model observing only the second entry
    (R diagonal): the masked update drops the entry and its correlations exactly."""
    _check_missing_entry(method)


def _check_missing_entry(method):
    times, y = _data(missing=False)
    params, Q, _, m0, P0 = _theta()
    R = jnp.diag(jnp.array([0.1, 0.15]))
    full = NonlinearSDE(_drift, Q, _observe, R, m0, P0, params=params)
    second = NonlinearSDE(_drift, Q, lambda x, t, p: _observe(x, t, p)[1:], R[1:, 1:], m0, P0,
                          params=params)
    kw = dict(method=method, substeps=SUBSTEPS)
    masked = statespace.log_likelihood(full, y.at[:, 0].set(jnp.nan), times, **kw)
    only = statespace.log_likelihood(second, y[:, 1:], times, **kw)
    np.testing.assert_allclose(masked, only, rtol=1e-10)


# ------------------------------------------------------------------------------------------
# 5. T = 0
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_empty_series_has_log_likelihood_zero():
    y, times = jnp.zeros((0, M)), jnp.zeros((0,))
    assert float(statespace.log_likelihood(_model(), y, times, substeps=SUBSTEPS)) == 0.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_empty_series_every_front_end():
    model = _model()
    y, times = jnp.zeros((0, M)), jnp.zeros((0,))
    assert float(statespace.log_likelihood(model, y, times, method="ukf", form="sqrt")) == 0.0
    out = statespace.kalman_filter(model, y, times, form="sqrt")
    assert float(out.log_likelihood) == 0.0 and out.filtered_means.shape == (0, N)
    assert out.log_likelihoods.shape == (0,)
    sm = statespace.rts_smoother(model, y, times)
    assert float(sm.log_likelihood) == 0.0 and sm.smoothed_means.shape == (0, N)
    assert float(statespace.log_likelihood(model, jnp.zeros((3, 0, M)), times)[1]) == 0.0
    states, obs = model.simulate(jax.random.key(0), times)
    assert states.shape == (0, N) and obs.shape == (0, M)
    d = NonlinearStateSpace(model, times)
    assert d.sample(jax.random.key(0), (2,)).shape == (2, 0, M)
    assert float(d.log_prob(y)) == 0.0
