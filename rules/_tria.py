"""PLACEHOLDER (being replaced): QR-based triangularisation, plain autodiff."""

import jax.numpy as jnp


def tria(M):
    R = jnp.linalg.qr(jnp.swapaxes(M, -1, -2), mode="r")
    L = jnp.swapaxes(R, -1, -2)
    s = jnp.sign(jnp.diagonal(L, axis1=-2, axis2=-1))
    s = jnp.where(s == 0, 1.0, s)
    return L * s[..., None, :]
