"""Tests of ``statespace.transforms``: the StableMatrix NumPyro transform and its constraint,
``constrain``/``unconstrain`` over NumPyro transforms and constraints, and ``fit(constraints=)``."""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import (
    ExpTransform,
    SoftplusTransform,
    biject_to,
)
from numpyro.infer.reparam import TransformReparam
from numpyro.infer.util import potential_energy
import optax
import pytest
import scipy.linalg

import statespace
from statespace import transforms as T


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


def _closed_form_ladj(u, n):
    # (A_ij, A_ji), i > j, are -sym ± skew: |det| 2 per pair; L ↦ vech(L Lᵀ) has
    # |det| 2ⁿ ∏ L_ii^(n-i+1) (1-based i); L_ii = exp(u_ii) adds ∏ L_ii
    diag_index = [i * (i + 3) // 2 for i in range(n)]  # L filled row by row
    weights = n + 1 - np.arange(n)
    return n * (n + 1) / 2 * np.log(2.0) + np.sum(weights * np.asarray(u)[..., diag_index], -1)


@pytest.mark.parametrize("n, eps", [(1, 0.0), (2, 0.0), (3, 0.05), (5, 0.2)])
def test_stable_matrix_is_stable_and_round_trips(n, eps):
    t = T.StableMatrix(n, eps=eps)
    u = _normal(10 + n, (50, n * n))
    A = np.asarray(t(u))
    assert A.shape == (50, n, n)
    real_parts = np.linalg.eigvals(A).real
    assert np.all(real_parts <= -eps + 1e-12)
    assert np.all(real_parts < 0)
    # negative-definite symmetric part => contraction: ||expm(A t)||_2 <= exp(-eps t)
    for a in A[:5]:
        for tt in (0.3, 2.0):
            assert np.linalg.norm(scipy.linalg.expm(a * tt), 2) <= np.exp(-eps * tt) + 1e-10
    np.testing.assert_allclose(t.inv(A), u, rtol=1e-8, atol=1e-9)
    # the codomain constraint holds on the image
    assert np.all(np.asarray(t.codomain(A)))


def test_stable_matrix_inverse_of_a_dissipative_matrix_and_nan_outside():
    t = T.StableMatrix(2)
    A = np.array([[-1.0, 0.7], [-0.3, -0.5]])  # symmetric part negative definite
    np.testing.assert_allclose(t(t.inv(A)), A, rtol=1e-12, atol=1e-14)
    non_normal = np.array([[-1.0, 10.0], [0.0, -1.0]])  # stable but indefinite symmetric part
    assert np.all(np.isnan(np.asarray(t.inv(non_normal))))
    assert bool(t.codomain(A)) and not bool(t.codomain(non_normal))


@pytest.mark.parametrize("n, eps", [(1, 0.0), pytest.param(3, 0.1, marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
                                    pytest.param(4, 0.0, marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
def test_stable_matrix_log_abs_det_jacobian_is_the_dense_jacobians(n, eps):
    t = T.StableMatrix(n, eps=eps)
    u = _normal(n, (n * n,))
    ladj = t.log_abs_det_jacobian(u, t(u))
    jac = jax.jacfwd(lambda v: t(v).reshape(-1))(u)
    sign, logdet = jnp.linalg.slogdet(jac)
    assert sign != 0
    np.testing.assert_allclose(ladj, logdet, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ladj, _closed_form_ladj(u, n), rtol=1e-12, atol=1e-12)
    # batched input: one value per row; the inverse's is the negative
    us = jnp.stack([u, 0.5 * u, -u])
    batched = t.log_abs_det_jacobian(us, t(us))
    assert batched.shape == (3,)
    jacs = jax.vmap(jax.jacfwd(lambda v: t(v).reshape(-1)))(us)
    np.testing.assert_allclose(batched, jnp.linalg.slogdet(jacs)[1], rtol=1e-12, atol=1e-12)
    A = t(u)
    np.testing.assert_allclose(t.inv.log_abs_det_jacobian(A, u), -ladj, rtol=1e-12, atol=1e-12)


def test_stable_matrix_gradients_finite_and_jittable():
    t = T.StableMatrix(3, eps=0.1)
    u = _normal(3, (9,))

    def f(u):
        return jnp.sum(jnp.sin(jax.jit(t)(u)))

    g = jax.grad(f)(u)
    assert np.all(np.isfinite(np.asarray(g)))
    check_grads(t, (u,), order=2, modes=("fwd", "rev"))
    # the transform is a pytree (NumPyro registers every Transform): it passes through jit
    A = jax.jit(lambda tr, v: tr(v))(t, u)
    np.testing.assert_allclose(A, t(u), rtol=1e-14)
    np.testing.assert_allclose(jax.vmap(t)(jnp.stack([u, u])), jnp.stack([A, A]), rtol=1e-14)


def test_biject_to_the_constraint_returns_a_stable_matrix():
    t = biject_to(T.stable_matrix)
    assert isinstance(t, T.StableMatrix) and t.n is None and t.eps == 0.0
    t3 = biject_to(T.StableMatrixConstraint(3, eps=0.1))
    assert isinstance(t3, T.StableMatrix) and (t3.n, t3.eps) == (3, 0.1)
    assert t3 == T.StableMatrix(3, 0.1) and t3 != T.StableMatrix(3)
    assert t3.codomain == T.StableMatrixConstraint(3, 0.1)
    assert t3.domain is constraints.real_vector
    # the size-free transform takes n from the input
    u = _normal(0, (9,))
    np.testing.assert_allclose(t(u), T.StableMatrix(3)(u), rtol=0)
    assert t.forward_shape((7, 9)) == (7, 3, 3) and t.inverse_shape((7, 3, 3)) == (7, 9)
    feasible = T.stable_matrix.feasible_like(jnp.zeros((2, 3, 3)))
    assert feasible.shape == (2, 3, 3) and np.all(np.asarray(T.stable_matrix(feasible)))
    c = T.StableMatrixConstraint(2, eps=0.5)
    assert not bool(c(-0.4 * jnp.eye(2))) and bool(c(-0.6 * jnp.eye(2)))
    assert bool(c(c.feasible_like(jnp.zeros((2, 2)))))


def test_wrong_shapes_and_arguments_raise():
    with pytest.raises(ValueError, match=r"n² = 4.*\(3,\)"):
        T.StableMatrix(2)(jnp.zeros(3))
    with pytest.raises(ValueError, match=r"n².*\(5,\)"):
        T.StableMatrix()(jnp.zeros(5))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 2\).*\(3, 3\)"):
        T.StableMatrix(2).inv(jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        T.StableMatrix().inv(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        T.stable_matrix(jnp.zeros(4))
    with pytest.raises(ValueError, match="n"):
        T.StableMatrix().forward_shape((7, 8))
    with pytest.raises(ValueError, match="eps"):
        T.StableMatrix(2, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        T.StableMatrixConstraint(2, eps=-1.0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        T.StableMatrix(0)
    with pytest.raises(TypeError, match="int"):
        T.StableMatrix(2.5)


def test_float32_stays_float32():
    u = jnp.zeros(4, dtype=jnp.float32)
    A = T.StableMatrix(2)(u)
    assert A.dtype == jnp.float32
    assert T.StableMatrix(2).inv(A).dtype == jnp.float32


def test_stable_matrix_in_numpyro_param_under_handlers_and_svi():
    constraint = T.StableMatrixConstraint(2)
    A0 = jnp.array([[-1.0, 0.0], [0.0, -1.0]])
    target = jnp.array([[-0.6, 0.9], [-0.7, -0.4]])  # dissipative: symmetric part < 0

    def model():
        A = numpyro.param("A", A0, constraint=constraint)
        numpyro.factor("fit", -jnp.sum((A - target) ** 2))

    trace = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace()
    assert trace["A"]["type"] == "param"
    assert trace["A"]["kwargs"]["constraint"] == constraint
    np.testing.assert_allclose(trace["A"]["value"], A0)

    svi = numpyro.infer.SVI(model, lambda: None, numpyro.optim.Adam(0.05),
                            numpyro.infer.Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0))
    # SVI keeps biject_to(constraint).inv(A0), i.e. StableMatrix's inverse
    unconstrained = svi.optim.get_params(state.optim_state)["A"]
    np.testing.assert_allclose(unconstrained, T.StableMatrix(2).inv(A0), atol=1e-14)
    result = svi.run(jax.random.PRNGKey(0), 400, progress_bar=False)
    A = result.params["A"]
    assert np.all(np.linalg.eigvals(np.asarray(A)).real < 0)
    np.testing.assert_allclose(A, target, atol=1e-3)


def test_stable_matrix_in_a_reparameterised_prior():
    base = dist.Normal(0.0, 1.5).expand([4]).to_event(1)
    prior = dist.TransformedDistribution(base, T.StableMatrix(2))
    assert prior.event_shape == (2, 2)
    assert prior.support == T.StableMatrixConstraint(2)
    u = _normal(1, (4,))
    A = T.StableMatrix(2)(u)
    # density of A: base density of u over |det ∂A/∂u| (change of variables)
    expected = base.log_prob(u) - _closed_form_ladj(u, 2)
    np.testing.assert_allclose(prior.log_prob(A), expected, rtol=1e-12)

    def model():
        numpyro.sample("A", prior)

    # NUTS's potential: biject_to(support) is StableMatrix, so in u the density is the base's
    energy = potential_energy(model, (), {}, {"A": u})
    np.testing.assert_allclose(energy, -base.log_prob(u), rtol=1e-12)

    # TransformReparam: A_base ~ base, A = StableMatrix(2)(A_base) deterministic
    reparam = handlers.reparam(model, config={"A": TransformReparam()})
    trace = handlers.trace(handlers.seed(reparam, rng_seed=3)).get_trace()
    assert trace["A_base"]["type"] == "sample"
    np.testing.assert_allclose(trace["A"]["value"], T.StableMatrix(2)(trace["A_base"]["value"]),
                               rtol=1e-14)
    assert np.all(np.linalg.eigvals(np.asarray(trace["A"]["value"])).real < 0)


def test_constrain_unconstrain_with_numpyro_transforms_and_constraints():
    spec = {"exp": constraints.positive, "softplus": SoftplusTransform(),
            "interval": constraints.interval(-2.0, 3.0), "cov": constraints.positive_definite,
            "drift": T.StableMatrix(2), "drift_c": T.stable_matrix, "free": constraints.real,
            "nested": {"scale": ExpTransform()}}
    u = {"exp": jnp.array(0.3), "softplus": jnp.array([-1.0, 2.0]),
         "interval": jnp.array(0.4), "cov": jnp.array([0.1, -0.4, 0.2]),
         "drift": jnp.array([0.0, 0.5, -0.2, 1.0]), "drift_c": jnp.array([0.3, 0.1, 0.2, -0.5]),
         "free": jnp.arange(3.0), "nested": {"scale": jnp.array(-0.5)}}
    p = T.constrain(spec, u)
    np.testing.assert_allclose(p["exp"], np.exp(0.3), rtol=1e-15)
    np.testing.assert_allclose(p["softplus"], np.log1p(np.exp([-1.0, 2.0])), rtol=1e-14)
    np.testing.assert_allclose(p["interval"], -2.0 + 5.0 / (1.0 + np.exp(-0.4)), rtol=1e-14)
    assert p["cov"].shape == (2, 2) and np.all(np.linalg.eigvalsh(np.asarray(p["cov"])) > 0)
    assert p["drift"].shape == (2, 2) and p["drift_c"].shape == (2, 2)
    np.testing.assert_array_equal(p["free"], u["free"])
    back = T.unconstrain(spec, p)
    for k, v in jax.tree_util.tree_leaves_with_path(u):
        np.testing.assert_allclose(_get(back, k), v, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="float"):
        T.constrain({"a": 1.0}, {"a": jnp.zeros(())})
    with pytest.raises(ValueError, match="structure"):
        T.constrain({"a": constraints.positive}, {"b": jnp.zeros(())})


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fit_takes_numpyro_constraints_and_transforms():
    # Gaussian scale MLE: sigma_hat² = mean(y²), se(sigma_hat) = sigma_hat / sqrt(2 N)
    y = jnp.asarray(np.random.default_rng(0).normal(0.0, 2.0, size=200))
    target = jnp.array([[-0.6, 0.9], [-0.7, -0.4]])

    def loss(p, y):
        sigma = p["sigma"]
        nll = y.shape[0] * jnp.log(sigma) + jnp.sum(y**2) / (2 * sigma**2)
        return nll + 50.0 * jnp.sum((p["A"] - target) ** 2)

    start = {"sigma": jnp.array(1.0), "A": -jnp.eye(2)}
    for spec in ({"sigma": constraints.positive, "A": T.stable_matrix},
                 {"sigma": ExpTransform(), "A": T.StableMatrix(2)}):
        res = statespace.fit(loss, start, constraints=spec, args=(y,), progress=False)
        assert res.converged
        sigma_hat = float(np.sqrt(np.mean(np.asarray(y) ** 2)))
        np.testing.assert_allclose(res.params["sigma"], sigma_hat, rtol=1e-8)
        np.testing.assert_allclose(res.params["A"], target, atol=1e-7)
        np.testing.assert_allclose(res.unconstrained_params["sigma"], np.log(sigma_hat),
                                   rtol=1e-8)
        np.testing.assert_allclose(res.loss, float(loss(res.params, y)), rtol=1e-12)
        se = res.standard_errors()
        np.testing.assert_allclose(se["sigma"], sigma_hat / np.sqrt(2 * y.shape[0]), rtol=1e-6)
        # the user's transform applies to the constrained parameters
        se_var = res.standard_errors(transform=lambda p: p["sigma"] ** 2)
        np.testing.assert_allclose(se_var, 2 * sigma_hat * se["sigma"], rtol=1e-6)
    # an explicit optimizer with constraints works the same way
    res = statespace.fit(loss, start, constraints=spec, args=(y,), optimizer=optax.lbfgs(),
                         num_steps=200, tol=1e-12, progress=False)
    np.testing.assert_allclose(res.params["A"], target, atol=1e-6)


def test_fit_with_constraints_rejects_bad_starts():
    def loss(p):
        return jnp.sum(p["A"] ** 2)

    with pytest.raises(ValueError, match=r"\['A'\]"):
        statespace.fit(loss, {"A": jnp.array([[-1.0, 10.0], [0.0, -1.0]])},
                       constraints={"A": T.stable_matrix}, progress=False)
    with pytest.raises(TypeError):
        statespace.fit(loss, {"A": -jnp.eye(2)}, constraints={"A": "stable"}, progress=False)
