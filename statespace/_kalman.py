"""PLACEHOLDER (being written)."""


class FilterResult:
    pass


def kalman_filter(model, y, times=None, *, form="cov", parallel=False):
    raise NotImplementedError


def log_likelihood(model, y, times=None, **kwargs):
    raise NotImplementedError
