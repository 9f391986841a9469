"""Input data: Parquet, JSONL or CSV files, local or ``s3://``, one path, a list or a glob.

Files are listed in sorted order. Each file's identity is its path, size and version
(modification time locally, ETag on S3), so a batch's fingerprint never needs the data.
Every row gets ``_row_id = crc32(file path) << 32 | row number in the file``: stable across
runs and across new files added beside it.

JSONL and CSV files are read once, validated (a bad line is reported with its file and
line number) and staged as Parquet in the step store, so batches are cheap row-range reads;
Parquet files are read in place.

Types are never unified silently: a JSONL column whose values change JSON type between
lines (a number on one line, a string on another) is refused naming the line, unless
``source.schema`` declares its type, in which case every value is converted to it (a value
that cannot be is refused naming its file, line and column). Files of one source must
have the same columns and types (``tasks/staging.py`` checks this across files).
"""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import polars as pl
from fsspec import AbstractFileSystem
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nightshift.core import file_io
from nightshift.core.errors import SourceError, one_line
from nightshift.core.fingerprints import digest

try:  # a Prefect dependency; 2x faster than json for the line-by-line type check
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

ROW_ID = "_row_id"  # nightshift.tasks.operators.ROW_ID (not imported: operators import this module's users)
_BOM = b"\xef\xbb\xbf"

Format = Literal["parquet", "jsonl", "csv"]
_SUFFIXES: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}
_GLOB_CHARS = set("*?[")

#: The types a column can be declared as in ``source.schema`` (aliases on the right).
SCHEMA_TYPES: dict[str, pl.DataType] = {
    "string": pl.String(),
    "integer": pl.Int64(),
    "float": pl.Float64(),
    "boolean": pl.Boolean(),
    "date": pl.Date(),
    "datetime": pl.Datetime("us"),
}
_TYPE_ALIASES = {
    "str": "string",
    "text": "string",
    "int": "integer",
    "int64": "integer",
    "float64": "float",
    "double": "float",
    "bool": "boolean",
}


class SourceSpec(BaseModel):
    """``source: {path: "data/*.jsonl"}``; ``format`` defaults to the file suffix."""

    model_config = ConfigDict(
        extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    path: str | list[str] = Field(min_length=1)
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    #: fsspec options for remote paths, e.g. ``{endpoint_url: http://127.0.0.1:9000}``;
    #: credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never the spec.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    #: ``schema: {n: integer, id: string}``: declared column types, enforced on every file
    #: (JSONL/CSV values are converted; Parquet columns must already have the type).
    #: Types: string, integer, float, boolean, date, datetime.
    declared: dict[str, str] = Field(default_factory=dict, alias="schema")

    @field_validator("declared")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        known = {}
        for column, name in value.items():
            if column == ROW_ID:
                raise ValueError(f"column {ROW_ID} is reserved")
            canonical = _TYPE_ALIASES.get(str(name).lower(), str(name).lower())
            if canonical not in SCHEMA_TYPES:
                raise ValueError(
                    f"column {column!r}: unknown type {name!r} (known: {', '.join(SCHEMA_TYPES)})"
                )
            known[column] = canonical
        return known

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass(frozen=True)
class SourceFile:
    """One input file and what identifies its content."""

    uri: str
    format: Format
    size: int
    version: str
    #: ``source.schema`` as ``((column, type), ...)``: part of a JSONL/CSV file's identity,
    #: since it changes the rows read from it.
    schema: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def identity(self) -> str:
        if self.schema and self.format != "parquet":
            return digest(self.uri, self.size, self.version, [list(c) for c in self.schema])
        return digest(self.uri, self.size, self.version)

    @functools.cached_property
    def row_key(self) -> int:
        return zlib.crc32(self.uri.encode())

    @functools.cached_property
    def stem(self) -> str:
        name = PurePosixPath(self.uri.split("://", 1)[-1]).name
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in name.split(".")[0])[:40]


