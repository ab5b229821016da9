"""PLACEHOLDER (being written)."""


class FitResult:
    pass


def fit(loss, params, *, optimizer, num_steps, tol=None, progress=True):
    raise NotImplementedError
