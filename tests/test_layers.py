"""The package's import graph: no circle, and the product does not depend on the lab.

The graph is read from the source with ast, so it holds every import: at module level, inside
functions (a lazy import is still a dependency) and under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import sidecar

PACKAGE = Path(sidecar.__file__).parent
# The lab (local clusters, network lab, demo) may be used by the CLI and the tools only.
LAB = "sidecar.lab"
LAB_USERS = ("sidecar.lab", "sidecar.cli", "sidecar.tools")


def _within(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The full names an import statement refers to (modules, or names inside modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        anchor = ".".join(package[:len(package) - node.level + 1])
        base = f"{anchor}.{base}" if base else anchor
    # "from . import logs" names a module; "from .config import Settings" a name in one.
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported(name, path, node):
                while target not in files and "." in target:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target in files and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def test_the_graph_is_read_whole() -> None:
    """The reader sees module-level, relative, function-level and absolute imports (a reader
    that saw none would find no circle)."""
    graph = import_graph()
    assert "sidecar.configcheck" in graph["sidecar.config"]  # from .configcheck import validate
    assert "sidecar.logs" in graph["sidecar.service"]  # from . import logs
    assert "sidecar.resource.address" in graph["sidecar.configcheck"]  # inside a function
    assert "sidecar.config" in graph["sidecar.tools.example_config"]  # from sidecar import config


def test_no_import_circle() -> None:
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        # graphlib lists the circle by "is imported by": reversed, each arrow reads "imports".
        raise AssertionError(f"import circle: {' -> '.join(reversed(exc.args[1]))}") from None


def test_the_product_does_not_import_the_lab() -> None:
    users = {name: sorted(t for t in targets if _within(t, (LAB,)))
             for name, targets in import_graph().items()
             if not _within(name, LAB_USERS)}
    assert {name: labs for name, labs in users.items() if labs} == {}


# The settings face (building, loading, flags) is for the entry points; the rooms read the
# Settings table from its leaf, sidecar.settings, so no room depends on the validators.
CONFIG = "sidecar.config"
CONFIG_USERS = ("sidecar.cli", "sidecar.service", "sidecar.tools", "sidecar.lab")


def test_the_rooms_read_settings_from_the_leaf() -> None:
    users = sorted(name for name, targets in import_graph().items()
                   if CONFIG in targets and not _within(name, CONFIG_USERS))
    assert users == []
