"""Test configuration: float64 everywhere unless a test asks for float32 explicitly.

Compile time, not run time, is nine tenths of this suite on CPU (1337 XLA compilations,
195 s of 247 s, for ``tests/statespace/test_continuous.py`` alone). Two settings made here,
for the test processes only, cut it by 40 % (2-core machine, that file: 189 s → 113 s):

* a persistent compilation cache in a fresh temporary folder shared by the pytest-xdist
  workers (and by the subprocesses some tests start): the workers compile many of the same
  programs, and every module recompiles what ``jax.clear_caches()`` dropped after the last
  one. The folder is removed at the end of the run; entries are keyed by the program, JAX's
  version and the XLA flags, so nothing stale can be read.
* ``--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true``: LLVM
  spends less time optimising machine code that runs for microseconds. XLA's own HLO passes
  (fusion, simplification) still run, and without fast-math LLVM keeps IEEE semantics, so
  the numbers are those a user gets up to the contraction of a product and a sum into one
  FMA. A run that sets ``--xla_backend_optimization_level`` itself in ``XLA_FLAGS`` keeps it
  (e.g. ``XLA_FLAGS=--xla_backend_optimization_level=2 python3 -m pytest``).
"""

import os
import shutil
import tempfile

_FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE_FLAGS}".strip()

# Made by the first process to import this file (pytest's controller, or the only process
# with -n 0) before any worker starts, so the workers inherit it through the environment.
_CACHE_MADE_HERE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_MADE_HERE = tempfile.mkdtemp(prefix="statespace-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_MADE_HERE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402  (after the environment it reads at import)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
if _CACHE_MADE_HERE is not None:  # also where jax was imported before this file
    jax.config.update("jax_compilation_cache_dir", _CACHE_MADE_HERE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    if _CACHE_MADE_HERE is not None:
        shutil.rmtree(_CACHE_MADE_HERE, ignore_errors=True)


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
    """Slow tests name their own timeout; off CPU, skip what needs LAPACK's Schur form.

    The default run (CI's) includes the slow tests, so each must say how long it may take
    rather than inherit the 300 s meant for quick ones. ``method="schur"`` needs LAPACK's
    Schur form, which JAX has on CPU only.
    """
    untimed = [item.nodeid for item in items
               if item.get_closest_marker("slow") and not item.get_closest_marker("timeout")]
    if untimed:
        raise pytest.UsageError("slow tests without @pytest.mark.timeout: " + ", ".join(untimed))
    if jax.default_backend() == "cpu":
        return
    skip = pytest.mark.skip(reason="method='schur' needs LAPACK's Schur form: CPU only in JAX")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("cpu_only") or "schur" in params.values():
            item.add_marker(skip)
