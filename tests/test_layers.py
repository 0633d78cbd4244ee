"""The layer order, enforced: runtime/ at the bottom (never torch), exporter/ and graphs/ on it (independent of each
other), workflows above them, the CLI on top. Every import counts, also one inside a function.

import-linter cannot check this layout (its graph builder walks the package's own directory, and pyproject maps the
three repository folders into bigcode_deploy from outside it), so this test does the same with ast.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # repository folder -> (package, packages it may import)
    "runtime": ("bigcode_deploy.runtime", ()),
    "graphs": ("bigcode_deploy.graphs", ("bigcode_deploy.runtime",)),
    "exporter": ("bigcode_deploy.exporter", ("bigcode_deploy.runtime",)),
    "bigcode_deploy/workflows": (
        "bigcode_deploy.workflows",
        ("bigcode_deploy.runtime", "bigcode_deploy.exporter", "bigcode_deploy.graphs"),
    ),
}
FORBIDDEN_EXTERNAL = {"runtime": ("torch", "transformers", "optimum"), "graphs": ("torch", "transformers", "optimum")}
OUR_TOP_LEVEL = ("runtime", "exporter", "graphs")  # the old top-level names must not be imported at all


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an import statement names, anywhere in the source (relative imports resolved against package)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def violations(folder: str) -> list[str]:
    package, allowed = LAYERS[folder]
    allowed = (package, *allowed)
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_modules(path.read_text(), package):
            top = name.split(".")[0]
            if name.startswith("bigcode_deploy.") and not any(name == a or name.startswith(a + ".") for a in allowed):
                if name.count(".") >= 1 and name.split(".")[1] in ("runtime", "exporter", "graphs", "workflows", "cli"):
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
            if top in FORBIDDEN_EXTERNAL.get(folder, ()):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
            if top in OUR_TOP_LEVEL:
                found.append(f"{path.relative_to(ROOT)} imports the top-level name {name}")
    return found


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_layer_imports_point_down(folder):
    assert violations(folder) == []


def test_the_checker_sees_imports_inside_functions():
    source = "def f():\n    import torch\n    from bigcode_deploy.exporter.model import build_model\n"
    names = imported_modules(source, "bigcode_deploy.runtime")
    assert {"torch", "bigcode_deploy.exporter.model"} <= names
    assert "bigcode_deploy.graphs.pipeline" in imported_modules(
        "from ..graphs import pipeline", "bigcode_deploy.runtime"
    )
