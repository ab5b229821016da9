"""PLACEHOLDER (being written)."""


class SmootherResult:
    pass


def rts_smoother(model, y, times=None, **kwargs):
    raise NotImplementedError


def sample_posterior(key, model, y, num_samples, times=None, **kwargs):
    raise NotImplementedError
