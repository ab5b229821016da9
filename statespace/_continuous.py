"""PLACEHOLDER (being written)."""


class ContinuousLinearSSM:
    pass


def discretize(model, dt):
    raise NotImplementedError


def predict(model, y, times, new_times):
    raise NotImplementedError
