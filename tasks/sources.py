"""Input data: Parquet, JSONL or CSV files, local or ``s3://``, one path, a list or a glob.

Files are listed in sorted order. Each file's identity is its path, size and version
(modification time locally, ETag on S3), so a batch's fingerprint never needs the data.
Every row gets ``_row_id = crc32(file path) << 32 | row number in the file``: stable across
runs and across new files added beside it.

JSONL and CSV files are read once, validated (a bad line is reported with its file and
line number) and staged as Parquet in the step store, so batches are cheap row-range reads;
Parquet files are read in place.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import polars as pl
from fsspec import AbstractFileSystem
from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import SourceError, one_line
from tasks.fingerprints import digest

Format = Literal["parquet", "jsonl", "csv"]
_SUFFIXES: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}
_GLOB_CHARS = set("*?[")


class SourceSpec(BaseModel):
    """``source: {path: "data/*.jsonl"}``; ``format`` defaults to the file suffix."""

    model_config = ConfigDict(extra="forbid")

    path: str | list[str] = Field(min_length=1)
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    #: fsspec options for remote paths, e.g. ``{endpoint_url: http://127.0.0.1:9000}``;
    #: credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never the spec.
    storage_options: dict[str, Any] = Field(default_factory=dict)

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass(frozen=True)
class SourceFile:
    """One input file and what identifies its content."""

    uri: str
    format: Format
    size: int
    version: str

    @property
    def identity(self) -> str:
        return digest(self.uri, self.size, self.version)

    @property
    def row_key(self) -> int:
        return zlib.crc32(self.uri.encode())

    @property
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
    for pattern in spec.paths():
        fs, path = filesystem(pattern, spec.storage_options)
        try:
            if _GLOB_CHARS & set(path):
                matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
                if not matches:
                    raise SourceError(f"source.path {pattern!r}: no file matches this pattern")
            elif fs.isfile(path):
                matches = [path]
            else:
                raise SourceError(f"source.path {pattern!r}: no such file")
            for match in matches:
                info = fs.info(match)
                version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
                fmt = _format_of(match, spec.format)
                uri = _full_uri(fs, match)
                found[uri] = SourceFile(uri, fmt, int(info.get("size") or 0), str(version))
        except SourceError:
            raise
        except Exception as exc:  # permission, network, credentials
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
    """Read a whole JSONL or CSV file, validated; errors name the file and line."""
    fs, path = filesystem(file.uri, options)
    try:
        data = fs.cat_file(path)
    except Exception as exc:
        raise SourceError(f"source file {file.uri}: cannot read: {one_line(exc)}") from None
    if file.format == "jsonl":
        try:
            return pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
        except Exception as exc:
            _check_jsonl(file.uri, data)  # polars does not say which line: find it
            raise SourceError(f"source file {file.uri}: {one_line(exc)}") from None
    try:
        return pl.read_csv(io.BytesIO(data), infer_schema_length=10000)
    except Exception as exc:
        raise SourceError(f"source file {file.uri}: bad CSV: {one_line(exc)}") from None


def _check_jsonl(uri: str, data: bytes) -> None:
    """Find the first line that is not a JSON object; raise naming file and line."""
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"source file {uri} line {number}: invalid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise SourceError(
                f"source file {uri} line {number}: expected a JSON object, got {type(value).__name__}"
            )
