"""Dependencies point downward only: main -> api -> engine -> (Runner protocol) <- model.

Scans each module's imports (statically, with ast), so a stray `import torch` in the
scheduler or an `app.model` import in a route fails here, not in production.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"

# package (or module) -> import prefixes it must never use
FORBIDDEN = {
    "core.py": ("torch", "app.model", "app.engine", "app.api", "fastapi"),
    "engine": ("torch", "app.model", "app.api", "fastapi"),
    "api": ("torch", "app.model"),
    "model": ("app.api", "app.engine.engine", "app.engine.scheduler", "fastapi"),
    # compiled kernels below the model: they know tensors and pointers, nothing of lamina
    "native": ("app.model", "app.engine", "app.api", "fastapi"),
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
