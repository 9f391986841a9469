"""Rules of the code itself, read with ``ast`` (issue 23, "each rule in one place"): no
import cycle between modules, attributes set in ``__init__``, one verbose switch, no
logging filter installed at import time; and what the rules keep (step keys)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nightshift"

#: Attributes first set outside ``__init__`` that are another change's to fix (the
#: serving layer is reworked beside this one); each entry names its class and attribute.
LATE_ATTRIBUTES_LEFT = {
    "nightshift/serving/http/limits.py": {"TokenBucket.per_minute", "TokenBucket.capacity"},
    "nightshift/serving/http/backend.py": {
        "OpenAIBackend.fleet",
        "OpenAIBackend._queue",
        "OpenAIBackend._lanes",
    },
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in it (lazy imports count)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def test_no_import_cycle_between_modules() -> None:
    """``tasks/spec.py`` and ``tasks/dag.py`` imported each other (a function-local import
    of ``validation_message``); no two modules may (the layer test sees folders only)."""
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def late_attributes(path: Path) -> set[str]:
    """``Class.attr`` for every ``self.attr`` a method sets that ``__init__`` does not."""
    late = set()
    for cls in [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)]:
        methods = [f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if not any(f.name == "__init__" for f in methods):
            continue  # pydantic models, dataclasses: their fields are declared
        in_init: set[str] = set()
        elsewhere: set[str] = set()
        for method in methods:
            for node in ast.walk(method):
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                    targets = [node.target]
                else:
                    continue
                for target in targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "self"
                    ):
                        (in_init if method.name == "__init__" else elsewhere).add(target.attr)
        late |= {f"{cls.name}.{attr}" for attr in elsewhere - in_init}
    return late


def test_attributes_are_set_in_init() -> None:
    """Every attribute a class's methods set exists from ``__init__`` on (``StreamRuntime``
    set 14 of them first in ``run`` and ``_loop``)."""
    found = {}
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        late = late_attributes(path) - LATE_ATTRIBUTES_LEFT.get(rel, set())
        if late:
            found[rel] = sorted(late)
    assert not found, found


def test_one_verbose_switch() -> None:
    """``NIGHTSHIFT_LOG_LEVEL`` is read in one place, ``nightshift.core.verbose``."""
    readers = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == "NIGHTSHIFT_LOG_LEVEL":
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers == ["nightshift/core/verbose.py:20"], readers


def test_the_verbose_switch_drives_engines_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from nightshift.core.verbose import is_verbose, set_verbose
    from nightshift.serving.vllm_backend import engine_logs_verbose

    monkeypatch.delenv("NIGHTSHIFT_LOG_LEVEL", raising=False)
    assert not is_verbose() and not engine_logs_verbose()
    set_verbose()
    assert os.environ["NIGHTSHIFT_LOG_LEVEL"] == "DEBUG"  # worker processes see it too
    assert is_verbose() and engine_logs_verbose()
    set_verbose(False)
    assert not is_verbose()
    monkeypatch.setenv("NIGHTSHIFT_LOG_LEVEL", " debug ")
    assert is_verbose()


def test_no_logging_filter_is_installed_at_import_time() -> None:
    """Importing the flows changes no logger; a Nightshift flow installs its filters (once)
    as it starts (``tests/test_cli.py`` runs one that fails: one line, no traceback)."""
    code = (
        "import logging\n"
        "import nightshift.flows.cli, nightshift.flows.nightly, nightshift.flows.pipeline\n"
        "import nightshift.flows.run_pipeline, nightshift.flows.stream\n"
        "names = ('prefect.task_runs', 'prefect.flow_runs')\n"
        "print([len(logging.getLogger(n).filters) for n in names])\n"
        "from nightshift.flows.log_filters import install_log_filters\n"
        "install_log_filters(); install_log_filters()\n"
        "print([len(logging.getLogger(n).filters) for n in names])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # task runs: the state-line filter and the one-line errors; flow runs: the latter
    assert result.stdout.split() == ["[0,", "0]", "[2,", "1]"], result.stdout


def test_one_line_errors_drop_only_nightshift_tracebacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging

    from nightshift.core.errors import SpecError
    from nightshift.flows.log_filters import OneLineErrors

    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "x", logging.ERROR, "f", 1, "failed", None, (type(error), error, None)
        )

    monkeypatch.delenv("NIGHTSHIFT_LOG_LEVEL", raising=False)
    ours, other = record(SpecError("steps[0]: bad")), record(ValueError("bug"))
    assert OneLineErrors().filter(ours) and ours.exc_info is None
    assert OneLineErrors().filter(other) and other.exc_info is not None
    monkeypatch.setenv("NIGHTSHIFT_LOG_LEVEL", "DEBUG")
    kept = record(SpecError("steps[0]: bad"))
    assert OneLineErrors().filter(kept) and kept.exc_info is not None


def test_safe_on_sample_keeps_step_keys() -> None:
    """Saying that a step is safe on sample rows changes what validate does, not what the
    step computes: its code version (part of every step key) stays."""
    from nightshift.core.fingerprints import code_version
    from nightshift.tasks.operators import Operator

    class Plain(Operator):
        name = "plain_for_keys"

    class Safe(Operator):
        name = "plain_for_keys"
        safe_on_sample = True

    code_version.cache_clear()
    assert code_version(Safe) == code_version(Plain)
