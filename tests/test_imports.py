"""The package's import structure: every module imports in a fresh interpreter, the module import graph
(module-level imports, read from each file's syntax tree) has no cycle, and imports sit at module level.

Function-local imports are allowed only for optional heavy dependencies that a plain install does not have
or that cost seconds to import: torch, transformers, lm_eval (the ``torch`` / ``eval`` extras) and the
browser drivers selenium / playwright. ``LOCAL_IMPORT_EXCEPTIONS`` names the remaining function-local
imports of other modules, each by file and imported module; the list only shrinks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minimind_jax", "convert")

# optional heavy dependencies: imported inside the function that needs them
OPTIONAL = {"torch", "transformers", "lm_eval", "selenium", "playwright"}

# (file, imported top-level-or-full module name) still imported inside a function
LOCAL_IMPORT_EXCEPTIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imported(node: ast.AST, module: str, is_pkg: bool) -> list[str]:
    """Full names of the modules an ``import`` / ``from ... import`` statement imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module
    # ``from pkg import sub`` imports the module pkg.sub when there is one
    subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in MODULES]
    return subs or [name]


def _walk(tree: ast.AST):
    """(import node, inside a function?) for every import statement, skipping ``if TYPE_CHECKING:`` blocks."""
    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_func
            yield from visit(child, inner)
    yield from visit(tree, False)


def _scan():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    local: set[tuple[str, str]] = set()
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, in_func in _walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            for name in _imported(node, module, path.name == "__init__.py"):
                if in_func:
                    if name.split(".")[0] not in OPTIONAL:
                        local.add((str(path.relative_to(ROOT)), name))
                elif name in MODULES and name != module:
                    graph[module].add(name)
    return graph, local


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_module_import_graph_has_no_cycle():
    graph, _ = _scan()
    assert sum(map(len, graph.values())) > 50, "the scan found almost no imports: the walker is broken"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_are_at_module_level():
    _, local = _scan()
    new = sorted(local - LOCAL_IMPORT_EXCEPTIONS)
    assert not new, "function-local imports (move them to the top of the file): " + ", ".join(
        f"{f}: {m}" for f, m in new)
    stale = sorted(LOCAL_IMPORT_EXCEPTIONS - local)
    assert not stale, f"LOCAL_IMPORT_EXCEPTIONS lists imports that are gone: {stale}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_in_a_fresh_interpreter(package):
    names = [m for m in MODULES if m.split(".")[0] == package]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# the layers of docs/ARCHITECTURE.md: (module or package prefix, layer); the longest matching prefix wins
LAYERS = [
    ("minimind_jax", 1),  # the package's own names: settings and the model
    ("minimind_jax.config", 0), ("minimind_jax.precision", 0), ("minimind_jax.tokenizer", 0), ("minimind_jax.chat_render", 0),
    ("minimind_jax.chat_format", 0), ("minimind_jax.data", 0), ("minimind_jax.model", 1),
    ("minimind_jax.sharding", 2), ("minimind_jax.checkpoint", 2), ("convert", 3), ("minimind_jax.weights", 4),
    ("minimind_jax.lora", 4), ("minimind_jax.generate", 5), ("minimind_jax.evaluation.scoring", 5),
    ("minimind_jax.training", 6), ("minimind_jax.rl", 6), ("minimind_jax.engine", 6), ("minimind_jax.server", 7), ("minimind_jax.completions", 7),
    ("minimind_jax.evaluation", 7), ("convert.cli", 8), ("convert.__main__", 8), ("minimind_jax.evaluation.__main__", 8),
]


def _layer(module: str) -> int:
    matches = [(len(p), layer) for p, layer in LAYERS if module == p or module.startswith(p + ".")]
    assert matches, f"{module} has no layer in LAYERS (add it, and to docs/ARCHITECTURE.md)"
    return max(matches)[1]


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})" for a, deps in sorted(graph.items())
            for b in sorted(deps) if _layer(b) > _layer(a)]


def test_no_module_imports_a_layer_above_it():
    graph, _ = _scan()
    assert not _upward(graph), "imports against the layering of docs/ARCHITECTURE.md:\n" + "\n".join(_upward(graph))


def test_layer_check_finds_an_upward_import():
    assert _upward({"minimind_jax.model.layers": {"minimind_jax.training.loop"}, "minimind_jax.training.loop": set()})
    assert not _upward({"minimind_jax.training.loop": {"minimind_jax.model.layers"}, "minimind_jax.model.layers": set()})
