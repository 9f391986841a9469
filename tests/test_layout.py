"""The layout (docs/layout.md): step keys hash module names and code, never file paths, so
moving the code under nightshift/ kept every store's keys; the public names are static."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

import nightshift

#: A fixed linear spec's steps, one of each built-in kind a spec names most.
STEPS = [
    {"map": {"columns": {"m": "n * 2"}}},
    {"filter": {"where": "n % 3 <> 0"}},
    {"dedup": {"on": ["text"]}},
    {"template": {"output": "p", "template": "Summarize: {{ text }}"}},
    {"rename": {"columns": {"p": "prompt"}}},
    {"generate": {"prompt": "{{ prompt }}", "output": "summary"}},
    {"judge": {"input": "summary", "rubric": "fluency", "output": "score"}},
    {"select": {"columns": ["text", "summary", "score"]}},
]

#: Each step's key, chained from the upstream key "source" with a fixed serving identity,
#: as computed by the same code (KEYS_SCRIPT) on commit 8e0cc4c, the last one before the
#: move under nightshift/ (its top-level folders mapped to nightshift.<folder>). A
#: difference means stores written before recompute that step and everything after it.
KEYS_BEFORE_THE_MOVE = [
    ("tasks.operators.map:Map", "fa9f88902557c2fa404bc5e43b16bdaaa6f9c9e4ac4337a68387d1e50d589df3"),
    (
        "tasks.operators.filter:Filter",
        "2534a7d20762f3d84e22e94d0db972de5da75c8b9ac378f753938e1eb02dd47e",
    ),
    (
        "tasks.operators.dedup:Dedup",
        "e37bd79f9e7085c91664e2ff63cce33747ae760f443d1affe8852e042abd2c7a",
    ),
    (
        "tasks.operators.template:Template",
        "231c79e2b92c02bddcd5ab750ba4e7ba4d375730ba5a2a2b159231f6dc6512c7",
    ),
    (
        "tasks.operators.columns:Rename",
        "f746622ae8ed82d5b6f874472e6d81fdf60e9a98beb023d954d2c46853a1f267",
    ),
    (
        "tasks.operators.generate:Generate",
        "860fd373f3083996ff4b2317cb128ea2344c59ae812a43ba72500ff1a2472870",
    ),
    (
        "tasks.operators.judge:Judge",
        "db937564b318ff12ec1c5fb289ebed5a2f5a983e14e3cca76cf423ffe0460ada",
    ),
    (
        "tasks.operators.columns:Select",
        "c42e7a2569c6f11b7c43417ba770dcc588a7fcc2d58034e1ede66e15ffc9c281",
    ),
]

KEYS_SCRIPT = f"""
import json
from nightshift.tasks.operators.base import _keyed_path
from nightshift.tasks.spec import load_spec

spec = load_spec({{
    "name": "keys",
    "source": {{"path": "in.jsonl"}},
    "store": {{"url": "file:///tmp/nightshift-keys-store"}},
    "steps": {STEPS!r},
}})
up, keys = "source", []
context = {{"serving": {{"default": {{"model": "smollm2", "weights": "fixed"}}}}}}
for node in spec.step_nodes(False):
    up = node.operator.fingerprint(up, context)
    keys.append((_keyed_path(node.operator.import_path()), up))
print(json.dumps(keys))
"""


def step_keys(pythonpath: Path, cwd: Path) -> tuple[list[tuple[str, str]], str]:
    """The keys, computed in a fresh interpreter importing nightshift from ``pythonpath``;
    and the file the package was imported from."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    script = KEYS_SCRIPT + "\nimport nightshift, sys; print(nightshift.__file__, file=sys.stderr)"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return [tuple(k) for k in json.loads(done.stdout)], done.stderr.strip().splitlines()[-1]


def test_step_keys_are_the_ones_from_before_the_move() -> None:
    keys, origin = step_keys(ROOT, ROOT)
    assert Path(origin) == ROOT / "nightshift" / "__init__.py"
    assert keys == KEYS_BEFORE_THE_MOVE, (
        "a step key changed: stores written before recompute from that step on "
        "(an operator's code, config or keyed import path changed; docs/layout.md)"
    )


def test_step_keys_do_not_depend_on_where_the_files_are(tmp_path: Path) -> None:
    """The same package copied elsewhere (another clone, site-packages) gives the same
    keys: they carry module names and source text, never a file path."""
    shutil.copytree(
        ROOT / "nightshift",
        tmp_path / "elsewhere" / "nightshift",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    keys, origin = step_keys(tmp_path / "elsewhere", tmp_path)
    assert Path(origin) == tmp_path / "elsewhere" / "nightshift" / "__init__.py"
    assert keys == KEYS_BEFORE_THE_MOVE


def test_the_public_names_are_spelled_out() -> None:
    """``__all__`` is a literal list (editors and type checkers read it) naming exactly
    what ``nightshift.<name>`` loads on first use."""
    assert sorted(nightshift.__all__) == sorted([*nightshift._WHERE, "ops"])
    for name in nightshift.__all__:
        assert getattr(nightshift, name) is not None


def test_the_root_folders_are_links_into_the_package() -> None:
    """Prefect's project folders stay at the root (prefect.yaml, the design card) as links
    into the one package, so nothing is importable under a second name."""
    for folder in ("flows", "tasks", "blocks"):
        link = ROOT / folder
        assert link.is_symlink(), f"{folder}/ should be a link into nightshift/"
        assert link.resolve() == (ROOT / "nightshift" / folder).resolve()
    assert (ROOT / "nightshift" / "py.typed").is_file()
