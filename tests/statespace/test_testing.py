"""statespace.testing: the derivative checker tells right derivatives from wrong ones."""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from statespace.testing import check_derivatives, relative_error


def _cubic_matrix(X):
    return X @ X @ X + jnp.sin(X)


def _cubic_matrix_mp(X):
    m = mpmath.matrix(X.tolist())
    out = m * m * m + m.apply(mpmath.sin)
    return np.array(out.tolist(), dtype=object)


@jax.custom_jvp
def _wrong_sin(x):
    return jnp.sin(x)


@_wrong_sin.defjvp
def _wrong_sin_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.sin(x), 1.01 * jnp.cos(x) * t  # 1 % off on purpose


X0 = np.array([[0.3, -0.2, 0.1], [0.5, 0.4, -0.7], [0.0, 0.2, 0.9]])


@pytest.mark.parametrize("use_reference", [False, True])
def test_correct_derivative_has_tiny_error(use_reference):
    reference = _cubic_matrix_mp if use_reference else None
    report = check_derivatives(_cubic_matrix, (jnp.asarray(X0),), reference=reference)
    bound = 1e-13 if use_reference else 1e-9
    assert report.max_error < bound, str(report)
    assert report.reference == ("high-precision" if use_reference else "richardson")
    assert report.jvp_errors.shape == report.vjp_errors.shape == (3,)


def test_wrong_derivative_is_flagged():
    report = check_derivatives(lambda x: _wrong_sin(x).sum() * x, (jnp.asarray(X0),))
    assert report.max_error > 1e-4, str(report)


def test_argnum_selects_the_perturbed_argument():
    f = lambda a, b: a * jnp.exp(b)  # noqa: E731
    a, b = jnp.asarray(X0), jnp.asarray(-X0)
    assert check_derivatives(f, (a, b), argnum=1).max_error < 1e-9
    with pytest.raises(ValueError, match="argnum"):
        check_derivatives(f, (a, b), argnum=2)


def test_relative_error_handles_zero_reference():
    assert relative_error(np.ones(2), np.zeros(2)) == pytest.approx(np.sqrt(2))
    assert relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
