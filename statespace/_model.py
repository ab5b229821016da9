"""PLACEHOLDER (being written)."""


class LinearGaussianSSM:
    pass
