"""A user's own model class, through :class:`statespace.DiscretizableModel`.

``DampedWalk`` below is written as a user would: a pytree with a ``to_discrete(times)`` method
and nothing else from the package. It is the Ornstein-Uhlenbeck process
``dx = -a x dt + sqrt(q) dW`` observed with noise ``r``, so every result has an oracle: the
package's own ``ContinuousLinearSSM`` of the same process, and the dense Gaussian of ``y``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions
import pytest
from numpyro.infer.util import log_density

import statespace
from statespace import ContinuousLinearSSM, DiscretizableModel, LinearGaussianSSM
from statespace.numpyro import LinearGaussianStateSpace

pytestmark = pytest.mark.timeout(300)


@jax.tree_util.register_pytree_node_class
class DampedWalk:
    """OU process with rate ``a``, diffusion ``q``, noise ``r``; stationary start."""

    def __init__(self, a, q, r):
        self.a, self.q, self.r = a, q, r

    def tree_flatten(self):
        return (self.a, self.q, self.r), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def to_discrete(self, times):
        dt = jnp.append(jnp.diff(times), 0.0)
        decay = jnp.exp(-self.a * dt)
        var = self.q / (2 * self.a)
        disc = LinearGaussianSSM(
            F=decay[:, None, None], Q=(var * (1 - decay**2))[:, None, None], H=[[1.0]],
            R=self.r * jnp.eye(1), m0=jnp.zeros(1), P0=var * jnp.eye(1))
        return disc, (self.a > 0) & jnp.all(dt >= 0)


def _reference(a, q, r):
    return ContinuousLinearSSM(A=[[-a]], Q=[[q]], H=[[1.0]], R=[[r]], m0=[0.0],
                               P0=[[q / (2 * a)]])


def _data(T=7, seed=0):
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.uniform(0.1, 1.0, T))
    y = rng.normal(size=(T, 1))
    y[2] = np.nan
    return jnp.asarray(times), jnp.asarray(y)


def _dense_log_likelihood(a, q, r, times, y):
    keep = ~np.isnan(y[:, 0])
    t = np.asarray(times)[keep]
    cov = q / (2 * a) * np.exp(-a * np.abs(np.subtract.outer(t, t))) + r * np.eye(t.size)
    v = np.asarray(y)[keep, 0]
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (v @ np.linalg.solve(cov, v) + logdet + t.size * np.log(2 * np.pi))


def test_is_a_discretizable_model():
    assert isinstance(DampedWalk(1.0, 1.0, 1.0), DiscretizableModel)
    assert isinstance(_reference(1.0, 1.0, 1.0), DiscretizableModel)
    assert not isinstance(LinearGaussianSSM([[0.5]], [[1.0]], [[1.0]], [[1.0]], [0.0], [[1.0]]),
                          DiscretizableModel)


def test_filter_smoother_and_gradient_match_the_package_model():
    times, y = _data()
    mine, ref = DampedWalk(0.7, 1.3, 0.2), _reference(0.7, 1.3, 0.2)
    dense = _dense_log_likelihood(0.7, 1.3, 0.2, times, y)
    np.testing.assert_allclose(statespace.log_likelihood(mine, y, times), dense, rtol=1e-10)
    ours, theirs = statespace.kalman_filter(mine, y, times), statespace.kalman_filter(ref, y, times)
    np.testing.assert_allclose(ours.filtered_covs, theirs.filtered_covs, rtol=1e-10)
    smoothed = statespace.rts_smoother(mine, y, times)
    np.testing.assert_allclose(smoothed.smoothed_means,
                               statespace.rts_smoother(ref, y, times).smoothed_means, rtol=1e-9)

    def grad_of(build):
        return jax.grad(lambda a: statespace.log_likelihood(build(a, 1.3, 0.2), y, times))(0.7)

    np.testing.assert_allclose(jax.jit(lambda: grad_of(DampedWalk))(),
                               grad_of(lambda a, q, r: _reference(a, q, r)), rtol=1e-8)


def test_prediction_and_posterior_samples():
    times, y = _data()
    mine, ref = DampedWalk(0.7, 1.3, 0.2), _reference(0.7, 1.3, 0.2)
    new_times = jnp.array([0.05, times[3] + 0.1, times[-1] + 2.0])
    ours = statespace.predict(mine, y, times, new_times)
    theirs = statespace.predict(ref, y, times, new_times)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    draws = statespace.sample_posterior(jax.random.key(0), mine, y, 4000, times)
    np.testing.assert_allclose(draws.mean(0), statespace.rts_smoother(mine, y, times).smoothed_means,
                               atol=0.1)


def test_no_density_gives_minus_inf_and_nan():
    times, y = _data()
    unstable = DampedWalk(-0.5, 1.0, 0.2)  # a < 0: ok is False
    assert statespace.log_likelihood(unstable, y, times) == -jnp.inf
    assert np.all(np.isnan(statespace.predict(unstable, y, times, times[:2]).means))


def test_numpyro_distribution_with_batched_times():
    times, y = _data()
    mine = DampedWalk(0.7, 1.3, 0.2)
    dist = LinearGaussianStateSpace(mine, times)
    np.testing.assert_allclose(dist.log_prob(y), _dense_log_likelihood(0.7, 1.3, 0.2, times, y),
                               rtol=1e-10)
    # two series at their own times: the distribution maps over the batch of times
    times2 = jnp.stack([times, times * 1.5])
    batched = LinearGaussianStateSpace(mine, times2)
    assert batched.batch_shape == (2,)
    expected = [_dense_log_likelihood(0.7, 1.3, 0.2, t, y) for t in times2]
    np.testing.assert_allclose(batched.log_prob(y), expected, rtol=1e-10)
    assert batched.sample(jax.random.key(1), (3,)).shape == (3, 2, 7, 1)

    def model():
        a = numpyro.sample("a", numpyro.distributions.LogNormal(0.0, 1.0))
        numpyro.sample("y", LinearGaussianStateSpace(DampedWalk(a, 1.3, 0.2), times), obs=y)

    value, _ = log_density(model, (), {}, {"a": 0.7})
    prior = jax.scipy.stats.norm.logpdf(jnp.log(0.7)) - jnp.log(0.7)
    np.testing.assert_allclose(value, prior + _dense_log_likelihood(0.7, 1.3, 0.2, times, y),
                               rtol=1e-10)


def test_not_a_model_is_a_clear_error():
    times, y = _data()
    with pytest.raises(TypeError, match="to_discrete"):
        statespace.log_likelihood(object(), y)
    with pytest.raises(ValueError, match="pass times"):
        statespace.log_likelihood(DampedWalk(0.7, 1.3, 0.2), y)
    with pytest.raises(TypeError, match="DiscretizableModel"):
        LinearGaussianStateSpace(object(), times)
