"""Operator code versions: change with the code, stable across processes, no AST parse."""

from __future__ import annotations

import ast
import subprocess
import sys

import polars as pl
import pytest
from conftest import ROOT

from nightshift.core.fingerprints import code_version
from nightshift.tasks.operators import Filter, Operator


class Shout(Operator):
    column: str

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(pl.col(self.column).str.to_uppercase())


class ShoutEdited(Operator):
    column: str

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(pl.col(self.column).str.to_lowercase())


class ShoutRenamed(Shout):
    fusable = False


def test_code_version_follows_the_code() -> None:
    assert code_version(Shout).split(":")[1] != code_version(ShoutEdited).split(":")[1]
    assert code_version(ShoutRenamed) != code_version(Shout)  # a class attribute changed
    assert Shout(column="a").fingerprint("up") != ShoutEdited(column="a").fingerprint("up")


def test_code_version_is_stable_across_processes() -> None:
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "from nightshift.core.fingerprints import code_version; from nightshift.tasks.operators import Filter;"
            "print(code_version(Filter))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert other.stdout.strip() == code_version(Filter)


def test_code_version_builds_no_ast(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ast.parse called: not thread-safe on CPython 3.11.7")

    code_version.cache_clear()
    monkeypatch.setattr(ast, "parse", refuse)
    assert code_version(ShoutEdited).startswith("1:")


def test_step_keys_do_not_depend_on_the_package_name() -> None:
    """Built-in operators carry their module path as it was before the folders became
    nightshift.<folder> packages, so stores written before keep their keys and resume."""
    from nightshift.tasks.operators import Map
    from nightshift.tasks.operators.base import _keyed_path

    op = Map(columns={"m": "n * 2"})
    assert op.import_path() == "nightshift.tasks.operators.map:Map"
    assert _keyed_path(op.import_path()) == "tasks.operators.map:Map"
    assert _keyed_path("my_ops:Upper") == "my_ops:Upper"
