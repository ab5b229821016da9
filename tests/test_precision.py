"""Every matrix product we trace asks for full float32 precision (rules/_precision.py).

At JAX's default precision a GPU with tensor cores rounds float32 products to TF32; an H200 run
of this suite failed float32 ``lyap``/``dlyap`` and ``discretize`` checks by 1e-4 to 0.34 that
way. The precision is part of the traced program, so this is checked here on any backend: walk
the jaxprs of the public functions and of their derivatives (including ``grad(jit(f))``, where
JAX traces ``custom_jvp`` rules outside the entry point) and list every ``dot_general`` whose
precision is not HIGHEST. The walk also enters the lowerings of this package's primitives
(``small_matmul``, ``expm``, its Fréchet derivative), which the jaxpr does not show, and fails
on a package primitive it does not know; each case must trace at least one product (a case
without one checks nothing); and the StableHLO XLA receives is checked as well.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive

import rules
import statespace as ss
from rules import _expm, _smallmm
from statespace import models

pytestmark = pytest.mark.timeout(120)

_HIGHEST = jax.lax.Precision.HIGHEST


# Primitives of this package hide their products from the jaxpr: their lowering is a Python
# function JAX traces only at compile time. The walk traces each lowering at the equation's
# operand shapes, outside any precision context (as XLA lowering does), and walks it too.
_LOWERINGS = {
    "small_matmul": _smallmm._lowering,
    "rules_expm": _expm._expm_impl,
    "rules_expm_frechet": _expm._frechet_impl,
}


def _package_primitives():
    """Names of the ``Primitive`` objects defined in ``rules`` and ``statespace`` modules."""
    names = set()
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in ("rules", "statespace"):
            continue
        for value in vars(module).values():
            if isinstance(value, Primitive):
                names.add(value.name)
    return names


_PACKAGE_PRIMITIVES = _package_primitives()


def _walk(jaxpr, found):
    """Collect products (``dot_general``, ``small_matmul``) and those not at full precision."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            found["products"] += 1
            precision = eqn.params.get("precision")
            pair = precision if isinstance(precision, tuple) else (precision, precision)
            if any(p != _HIGHEST for p in pair):
                found["default"].append(str(eqn))
        elif name == "small_matmul":
            found["products"] += 1
        if name in _LOWERINGS:
            avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
            _walk(jax.make_jaxpr(_LOWERINGS[name])(*avals).jaxpr, found)
        elif name in _PACKAGE_PRIMITIVES:
            found["unknown"].add(name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _walk(inner, found)
    return found


def _assert_full_precision(fn, *args):
    """Every product in ``fn``'s program asks for HIGHEST, and there is at least one.

    Checked twice: on the jaxpr (with the package primitives' lowerings), and on the StableHLO
    XLA receives, where every lowering is already expanded.
    """
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    found = _walk(jaxpr, {"products": 0, "default": [], "unknown": set()})
    assert not found["unknown"], f"add the lowering of {found['unknown']} to _LOWERINGS"
    assert not found["default"], f"{len(found['default'])} products at default precision, e.g. {found['default'][0]}"
    assert found["products"] > 0, "no matrix product traced: this case checks nothing"
    hlo = [ln for ln in jax.jit(fn).lower(*args).as_text().splitlines() if "stablehlo.dot_general" in ln]
    loose = [ln for ln in hlo if "precision = [HIGHEST, HIGHEST]" not in ln]
    assert not loose, f"{len(loose)} of {len(hlo)} dot_general in the StableHLO not HIGHEST, e.g. {loose[0]}"
    return found["products"], len(hlo)


def test_walk_knows_every_package_primitive_and_sees_products():
    assert _PACKAGE_PRIMITIVES <= set(_LOWERINGS), _PACKAGE_PRIMITIVES - set(_LOWERINGS)
    # a product at default precision, one hidden in small_matmul's lowering, and none at all
    assert _walk(jax.make_jaxpr(jnp.matmul)(_A, _A).jaxpr, {"products": 0, "default": [], "unknown": set()})["default"]
    big = np.ones((2, 8, 8))  # above SMALL_MATMUL_MAX the lowering is a dot
    found = _walk(jax.make_jaxpr(_smallmm.small_matmul)(big, big).jaxpr, {"products": 0, "default": [], "unknown": set()})
    assert found["products"] == 2 and not found["default"]
    with pytest.raises(AssertionError, match="no matrix product"):
        _assert_full_precision(lambda a: a * 2.0, _A)


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
    # 9 × 9: up to n = 6 expm's products are elementwise (rules/_expm.py, _SMALL_N), no dot
    lambda a: rules.expm(jnp.tile(a, (3, 3)) / 3),
    lambda a: rules.kron(a, a) @ jnp.ones(_N * _N),
    lambda a: rules.kron(a, a).solve(jnp.ones(_N * _N)),
    lambda a: rules.kron(a, a).inv().to_dense(),
    lambda a: rules.kron(a + a.T, a + a.T).cholesky().to_dense(),
    lambda a: rules.kron(a, a).slogdet()[1],
    lambda a: rules.kron_sum(a, a) @ jnp.ones(_N * _N),  # to_dense() has no product to check
], ids=["lyap_sign", "lyap_auto", "dlyap_doubling", "dlyap_auto", "solve", "inv", "tria", "expm",
        "kron_matmul", "kron_solve", "kron_inv", "kron_cholesky", "kron_slogdet", "kron_sum_matmul"])
def test_rules_and_their_derivatives_trace_full_precision_products(fn):
    scalar = lambda a: jnp.sum(fn(a) ** 2)  # noqa: E731
    _assert_full_precision(jax.grad(jax.jit(scalar)), _A)
    _assert_full_precision(lambda a: jax.jvp(jax.jit(fn), (a,), (a,)), _A)
    _assert_full_precision(jax.hessian(scalar), _A)
