"""The tiny-matrix product primitive (rules._smallmm): values, derivatives, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rules._smallmm import SMALL_MATMUL_MAX, small_matmul


@pytest.mark.parametrize("shapes", [((3, 4, 4), (3, 4, 4)), ((5, 2, 3), (3, 4)), ((2, 3), (7, 3, 1)),
                                    ((6, 6), (6, 6)),
                                    ((200, 4, 4), (200, 4, 4)), ((200, 8, 8), (200, 8, 8))])
def test_values_match_matmul(shapes):
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=s)) for s in shapes)
    np.testing.assert_allclose(small_matmul(a, b), jnp.matmul(a, b), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(jax.jit(small_matmul)(a, b), jnp.matmul(a, b), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("batch,n", [(3, 4), (200, 4), (200, 8)])  # reduction, unrolled, dot
def test_second_order_both_modes(batch, n):
    rng = np.random.default_rng(1)
    a, b = (jnp.asarray(rng.normal(size=(batch,) + s)) for s in [(n, 2), (2, n)])
    # a product of three, so second derivatives are not identically zero
    f = lambda a, b: small_matmul(small_matmul(a, b), a)  # noqa: E731
    check_grads(f, (a, b), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("batch", [4, 300])  # the reduction and the unrolled lowering
def test_derivatives_equal_matmuls(batch):
    rng = np.random.default_rng(2)
    a, b, ct = (jnp.asarray(rng.normal(size=(batch, 3, 3))) for _ in range(3))
    got = jax.vjp(small_matmul, a, b)[1](ct)
    want = jax.vjp(jnp.matmul, a, b)[1](ct)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-13)
    hess = jax.hessian(lambda a: jnp.sum(small_matmul(a, a) ** 2))(a[0])
    want = jax.hessian(lambda a: jnp.sum((a @ a) ** 2))(a[0])
    np.testing.assert_allclose(hess, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_axes", [(0, None), (None, 1), (2, 0)])
def test_vmap_any_batch_axis(in_axes):
    rng = np.random.default_rng(3)
    shape_a = [3, 3]
    shape_b = [3, 3]
    if in_axes[0] is not None:
        shape_a.insert(in_axes[0], 5)
    if in_axes[1] is not None:
        shape_b.insert(in_axes[1], 5)
    a, b = jnp.asarray(rng.normal(size=shape_a)), jnp.asarray(rng.normal(size=shape_b))
    got = jax.vmap(small_matmul, in_axes=in_axes)(a, b)
    want = jax.vmap(jnp.matmul, in_axes=in_axes)(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)
    # the batched JVP and its transpose go through the batching rule too
    g = jax.grad(lambda a, b: jnp.sum(jax.vmap(small_matmul, in_axes=in_axes)(a, b) ** 2))(a, b)
    w = jax.grad(lambda a, b: jnp.sum(jax.vmap(jnp.matmul, in_axes=in_axes)(a, b) ** 2))(a, b)
    np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-13)


def test_float32_and_large_fallback():
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)
    assert small_matmul(a, a).dtype == jnp.float32
    np.testing.assert_allclose(small_matmul(a, a), a @ a, rtol=1e-5, atol=1e-5)
    n = SMALL_MATMUL_MAX + 1
    big = jnp.asarray(rng.normal(size=(n, n)))
    np.testing.assert_allclose(small_matmul(big, big), big @ big, rtol=1e-13)


def test_inner_dimension_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) @ \(2, 3\)"):
        small_matmul(jnp.ones((2, 3)), jnp.ones((2, 3)))