def filesystem(uri: str, options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path on it."""
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise SourceError(f"source {uri}: unsupported location: {one_line(exc)}") from None


def _full_uri(fs: AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def discover(spec: SourceSpec) -> list[SourceFile]:
    """List the source files (sorted), with their identity; errors name the path."""
    found: dict[str, SourceFile] = {}
    declared = tuple(spec.declared.items())
    for pattern in spec.paths():
        fs, path = filesystem(pattern, spec.storage_options)
        try:
            if _GLOB_CHARS & set(path):
                matches = sorted(p for p in file_io.glob(fs, path) if fs.isfile(p))
                if not matches:
                    raise SourceError(f"source.path {pattern!r}: no file matches this pattern")
                infos = [(match, fs.info(match)) for match in matches]
            else:
                infos = [(path, _file_info(fs, pattern, path, spec.storage_options))]
            for match, info in infos:
                version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
                fmt = _format_of(match, spec.format)
                uri = _full_uri(fs, match)
                found[uri] = SourceFile(
                    uri, fmt, int(info.get("size") or 0), str(version), declared
                )
        except SourceError:
            raise
        except Exception as exc:  # permission, network, credentials
            if _is_connection_error(exc):
                raise SourceError(_connection_message(pattern, spec.storage_options, exc)) from None
            raise SourceError(f"source.path {pattern!r}: cannot list: {one_line(exc)}") from None
    files = [found[k] for k in sorted(found)]
    keys: dict[int, str] = {}
    for f in files:
        if f.row_key in keys:
            raise SourceError(
                f"source files {keys[f.row_key]} and {f.uri} hash to the same _row_id prefix; "
                "rename one of them"
            )
        keys[f.row_key] = f.uri
    return files


def _file_info(
    fs: AbstractFileSystem, pattern: str, path: str, options: dict[str, Any]
) -> dict[str, Any]:
    """``fs.info`` of one named file; a directory, a symlink loop, a dangling symlink and an
    unreachable endpoint each get their own words (fsspec's ``isfile`` says False to all)."""
    where = f"source.path {pattern!r}"
    try:
        info = fs.info(path)
    except FileNotFoundError:
        if _is_local(fs) and os.path.islink(path):
            raise SourceError(
                f"{where}: a symlink to {os.readlink(path)!r}, which does not exist"
            ) from None
        raise SourceError(f"{where}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SourceError(f"{where}: a symlink loop (it resolves to itself)") from None
        if _is_connection_error(exc):
            raise SourceError(_connection_message(pattern, options, exc)) from None
        raise SourceError(f"{where}: cannot read: {exc.strerror or one_line(exc)}") from None
    except Exception as exc:
        if _is_connection_error(exc):
            raise SourceError(_connection_message(pattern, options, exc)) from None
        raise
    if info.get("type") == "directory":
        raise SourceError(
            f"{where}: is a directory, not a file; use a glob such as "
            f"'{pattern.rstrip('/')}/*.jsonl'"
        )
    if info.get("type") not in (None, "file"):
        raise SourceError(f"{where}: not a regular file ({info.get('type')})")
    return info


def _is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


_CONNECTION_ERRORS = {
    "ConnectionError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectTimeout",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ProxyConnectionError",
    "gaierror",
    "TimeoutError",
    "ReadTimeoutError",
}


def _is_connection_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):  # the cause chain: s3fs wraps botocore wraps aiohttp
        if seen is None:
            return False
        if {c.__name__ for c in type(seen).__mro__} & _CONNECTION_ERRORS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _connection_message(pattern: str, options: dict[str, Any], exc: BaseException) -> str:
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
        "endpoint_url"
    )
    protocol = pattern.split("://", 1)[0] if "://" in pattern else "file"
    target = f"endpoint {endpoint}" if endpoint else f"the default {protocol} endpoint"
    return (
        f"source.path {pattern!r}: cannot connect to {target} ({type(exc).__name__}: "
        f"{one_line(exc, 200)}); check source.storage_options.endpoint_url and the network"
    )


def _format_of(path: str, declared: str) -> Format:
    if declared != "auto":
        return declared  # type: ignore[return-value]
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise SourceError(
            f"source file {path}: unknown format '{suffix}' (use .parquet, .jsonl or .csv, "
            "or set source.format)"
        )
    return _SUFFIXES[suffix]


def load_text_file(file: SourceFile, options: dict[str, Any]) -> pl.DataFrame:
    """Read a whole JSONL or CSV file, validated; errors name the file and line.

    A UTF-8 byte order mark is skipped. A file with no rows (empty, or only blank lines)
    is an error. Columns declared in ``file.schema`` are converted to their type.
    """
    fs, path = filesystem(file.uri, options)
    try:
        data = file_io.read_bytes(fs, path)
    except Exception as exc:
        raise SourceError(f"source file {file.uri}: cannot read: {one_line(exc)}") from None
    data = data.removeprefix(_BOM)
    declared = dict(file.schema)
    if file.format == "jsonl":
        lines, seen = _scan_jsonl(file.uri, data, declared)
        overrides = {c: pl.String for c in declared if c in seen}
        try:
            df = pl.read_ndjson(
                io.BytesIO(data), infer_schema_length=None, schema_overrides=overrides
            )
        except Exception as exc:
            raise SourceError(f"source file {file.uri}: {one_line(exc)}") from None
        line_of = _row_lines(lines, df.height, "line")
    else:
        header, lines, blanks = _scan_csv(file.uri, data)
        overrides = {c: pl.String for c in declared if c in header}
        try:
            df = pl.read_csv(io.BytesIO(data), infer_schema_length=None, schema_overrides=overrides)
        except Exception as exc:
            line = _csv_strict_error(data)
            where = f"source file {file.uri}" + (f" {line}" if line else "")
            raise SourceError(f"{where}: bad CSV: {one_line(exc)}") from None
        if blanks and df.height == len(lines) + len(blanks):
            keep = pl.Series(values=[True] * df.height)
            keep.scatter(list(blanks), False)
            df = df.filter(keep)
        line_of = _row_lines(lines, df.height, "line")
    return _convert_declared(file.uri, df, declared, line_of)


def check_declared(file: SourceFile, schema: pl.Schema) -> None:
    """A Parquet file (read in place, not converted) must already have the declared types."""
    for column, name in file.schema:
        if column not in schema:
            raise SourceError(
                f"source file {file.uri}: no column {column!r} (declared in source.schema; "
                f"columns: {_names(schema)})"
            )
        dtype, want = schema[column], SCHEMA_TYPES[name]
        same_family = (
            dtype == want
            or (name == "integer" and dtype.is_integer())
            or (name == "float" and dtype.is_float())
            or (name == "datetime" and isinstance(dtype, pl.Datetime))
        )
        if not same_family:
            raise SourceError(
                f"source file {file.uri}: column {column!r} is {dtype}, but source.schema "
                f"says {name} (Parquet files are read as they are: convert the file or fix "
                "source.schema)"
            )


def _names(columns: Any, limit: int = 20) -> str:
    names = [c for c in columns if c != ROW_ID]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# -- JSONL -------------------------------------------------------------------------------

_KINDS: dict[type, str] = {
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "list",
    dict: "object",
}
_A = {
    "boolean": "a boolean",
    "number": "a number",
    "string": "a string",
    "list": "a list",
    "object": "an object",
}


class _Mixed(Exception):
    def __init__(self, path: str, before: Any, now: Any) -> None:
        super().__init__(path)
        self.path, self.before, self.now = path, before, now


def _describe(shape: Any) -> str:
    return _A[shape if isinstance(shape, str) else shape[0]]


def _shape(value: Any, path: str) -> Any:
    """The JSON type of a value, nested: ``"number"``, ``("list", elem)``, ``("object", ..)``."""
    if value is None:
        return None
    kind = _KINDS[type(value)]
    if kind == "list":
        element = None
        for item in value:
            element = _merge(element, _shape(item, path + "[]"), path + "[]")
        return ("list", element)
    if kind == "object":
        return ("object", tuple(sorted((k, _shape(v, f"{path}.{k}")) for k, v in value.items())))
    return kind


def _merge(before: Any, now: Any, path: str) -> Any:
    """One shape for both, or :class:`_Mixed` naming the (nested) column path."""
    if before is None or before == now:
        return now if before is None else before
    if now is None:
        return before
    if isinstance(before, tuple) and isinstance(now, tuple) and before[0] == now[0]:
        if before[0] == "list":
            return ("list", _merge(before[1], now[1], path + "[]"))
        fields = dict(before[1])
        for key, shape in now[1]:
            fields[key] = _merge(fields.get(key), shape, f"{path}.{key}")
        return ("object", tuple(sorted(fields.items())))
    raise _Mixed(path, before, now)


def _scan_jsonl(uri: str, data: bytes, declared: dict[str, str]) -> tuple[array, set[str]]:
    """Check every line: a JSON object, each column one JSON type (numbers: int or float)
    on every line unless declared in ``source.schema``. Returns the line number of each row
    and the declared columns that appear.
    """
    rows = array("l")
    seen: set[str] = set()
    shapes: dict[str, tuple[Any, int]] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = _loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SourceError(f"source file {uri} line {number}: invalid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise SourceError(
                f"source file {uri} line {number}: expected a JSON object, got {type(value).__name__}"
            )
        rows.append(number)
        for key, item in value.items():
            if key in declared:
                seen.add(key)
                continue
            if item is None:
                continue
            known = shapes.get(key)
            try:
                shape = _shape(item, key)
                if known is None:
                    shapes[key] = (shape, number)
                elif known[0] != shape:
                    shapes[key] = (_merge(known[0], shape, key), known[1])
            except _Mixed as mixed:
                earlier = (
                    f"on line {known[1]}"
                    if known is not None and mixed.path == key
                    else "on an earlier line"
                    if known is not None
                    else "in the same line"
                )
                raise SourceError(
                    f"source file {uri} line {number}: column {mixed.path!r} is "
                    f"{_describe(mixed.now)} here but {_describe(mixed.before)} {earlier}; "
                    f"give it one type on every line, or declare it in source.schema "
                    f"(e.g. schema: {{{key}: string}})"
                ) from None
    if not rows:
        what = "only blank lines" if data else "0 bytes"
        raise SourceError(f"source file {uri}: the file is empty ({what}, no JSON rows)")
    return rows, seen


# -- CSV ---------------------------------------------------------------------------------


def _csv_text(uri: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SourceError(f"source file {uri} line {line}: not UTF-8 text ({exc.reason})") from None


def _scan_csv(uri: str, data: bytes) -> tuple[list[str], array, array]:
    """The header, the line each row starts on, and the rows polars makes of blank lines
    (it reads a blank line after the header as a row of nulls; they are dropped). A row
    whose field count differs from the header's (a ragged row, or an unclosed quote) is
    refused naming its line."""
    reader = csv.reader(io.StringIO(_csv_text(uri, data), newline=""))
    header: list[str] | None = None
    rows, blanks = array("l"), array("l")
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise SourceError(f"source file {uri} line {start}: bad CSV: {exc}") from None
        if header is None:
            if fields:
                header = fields
            continue
        if not fields:  # a blank line
            blanks.append(len(rows) + len(blanks))
            continue
        if len(fields) != len(header):
            spans = (
                f" (lines {start}-{reader.line_num}: an unclosed quote?)"
                if (reader.line_num > start)
                else ""
            )
            raise SourceError(
                f"source file {uri} line {start}: bad CSV: {len(fields)} field(s), the header "
                f"has {len(header)}{spans}"
            )
        rows.append(start)
    if header is None:
        what = "only blank lines" if data else "0 bytes"
        raise SourceError(f"source file {uri}: the file is empty ({what}, no CSV header)")
    return header, rows, blanks


def _csv_strict_error(data: bytes) -> str | None:
    """``line N`` of the first row Python's strict CSV reader refuses, if any."""
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8", "replace"), newline=""), strict=True)
    except Exception:  # pragma: no cover
        return None
    while True:
        start = reader.line_num + 1
        try:
            next(reader)
        except StopIteration:
            return None
        except csv.Error:
            return f"line {start}"


# -- declared types ----------------------------------------------------------------------


def _row_lines(lines: array, height: int, word: str) -> Callable[[int], str]:
    def line_of(row: int) -> str:
        if len(lines) == height and 0 <= row < height:
            return f"{word} {lines[row]}"
        return f"row {row + 1}"

    return line_of


_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


def _convert(values: pl.Series, name: str) -> pl.Series:
    text = values if values.dtype == pl.String else values.cast(pl.String)
    if name == "string":
        return text
    if name == "boolean":
        return (
            text.str.strip_chars()
            .str.to_lowercase()
            .replace_strict(_BOOLEANS, default=None, return_dtype=pl.Boolean)
        )
    if name == "date":
        return text.str.strip_chars().str.to_date(strict=False)
    if name == "datetime":
        return text.str.strip_chars().str.to_datetime(strict=False, time_unit="us")
    return text.str.strip_chars().cast(SCHEMA_TYPES[name], strict=False)


def _convert_declared(
    uri: str, df: pl.DataFrame, declared: dict[str, str], line_of: Callable[[int], str]
) -> pl.DataFrame:
    """Columns of ``source.schema`` converted to their type; the first value that does not
    convert is refused naming its line and column."""
    if not declared:
        return df
    present = set(df.columns)
    converted = []
    for column, name in declared.items():
        if column not in present:
            raise SourceError(
                f"source file {uri}: no column {column!r} (declared in source.schema; "
                f"columns: {_names(df.columns)})"
            )
        values = df[column]
        out = _convert(values, name)
        bad = values.is_not_null() & out.is_null()
        if bad.any():
            row = int(bad.arg_true()[0])
            raise SourceError(
                f"source file {uri} {line_of(row)}: column {column!r}: {values[row]!r} is not "
                f"a valid {name} (source.schema)"
            )
        converted.append(out.alias(column))
    return df.with_columns(converted)
