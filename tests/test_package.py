"""The package's public surface is importable and matches ``__all__``."""

import pytest

import rules
import statespace


@pytest.mark.parametrize("module", [rules, statespace])
def test_all_names_exist(module):
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.{name} is in __all__ but missing"


def test_float64_enabled_by_conftest():
    import jax.numpy as jnp

    assert jnp.zeros(1).dtype == jnp.float64
