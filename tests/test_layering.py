"""The layering of DESIGN §2: rayjobs -> tuning -> training -> operators, read from the imports
of every module (top level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# layer -> top-level packages it must not import
FORBIDDEN = {
    "operators": {"ray", "rayjobs", "tuning", "training"},
    "training": {"rayjobs", "tuning"},
    "tuning": {"rayjobs"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level package names imported anywhere in a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_no_higher_layer(layer: str) -> None:
    offences = {str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[layer])
                for path in sorted((REPO / layer).rglob("*.py"))}
    assert {k: v for k, v in offences.items() if v} == {}


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import ray.data\n    from rayjobs.config import load_config\n")
    assert imported_packages(module) == {"ray", "rayjobs"}
