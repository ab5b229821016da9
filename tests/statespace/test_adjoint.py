"""Adjoint (hand-written reverse pass) log-likelihood derivatives against plain autodiff through
the filter's scan (``gradient="autodiff"``): gradients, forward mode, second order, missing
data, time-varying and batched models, float32, failures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from statespace import LinearGaussianSSM, log_likelihood
from statespace._adjoint import _value_and_grad
from tests.statespace.dense_oracle import random_model, random_observations

NAMES = ("F", "Q", "H", "R", "m0", "P0", "b", "d")


def _loglik(params, y, form, gradient):
    return log_likelihood(LinearGaussianSSM(**params), y, form=form, gradient=gradient)


# One compiled program per (shapes, form, path), shared by the tests.
GRAD = jax.jit(jax.grad(_loglik, argnums=(0, 1)), static_argnums=(2, 3))


def _case(n=3, m=2, T=6, seed=0, missing=0.25, **kw):
    rng = np.random.default_rng(seed)
    p = random_model(rng, n, m, T=T, offsets=True, **kw)
    y = random_observations(rng, p, T, missing=missing, missing_rows=(2,))
    return {k: jnp.asarray(v) for k, v in p.items()}, jnp.asarray(y)


def _assert_close(a, b, rtol, what=""):
    for x, y_ in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y_ = np.asarray(x), np.asarray(y_)
        scale = np.max(np.abs(y_))
        assert scale > 0, what
        np.testing.assert_array_less(np.max(np.abs(x - y_)), rtol * scale, err_msg=what)


CASES = {
    "constant": dict(),
    "time_varying": dict(time_varying=True),
    "time_varying_some": dict(time_varying=("H", "Q")),
    "m1": dict(n=2, m=1),
    # above the scalar L D L^T (m <= 2): the unrolled Cholesky inside and outside the loops
    "m3": dict(n=4, m=3),
    # above _UNROLL_MAX: LAPACK Cholesky / triangular solves and plain matmuls
    "large": dict(n=9, m=9, T=3, missing=0.2),
}


# Every case in covariance form; the square-root form (slower to compile; same reverse pass)
# on two of them.
_RUNS = [(c, "cov") for c in CASES] + [
    pytest.param("m1", "sqrt", marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
    pytest.param("time_varying_some", "sqrt", marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
]


@pytest.mark.parametrize("case, form", _RUNS)
def test_gradient_equals_autodiff(case, form):
    params, y = _case(**CASES[case])
    adjoint = GRAD(params, y, form, "adjoint")
    plain = GRAD(params, y, form, "autodiff")
    _assert_close(adjoint, plain, 1e-9, case)
    g_y = np.asarray(adjoint[1])
    assert np.all(g_y[np.isnan(np.asarray(y))] == 0)  # missing entries have no influence
    value = _loglik(params, y, form, "adjoint")
    np.testing.assert_allclose(value, _loglik(params, y, form, "autodiff"), rtol=1e-13)


def test_gradient_through_model_pytree_and_symmetry():
    params, y = _case(seed=3)
    g = jax.jit(jax.grad(lambda mdl: log_likelihood(mdl, y)))(LinearGaussianSSM(**params))
    g_plain = jax.jit(jax.grad(lambda mdl: log_likelihood(mdl, y, gradient="autodiff")))(
        LinearGaussianSSM(**params))
    for name in NAMES:
        _assert_close(getattr(g, name), getattr(g_plain, name), 1e-9, name)
    for name in ("Q", "R", "P0"):
        G = np.asarray(getattr(g, name))
        np.testing.assert_allclose(G, G.T, rtol=1e-12, atol=1e-14)


def test_batched_and_vmapped_models():
    params, y = _case(T=5)
    scales = jnp.array([0.5, 1.0, 1.5])
    Fs = scales[:, None, None, None] * params["F"]  # (3, 1, n, n): batch, then time
    ys = jnp.stack([y, y + 0.1])[:, None]  # (2, 1, T, m) broadcasts to (2, 3)

    def total(F, ys, gradient):
        model = LinearGaussianSSM(**{**params, "F": F})
        return jnp.sum(log_likelihood(model, ys, gradient=gradient) ** 2)

    grad = jax.jit(jax.grad(total, argnums=(0, 1)), static_argnums=2)
    _assert_close(grad(Fs, ys, "adjoint"), grad(Fs, ys, "autodiff"), 1e-9)

    def per_F(F, gradient):
        return log_likelihood(LinearGaussianSSM(**{**params, "F": F}), y, gradient=gradient)

    vg = jax.jit(jax.vmap(jax.grad(per_F), in_axes=(0, None)), static_argnums=1)
    _assert_close(vg(Fs[:, 0], "adjoint"), vg(Fs[:, 0], "autodiff"), 1e-9)


def test_float32():
    params, y = _case(T=6)
    params32 = {k: v.astype(jnp.float32) for k, v in params.items()}
    y32 = y.astype(jnp.float32)
    g32 = GRAD(params32, y32, "cov", "adjoint")
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g32))
    _assert_close(g32, GRAD(params32, y32, "cov", "autodiff"), 1e-4, "float32")
    _assert_close(g32, GRAD(params, y, "cov", "adjoint"), 1e-3, "float32 vs float64")


@pytest.mark.slow  # ~20 s (cov), compile of the nested derivatives
@pytest.mark.timeout(300)
@pytest.mark.parametrize("form", ["cov", "sqrt"])
def test_second_order_and_forward_mode(form):
    full, y = _case(n=2, m=2, T=4, seed=5)
    params = {k: full[k] for k in ("F", "H", "R", "m0")}
    rest = {k: v for k, v in full.items() if k not in params}

    def f(params, gradient="adjoint"):
        return log_likelihood(LinearGaussianSSM(**params, **rest), y, form=form,
                              gradient=gradient)

    if form == "cov":  # the sqrt form's reverse pass is the same code
        check_grads(jax.jit(f), (params,), order=2, modes=("fwd", "rev"), eps=1e-5,
                    atol=1e-5, rtol=1e-5)
    hess = jax.jit(jax.hessian(f), static_argnums=1)
    _assert_close(hess(params, "adjoint"), hess(params, "autodiff"), 1e-9)
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    # jitted: one program each (run eagerly, every primitive of the filter compiles on its own)
    jvp = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,))[1])(params, tangent)
    jvp_plain = jax.jit(lambda p, t: jax.jvp(lambda q: f(q, "autodiff"), (p,), (t,))[1])(
        params, tangent)
    np.testing.assert_allclose(jvp, jvp_plain, rtol=1e-9)


@pytest.mark.parametrize("form", ["cov", "sqrt"])
def test_failed_factorisation_gives_minus_inf_and_nan_gradient(form):
    params, y = _case(n=2, m=2, T=4, seed=7, missing=0.0)
    params = {**params, "R": -10.0 * jnp.eye(2)}  # innovation covariance not positive definite
    assert float(_loglik(params, y, form, "adjoint")) == -np.inf
    g = GRAD(params, y, form, "adjoint")
    assert all(np.all(np.isnan(x)) for x in jax.tree_util.tree_leaves(g))


def test_unknown_gradient_option_raises():
    params, y = _case(T=3)
    with pytest.raises(ValueError, match="gradient"):
        log_likelihood(LinearGaussianSSM(**params), y, gradient="magic")


@pytest.mark.parametrize("case, form", [pytest.param("constant", "cov", marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
                                        ("time_varying", "cov"),
                                        pytest.param("m3", "cov", marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
                                        pytest.param("m1", "sqrt", marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_split_and_loop_drivers_agree(case, form):
    # the size picks the driver; both must give the same value and gradient at any size
    params, y = _case(**CASES[case])
    model = LinearGaussianSSM(**params)
    split = _value_and_grad(model, y, form, split=True)
    loop = _value_and_grad(model, y, form, split=False)
    np.testing.assert_allclose(split[0], loop[0], rtol=1e-13)
    _assert_close(split[1:], loop[1:], 1e-10, case)
