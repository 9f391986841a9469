"""``parse_json``: a JSON reply becomes typed columns.

``parse_json: {column: reply, into: {questions: "list[string]", difficulty: int}}`` reads
each row's ``reply`` (a JSON object) and writes one column per ``into`` key, typed;
``into: auto`` takes the keys and types from the ``json_schema`` of the ``generate`` step
that wrote ``reply`` (resolved at validate; the schema must be an object with
``properties``).

* **Types**: ``string``, ``int``, ``float`` (an integer is accepted), ``bool``,
  ``list[T]`` (nested lists stay lists: ``list[list[int]]``) and ``json`` (the value's
  JSON text, for anything else). From a JSON schema: ``string``, ``integer``,
  ``number``, ``boolean``, ``array`` (of ``items``), ``object`` with ``properties``
  (a struct column); other schemas keep their JSON text.
* **Errors**: a reply that does not parse, is not an object, lacks a key or has a value of
  another type gives that row null columns and the reason in ``<column>_error``, never a
  failed batch; the batch fails only when more than ``max_error_rate`` of its replies
  do. A key that is present with ``null`` gives a null. A null reply (the LLM call failed)
  is no new error: ``<column>_error`` keeps what the generate step wrote there.
* An unknown type fails ``validate``, naming the step.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import polars as pl
from pydantic import Field, field_validator

from nightshift.core.errors import SpecError, StepFailed
from nightshift.tasks.operators.base import ROW_ID, Operator, register_operator

_SCALARS: dict[str, pl.DataType] = {
    "string": pl.String(),
    "str": pl.String(),
    "int": pl.Int64(),
    "integer": pl.Int64(),
    "float": pl.Float64(),
    "number": pl.Float64(),
    "bool": pl.Boolean(),
    "boolean": pl.Boolean(),
    "json": pl.String(),
}
_LIST = re.compile(r"^\s*list\s*[\[(]\s*(.+?)\s*[\])]\s*$")
#: a type the reply's value is checked against (a scalar name, ("list", T) or a struct)
Kind = Any


def parse_type(text: str) -> Kind:
    """``"list[int]"`` -> ``("list", "int")``; an unknown type is a ValueError."""
    match = _LIST.match(text)
    if match:
        return ("list", parse_type(match.group(1)))
    name = text.strip().lower()
    if name not in _SCALARS:
        raise ValueError(f"unknown type {text!r} (known: string, int, float, bool, json, list[T])")
    return name


def kind_from_schema(schema: dict[str, Any]) -> Kind:
    """The kind of a JSON-schema value (see the module docstring)."""
    kind = schema.get("type")
    if kind == "array" and isinstance(schema.get("items"), dict):
        return ("list", kind_from_schema(schema["items"]))
    if kind == "object" and isinstance(schema.get("properties"), dict):
        return {k: kind_from_schema(v) for k, v in schema["properties"].items()}
    if isinstance(kind, str) and kind in _SCALARS and kind != "json":
        return kind
    return "json"


def dtype_of(kind: Kind) -> pl.DataType:
    if isinstance(kind, tuple):
        return pl.List(dtype_of(kind[1]))
    if isinstance(kind, dict):
        return pl.Struct({k: dtype_of(v) for k, v in kind.items()})
    return _SCALARS[kind]


def _convert(value: Any, kind: Kind, where: str) -> Any:
    """``value`` checked against ``kind`` (a ValueError naming ``where`` if it is not)."""
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, ensure_ascii=False)
    if isinstance(kind, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{where} is {_name(value)}, not a list")
        return [_convert(v, kind[1], f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{where} is {_name(value)}, not an object")
        return {k: _convert(value.get(k), v, f"{where}.{k}") for k, v in kind.items()}
    ok = {
        "string": isinstance(value, str),
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[kind]
    if not ok:
        raise ValueError(f"{where} is {_name(value)}, not {kind}")
    return float(value) if kind in ("float", "number") else value


def _name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


@register_operator
class ParseJson(Operator):
    """``parse_json: {column: reply, into: {name: type, ...}}`` or ``into: auto``."""

    name = "parse_json"
    column: str
    into: dict[str, str] | Literal["auto"] = "auto"
    max_error_rate: float = Field(default=0.1, ge=0, le=1)
    #: ``into: auto`` resolved from the upstream ``generate``'s json_schema (validate
    #: fills it in: ``tasks/dag.py``); part of the fingerprint, so a schema change
    #: recomputes this step
    resolved: dict[str, Any] | None = None

    @field_validator("into")
    @classmethod
    def _known_types(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if not value:
                raise ValueError("into names no column")
            for name, text in value.items():
                try:
                    parse_type(text)
                except ValueError as exc:
                    raise ValueError(f"column {name!r}: {exc}") from None
        return value

    def kinds(self) -> dict[str, Kind]:
        if isinstance(self.into, dict):
            return {name: parse_type(text) for name, text in self.into.items()}
        if self.resolved is None:
            raise SpecError(
                f"into: auto needs the generate step that writes {self.column!r} to have a "
                "json_schema (an object with properties) upstream; or give into: {name: type}"
            )
        return {name: kind_from_schema(s) for name, s in self.resolved.items()}

    def reads(self) -> list[str]:
        return [self.column]

    def writes(self) -> list[str]:
        names = list(self.into) if isinstance(self.into, dict) else list(self.resolved or {})
        return [*names, self.error_column()]

    def error_column(self) -> str:
        return f"{self.column}_error"

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        kinds = self.kinds()
        dtype = df.schema[self.column]
        if dtype not in (pl.String, pl.Null):
            raise SpecError(
                f"column {self.column!r} is {dtype}, not a string of JSON"
                + (" (explode the list first)" if isinstance(dtype, pl.List) else "")
            )
        columns: dict[str, list[Any]] = {name: [] for name in kinds}
        errors: list[str | None] = []
        failed = 0
        first: str | None = None
        for row_id, text in zip(df.get_column(ROW_ID), df.get_column(self.column), strict=True):
            values, error = self._parse_one(text, kinds)
            for name in kinds:
                columns[name].append(values.get(name) if values else None)
            errors.append(error)
            if error is not None:
                failed += 1
                first = first or f"row {row_id}: {error}"
        replies = df.height - df.get_column(self.column).null_count()
        if replies and failed / replies > self.max_error_rate:
            raise StepFailed(
                f"{failed}/{replies} replies failed to parse ({100 * failed / replies:.0f}% > "
                f"max_error_rate {100 * self.max_error_rate:.0f}%); first: {first}"
            )
        new_errors = pl.Series(self.error_column(), errors, dtype=pl.String)
        if self.error_column() in df.columns:  # keep the generate step's own errors
            new_errors = df.get_column(self.error_column()).cast(pl.String).fill_null(new_errors)
        return df.with_columns(
            *(pl.Series(name, columns[name], dtype=dtype_of(kind)) for name, kind in kinds.items()),
            new_errors.alias(self.error_column()),
        )

    def _parse_one(
        self, text: str | None, kinds: dict[str, Kind]
    ) -> tuple[dict | None, str | None]:
        if text is None:
            return None, None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, f"reply is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        if not isinstance(value, dict):
            return None, f"reply is {_name(value)}, not a JSON object"
        missing = [k for k in kinds if k not in value]
        if missing:
            return None, f"reply has no key {missing[0]!r}"
        try:
            return {k: _convert(value[k], kind, k) for k, kind in kinds.items()}, None
        except ValueError as exc:
            return None, f"reply does not match: {exc}"
