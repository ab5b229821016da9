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


def pytest_collection_modifyitems(config, items):
    """Off CPU, skip what needs LAPACK's Schur form (``method="schur"``), which JAX has on CPU only."""
    if jax.default_backend() == "cpu":
        return
    skip = pytest.mark.skip(reason="method='schur' needs LAPACK's Schur form: CPU only in JAX")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("cpu_only") or "schur" in params.values():
            item.add_marker(skip)
