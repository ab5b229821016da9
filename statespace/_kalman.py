"""PLACEHOLDER (being written)."""


class FilterResult:
    pass


class SmootherResult:
    pass


def kalman_filter(model, y, times=None, *, form="cov", parallel=False):
    raise NotImplementedError


def log_likelihood(model, y, times=None, **kwargs):
    raise NotImplementedError


def rts_smoother(model, y, times=None, **kwargs):
    raise NotImplementedError


def sample_posterior(key, model, y, num_samples, times=None, **kwargs):
    raise NotImplementedError
