"""Every matrix product we trace asks for full float32 precision (rules/_precision.py).

At JAX's default precision a GPU with tensor cores rounds float32 products to TF32; an H200 run
of this suite failed float32 ``lyap``/``dlyap`` and ``discretize`` checks by 1e-4 to 0.34 that
way. The precision is part of the traced program, so this is checked here on any backend: walk
the jaxprs of the public functions and of their derivatives (including ``grad(jit(f))``, where
JAX traces ``custom_jvp`` rules outside the entry point) and list every ``dot_general`` whose
precision is not HIGHEST.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rules
import statespace as ss
from statespace import models

pytestmark = pytest.mark.timeout(120)

_HIGHEST = jax.lax.Precision.HIGHEST


def _default_precision_dots(jaxpr, found):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            precision = eqn.params.get("precision")
            pair = precision if isinstance(precision, tuple) else (precision, precision)
            if any(p != _HIGHEST for p in pair):
                found.append(str(eqn))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _default_precision_dots(inner, found)
    return found


def _assert_full_precision(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    found = _default_precision_dots(jaxpr, [])
    assert not found, f"{len(found)} products at default precision, e.g. {found[0]}"


_RNG = np.random.default_rng(0)
_N, _M, _T = 3, 2, 5
_A = -np.eye(_N) + 0.1 * _RNG.normal(size=(_N, _N))
_Q = np.eye(_N)
_H = _RNG.normal(size=(_M, _N))
_Y = _RNG.normal(size=(_T, _M))
_TIMES = np.cumsum(_RNG.uniform(0.1, 1.0, _T))


def _discrete(a):
    return ss.LinearGaussianSSM(a, _Q, _H, np.eye(_M), np.zeros(_N), np.eye(_N))


def _continuous(a):
    return ss.ContinuousLinearSSM(a, _Q, _H, np.eye(_M))


def _loglik(kind, **kw):
    if kind == "continuous":
        return lambda a: ss.log_likelihood(_continuous(a), _Y, _TIMES, **kw)
    return lambda a: ss.log_likelihood(_discrete(a), _Y, **kw)


@pytest.mark.parametrize("kind,kw", [
    ("discrete", dict(form="sqrt")),
    ("discrete", dict(form="sqrt", gradient="autodiff")),
    ("discrete", dict(form="cov", parallel=True)),
    ("discrete", dict(form="sqrt", parallel=True)),
    ("continuous", {}),
])
def test_likelihood_and_gradients_trace_full_precision_products(kind, kw):
    f = _loglik(kind, **kw)
    _assert_full_precision(jax.grad(jax.jit(f)), _A)
    _assert_full_precision(lambda a: jax.jvp(jax.jit(f), (a,), (a,)), _A)


def test_continuous_hessian_traces_full_precision_products():
    _assert_full_precision(jax.hessian(_loglik("continuous")), _A)


def test_smoother_sampler_predict_simulate_trace_full_precision_products():
    _assert_full_precision(lambda a: ss.rts_smoother(_continuous(a), _Y, _TIMES), _A)
    _assert_full_precision(lambda a: ss.rts_smoother(_discrete(a), _Y, form="sqrt", parallel=True), _A)
    _assert_full_precision(lambda a: ss.sample_posterior(jax.random.key(0), _discrete(a), _Y, 2), _A)
    _assert_full_precision(lambda a: ss.predict(_continuous(a), _Y, _TIMES, _TIMES + 0.3), _A)
    _assert_full_precision(lambda a: _discrete(a).simulate(jax.random.key(0), 4), _A)
    _assert_full_precision(
        lambda s: ss.log_likelihood(models.product_of(models.matern32(1.0, s), models.sho(2.0, 3.0, 1.0)),
                                    _Y[:, :1], _TIMES), 1.0)


@pytest.mark.parametrize("fn", [
    lambda a: rules.lyap(a, _Q, method="sign"),
    lambda a: rules.lyap(a, _Q),
    lambda a: rules.dlyap(0.5 * a, _Q, method="doubling"),
    lambda a: rules.dlyap(0.5 * a, _Q),
    lambda a: rules.solve(a, _Q),
    rules.inv,
    rules.tria,
    rules.expm,
    lambda a: rules.kron(a, a) @ jnp.ones(_N * _N),
    lambda a: rules.kron(a, a).solve(jnp.ones(_N * _N)),
    lambda a: rules.kron(a, a).inv().to_dense(),
    lambda a: rules.kron(a + a.T, a + a.T).cholesky().to_dense(),
    lambda a: rules.kron(a, a).slogdet()[1],
    lambda a: rules.kron_sum(a, a).to_dense(),
], ids=["lyap_sign", "lyap_auto", "dlyap_doubling", "dlyap_auto", "solve", "inv", "tria", "expm",
        "kron_matmul", "kron_solve", "kron_inv", "kron_cholesky", "kron_slogdet", "kron_sum_dense"])
def test_rules_and_their_derivatives_trace_full_precision_products(fn):
    scalar = lambda a: jnp.sum(fn(a) ** 2)  # noqa: E731
    _assert_full_precision(jax.grad(jax.jit(scalar)), _A)
    _assert_full_precision(lambda a: jax.jvp(jax.jit(fn), (a,), (a,)), _A)
    _assert_full_precision(jax.hessian(scalar), _A)
