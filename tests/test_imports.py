"""The packages' import graph: read from the sources with ``ast`` (nothing is imported).

* no cycle among the modules of ``rules`` and ``statespace``, counting imports at any level;
* imports of package modules at module level only (never inside a function);
* the layers: models know nothing of filtering, the pure step functions import no driver,
  the drivers do not import each other except where the dispatcher calls them.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("rules", "statespace")


def _module_files():
    """``{module name: path}`` for every module of the packages (``__init__`` is the package)."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _resolve(node, module, is_package, known):
    """Package modules that one ``import`` / ``from ... import`` node loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = module.split(".") if is_package else module.split(".")[:-1]
            parent = parent[: len(parent) - (node.level - 1)]
            base = ".".join(parent + ([base] if base else []))
        # ``from pkg import name`` loads pkg and, where ``name`` is a submodule, pkg.name
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    return {name for name in names if name in known}


def _imports(source, module, is_package, known):
    """``(targets, nested)``: the package modules imported anywhere in ``source`` and the
    ``(line, target)`` pairs of those imported inside a function body."""
    tree = ast.parse(source)
    targets, nested = set(), []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = _resolve(child, module, is_package, known) - {module}
                targets.update(found)
                if in_function:
                    nested.extend((child.lineno, name) for name in sorted(found))
            inside = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            visit(child, inside)

    visit(tree, False)
    return targets, nested


def _graph():
    """``(edges, nested)`` over all modules of the packages."""
    files = _module_files()
    known = set(files)
    edges, nested = {}, {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges[module], nested[module] = _imports(path.read_text(), module, is_package, known)
    return edges, nested


def _find_cycle(edges):
    """One cycle of the directed graph ``edges`` as a list of nodes, or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def _reachable(edges, start):
    seen, todo = set(), [start]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


# -- the checkers themselves catch what they should -----------------------------------------
def test_cycle_finder_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_reader_sees_nested_and_relative_imports():
    known = {"statespace", "statespace._kalman", "statespace._model", "rules", "rules._tria"}
    source = (
        "import rules\n"
        "from . import _model\n"
        "def f():\n"
        "    from statespace._kalman import log_likelihood\n"
        "    return lambda: __import__('os')\n"
        "class C:\n"
        "    def g(self):\n"
        "        from rules import _tria\n"
    )
    targets, nested = _imports(source, "statespace._x", False, known)
    assert targets == {"rules", "statespace", "statespace._model", "statespace._kalman",
                       "rules._tria"}
    assert nested == [(4, "statespace._kalman"), (8, "rules"), (8, "rules._tria")]


# -- the packages -----------------------------------------------------------------------------
def test_no_import_cycle():
    edges, _ = _graph()
    assert _find_cycle(edges) is None, f"import cycle: {' -> '.join(_find_cycle(edges))}"


def test_package_modules_are_imported_at_module_level_only():
    _, nested = _graph()
    offenders = [f"{module}:{line} imports {target}"
                 for module, found in sorted(nested.items()) for line, target in found]
    assert not offenders, "imports inside functions:\n" + "\n".join(offenders)


_MODEL_MODULES = ("statespace._model", "statespace._continuous", "statespace.models")


@pytest.mark.parametrize("module", _MODEL_MODULES)
def test_models_know_nothing_of_filtering(module):
    edges, _ = _graph()
    assert module in edges
    allowed = set(_MODEL_MODULES)
    outside = {t for t in _reachable(edges, module)
               if t.split(".")[0] != "rules" and t not in allowed}
    assert not outside, f"{module} reaches {sorted(outside)}"
def test_steps_is_a_leaf():
    edges, _ = _graph()
    assert "statespace._steps" in edges
    outside = {t for t in _reachable(edges, "statespace._steps") if t.split(".")[0] != "rules"}
    assert not outside, f"statespace._steps reaches {sorted(outside)}"


@pytest.mark.parametrize("module, forbidden", [
    ("statespace._adjoint", ("statespace._kalman", "statespace._parallel", "statespace._smoother")),
    ("statespace._parallel", ("statespace._kalman", "statespace._adjoint",
                              "statespace._sequential", "statespace._smoother")),
    ("statespace._sequential", ("statespace._kalman", "statespace._adjoint",
                                "statespace._parallel", "statespace._smoother")),
])
def test_drivers_do_not_import_each_other(module, forbidden):
    edges, _ = _graph()
    assert module in edges
    reached = _reachable(edges, module) & set(forbidden)
    assert not reached, f"{module} reaches {sorted(reached)}"


_DRIVERS = ("statespace._kalman", "statespace._sequential", "statespace._adjoint",
            "statespace._parallel", "statespace._smoother", "statespace._predict")


def _private_imports(source, module, modules):
    """``(module, source module, name)`` for every private name ``source`` (the code of
    ``module``) imports from one of ``modules``."""
    return [(module, node.module, alias.name) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.module in modules
            for alias in node.names if alias.name.startswith("_")]


def test_private_import_reader_sees_them():
    source = "from statespace._kalman import _x, y\nimport statespace._kalman\n"
    assert _private_imports(source, "m", _DRIVERS) == [("m", "statespace._kalman", "_x")]


def test_drivers_share_no_private_names():
    files = _module_files()
    found = [hit for module in _DRIVERS
             for hit in _private_imports(files[module].read_text(), module, _DRIVERS)]
    assert not found, "\n".join(f"{a} imports {name} from {b}" for a, b, name in found)
