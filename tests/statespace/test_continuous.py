"""ContinuousLinearSSM, discretize and predict against mpmath, SciPy and dense GP oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads

import rules
import statespace
from rules._unrolled import UNROLL_MAX
from statespace import ContinuousLinearSSM, discretize, predict
from statespace._continuous import (
    _CLOSED_FORM_LYAP_MAX,
    _ELEMENTWISE_POWERS_MAX,
    _KRON_LYAP_MAX,
    _powers,
    _stationary_closed_form,
)
from tests.statespace.continuous_oracle import (
    dense_gp_condition,
    dense_gp_log_likelihood,
    discretized_model,
    mp_discretize,
    scipy_van_loan,
    stationary_cov,
    stationary_model_joint,
)
from tests.statespace.dense_oracle import dense_diffuse_log_likelihood

RNG = np.random.default_rng(20261125)
SCALES = [1e-8, 1e-4, 1e-1, 1.0, 10.0, 100.0, 1e3]


def _rotation_like(rng, n, damping):
    """Non-normal A with eigenvalues −damping ± 3i (and −damping), cond(V) ~ 10."""
    D = np.zeros((n, n))
    for i in range(0, n - 1, 2):
        D[i : i + 2, i : i + 2] = [[-damping, 3.0], [-3.0, -damping]]
    if n % 2:
        D[-1, -1] = -damping
    V = np.eye(n) + 0.4 * rng.normal(size=(n, n))
    return V @ D @ np.linalg.inv(V)


def _drifts():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(3, 3))
    return {
        "stable_random": X - X.T - (X @ X.T / 3 + 0.3 * np.eye(3)),
        "oscillator_nonnormal": _rotation_like(rng, 3, 0.01),
        "brownian": np.zeros((3, 3)),
        "integrated_rw": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
        "trend_plus_ou": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -2.0]]),
        "strongly_nonnormal": np.array([[-1.0, 300.0, 0.0], [0.0, -1.5, 40.0], [0.0, 0.0, -0.7]]),
        "unstable": np.array([[0.05, 1.0, 0.0], [-1.0, 0.05, 0.0], [0.0, 0.0, 0.02]]),
    }


def _spd(rng, n):
    X = rng.normal(size=(n, n))
    return X @ X.T / n + 0.2 * np.eye(n)


def _rel(x, ref):
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("name", list(_drifts()))
def test_discretize_matches_mpmath_float64(name):
    A = _drifts()[name]
    Q = _spd(np.random.default_rng(1), 3)
    b = np.array([0.3, -1.0, 0.5])
    norm = np.abs(A).sum(0).max() or 1.0
    scales = [s for s in SCALES if name != "unstable" or s <= 10.0]  # e^{A dt} overflows beyond
    dts = np.array(scales) / norm
    model = ContinuousLinearSSM(A, Q, np.ones((1, 3)), np.eye(1), P0=np.eye(3), b=b)
    F, Qd, bd = jax.jit(discretize)(model, dts)
    for k, dt in enumerate(dts):
        F_ref, Qd_ref, bd_ref = mp_discretize(A, Q, dt, b)
        if np.linalg.norm(F_ref) > 1e-250:  # a decayed e^{A dt} underflows in float64
            assert _rel(np.asarray(F[k]), F_ref) <= 1e-12, (dt, _rel(np.asarray(F[k]), F_ref))
        assert _rel(np.asarray(Qd[k]), Qd_ref) <= 1e-12, (dt, _rel(np.asarray(Qd[k]), Qd_ref))
        assert _rel(np.asarray(bd[k]), bd_ref) <= 1e-12, (dt, _rel(np.asarray(bd[k]), bd_ref))


@pytest.mark.parametrize("name", ["stable_random", "integrated_rw", "oscillator_nonnormal"])
def test_discretize_float32(name):
    # dt ||A|| up to 1e3, also for the oscillatory A, where e^{A dt} has relative condition number
    # ~ dt ||A||: a table built in float32 reached 3e-5 there; the step-independent tables are
    # built in float64 (x64 is on in the tests), the per-step work stays float32.
    A = _drifts()[name]
    Q = _spd(np.random.default_rng(2), 3)
    norm = np.abs(A).sum(0).max() or 1.0
    dts = np.array(SCALES) / norm
    model = ContinuousLinearSSM(jnp.asarray(A, jnp.float32), jnp.asarray(Q, jnp.float32),
                                jnp.ones((1, 3), jnp.float32), jnp.eye(1, dtype=jnp.float32))
    F, Qd, _ = discretize(model, jnp.asarray(dts, jnp.float32))
    assert F.dtype == jnp.float32 and Qd.dtype == jnp.float32
    for k, dt in enumerate(dts):
        # the reference at the float32-rounded inputs, so only the method's error is measured
        A32 = np.asarray(jnp.asarray(A, jnp.float32), np.float64)
        Q32 = np.asarray(jnp.asarray(Q, jnp.float32), np.float64)
        F_ref, Qd_ref, _ = mp_discretize(A32, Q32, float(np.float32(dt)))
        if np.linalg.norm(F_ref) > 1e-30:
            assert _rel(np.asarray(F[k], np.float64), F_ref) <= 1e-5, (dt, _rel(np.asarray(F[k], np.float64), F_ref))
        assert _rel(np.asarray(Qd[k], np.float64), Qd_ref) <= 1e-5, (dt, _rel(np.asarray(Qd[k], np.float64), Qd_ref))


@pytest.mark.parametrize("rate", [1e-3, 2e3])
def test_discretize_float32_any_time_unit(rate):
    # The same dynamics in slow and in fast time units. The series is taken in x = r/δ of the
    # scaled δA: unscaled, A^14 overflowed float32 once ||A|| passed ~500 (all-NaN output).
    A = rate * np.array([[-1.0, 0.005], [0.0, -2.0]])
    Q = np.array([[1.0, 0.2], [0.2, 0.5]]) * rate
    dts = np.array([1e-6, 1e-3, 0.3, 1.0, 20.0]) / rate
    model = ContinuousLinearSSM(jnp.asarray(A, jnp.float32), jnp.asarray(Q, jnp.float32),
                                jnp.ones((1, 2), jnp.float32), jnp.eye(1, dtype=jnp.float32))
    F, Qd, _ = discretize(model, jnp.asarray(dts, jnp.float32))
    A32, Q32 = (np.asarray(jnp.asarray(M, jnp.float32), np.float64) for M in (A, Q))
    for k, dt in enumerate(dts):
        F_ref, Qd_ref, _ = mp_discretize(A32, Q32, float(np.float32(dt)))
        assert _rel(np.asarray(F[k], np.float64), F_ref) <= 1e-5, (dt, np.asarray(F[k]))
        assert _rel(np.asarray(Qd[k], np.float64), Qd_ref) <= 1e-5, (dt, np.asarray(Qd[k]))


@pytest.mark.parametrize("name", ["stable_random", "integrated_rw", "strongly_nonnormal", "unstable"])
def test_discretize_matches_scipy_van_loan(name):
    A = _drifts()[name]
    Q = _spd(np.random.default_rng(3), 3)
    b = np.array([1.0, 0.5, -0.2])
    dts = np.array([0.0, 0.01, 0.3, 1.0, 2.5])
    F, Qd, bd = discretize(ContinuousLinearSSM(A, Q, np.ones((1, 3)), np.eye(1), P0=np.eye(3), b=b), dts)
    for k, dt in enumerate(dts):
        F_ref, Qd_ref, bd_ref = scipy_van_loan(A, Q, dt, b)
        # normwise: SciPy's 2n x 2n block is itself only ~1e-10 accurate for the non-normal A
        # (the mpmath test above holds ours to 1e-12)
        if dt == 0.0:
            np.testing.assert_array_equal(F[k], np.eye(3))
            np.testing.assert_array_equal(Qd[k], 0.0)
            continue
        assert _rel(np.asarray(F[k]), F_ref) < 1e-9
        assert _rel(np.asarray(Qd[k]), Qd_ref) < 1e-9
        assert _rel(np.asarray(bd[k]), bd_ref) < 1e-9


@pytest.mark.parametrize("d", [_ELEMENTWISE_POWERS_MAX, _ELEMENTWISE_POWERS_MAX + 2])
@pytest.mark.parametrize("count", [1, 5, 21])
def test_powers_match_numpy(d, count):
    """The Van Loan block's powers in blocks (elementwise and dot products) equal the plain
    repeated product, and so do their derivatives (a polynomial in M)."""
    M = jnp.asarray(np.random.default_rng(d + count).normal(size=(d, d)) / np.sqrt(d))
    got = jax.jit(_powers, static_argnums=1)(M, count)
    expected = np.stack([np.linalg.matrix_power(np.asarray(M), k) for k in range(count)])
    assert got.shape == (count, d, d)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-14)
    check_grads(lambda M: _powers(M, count), (M,), order=2, modes=("fwd", "rev"))


def test_discretize_zero_step_and_shapes():
    A = _drifts()["stable_random"]
    model = ContinuousLinearSSM(A, np.eye(3), np.ones((1, 3)), np.eye(1))
    F, Qd, bd = discretize(model, 0.0)
    assert F.shape == (3, 3) and Qd.shape == (3, 3) and bd.shape == (3,)
    np.testing.assert_array_equal(F, np.eye(3))
    np.testing.assert_array_equal(Qd, np.zeros((3, 3)))
    np.testing.assert_array_equal(bd, np.zeros(3))
    F2, Qd2 = discretize(model, np.ones((2, 4)) * 0.3)[:2]
    assert F2.shape == (2, 4, 3, 3) and Qd2.shape == (2, 4, 3, 3)
    # the semigroup: two half steps compose to one step
    F1, Q1, _ = discretize(model, 0.35)
    F0, Q0, _ = discretize(model, 0.7)
    np.testing.assert_allclose(F1 @ F1, F0, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(F1 @ Q1 @ F1.T + Q1, Q0, rtol=1e-13, atol=1e-15)
    # Qd also solves A Qd + Qd Aᵀ = F Q Fᵀ − Q
    np.testing.assert_allclose(A @ Q0 + Q0 @ A.T, F0 @ np.eye(3) @ F0.T - np.eye(3), atol=1e-13)


@pytest.fixture(params=["pass_through", "rematerialised"])
def long_step_cond(request, monkeypatch):
    """Both forms of the discretisation's long-step cond: the squarings alone with the usual
    steps passed through (small batches, the default here), and both branches rematerialised
    (batches of more than ``_PASS_THROUGH_MAX_ENTRIES`` numbers per array)."""
    if request.param == "rematerialised":
        monkeypatch.setattr(statespace._continuous, "_PASS_THROUGH_MAX_ENTRIES", 0)
    return request.param


def test_discretize_long_steps_nan_beyond_range_and_finite_within(long_step_cond):
    A = np.array([[-0.01, 5.0], [-5.0, -0.01]])
    model = ContinuousLinearSSM(A, np.eye(2), np.ones((1, 2)), np.eye(1))
    dts = np.array([0.1, 50.0, 2e3])  # 2e3 * 5 is past 64 δ: halved, then squared
    F, Qd, _ = discretize(model, dts)
    for k, dt in enumerate(dts):
        F_ref, Qd_ref, _ = mp_discretize(A, np.eye(2), dt)
        # 1e-12 up to dt ||A|| = 1e3 (issue #6); beyond, e^{A dt}'s relative condition number
        # (~ dt ||A||) allows proportionally more: an H200 gave 2.4e-12 at dt ||A|| = 1e4.
        tol = 1e-12 * max(1.0, dt * np.abs(A).sum(0).max() / 1e3)
        assert _rel(np.asarray(F[k]), F_ref) < tol
        assert _rel(np.asarray(Qd[k]), Qd_ref) < tol
    # long steps elsewhere in the batch (halved and squared) leave the short one unchanged
    F_short, Qd_short, _ = discretize(model, dts[:1])
    np.testing.assert_allclose(F[:1], F_short, rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(Qd[:1], Qd_short, rtol=1e-15, atol=1e-16)
    # past the range (64 · 2^12 grid steps, at least 1.3e5/α): NaN, never a wrong finite answer
    F_far, Qd_far, _ = discretize(model, np.array([0.1, 1e9]))
    assert np.all(np.isnan(F_far[1])) and np.all(np.isnan(Qd_far[1]))
    assert np.all(np.isfinite(F_far[0]))


def _discretize_first_order_checked():
    A = jnp.asarray(_drifts()["stable_random"][:2, :2])
    Q = jnp.asarray(_spd(np.random.default_rng(4), 2))
    b = jnp.array([0.4, -0.3])

    def f(A, Q, b, dt):
        # A zero step (F = I, Qd = 0) rides along undifferentiated in dt: negative steps are NaN,
        # so its finite difference in dt would be NaN on one side.
        dt = jnp.concatenate([jnp.zeros(1, dt.dtype), dt])
        out = discretize(ContinuousLinearSSM(A, Q, jnp.ones((1, 2)), jnp.eye(1), P0=jnp.eye(2), b=b), dt)
        return out.F, out.Qd, out.bd

    dts = jnp.array([0.05, 0.7, 3.0])
    f = jax.jit(f)
    check_grads(f, (A, Q, b, dts), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
    return f, A, Q, b, dts


def test_discretize_gradients():
    f, A, Q, b, _ = _discretize_first_order_checked()
    # a batch with a step past the first table (64 δ): the long-step branch, both modes (the
    # same shape as the first batch, so the programs compiled for it are reused)
    long_dts = jnp.array([0.05, 3.0, 70.0])
    check_grads(f, (A, Q, b, long_dts), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_discretize_long_step_conds_agree(monkeypatch):
    # the two forms of the long-step cond (see long_step_cond) give the same transitions and
    # derivatives, with and without a long step in the batch
    A = jnp.asarray(_drifts()["stable_random"][:2, :2])
    Q = jnp.asarray(_spd(np.random.default_rng(4), 2))
    b = jnp.array([0.4, -0.3])
    directions = [jnp.ones_like(A), jnp.eye(2), jnp.array([1.0, -2.0])]

    def f(A, Q, b, dt):
        out = discretize(ContinuousLinearSSM(A, Q, jnp.ones((1, 2)), jnp.eye(1), P0=jnp.eye(2), b=b), dt)
        return out.F, out.Qd, out.bd

    def derivatives(dt):
        value, tangent = jax.jvp(lambda *p: f(*p, dt), (A, Q, b), tuple(directions))
        _, vjp = jax.vjp(lambda *p: f(*p, dt), A, Q, b)
        return value, tangent, vjp(tangent)

    for dt in (jnp.array([0.05, 3.0, 0.7]), jnp.array([0.05, 3.0, 70.0])):
        pass_through = derivatives(dt)
        monkeypatch.setattr(statespace._continuous, "_PASS_THROUGH_MAX_ENTRIES", 0)
        rematerialised = derivatives(dt)
        monkeypatch.undo()
        for x, y in zip(jax.tree_util.tree_leaves(pass_through), jax.tree_util.tree_leaves(rematerialised)):
            np.testing.assert_allclose(x, y, rtol=1e-14, atol=1e-15)


# Slow: the forward-over-reverse program takes ~15 s to compile (the quick run). Second order
# in the default run: rules/test_smallmm.py, rules' order-2 check_grads, and the filter's
# Hessian in test_adjoint.py.
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_discretize_second_order():
    f, A, Q, b, dts = _discretize_first_order_checked()
    # second order: forward-over-reverse equals finite differences of the gradient
    # (one compiled program: its primal output is the gradient, used for the differences)
    scalar = lambda A: sum(jnp.sum(jnp.sin(x)) for x in f(A, Q, b, dts))  # noqa: E731
    grad_and_hvp = jax.jit(lambda A, E: jax.jvp(jax.grad(scalar), (A,), (E,)))
    E = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2)))
    hvp = grad_and_hvp(A, E)[1]
    fd = (grad_and_hvp(A + 1e-5 * E, E)[0] - grad_and_hvp(A - 1e-5 * E, E)[0]) / 2e-5
    np.testing.assert_allclose(hvp, fd, rtol=1e-5, atol=1e-7)


def test_discretize_gradient_matches_scipy_frechet():
    """d/dA of F = e^{A dt} in direction E is L(A dt, E dt) (scipy.linalg.expm_frechet)."""
    A = _drifts()["oscillator_nonnormal"]
    E = np.random.default_rng(5).normal(size=(3, 3))
    model = lambda A: ContinuousLinearSSM(A, jnp.eye(3), jnp.ones((1, 3)), jnp.eye(1))  # noqa: E731
    for dt in [0.2, 40.0]:  # one short step and one through the table
        _, dF = jax.jvp(lambda A: discretize(model(A), dt).F, (jnp.asarray(A),), (jnp.asarray(E),))
        ref = scipy.linalg.expm_frechet(A * dt, E * dt, compute_expm=False)
        np.testing.assert_allclose(dF, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


def test_model_shape_errors():
    A, Q, H, R = np.eye(2) * -1.0, np.eye(2), np.ones((1, 2)), np.eye(1)
    with pytest.raises(ValueError, match=r"Q.shape = \(3, 3\)"):
        ContinuousLinearSSM(A, np.eye(3), H, R)
    with pytest.raises(ValueError, match=r"H.shape = \(1, 3\)"):
        ContinuousLinearSSM(A, Q, np.ones((1, 3)), R)
    with pytest.raises(ValueError, match=r"R.shape = \(2, 2\)"):
        ContinuousLinearSSM(A, Q, H, np.eye(2))
    with pytest.raises(ValueError, match=r"A.shape = \(2, 3\)"):
        ContinuousLinearSSM(np.ones((2, 3)), Q, H, R)
    with pytest.raises(ValueError, match=r"b.shape = \(3,\)"):
        ContinuousLinearSSM(A, Q, H, R, b=np.ones(3))
    with pytest.raises(ValueError, match=r"P0.shape"):
        ContinuousLinearSSM(A, Q, H, R, P0=np.eye(3))
    with pytest.raises(TypeError):
        ContinuousLinearSSM(A.astype(complex), Q, H, R)
    model = ContinuousLinearSSM(A, Q, H, R)
    with pytest.raises(ValueError, match="times"):
        statespace.log_likelihood(model, np.zeros((3, 1)), np.zeros((3, 1)))


def test_pytree_jit_vmap():
    model = ContinuousLinearSSM(-np.eye(2), np.eye(2), np.ones((1, 2)), np.eye(1), diffuse=[True, False])
    leaves, tree = jax.tree_util.tree_flatten(model)
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.diffuse == (True, False)
    scaled = jax.tree_util.tree_map(lambda x: 2 * x, model)
    np.testing.assert_array_equal(scaled.A, -2 * np.eye(2))
    Fs = jax.vmap(lambda s: discretize(ContinuousLinearSSM(s * model.A, model.Q, model.H, model.R), 0.5).F)(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(Fs[1], scipy.linalg.expm(-np.eye(2)), rtol=1e-13)


@pytest.mark.parametrize("n", range(1, _CLOSED_FORM_LYAP_MAX + 1))
@pytest.mark.parametrize("margin", [1e-3, 0.5, 20.0])
def test_stationary_closed_form_matches_scipy_and_kron(n, margin):
    """The small stationary start's closed form against SciPy's Bartels-Stewart solve, its
    derivatives against the Kronecker LU's rule (rules.lyap), and its stability flag."""
    rng = np.random.default_rng(n + int(margin * 1000))
    A = rng.normal(size=(n, n))
    A = A - (np.max(np.linalg.eigvals(A).real) + margin) * np.eye(n)  # max Re λ = -margin
    Q = rng.normal(size=(n, n))
    Q = jnp.asarray(Q @ Q.T + 0.1 * np.eye(n))
    A = jnp.asarray(A)
    P, stable = jax.jit(_stationary_closed_form)(A, Q)
    expected = scipy.linalg.solve_continuous_lyapunov(np.asarray(A), -np.asarray(Q))
    assert bool(stable)
    np.testing.assert_allclose(P, expected, rtol=1e-13 / min(margin, 1.0), atol=0)
    if margin >= 0.5:  # (finite differences cannot resolve a solve this close to instability)
        check_grads(lambda A, Q: _stationary_closed_form(A, Q)[0], (A, Q), order=2,
                    modes=("fwd", "rev"))
    weights = jnp.asarray(rng.normal(size=(n, n)))
    grads = [jax.grad(lambda A: jnp.sum(weights * solve(A)))(A) for solve in (
        lambda A: _stationary_closed_form(A, Q)[0], lambda A: rules.lyap(A, Q, method="kron"))]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-11 / min(margin, 1.0), atol=1e-13)
    unstable = A + 2 * margin * jnp.eye(n)
    assert not bool(_stationary_closed_form(unstable, Q)[1])
    assert not bool(_stationary_closed_form(jnp.full((n, n), jnp.nan), Q)[1])


