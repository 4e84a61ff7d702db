"""Functions that fit on a screen: no function or method of the package is longer than ``MAX_LINES`` lines
(decorators excluded, its docstring included), except those named in ``LONG_FUNCTIONS`` with the length they
may not exceed; that list only shrinks (a listed function that got short again must leave it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minimind_jax", "convert")
MAX_LINES = 60

# (file, qualified name) -> the most lines it may have
LONG_FUNCTIONS: dict[tuple[str, str], int] = {}


def _functions():
    """(file, qualified name, lines) of every function and method in the packages."""
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text(encoding="utf-8"))
            stack = [(node, "") for node in tree.body]
            while stack:
                node, prefix = stack.pop()
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{node.name}"
                    if not isinstance(node, ast.ClassDef):
                        yield rel, name, node.end_lineno - node.lineno + 1
                    stack.extend((child, f"{name}.") for child in node.body)


def test_functions_fit_on_a_screen():
    found = {(f, n): lines for f, n, lines in _functions()}
    too_long = {k: v for k, v in found.items() if v > LONG_FUNCTIONS.get(k, MAX_LINES)}
    assert not too_long, f"functions over {MAX_LINES} lines (or over their listed length): {too_long}"
    stale = {k: v for k, v in LONG_FUNCTIONS.items() if found.get(k, 0) <= MAX_LINES}
    assert not stale, f"listed as long but now short (or gone): remove them from LONG_FUNCTIONS: {stale}"


def test_the_walk_sees_nested_functions_and_methods():
    names = {n for f, n, _ in _functions() if f == "minimind_jax/training/loop.py"}
    assert {"train", "setup", "run", "_Throughput.__init__"} <= names
