"""Dependencies point downward only: main -> api -> engine -> (Runner protocol) <- model,
and no module of app/ reaches itself through its imports.

Scans each module's imports (statically, with ast), so a stray `import torch` in the
scheduler or an `app.model` import in a route fails here, not in production. Every
import counts, type-only (`if TYPE_CHECKING:`) and function-level ones included: a type
that needs a circle to be named lives in the wrong file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"

# package (or module) -> import prefixes it must never use
FORBIDDEN = {
    "core.py": ("torch", "app.model", "app.engine", "app.api", "fastapi"),
    "engine": ("torch", "app.model", "app.api", "fastapi"),
    "api": ("torch", "app.model"),
    "model": ("app.api", "app.engine.engine", "app.engine.scheduler", "fastapi"),
    # grammar constraints: compiled without torch (the API calls it), below the engine
    "structured": ("torch", "app.model", "app.engine", "app.api", "fastapi"),
    # tool calls: the call format, its prompt fallback and parser, below the API
    "tools": ("torch", "app.model", "app.engine", "app.api", "fastapi"),
    # compiled kernels below the model: they know tensors and pointers, nothing of lamina
    "native": ("app.model", "app.engine", "app.api", "fastapi"),
    # the last minute's windows behind GET /status: fed per step, so plain Python only
    "live_stats.py": ("torch", "app.model", "app.engine", "app.api", "fastapi"),
    # the playground and dashboard pages: static files and the middleware serving them
    "ui": ("torch", "app.model", "app.engine", "app.api"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files_of(target: str) -> list[Path]:
    path = APP / target
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("target", sorted(FORBIDDEN))
def test_layer_imports_point_downward(target: str) -> None:
    files = files_of(target)
    assert files, f"nothing to check under app/{target}"
    violations = [
        f"{path.relative_to(APP.parent)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[target])
    ]
    assert not violations, "\n".join(violations)


TOLERATED_CYCLES: list[frozenset[str]] = []  # none: a new circle fails below


def module_name(path: Path, root: Path = APP) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_app_modules(path: Path, modules: set[str], root: Path = APP) -> Iterator[str]:
    """Every module of app/ that `path` imports, wherever the import statement is."""
    own = module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from app.native import build` names a module; `import NativeKernels` a name.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            targets = [t for t in targets[:-1] if t in modules] or [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module
                target = target.rpartition(".")[0]
            if target and target != own:
                yield target


def import_cycles(root: Path = APP) -> list[frozenset[str]]:
    """The strongly connected components of the import graph of the package at `root`
    with more than one module (Tarjan's algorithm)."""
    paths = {module_name(path, root): path for path in root.rglob("*.py")}
    modules = set(paths)
    graph = {name: set(imported_app_modules(path, modules, root)) for name, path in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[frozenset[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in graph[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = set()
            while not component or name not in component:
                component.add(stack.pop())
            if len(component) > 1:
                cycles.append(frozenset(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_no_module_of_app_imports_itself_back() -> None:
    cycles = import_cycles()
    untolerated = [sorted(c) for c in cycles if not any(c <= known for known in TOLERATED_CYCLES)]
    assert not untolerated, f"import circles: {untolerated}"
    gone = [sorted(known) for known in TOLERATED_CYCLES if not any(c <= known for c in cycles)]
    assert not gone, f"this circle is gone: delete it from TOLERATED_CYCLES: {gone}"


def test_the_cycle_finder_sees_type_only_and_function_level_imports(tmp_path: Path) -> None:
    package = tmp_path / "app" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from app.pkg.a import A\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from app.pkg import b\n"
    )
    (package / "b.py").write_text("def f():\n    from app.pkg.a import A\n")
    modules, root = {"app.pkg", "app.pkg.a", "app.pkg.b"}, tmp_path / "app"
    assert set(imported_app_modules(package / "a.py", modules, root)) == {"app.pkg.b"}
    assert set(imported_app_modules(package / "b.py", modules, root)) == {"app.pkg.a"}
    assert import_cycles(root) == [frozenset({"app.pkg.a", "app.pkg.b"})]
