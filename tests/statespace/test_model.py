"""LinearGaussianSSM: construction checks, pytree behaviour, stationary start, simulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax import lax

from statespace import LinearGaussianSSM
from statespace._model import _PSD_RTOL, _from_first, _indefinite
from tests.statespace.dense_oracle import dense_joint, random_model


def _params(n=3, m=2, seed=0, **kw):
    return random_model(np.random.default_rng(seed), n, m, **kw)


def test_defaults_and_fields():
    p = _params()
    model = LinearGaussianSSM(**p)
    assert model.state_dim == 3 and model.obs_dim == 2
    np.testing.assert_array_equal(model.b, np.zeros(3))
    np.testing.assert_array_equal(model.d, np.zeros(2))
    assert model.num_timesteps is None and model.batch_shape == () and model.diffuse is None
    for name in ("F", "Q", "H", "R", "m0", "P0"):
        np.testing.assert_array_equal(getattr(model, name), p[name])


@pytest.mark.parametrize(
    "name, bad",
    [
        ("Q", np.eye(2)),
        ("H", np.ones((2, 4))),
        ("R", np.eye(3)),
        ("m0", np.zeros(4)),
        ("P0", np.eye(2)),
        ("b", np.zeros(2)),
        ("d", np.zeros(3)),
    ],
)
def test_wrong_shape_names_both_shapes(name, bad):
    p = _params(offsets=True)
    p[name] = bad
    with pytest.raises(ValueError) as err:
        LinearGaussianSSM(**p)
    message = str(err.value)
    assert f"{name}.shape = {bad.shape}" in message
    reference = "H.shape" if name in ("R", "d") else "F.shape"
    assert reference in message


def test_nonsquare_F_and_bad_P0_string():
    p = _params()
    with pytest.raises(ValueError, match=r"F.shape = \(3, 2\)"):
        LinearGaussianSSM(**{**p, "F": np.ones((3, 2))})
    with pytest.raises(ValueError, match="stationary"):
        LinearGaussianSSM(**{**p, "P0": "steady"})
    with pytest.raises(TypeError):
        LinearGaussianSSM(**{**p, "F": p["F"] + 0j})


def test_time_axis_lengths_must_agree():
    p = _params(T=5, time_varying=("F",))
    LinearGaussianSSM(**p)  # fine
    p["H"] = np.stack([p["H"]] * 4)
    with pytest.raises(ValueError, match="time-axis lengths disagree"):
        LinearGaussianSSM(**p)


def test_batch_axes_must_broadcast():
    p = _params()
    p["F"] = np.stack([p["F"][None]] * 3)  # batch 3, time 1
    p["m0"] = np.stack([p["m0"]] * 2)  # batch 2
    with pytest.raises(ValueError, match="do not broadcast"):
        LinearGaussianSSM(**p)


def test_batch_and_time_shapes():
    p = _params(T=5, time_varying=("Q",))
    p["F"] = np.stack([p["F"][None]] * 3)  # (3, 1, n, n): batch 3, constant in time
    p["m0"] = np.stack([p["m0"]] * 3)
    model = LinearGaussianSSM(**p)
    assert model.batch_shape == (3,)
    assert model.num_timesteps == 5


def test_dtype_is_common_and_integers_promote():
    p = {k: np.asarray(v, np.float32) for k, v in _params().items()}
    model = LinearGaussianSSM(**p)
    assert model.F.dtype == jnp.float32 and model.b.dtype == jnp.float32
    model = LinearGaussianSSM(F=[[1]], Q=[[1]], H=[[1]], R=[[1]], m0=[0], P0=[[1]])
    assert jnp.issubdtype(model.F.dtype, jnp.floating)


def test_stationary_P0_solves_discrete_lyapunov():
    p = _params()
    p["P0"] = "stationary"
    model = LinearGaussianSSM(**p)
    expected = scipy.linalg.solve_discrete_lyapunov(p["F"], p["Q"])
    np.testing.assert_allclose(model.P0, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(model.P0, model.P0.T)


def test_stationary_P0_batched_and_time_varying_rejected():
    p = _params()
    Fs = np.stack([p["F"], 0.5 * p["F"]])[:, None]  # (2, 1, n, n)
    model = LinearGaussianSSM(**{**p, "F": Fs, "P0": "stationary"})
    for i in range(2):
        expected = scipy.linalg.solve_discrete_lyapunov(Fs[i, 0], p["Q"])
        np.testing.assert_allclose(model.P0[i], expected, rtol=1e-10, atol=1e-12)
    p_tv = _params(T=4, time_varying=("F",))
    with pytest.raises(ValueError, match="time-invariant"):
        LinearGaussianSSM(**{**p_tv, "P0": "stationary"})


def test_pytree_roundtrip_jit_and_vmap():
    p = _params(offsets=True)
    model = LinearGaussianSSM(**p, diffuse=[True, False, False])
    leaves, treedef = jax.tree_util.tree_flatten(model)
    assert len(leaves) == 8
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.diffuse == (True, False, False)
    out = jax.jit(lambda mdl: mdl.F @ mdl.m0 + mdl.b)(model)
    np.testing.assert_allclose(out, p["F"] @ p["m0"] + p["b"], rtol=1e-12)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), model)
    traces = jax.vmap(lambda mdl: jnp.trace(mdl.Q))(stacked)
    np.testing.assert_allclose(traces, [np.trace(p["Q"]), 2 * np.trace(p["Q"])], rtol=1e-12)
    assert model.replace(F=2 * model.F).diffuse == model.diffuse


def test_diffuse_normalisation():
    p = _params()
    assert LinearGaussianSSM(**p, diffuse=True).diffuse == (True,) * 3
    assert LinearGaussianSSM(**p, diffuse=False).diffuse is None
    assert LinearGaussianSSM(**p, diffuse=[False] * 3).diffuse is None
    with pytest.raises(ValueError, match="boolean mask"):
        LinearGaussianSSM(**p, diffuse=[True, False])
    with pytest.raises(ValueError, match="boolean mask"):
        LinearGaussianSSM(**p, diffuse=[1, 0, 0])


@pytest.mark.parametrize("time_varying", [False, True])
def test_simulate_matches_dense_moments(time_varying):
    T, num = 4, 4000
    p = _params(n=2, m=2, T=T, time_varying=time_varying, offsets=True, seed=4)
    model = LinearGaussianSSM(**p)
    states, obs = jax.vmap(lambda k: model.simulate(k, T))(jax.random.split(jax.random.key(0), num))
    assert states.shape == (num, T, 2) and obs.shape == (num, T, 2)
    joint = np.concatenate(
        [np.asarray(states).reshape(num, -1), np.asarray(obs).reshape(num, -1)], axis=1
    )
    mean, cov = dense_joint(p, T)
    std = np.sqrt(np.diag(cov))
    # 5 standard errors on the mean, and a loose check on the covariance.
    assert np.all(np.abs(joint.mean(0) - mean) < 5 * std / np.sqrt(num))
    emp = np.cov(joint.T)
    scale = np.outer(std, std)
    assert np.max(np.abs(emp - cov) / scale) < 0.15


def test_simulate_errors():
    p = _params(T=5, time_varying=("F",))
    model = LinearGaussianSSM(**p)
    with pytest.raises(ValueError, match="num_steps"):
        model.simulate(jax.random.key(0), 4)
    batched = LinearGaussianSSM(**{**_params(), "m0": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="batch"):
        batched.simulate(jax.random.key(0), 4)


def test_simulate_singular_noise():
    p = _params(n=2, m=1)
    p["Q"] = np.diag([0.0, 1.0])
    p["P0"] = np.zeros((2, 2))
    p["F"] = np.eye(2)
    states, _ = LinearGaussianSSM(**p).simulate(jax.random.key(1), 6)
    np.testing.assert_allclose(states[:, 0], p["m0"][0], rtol=1e-12)
    assert np.all(np.isfinite(states))


@pytest.mark.parametrize("shape", [(0,), (1,), (9,), (7, 3), (6, 2, 2)])
@pytest.mark.parametrize("rate", [0.0, 0.15, 0.6])
def test_from_first_is_the_cumulative_maximum(shape, rate):
    """The failure masks (True from the first failed step on, per column) equal lax.cummax's."""
    flags = jnp.asarray(np.random.default_rng(int(rate * 100) + len(shape)).random(shape) < rate)
    expected = lax.cummax(flags.astype(jnp.int32), axis=0) > 0
    got = jax.jit(_from_first)(flags)
    assert got.shape == expected.shape and got.dtype == jnp.bool_
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 10])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_indefinite_matches_the_smallest_eigenvalue(n, dtype):
    # the unrolled right-looking factorisation (n <= 8) and LAPACK's (n > 8) against
    # lambda_min(A) < -tol with tol = 100 n eps max|A_ij|, away from the boundary (singular
    # PSD matrices included: lambda_min = 0 is not indefinite)
    rng = np.random.default_rng(n)
    X = rng.standard_normal((300, n, n))
    A = X @ np.swapaxes(X, -1, -2)
    scale = np.abs(A).max(axis=(1, 2))
    tol = _PSD_RTOL * n * np.finfo(dtype).eps * scale
    shift = np.linalg.eigvalsh(A)[:, 0] + tol * rng.choice([-30.0, -3.0, 0.0, 3.0, 30.0], size=300)
    A = A - shift[:, None, None] * np.eye(n)
    if n > 1:  # the test reads the symmetric part: add an antisymmetric one to half of them
        K = rng.standard_normal((300, n, n)) * rng.integers(0, 2, size=(300, 1, 1))
        A = A + (K - np.swapaxes(K, -1, -2))
    A = A.astype(dtype)
    lam = np.linalg.eigvalsh(0.5 * (A + np.swapaxes(A, -1, -2)).astype(np.float64))[:, 0]
    tol = _PSD_RTOL * n * np.finfo(dtype).eps * np.abs(A).max(axis=(1, 2))
    clear = np.abs(lam + tol) > 0.5 * tol  # float32 rounding of A moves lambda by ~eps max|A|
    got = np.asarray(jax.jit(_indefinite)(jnp.asarray(A)))
    assert got.shape == (300,)
    np.testing.assert_array_equal(got[clear], (lam < -tol)[clear])
    assert 0 < got[clear].sum() < clear.sum()  # both answers occur
    # non-finite matrices are not reported as indefinite (NaN parameters stay NaN)
    B = np.array(A[:2])
    B[0, 0, 0], B[1, -1, -1] = np.nan, -np.inf
    assert not np.any(np.asarray(_indefinite(jnp.asarray(B))))
