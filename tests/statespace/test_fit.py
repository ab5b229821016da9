"""Tests of ``statespace.fit`` (optax loop) and the Hessian standard errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import statespace
from statespace._fit import covariance, standard_errors

A_QUAD = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]])
B_QUAD = np.array([1.0, -2.0, 0.5])


def quadratic(params):
    x = jnp.concatenate([params["a"], params["b"]["c"]])
    return 0.5 * x @ A_QUAD @ x - B_QUAD @ x


def quad_init():
    return {"a": jnp.zeros(2), "b": {"c": jnp.zeros(1)}}


def flat(params):
    return np.concatenate([np.asarray(params["a"]), np.asarray(params["b"]["c"])])


@pytest.mark.parametrize(
    "optimizer, steps",
    [
        (optax.adam(0.05), 2000),
        (optax.sgd(0.2), 2000),
        (optax.lbfgs(), 100),
        (optax.chain(optax.clip_by_global_norm(10.0), optax.adam(0.05)), 2000),
    ],
    ids=["adam", "sgd", "lbfgs", "chain"],
)
def test_fit_quadratic_reaches_the_solution(optimizer, steps):
    res = statespace.fit(
        quadratic, quad_init(), optimizer=optimizer, num_steps=steps, tol=1e-13, progress=False
    )
    x_star = np.linalg.solve(A_QUAD, B_QUAD)
    np.testing.assert_allclose(flat(res.params), x_star, atol=1e-5)
    assert res.converged
    assert res.num_steps < steps
    assert res.losses.shape == (res.num_steps,)
    np.testing.assert_allclose(res.loss, -0.5 * B_QUAD @ x_star, rtol=1e-9)
    assert res.losses[0] == pytest.approx(0.0)
    assert res.losses[-1] <= res.losses[0]
    # structure of params is kept
    assert jax.tree_util.tree_structure(res.params) == jax.tree_util.tree_structure(quad_init())


def test_lbfgs_reuses_value_and_gradient_from_state():
    calls = []

    def counted(params):
        jax.debug.callback(lambda: calls.append(1))
        return quadratic(params)

    res = statespace.fit(
        counted, quad_init(), optimizer=optax.lbfgs(), num_steps=30, tol=1e-14, progress=False
    )
    x_star = np.linalg.solve(A_QUAD, B_QUAD)
    np.testing.assert_allclose(flat(res.params), x_star, atol=1e-8)
    # a quadratic needs one line-search evaluation per step when the value and gradient of the
    # accepted point are reused; recomputing them would need at least two per step
    assert len(calls) < 2 * res.num_steps


def test_lbfgs_fit_traces_the_loss_once():
    # Every place a step evaluates the loss is a copy of its program that XLA compiles again
    # (inlined): the L-BFGS step reads the value and gradient from the seeded state, the line
    # search's two evaluations and the final loss share one traced (jitted) loss.
    traces = []

    def loss(params):
        traces.append(1)  # runs at trace time only
        return quadratic(params)

    res = statespace.fit(
        loss, quad_init(), optimizer=optax.lbfgs(), num_steps=30, tol=1e-14, progress=False
    )
    assert res.converged
    assert len(traces) == 1
    np.testing.assert_allclose(res.loss, float(quadratic(res.params)), rtol=1e-12)
    np.testing.assert_allclose(res.losses[0], float(quadratic(quad_init())), rtol=1e-12)


def test_runs_exactly_num_steps_without_tol_across_partial_chunks():
    res = statespace.fit(
        quadratic, quad_init(), optimizer=optax.sgd(0.01), num_steps=73, chunk_size=20,
        progress=False,
    )
    assert res.num_steps == 73
    assert res.losses.shape == (73,)
    assert not res.converged
    assert np.all(np.diff(res.losses) < 0)  # small-step gradient descent on a convex quadratic
    # the same as a hand-written loop
    params = quad_init()
    opt = optax.sgd(0.01)
    state = opt.init(params)
    for _ in range(73):
        g = jax.grad(quadratic)(params)
        upd, state = opt.update(g, state, params)
        params = optax.apply_updates(params, upd)
    np.testing.assert_allclose(flat(res.params), flat(params), rtol=1e-12)


def test_resume_from_opt_state_matches_one_long_run():
    opt = optax.adam(0.02)
    one = statespace.fit(quadratic, quad_init(), optimizer=opt, num_steps=60, progress=False)
    first = statespace.fit(quadratic, quad_init(), optimizer=opt, num_steps=25, progress=False)
    second = statespace.fit(
        quadratic, first.params, optimizer=opt, num_steps=35, opt_state=first.opt_state,
        progress=False,
    )
    np.testing.assert_allclose(flat(second.params), flat(one.params), rtol=1e-12)


def test_args_are_passed_to_the_loss():
    def loss(p, target, scale):
        return scale * jnp.sum((p - target) ** 2)

    target = jnp.arange(4.0)
    res = statespace.fit(
        loss, jnp.zeros(4), optimizer=optax.lbfgs(), num_steps=50, tol=1e-14,
        args=(target, 2.0), progress=False,
    )
    np.testing.assert_allclose(res.params, target, atol=1e-8)


def test_non_finite_loss_stops_and_keeps_last_finite_params():
    # log barrier: the loss is NaN for x >= 1; a large SGD step jumps over the barrier
    def loss(x):
        return jnp.sum(-jnp.log1p(-x) - 3.0 * x)

    res = statespace.fit(loss, jnp.array([0.0]), optimizer=optax.sgd(1.0), num_steps=100,
                         progress=False)
    assert not res.converged
    assert "non-finite" in res.status
    assert np.isfinite(res.loss)
    assert np.all(np.asarray(res.params) < 1.0)
    assert np.isnan(res.losses[-1]) or not np.isfinite(res.losses[-1])


def _rosenbrock(params):
    x = params["x"]
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


@pytest.mark.parametrize("num_steps, tol", [(0, None), (3, None), (200, 1e-12)],
                         ids=["no-step", "step-cap", "tol"])
@pytest.mark.parametrize("optimizer_name", ["lbfgs", "adam"])
def test_reported_loss_is_the_loss_at_the_returned_parameters(optimizer_name, num_steps, tol):
    # the final loss comes from the loop's carry or the optimiser's stored value where they
    # hold it (no program of its own): check it against the loss at the returned parameters
    optimizer = optax.lbfgs() if optimizer_name == "lbfgs" else optax.adam(0.01)
    start = {"x": jnp.array([-1.2, 1.0, 0.5])}
    res = statespace.fit(_rosenbrock, start, optimizer=optimizer, num_steps=num_steps, tol=tol,
                         progress=False)
    assert res.num_steps <= num_steps
    if optimizer_name == "lbfgs" and tol:
        assert res.converged
    np.testing.assert_allclose(res.loss, float(_rosenbrock(res.params)), rtol=1e-12)
    if num_steps:
        assert res.losses[0] == pytest.approx(float(_rosenbrock(start)))


def test_progress_bar_writes_to_stderr(capsys):
    statespace.fit(quadratic, quad_init(), optimizer=optax.adam(0.1), num_steps=30,
                   chunk_size=10, progress=True, description="quad")
    err = capsys.readouterr().err
    assert "quad" in err and "30/30" in err


def test_zero_steps_returns_initial_params():
    res = statespace.fit(quadratic, quad_init(), optimizer=optax.adam(0.1), num_steps=0)
    assert res.num_steps == 0 and res.losses.shape == (0,)
    np.testing.assert_array_equal(flat(res.params), 0.0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_steps=-1), ValueError),
        (dict(num_steps=10, chunk_size=0), ValueError),
        (dict(num_steps=10, tol=-1.0), ValueError),
        (dict(num_steps=10, optimizer="adam"), TypeError),
    ],
)
def test_invalid_arguments_raise(kwargs, error):
    kwargs = {"optimizer": optax.adam(0.1), **kwargs}
    with pytest.raises(error):
        statespace.fit(quadratic, quad_init(), progress=False, **kwargs)


def test_standard_errors_of_a_quadratic_are_the_inverse_hessian_diagonal():
    x_star = np.linalg.solve(A_QUAD, B_QUAD)
    params = {"a": jnp.asarray(x_star[:2]), "b": {"c": jnp.asarray(x_star[2:])}}
    se = standard_errors(quadratic, params)
    np.testing.assert_allclose(flat(se), np.sqrt(np.diag(np.linalg.inv(A_QUAD))), rtol=1e-12)
    cov, unravel = covariance(quadratic, params)
    np.testing.assert_allclose(cov, np.linalg.inv(A_QUAD), rtol=1e-12, atol=1e-14)
    assert jax.tree_util.tree_structure(unravel(jnp.zeros(3))) == jax.tree_util.tree_structure(
        params
    )


def test_gaussian_mle_and_delta_method_standard_errors():
    rng = np.random.default_rng(0)
    y = rng.normal(1.5, 2.0, size=400)

    def nll(p, y):
        sigma = jnp.exp(p["log_sigma"])
        return jnp.sum(0.5 * ((y - p["mu"]) / sigma) ** 2 + jnp.log(sigma))

    res = statespace.fit(
        nll, {"mu": 0.0, "log_sigma": 0.0}, optimizer=optax.lbfgs(), num_steps=100,
        tol=1e-12, args=(jnp.asarray(y),), progress=False,
    )
    mu_hat, sigma_hat = y.mean(), y.std()
    np.testing.assert_allclose(res.params["mu"], mu_hat, rtol=1e-7)
    np.testing.assert_allclose(jnp.exp(res.params["log_sigma"]), sigma_hat, rtol=1e-7)
    se = res.standard_errors()
    # observed information of the Gaussian MLE: se(mu) = sigma/sqrt(n), se(log sigma) = 1/sqrt(2n)
    np.testing.assert_allclose(se["mu"], sigma_hat / np.sqrt(y.size), rtol=1e-6)
    np.testing.assert_allclose(se["log_sigma"], 1.0 / np.sqrt(2 * y.size), rtol=1e-6)
    se_sigma = res.standard_errors(transform=lambda p: jnp.exp(p["log_sigma"]))
    np.testing.assert_allclose(se_sigma, sigma_hat / np.sqrt(2 * y.size), rtol=1e-6)


def test_standard_errors_nan_when_not_at_a_minimum():
    se = standard_errors(lambda x: x[0] ** 2 - x[1] ** 2, jnp.zeros(2))
    assert np.all(np.isnan(np.asarray(se)))


def test_fit_kalman_model_matches_scipy_on_the_dense_oracle():
    """MLE of a local-level + AR(1) model: fit(lbfgs) vs scipy minimize on the dense likelihood."""
    from tests.statespace.dense_oracle import dense_log_likelihood

    rng = np.random.default_rng(1)
    true = np.array([np.log(0.8 / 0.2), np.log(0.3), np.log(0.5)])
    _, y = _tiny_model_and_data(jnp.asarray(true), rng=rng, T=40)

    def nll(u, y):
        model, _ = _tiny_model_and_data(u)
        return -statespace.log_likelihood(model, y)

    res = statespace.fit(nll, jnp.zeros(3), optimizer=optax.lbfgs(), num_steps=200, tol=1e-12,
                         args=(jnp.asarray(y),), progress=False)

    def dense_nll(u):
        return -dense_log_likelihood(_tiny_params(u), y)

    ref = scipy.optimize.minimize(dense_nll, np.zeros(3), method="Nelder-Mead",
                                  options=dict(xatol=1e-9, fatol=1e-11, maxiter=20000))
    np.testing.assert_allclose(res.loss, ref.fun, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(res.params, ref.x, atol=2e-4)
    se = np.asarray(res.standard_errors())
    # finite-difference Hessian of the dense likelihood
    h = 1e-4
    H = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            ei, ej = np.eye(3)[i] * h, np.eye(3)[j] * h
            x = ref.x
            H[i, j] = (dense_nll(x + ei + ej) - dense_nll(x + ei - ej) - dense_nll(x - ei + ej)
                       + dense_nll(x - ei - ej)) / (4 * h * h)
    np.testing.assert_allclose(se, np.sqrt(np.diag(np.linalg.inv(H))), rtol=2e-3)


def _tiny_params(u):
    phi = 1.0 / (1.0 + np.exp(-np.asarray(u)[0]))
    q, r = np.exp(2 * np.asarray(u)[1]), np.exp(2 * np.asarray(u)[2])
    return dict(F=np.array([[phi]]), Q=np.array([[q]]), H=np.array([[1.0]]),
                R=np.array([[r]]), m0=np.zeros(1), P0=np.array([[q / (1 - phi**2)]]))


def _tiny_model_and_data(u, rng=None, T=40):
    phi = jax.nn.sigmoid(u[0])
    q, r = jnp.exp(2 * u[1]), jnp.exp(2 * u[2])
    model = statespace.LinearGaussianSSM(
        F=phi[None, None], Q=q[None, None], H=jnp.ones((1, 1)), R=r[None, None],
        m0=jnp.zeros(1), P0=(q / (1 - phi**2))[None, None],
    )
    y = None
    if rng is not None:
        from tests.statespace.dense_oracle import random_observations

        y = random_observations(rng, _tiny_params(np.asarray(u)), T, missing=0.1)
    return model, y


def test_default_fit_runs_lbfgs_to_convergence_on_a_quadratic():
    res = statespace.fit(quadratic, quad_init(), progress=False)
    x_star = np.linalg.solve(A_QUAD, B_QUAD)
    np.testing.assert_allclose(flat(res.params), x_star, atol=1e-7)
    np.testing.assert_allclose(res.loss, -0.5 * B_QUAD @ x_star, rtol=1e-12)
    assert res.converged and res.status.startswith("converged")
    assert res.num_steps < 50  # L-BFGS on a 3-dimensional quadratic, not the step cap
    # the gradient test holds at the returned parameters, or the last step changed the loss
    # by less than DEFAULT_RTOL relative
    g = flat(jax.grad(quadratic)(res.params))
    rel = abs(res.losses[-1] - res.losses[-2]) / max(abs(res.losses[-1]), 1.0)
    assert np.max(np.abs(g)) <= statespace.DEFAULT_GTOL or rel <= statespace.DEFAULT_RTOL


def test_default_fit_of_a_state_space_model_matches_scipy():
    rng = np.random.default_rng(1)
    true = np.array([np.log(0.8 / 0.2), np.log(0.3), np.log(0.5)])
    _, y = _tiny_model_and_data(jnp.asarray(true), rng=rng, T=40)
    y = jnp.asarray(y)

    def nll(u, y):
        model, _ = _tiny_model_and_data(u)
        return -statespace.log_likelihood(model, y)

    res = statespace.fit(nll, jnp.zeros(3), args=(y,), progress=False)
    value_and_grad = jax.jit(jax.value_and_grad(nll))

    def fun(u):
        v, g = value_and_grad(jnp.asarray(u), y)
        return float(v), np.asarray(g)

    ref = scipy.optimize.minimize(fun, np.zeros(3), jac=True, method="BFGS",
                                  options=dict(gtol=1e-9, maxiter=1000))
    assert np.max(np.abs(ref.jac)) < 1e-6  # scipy's optimum, to its line search's precision
    assert res.converged and res.num_steps < statespace.DEFAULT_MAX_STEPS
    np.testing.assert_allclose(res.loss, ref.fun, rtol=1e-12)
    np.testing.assert_allclose(res.params, ref.x, atol=1e-5)


def test_default_fit_stops_on_the_gradient_at_an_optimum_and_at_the_step_cap():
    x_star = np.linalg.solve(A_QUAD, B_QUAD)
    at_optimum = {"a": jnp.asarray(x_star[:2]), "b": {"c": jnp.asarray(x_star[2:])}}
    res = statespace.fit(quadratic, at_optimum, progress=False)
    assert res.converged and res.status == "converged: gradient below gtol"
    assert res.num_steps == 1  # the first step finds the gradient below gtol
    np.testing.assert_array_equal(flat(res.params), x_star)
    capped = statespace.fit(lambda x: jnp.sum(jnp.cosh(x - 5.0)), jnp.zeros(4), num_steps=2,
                            progress=False)
    assert capped.num_steps == 2 and not capped.converged
    assert capped.status == "reached num_steps"


def test_rtol_and_gtol_with_an_explicit_optimizer():
    res = statespace.fit(quadratic, quad_init(), optimizer=optax.sgd(0.05), num_steps=5000,
                         rtol=1e-6, progress=False)
    assert res.converged and res.status == "converged: relative loss change below rtol"
    assert res.num_steps < 5000
    assert abs(res.losses[-1] - res.losses[-2]) <= 1e-6 * max(abs(res.losses[-1]), 1.0)
    assert abs(res.losses[-2] - res.losses[-3]) > 1e-6 * max(abs(res.losses[-2]), 1.0)
    res = statespace.fit(quadratic, quad_init(), optimizer=optax.sgd(0.05), gtol=1e-4,
                         progress=False)
    assert res.converged and res.status == "converged: gradient below gtol"
    assert np.max(np.abs(flat(jax.grad(quadratic)(res.params)))) <= 1e-4
    # an explicit optimizer without tolerances runs to the step cap
    res = statespace.fit(quadratic, quad_init(), optimizer=optax.sgd(0.05), num_steps=30,
                         progress=False)
    assert res.num_steps == 30 and not res.converged


@pytest.mark.parametrize("kwargs", [dict(rtol=-1.0), dict(gtol=-1e-3)])
def test_negative_rtol_or_gtol_raise(kwargs):
    with pytest.raises(ValueError, match="tol"):
        statespace.fit(quadratic, quad_init(), progress=False, **kwargs)
