"""Decode: JSON messages to rows of the spec's schema; what does not fit is a dead letter.

Every message becomes one row with ``_row_id`` = its JetStream stream sequence (the
idempotency key of every sink), the declared columns, and the requested metadata
columns. A message is a dead letter, with a one-line reason, when it is not JSON, not a
JSON object, lacks a required field, has a value of the wrong type, or when the spec's
``validate`` SQL expression is not true for its row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl

from nightshift.core.errors import SpecError, one_line
from nightshift.tasks.operators import ROW_ID
from nightshift.tasks.operators.sql import sql_expr

if TYPE_CHECKING:
    from nightshift.streams.spec import DecodeSpec

DTYPES: dict[str, pl.DataType] = {
    "string": pl.String(),
    "int": pl.Int64(),
    "float": pl.Float64(),
    "bool": pl.Boolean(),
    "datetime": pl.Datetime("us", "UTC"),
    "json": pl.String(),
}
METADATA_COLUMNS: dict[str, tuple[str, pl.DataType]] = {
    "subject": ("_subject", pl.String()),
    "published": ("_published", pl.Datetime("us", "UTC")),
    "msg_id": ("_msg_id", pl.String()),
}


@dataclass(frozen=True)
class RawMessage:
    """What decoding needs of a JetStream message (no NATS types: testable alone)."""

    seq: int
    data: bytes
    subject: str
    published: dt.datetime
    msg_id: str | None = None


class BadValue(ValueError):
    pass


def _string(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise BadValue(f"expected a string, got {_kind(v)}")


def _int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        if -(2**63) <= v < 2**63:
            return v
        raise BadValue("integer out of the 64-bit range")
    raise BadValue(f"expected an integer, got {_kind(v)}")


def _float(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise BadValue(f"expected a number, got {_kind(v)}")


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise BadValue(f"expected true or false, got {_kind(v)}")


def _datetime(v: Any) -> dt.datetime:
    if not isinstance(v, str):
        raise BadValue(f"expected an ISO 8601 date-time string, got {_kind(v)}")
    try:
        value = dt.datetime.fromisoformat(v)
    except ValueError:
        raise BadValue(f"not an ISO 8601 date-time: {v[:40]!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _json(v: Any) -> str:
    return orjson.dumps(v).decode()


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "string": _string,
    "int": _int,
    "float": _float,
    "bool": _bool,
    "datetime": _datetime,
    "json": _json,
}


def _kind(v: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


class Decoder:
    """Decode batches of messages for one stream (``decode:`` of its spec)."""

    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec
        self.required = set(spec.required)
        self.converters = [(name, CONVERTERS[kind]) for name, kind in spec.columns.items()]
        self.validate = (
            sql_expr(spec.validate_expr, "decode.validate") if spec.validate_expr else None
        )
        schema: dict[str, pl.DataType] = {ROW_ID: pl.UInt64()}
        schema.update({name: DTYPES[kind] for name, kind in spec.columns.items()})
        schema.update(dict(METADATA_COLUMNS[m] for m in spec.metadata))
        self.schema = pl.Schema(schema)
        if self.validate is not None:
            try:
                dtype = (
                    pl.DataFrame(schema=self.schema)
                    .lazy()
                    .select(self.validate)
                    .collect_schema()
                    .dtypes()[0]
                )
            except Exception as exc:
                raise SpecError(f"decode.validate: {one_line(exc)}") from None
            if dtype != pl.Boolean:
                raise SpecError(
                    f"decode.validate {spec.validate_expr!r} gives {dtype}, not a boolean"
                )

    def row(self, message: RawMessage) -> dict[str, Any]:
        """One message's row; raises :class:`BadValue` with the reason."""
        try:
            value = orjson.loads(message.data)
        except orjson.JSONDecodeError as exc:
            raise BadValue(f"not valid JSON: {one_line(exc, 120)}") from None
        if not isinstance(value, dict):
            raise BadValue(f"expected a JSON object, got {_kind(value)}")
        row: dict[str, Any] = {ROW_ID: message.seq}
        for name, convert in self.converters:
            field = value.get(name)
            if field is None:
                if name in self.required:
                    raise BadValue(f"missing required field {name!r}")
                row[name] = None
                continue
            try:
                row[name] = convert(field)
            except BadValue as exc:
                raise BadValue(f"field {name!r}: {exc}") from None
        for m in self.spec.metadata:
            row[METADATA_COLUMNS[m][0]] = (
                message.subject
                if m == "subject"
                else message.published
                if m == "published"
                else message.msg_id
            )
        return row

    def decode(
        self, messages: list[RawMessage]
    ) -> tuple[list[dict[str, Any]], list[tuple[RawMessage, str]]]:
        """Rows of the good messages and ``(message, reason)`` for the dead letters."""
        rows: list[dict[str, Any]] = []
        kept: list[RawMessage] = []
        bad: list[tuple[RawMessage, str]] = []
        for message in messages:
            try:
                rows.append(self.row(message))
                kept.append(message)
            except BadValue as exc:
                bad.append((message, str(exc)))
        if self.validate is not None and rows:
            ok = self.frame(rows).select(self.validate.fill_null(False)).to_series().to_list()
            if not all(ok):
                bad.extend(
                    (m, f"validate {self.spec.validate_expr!r} is not true")
                    for m, good in zip(kept, ok, strict=True)
                    if not good
                )
                rows = [r for r, good in zip(rows, ok, strict=True) if good]
        return rows, bad

    def frame(self, rows: list[dict[str, Any]]) -> pl.DataFrame:
        """Rows as a frame of the stream's schema, in stream order."""
        return (
            pl.DataFrame(sorted(rows, key=lambda r: r[ROW_ID]), schema=self.schema, orient="row")
            if rows
            else pl.DataFrame(schema=self.schema)
        )
