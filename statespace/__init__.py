"""Linear-Gaussian state-space models in discrete and continuous time, built on ``rules``.

Kalman filtering, smoothing and sampling (sequential and parallel-in-time, covariance and
square-root form, missing data), exact discretisation of linear SDEs at irregular times,
NumPyro distributions for NUTS and optax fitting loops.
"""

from statespace import models
from statespace._continuous import ContinuousLinearSSM, discretize, predict
from statespace._fit import FitResult, fit
from statespace._kalman import (
    FilterResult,
    SmootherResult,
    kalman_filter,
    log_likelihood,
    rts_smoother,
    sample_posterior,
)
from statespace._model import LinearGaussianSSM

__all__ = [
    "ContinuousLinearSSM",
    "FilterResult",
    "FitResult",
    "LinearGaussianSSM",
    "SmootherResult",
    "discretize",
    "fit",
    "kalman_filter",
    "log_likelihood",
    "models",
    "predict",
    "rts_smoother",
    "sample_posterior",
]
