"""The project's import boundaries, read from the source with ``ast`` (no module is imported):

* ``client/`` (the hospital's ClientApp and command) never imports ``server``;
* ``server/`` (the coordinator's ServerApp, strategies and command) never imports ``client``;
* ``shared/`` imports neither of them, and no Flower: what both sides need lives there once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth (function bodies included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path)
                     if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("client", ("server",)),
    ("server", ("client",)),
    ("shared", ("client", "server", "flwr", "simulations")),
])
def test_package_does_not_import_across_its_boundary(package, forbidden):
    assert list((REPO / package).rglob("*.py")), f"{package}/ has no modules: the test reads nothing"
    assert offending(package, forbidden) == {}


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import hidden in a function body is still found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from server.loop import run_server\n    import flwr.app\n")
    assert imported_modules(module) == {"server.loop", "flwr.app"}