def test_stationary_start_and_check():
    A = _drifts()["stable_random"]
    Q = _spd(np.random.default_rng(6), 3)
    b = np.array([0.2, 0.1, -0.4])
    model = ContinuousLinearSSM(A, Q, np.ones((1, 3)), np.eye(1), b=b).check()
    m0, P0, ok = model.initial()
    assert bool(ok)
    np.testing.assert_allclose(P0, stationary_cov(A, Q), rtol=1e-10)
    np.testing.assert_allclose(m0, -np.linalg.solve(A, b), rtol=1e-10)

    bad = ContinuousLinearSSM(_drifts()["unstable"], Q, np.ones((1, 3)), np.eye(1))
    with pytest.raises(ValueError, match="stable A"):
        bad.check()
    y = RNG.normal(size=(5, 1))
    times = np.arange(5.0)
    ll = jax.jit(statespace.log_likelihood)(bad, y, times)
    assert ll == -jnp.inf
    # singular A without diffuse/P0: also -inf, not garbage
    sing = ContinuousLinearSSM(_drifts()["integrated_rw"], Q, np.ones((1, 3)), np.eye(1))
    assert jax.jit(statespace.log_likelihood)(sing, y, times) == -jnp.inf
    # a given P0 needs no stable A
    given = ContinuousLinearSSM(_drifts()["unstable"], Q, np.ones((1, 3)), np.eye(1), P0=np.eye(3))
    assert np.isfinite(statespace.log_likelihood(given.check(), y, times))


