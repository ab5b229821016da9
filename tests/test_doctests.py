"""Every docstring example of ``rules`` and ``statespace`` runs and prints what it says.

One test per module: the standard library's ``doctest`` runs the module's examples (those
of its functions, classes and methods) with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``, in
float64 as the rest of the suite (``tests/conftest.py``). A module also fails when one of
its public functions or classes has no example, so a new public function cannot go in
without one. Public means named in the module's ``__all__`` or, for a module without one,
defined there under a name without a leading underscore.

Examples print floating values rounded (``round(float(x), 6)``, ``np.round``) or compare
them (``bool(jnp.allclose(...))``), so that their output does not depend on the JAX
version or the CPU.
"""

import doctest
import importlib
import inspect
import os
import pkgutil

import jax
import jax.numpy as jnp
import pytest

# Modules whose examples are run here.
DOCTEST_MODULES = [
    "rules",
    "rules._checks",
    "rules._expm",
    "rules._kron",
    "rules._linalg",
    "rules._lyap",
    "rules._precision",
    "rules._smallmm",
    "rules._tria",
    "rules._unrolled",
    "statespace",
    "statespace.__main__",
    "statespace._adjoint",
    "statespace._cache",
    "statespace._continuous",
    "statespace._demo",
    "statespace._fit",
    "statespace._kalman",
    "statespace._model",
    "statespace._nonlinear",
    "statespace._parallel",
    "statespace._predict",
    "statespace._sequential",
    "statespace._smoother",
    "statespace._steps",
    "statespace._xla_flags",
    "statespace.models",
    "statespace.numpyro",
    "statespace.testing",
    "statespace.transforms",
]

# Modules whose examples are not run yet: they are being restructured, and their
# docstrings will be brought up to date afterwards. Move each into DOCTEST_MODULES once
# its examples run (and add any module the restructuring creates).
DOCTEST_MODULES_TODO = []

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


# Process-wide JAX settings an example may change (the compilation-cache helper's example
# undoes its own change; restored here as well, so no later test sees a different setting).
_JAX_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
)


@pytest.fixture
def float64():
    """Run with ``jax_enable_x64`` on (as conftest sets it); restore the settings afterwards."""
    before = {name: getattr(jax.config, name) for name in ("jax_enable_x64",) + _JAX_SETTINGS}
    xla_flags = os.environ.get("XLA_FLAGS")
    jax.config.update("jax_enable_x64", True)
    assert jnp.zeros(1).dtype == jnp.float64
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    if xla_flags is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = xla_flags


def _public_objects(module):
    """The module's public functions and classes: ``__all__``, else its own public names."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name, obj in vars(module).items()
                 if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__]
    objects = {name: getattr(module, name) for name in names}
    return {name: obj for name, obj in objects.items()
            if inspect.isclass(obj) or inspect.isroutine(inspect.unwrap(obj))}


def _with_examples(module) -> set:
    """Qualified names of the objects of ``module`` whose own docstring has an example."""
    return {test.name for test in doctest.DocTestFinder().find(module) if test.examples}


@pytest.mark.timeout(60)
def test_every_module_is_listed():
    """Each module of the two packages is in one of the lists, and in only one."""
    assert not set(DOCTEST_MODULES) & set(DOCTEST_MODULES_TODO)
    found = set()
    for package in ("rules", "statespace"):
        path = importlib.import_module(package).__path__
        found |= {package} | {info.name for info in pkgutil.walk_packages(path, package + ".")}
    unlisted = sorted(found - set(DOCTEST_MODULES) - set(DOCTEST_MODULES_TODO))
    assert not unlisted, f"add to DOCTEST_MODULES (or, for now, DOCTEST_MODULES_TODO): {unlisted}"


# The examples of the internal drivers compile whole filters and their gradients (~10 s
# each): full suite only, to keep the quick run near its budget.
_FULL_SUITE_ONLY = {"statespace._parallel", "statespace._adjoint"}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow, pytest.mark.timeout(300)]) if n in _FULL_SUITE_ONLY else n
                                  for n in DOCTEST_MODULES])
def test_doctests(name, float64):
    module = importlib.import_module(name)
    public = _public_objects(module)
    if hasattr(module, "__path__"):
        # A package: its re-exports from the listed modules need an example where they are
        # defined (a re-export from a module not yet listed is checked once it is).
        required = {f"{obj.__module__}.{obj.__name__}" for obj in public.values()
                    if obj.__module__ in DOCTEST_MODULES}
        found = set().union(*(_with_examples(importlib.import_module(obj.__module__))
                              for obj in public.values() if obj.__module__ in DOCTEST_MODULES))
    else:
        required = {f"{name}.{key}" for key in public}
        found = _with_examples(module)
    missing = sorted(required - found)
    assert not missing, f"{name}: public functions or classes without an example: {missing}"
    result = doctest.testmod(module, optionflags=OPTIONFLAGS, verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
    if public and not hasattr(module, "__path__"):
        assert result.attempted > 0, f"{name} defines public functions but runs no example"
