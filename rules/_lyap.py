"""PLACEHOLDER (being replaced): dense Kronecker Lyapunov solves, plain autodiff."""

import jax.numpy as jnp


def lyap(A, Q, *, method="auto"):
    A = jnp.asarray(A); Q = jnp.asarray(Q)
    n = A.shape[-1]
    eye = jnp.eye(n, dtype=A.dtype)
    op = jnp.kron(A, eye) + jnp.kron(eye, A)
    return jnp.linalg.solve(op, -Q.reshape(Q.shape[:-2] + (n * n,))[..., None])[..., 0].reshape(Q.shape)


def dlyap(A, Q, *, method="auto"):
    A = jnp.asarray(A); Q = jnp.asarray(Q)
    n = A.shape[-1]
    op = jnp.eye(n * n, dtype=A.dtype) - jnp.kron(A, A)
    return jnp.linalg.solve(op, Q.reshape(Q.shape[:-2] + (n * n,))[..., None])[..., 0].reshape(Q.shape)