def _random_ou(rng, n=3, m=2):
    X = rng.normal(size=(n, n))
    A = X - X.T - (X @ X.T / n + 0.5 * np.eye(n))
    return A, _spd(rng, n), rng.normal(size=(m, n)), _spd(rng, m) * 0.3


def _irregular_times(rng, T):
    t = np.sort(rng.uniform(0.0, 8.0, T))
    t[3] = t[2]  # an equal time: dt = 0
    return t


def test_log_likelihood_matches_dense_gp_with_offsets_and_missing():
    rng = np.random.default_rng(8)
    A, Q, H, R = _random_ou(rng)
    b, d = np.array([0.3, -0.2, 0.5]), np.array([1.0, -2.0])
    T = 14
    times = _irregular_times(rng, T)
    y = rng.normal(size=(T, 2))
    y[4, 0] = np.nan
    y[7] = np.nan
    model = ContinuousLinearSSM(A, Q, H, R, b=b, d=d)
    mean, K = stationary_model_joint(A, Q, H, R, times, b, d)
    ref = dense_gp_log_likelihood(K, y, mean)
    for form in ("cov", "sqrt"):
        ll = statespace.log_likelihood(model, y, times, form=form)
        np.testing.assert_allclose(ll, ref, rtol=1e-10)
    res = statespace.kalman_filter(model, y, times)
    np.testing.assert_allclose(res.log_likelihood, ref, rtol=1e-10)


