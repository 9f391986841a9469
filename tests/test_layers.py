"""Imports between the top-level folders run one way (docs/layout.md).

Every ``.py`` file under the package folders is parsed with ``ast``; every ``import`` and
``from ... import`` counts, at module level, inside functions and under
``if TYPE_CHECKING:`` alike (a lazy import is still a dependency). Each import is mapped to
the folder it names (``nightshift.tasks.step_task`` -> ``tasks``). The test fails, naming
the file, the line and the import, when a folder imports one above it in ``LAYERS`` or
when the folders' imports form a cycle.
"""

from __future__ import annotations

import ast
import itertools
import os
from collections import defaultdict
from pathlib import Path

import pytest

#: The tree checked: this checkout, or another one (NIGHTSHIFT_LAYERS_ROOT=/path/to/tree).
ROOT = Path(os.environ.get("NIGHTSHIFT_LAYERS_ROOT") or Path(__file__).resolve().parent.parent)

#: The key under which imports through an old top-level name are collected.
OLD = "<old top-level name>"

#: The one declaration of the order, bottom to top: a folder may import the folders
#: before it (and itself), never one after it. ``nightshift/`` is the public surface
#: (``from nightshift import Pipeline``, ``nightshift.ops``) on top of everything.
LAYERS = ("core", "blocks", "serving", "tasks", "streams", "flows", "nightshift")

#: The import name of each folder (each is a subpackage of ``nightshift/``).
PACKAGE = {folder: f"nightshift.{folder}" for folder in LAYERS if folder != "nightshift"}

#: Top-level names a module must never import: the folders' old top-level names (each
#: module has one import name, ``nightshift.<folder>...``).
OLD_NAMES = frozenset(PACKAGE)


def folder_of(module: str) -> str | None:
    """``nightshift.tasks.step_task`` -> ``tasks``; ``nightshift`` -> ``nightshift``.

    An old top-level name (``tasks.step_task``) maps to its folder too, so the order and
    cycle checks also read a tree from before the package mapping."""
    parts = module.split(".")
    if parts[0] in OLD_NAMES:
        return parts[0]
    if parts[0] != "nightshift":
        return None
    if len(parts) > 1 and parts[1] in PACKAGE:
        return parts[1]
    return "nightshift"


def folder_path(root: Path, folder: str) -> Path:
    """Where a layer's files are: ``nightshift/<folder>``; the public surface is the
    package's own top-level modules (``nightshift/__init__.py``, ``nightshift/ops.py``)."""
    return root / "nightshift" if folder == "nightshift" else root / "nightshift" / folder


def layer_files(root: Path, folder: str) -> list[Path]:
    base = folder_path(root, folder)
    return sorted(base.glob("*.py") if folder == "nightshift" else base.rglob("*.py"))


def imports(path: Path, folder: str, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``path``, functions included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(path, folder, root)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # ``from nightshift import flows`` names the folder through the package
            if module == "nightshift":
                found.extend(
                    (node.lineno, f"nightshift.{a.name}") for a in node.names if a.name in PACKAGE
                )
    return found


def _package_of(path: Path, folder: str, root: Path) -> str:
    rel = path.relative_to(folder_path(root, folder)).parent.parts
    top = "nightshift" if folder == "nightshift" else PACKAGE[folder]
    return ".".join((top, *rel))


def edges(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importer folder, imported folder) -> ['file:line import', ...] across folders."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for folder in LAYERS:
        for path in layer_files(root, folder):
            for line, module in imports(path, folder, root):
                where = f"{path.relative_to(root)}:{line} imports {module}"
                if module.split(".")[0] in OLD_NAMES:
                    found[(folder, OLD)].append(where)
                target = folder_of(module)
                if target is not None and target != folder:
                    found[(folder, target)].append(where)
    return found


def upward(found: dict[tuple[str, str], list[str]]) -> list[str]:
    rank = {folder: i for i, folder in enumerate(LAYERS)}
    return [
        f"{where} ({src} sits below {dst})"
        for (src, dst), places in sorted(found.items())
        if dst in rank and rank[dst] > rank[src]
        for where in places
    ]


def cycles(found: dict[tuple[str, str], list[str]]) -> list[str]:
    """Each cycle between folders once, as 'a -> b -> a' with the imports that close it."""
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in found:
        if dst in LAYERS:
            graph[src].add(dst)
    seen: set[frozenset[str]] = set()
    out: list[str] = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycle = [*path, start]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    detail = "; ".join(found[(a, b)][0] for a, b in itertools.pairwise(cycle))
                    out.append(f"{' -> '.join(cycle)}: {detail}")
            elif nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return out


def test_every_module_belongs_to_a_layer():
    """Each module under nightshift/ is in exactly one layer; the Prefect-facing folders
    at the root (flows/, tasks/, blocks/) are the package's own folders, not copies."""
    package = ROOT / "nightshift"
    assert all(folder_path(ROOT, folder).is_dir() for folder in LAYERS)
    inside = {p for folder in LAYERS for p in layer_files(ROOT, folder)}
    assert inside == set(package.rglob("*.py"))
    for folder in ("flows", "tasks", "blocks"):
        assert (ROOT / folder).resolve() == (package / folder).resolve(), folder


def test_no_module_imports_an_old_top_level_name():
    """One name per module: ``nightshift.flows.cli``, never ``flows.cli`` (in the same
    process the two would be two modules), in the package, the tests and benchmarks."""
    old = [
        where for (_, dst), places in sorted(edges(ROOT).items()) if dst == OLD for where in places
    ]
    for folder in ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else []
                )
                old.extend(
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                    for name in names
                    if name.split(".")[0] in OLD_NAMES
                )
    assert old == [], "import through the package name, nightshift.<folder>:\n" + "\n".join(old)


def test_no_folder_imports_one_above_it():
    bad = upward(edges(ROOT))
    assert bad == [], f"imports against the layer order {LAYERS}:\n" + "\n".join(bad)


def test_no_cycle_between_folders():
    found = cycles(edges(ROOT))
    assert found == [], "import cycles between top-level folders:\n" + "\n".join(found)


@pytest.mark.parametrize("kind", ["function", "type_checking"])
def test_the_checker_sees_lazy_imports(tmp_path, kind):
    """A cycle closed by a function-local or TYPE_CHECKING import is still a cycle."""
    for folder in LAYERS:
        folder_path(tmp_path, folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / "nightshift" / "core" / "a.py").write_text(
        "def f():\n    from nightshift.tasks import x\n"
        if kind == "function"
        else "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nightshift.tasks import x\n"
    )
    (tmp_path / "nightshift" / "tasks" / "b.py").write_text("from nightshift.core import a\n")
    found = edges(tmp_path)
    assert (
        upward(found) == ["nightshift/core/a.py:2 imports nightshift.tasks (core sits below tasks)"]
        if kind == "function"
        else ["nightshift/core/a.py:3 imports nightshift.tasks (core sits below tasks)"]
    )
    assert len(cycles(found)) == 1
