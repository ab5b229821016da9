"""Function length in ``rules`` and ``statespace``: read from the sources with ``ast``.

A function's code lines are the non-blank, non-comment lines of its body after the docstring
(nested functions count towards the function that holds them, and on their own).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("rules", "statespace")
MAX_CODE_LINES = 80

# Longer functions that stay for now, by "path::name" (none today).
ALLOWED: set[str] = set()


def _code_lines(source):
    """``{(line, name): code lines}`` for every function of ``source``."""
    lines = source.split("\n")
    counts = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            body = body[1:]
        code = lines[body[0].lineno - 1:node.end_lineno] if body else []
        counts[node.lineno, node.name] = sum(
            1 for line in code if line.strip() and not line.strip().startswith("#"))
    return counts


def test_counter_skips_docstring_blank_and_comment_lines():
    source = (
        "def f(x):\n"
        '    """Doc\n'
        '    string."""\n'
        "    # a comment\n"
        "\n"
        "    def g():\n"
        "        return 1\n"
        "    return (x +\n"
        "            g())\n"
        "def h():\n"
        '    """Only a docstring."""\n'
    )
    assert _code_lines(source) == {(1, "f"): 4, (6, "g"): 1, (10, "h"): 0}


def test_no_long_functions():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for (line, name), count in _code_lines(path.read_text()).items():
                if count > MAX_CODE_LINES and f"{rel}::{name}" not in ALLOWED:
                    offenders.append(f"{rel}:{line} {name}: {count} code lines")
    assert not offenders, (
        f"functions over {MAX_CODE_LINES} code lines (split them into named helpers):\n"
        + "\n".join(sorted(offenders)))
