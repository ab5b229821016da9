"""PLACEHOLDER (being replaced): wraps jax.scipy.linalg.expm."""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl


def expm(A):
    A = jnp.asarray(A)
    f = jsl.expm
    for _ in range(A.ndim - 2):
        f = jax.vmap(f)
    return f(A)


def expm_frechet(A, E):
    return jax.jvp(expm, (A,), (E,))