def test_to_discrete_matches_dense_oracle_model():
    from tests.statespace.dense_oracle import dense_log_likelihood

    rng = np.random.default_rng(9)
    A, Q, H, R = _random_ou(rng)
    times = _irregular_times(rng, 10)
    y = rng.normal(size=(10, 2))
    model = ContinuousLinearSSM(A, Q, H, R, m0=np.ones(3), P0=np.eye(3) * 2.0, b=np.array([0.1, 0.2, 0.3]))
    disc, ok = model.to_discrete(times)
    assert bool(ok) and disc.F.shape == (10, 3, 3) and disc.b.shape == (10, 3)
    np.testing.assert_array_equal(disc.F[-1], np.eye(3))  # padded last step, dt = 0
    np.testing.assert_allclose(statespace.log_likelihood(model, y, times), dense_log_likelihood(disc, y), rtol=1e-10)


def test_diffuse_trend_matches_dense_diffuse_oracle():
    """Exact diffuse log-likelihood of an integrated random walk (both states diffuse) against
    the dense oracle's ``log ∫ p(y | δ) dδ`` on SciPy's discretisation, NaN rows included."""
    A = np.array([[0.0, 1.0], [0.0, 0.0]])
    Q = np.diag([0.04, 0.01])
    H, R = np.array([[1.0, 0.0]]), np.array([[0.1]])
    rng = np.random.default_rng(10)
    times = _irregular_times(rng, 12)
    y = np.cumsum(rng.normal(size=(12, 1)), axis=0)
    y[5] = np.nan
    ll_diffuse = statespace.log_likelihood(ContinuousLinearSSM(A, Q, H, R, diffuse=True), y, times)
    dk = dense_diffuse_log_likelihood(discretized_model(A, Q, H, R, times, np.zeros(2), np.zeros((2, 2))),
                                      y, diffuse=[True, True])
    # The package follows Durbin & Koopman: its value is log ∫ p(y | δ) dδ itself.
    np.testing.assert_allclose(ll_diffuse, dk, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.timeout(600)  # forward-over-reverse of a whole likelihood: the longest compile
def test_log_likelihood_gradients_and_hessian():
    rng = np.random.default_rng(11)
    A, Q, H, R = (jnp.asarray(v) for v in _random_ou(rng, n=2, m=1))
    times = jnp.asarray(_irregular_times(rng, 8))
    y = jnp.asarray(rng.normal(size=(8, 1)))

    def ll(A, Q, H, R):
        return statespace.log_likelihood(ContinuousLinearSSM(A, Q, H, R), y, times)

    ll = jax.jit(ll)
    check_grads(ll, (A, Q, H, R), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    hess = jax.jit(jax.jacfwd(jax.grad(ll)))(A, Q, H, R)
    hess = np.asarray(hess).reshape(4, 4)  # d²/dA², A is 2 x 2
    assert np.all(np.isfinite(hess))
    np.testing.assert_allclose(hess, hess.T, rtol=1e-8, atol=1e-8)
    # the Hessian agrees with finite differences of the gradient
    g = jax.jit(jax.grad(ll))
    E = jnp.asarray(rng.normal(size=(2, 2)))
    eps = 1e-5
    fd = (g(A + eps * E, Q, H, R) - g(A - eps * E, Q, H, R)) / (2 * eps)
    # the Hessian's product with E is the gradient's directional derivative (no second
    # forward-over-reverse compile: a jvp of g here timed out the test under load)
    hvp = (hess @ np.asarray(E).ravel()).reshape(2, 2)
    np.testing.assert_allclose(hvp, fd, rtol=1e-5, atol=1e-6)


def _matern32_model(ell, var, noise):
    lam = np.sqrt(3.0) / ell
    A = np.array([[0.0, 1.0], [-(lam**2), -2 * lam]])
    Q = np.diag([0.0, 4 * lam**3 * var])
    kern = lambda tau: var * (1 + lam * np.abs(tau)) * np.exp(-lam * np.abs(tau))  # noqa: E731
    return ContinuousLinearSSM(A, Q, np.array([[1.0, 0.0]]), np.array([[noise]])), kern


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_predict_and_smoother_match_dense_gp():
    model, kern = _matern32_model(0.8, 1.7, 0.05)
    rng = np.random.default_rng(12)
    times = _irregular_times(rng, 15)
    y = rng.normal(size=(15, 1))
    y[5] = np.nan
    new_times = np.array([9.5, -1.0, 3.3, times[6], 4.01, 20.0])  # beyond, before, inside, equal
    pred = predict(model, y, times, new_times)
    K_oo = kern(times[:, None] - times[None]) + 0.05 * np.eye(15)
    K_no = kern(new_times[:, None] - times[None])
    K_nn = kern(new_times[:, None] - new_times[None])
    mu, cov = dense_gp_condition(K_oo, K_no, K_nn, y[:, 0])
    np.testing.assert_allclose(pred.obs_means[:, 0], mu, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(pred.covs[:, 0, 0], np.diag(cov), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(pred.obs_covs[:, 0, 0], np.diag(cov) + 0.05, rtol=1e-9)
    assert pred.means.shape == (6, 2) and pred.obs_covs.shape == (6, 1, 1)

    sm = statespace.rts_smoother(model, y, times)
    mu_s, cov_s = dense_gp_condition(K_oo, kern(times[:, None] - times[None]), kern(times[:, None] - times[None]), y[:, 0])
    np.testing.assert_allclose(sm.smoothed_means[:, 0], mu_s, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(sm.smoothed_covs[:, 0, 0], np.diag(cov_s), rtol=1e-9, atol=1e-10)

    samples = statespace.sample_posterior(jax.random.key(0), model, y, 4000, times)
    samples = getattr(samples, "states", samples)
    draws = np.asarray(samples)[..., 0]
    draws = draws.reshape(-1, 15)
    np.testing.assert_allclose(draws.mean(0), mu_s, atol=5 * np.sqrt(np.diag(cov_s).max() / 4000) + 1e-3)


# Slow (quick-run time): the quick run checks predict against dense GP conditioning.
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_predict_is_differentiable_and_jits():
    model, _ = _matern32_model(0.8, 1.7, 0.05)
    times = np.linspace(0.0, 5.0, 9)
    y = np.sin(times)[:, None]

    def f(ell):
        m, _ = _matern32_model_jnp(ell)
        return predict(m, y, times, jnp.array([2.2, 6.0])).obs_means.sum()

    g = jax.jit(jax.grad(f))(0.8)
    fd = (f(0.8 + 1e-6) - f(0.8 - 1e-6)) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-5)


def _matern32_model_jnp(ell):
    from statespace import models

    return models.matern32(ell, 1.7, noise_var=0.05), None


def _panel(num_subjects, n=4, T=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num_subjects, n, n)) / 2
    A = jnp.asarray(X - np.swapaxes(X, -1, -2) - 1.5 * np.eye(n))
    times = jnp.asarray(np.cumsum(rng.exponential(1.0, size=(num_subjects, T)), axis=1))
    y = jnp.asarray(rng.normal(size=(num_subjects, T, 1)))
    Q, H, R = jnp.eye(n), jnp.ones((1, n)), jnp.eye(1)

    def total(A):
        loglik = lambda A, t, y: statespace.log_likelihood(ContinuousLinearSSM(A, Q, H, R), y, t)  # noqa: E731
        return jnp.sum(jax.vmap(loglik)(A, times, y))

    return A, total


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="LAPACK custom calls are CPU-only")
@pytest.mark.parametrize("n", [_KRON_LYAP_MAX, _KRON_LYAP_MAX + 1])
def test_stationary_start_makes_one_chain_of_lapack_calls(n):
    """P∞ and the stability test share one factorisation (the Kronecker LU up to
    ``_KRON_LYAP_MAX`` states, a Schur form beyond) and one chain of triangular solves, and up
    to ``rules._unrolled.UNROLL_MAX`` states the PD test uses no LAPACK: independent batched
    LAPACK calls side by side deadlock XLA:CPU under jaxlib 0.10 once a vmapped panel is large
    (test_large_panel_gradient_does_not_hang). The Schur sweep and its refinement step are one
    ``fori_loop`` body: one triangular solve per column, each needing the ones before it."""
    import collections
    import re

    A, _ = _panel(8, n=n)
    Q, H, R = jnp.eye(n), jnp.ones((1, n)), jnp.eye(1)

    def start(A):  # the stationary start of every subject, and a scalar of it for the gradient
        m0, P0, ok = jax.vmap(lambda A: ContinuousLinearSSM(A, Q, H, R).initial())(A)
        return jnp.sum(jnp.where(ok, 1.0, 0.0)[:, None, None] * P0 ** 2)

    for fn, chain in ((start, 1), (jax.grad(start), 2)):
        hlo = jax.jit(fn).lower(A).compile().as_text()
        calls = collections.Counter(re.findall(r'custom_call_target="(lapack_\w+)"', hlo))
        if n <= UNROLL_MAX:
            assert "lapack_dpotrf_ffi" not in calls, calls
        if n <= _KRON_LYAP_MAX:  # LU, then L and U solves (forward), Uᵀ and Lᵀ solves (reverse)
            assert calls == {"lapack_dgetrf_ffi": 1, "lapack_dtrsm_ffi": 2 * chain}, calls
        else:
            assert calls["lapack_dgees_ffi"] == 1, calls
            assert calls["lapack_ztrsm_ffi"] == chain, calls


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_large_panel_gradient_does_not_hang():
    A, total = _panel(20000)
    value, grad = jax.jit(jax.value_and_grad(total))(A)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
