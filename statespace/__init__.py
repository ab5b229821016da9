"""Linear-Gaussian state-space models in discrete and continuous time, built on ``rules``.

Kalman filtering, smoothing and sampling (sequential and parallel-in-time, covariance and
square-root form, missing data), exact discretisation of linear SDEs at irregular times,
NumPyro distributions for NUTS and optax fitting loops.
"""

from statespace import models, numpyro, testing, transforms
from statespace._cache import enable_compilation_cache
from statespace._continuous import ContinuousLinearSSM, Discretization, discretize
from statespace._fit import (
    DEFAULT_GTOL,
    DEFAULT_MAX_STEPS,
    DEFAULT_RTOL,
    FitResult,
    covariance,
    fit,
    standard_errors,
)
from statespace._kalman import FilterResult, kalman_filter, log_likelihood
from statespace._model import DiscretizableModel, LinearGaussianSSM
from statespace._nonlinear import NonlinearSDE
from statespace._predict import Prediction, predict
from statespace._smoother import SmootherResult, rts_smoother, sample_posterior
from statespace._xla_flags import enable_small_loop_compilation

__all__ = [
    "DEFAULT_GTOL",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_RTOL",
    "ContinuousLinearSSM",
    "DiscretizableModel",
    "Discretization",
    "FilterResult",
    "FitResult",
    "LinearGaussianSSM",
    "NonlinearSDE",
    "Prediction",
    "SmootherResult",
    "covariance",
    "discretize",
    "enable_compilation_cache",
    "enable_small_loop_compilation",
    "fit",
    "kalman_filter",
    "log_likelihood",
    "models",
    "numpyro",
    "predict",
    "rts_smoother",
    "sample_posterior",
    "standard_errors",
    "testing",
    "transforms",
]
