"""Test configuration: float64 everywhere unless a test asks for float32 explicitly."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compilation caches after each test module.

    One pytest process compiles thousands of XLA programs; each keeps its machine code
    mapped until its cache entry goes. Without this, a full run of the suite crashed inside
    the XLA compiler after several hundred modules' worth of programs (memory maps pile up
    towards ``vm.max_map_count``).
    """
    yield
    jax.clear_caches()
