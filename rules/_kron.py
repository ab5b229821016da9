"""PLACEHOLDER (being replaced)."""


class Kronecker:
    pass


class KroneckerSum:
    pass


def kron(*factors):
    raise NotImplementedError


def kron_sum(A, B):
    raise NotImplementedError
