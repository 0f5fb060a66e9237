"""The shape of the code, read from the source alone (no imports run): the import graphs of attnlab and of
benchmarks/, the dvc.yaml deps each stage needs, function lengths and folder sizes. Used by
tests/unit/test_structure.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "attnlab"
BENCHMARKS = ROOT / "benchmarks"
PACKAGES = {"attnlab": SRC, "benchmarks": ROOT}  # our top-level packages -> the folder each lives in


def module_path(name: str, packages: dict[str, Path] = PACKAGES) -> Path | None:
    """attnlab.x.y or benchmarks.x -> its file (module or package __init__), or None when it is not ours."""
    top = name.split(".")[0]
    if top not in packages:
        return None
    base = packages[top].joinpath(*name.split("."))
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    return None


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, packages: dict[str, Path] = PACKAGES) -> set[str]:
    """Every module of ours the file imports anywhere (module level or inside functions), with the packages
    that importing it runs (attnlab/__init__.py, attnlab/core/__init__.py, ...)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if module_path(candidate, packages) is not None:
                    found.add(candidate)
    return found


def import_graph(package: Path = PACKAGE, packages: dict[str, Path] = PACKAGES) -> dict[str, set[str]]:
    """module of `package` -> the modules of ours it imports directly (a package's __init__ counts as that
    package)."""
    graph = {}
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package.parent)
        graph[name] = {m for m in imported_modules(path, packages) if m != name and not name.startswith(m + ".")}
    return graph


def closure(start: set[str], graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph.get(name, ())
    return seen


def dep_path(module: str) -> str:
    """The dvc.yaml dep that covers a module: its sub-package folder, or the file of a top-level module."""
    path = module_path(module)
    rel = path.relative_to(ROOT)
    if len(rel.parts) > 4 or (len(rel.parts) == 4 and rel.name != "__init__.py"):  # src/attnlab/<pkg>/...
        return "/".join(rel.parts[:3])
    if rel.name == "__init__.py" and len(rel.parts) == 4:
        return "/".join(rel.parts[:3])
    return rel.as_posix()


def needed_deps(script: Path) -> set[str]:
    """The src deps a stage script needs: every folder or top-level file it runs code from."""
    modules = closure(imported_modules(script), import_graph())
    return {dep_path(m) for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def long_functions(folders: list[Path], limit: int) -> list[str]:
    """'path:line name (N lines)' for every function longer than limit lines (decorators and docstring in)."""
    out = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > limit:
                        out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out
