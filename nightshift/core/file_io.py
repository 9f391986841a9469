"""Files on any fsspec filesystem: Parquet frames (atomic writes, slices, footers) and
whole files of bytes (the JSON manifests and markers), written atomically.

Local files are written to a temporary name and renamed (atomic on POSIX); object stores
get one PUT of the finished file, which is atomic too (an object is visible whole or not
at all). Readers therefore never see half a file.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Sequence
from typing import IO, cast

import polars as pl
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

COMPRESSION = "zstd"


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_atomic(fs: AbstractFileSystem, path: str, df: pl.DataFrame) -> None:
    """Write ``df`` to ``path`` so that it appears whole or not at all."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            df.write_parquet(tmp, compression=COMPRESSION, statistics=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    buffer = io.BytesIO()
    df.write_parquet(buffer, compression=COMPRESSION, statistics=False)
    fs.pipe_file(path, buffer.getvalue())


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    """A whole file's bytes (fsspec is untyped; ``cat_file`` reads bytes)."""
    return cast(bytes, fs.cat_file(path))


def glob(fs: AbstractFileSystem, pattern: str) -> list[str]:
    """The paths matching ``pattern`` (fsspec is untyped; ``glob`` lists paths)."""
    return cast(list[str], fs.glob(pattern))


def read(fs: AbstractFileSystem, path: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
    """Read a whole Parquet file (optionally some columns)."""
    cols = list(columns) if columns is not None else None
    if is_local(fs):
        return pl.read_parquet(path, columns=cols)
    with fs.open(path, "rb") as handle:
        # fsspec is untyped: a file opened "rb" is a binary file object
        return pl.read_parquet(cast(IO[bytes], handle), columns=cols)


def read_slice(fs: AbstractFileSystem, path: str, start: int, stop: int) -> pl.DataFrame:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups needed."""
    if is_local(fs):
        return pl.scan_parquet(path).slice(start, stop - start).collect()
    with fs.open(path, "rb") as handle:
        meta = pq.ParquetFile(handle)
        groups, first, offset = [], None, 0
        for g in range(meta.metadata.num_row_groups):
            n = meta.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return pl.from_arrow(meta.schema_arrow.empty_table())  # type: ignore[return-value]
        table = meta.read_row_groups(groups)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.slice(start - (first or 0), stop - start)


def footer_rows(fs: AbstractFileSystem, path: str) -> int | None:
    """Row count from the Parquet footer, or None if the file is missing or unreadable."""
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except Exception:  # missing, truncated, not Parquet: all mean "recompute"
        return None


def schema(fs: AbstractFileSystem, path: str) -> pl.Schema:
    if is_local(fs):
        return pl.scan_parquet(path).collect_schema()
    with fs.open(path, "rb") as handle:
        return pl.from_arrow(pq.ParquetFile(handle).schema_arrow.empty_table()).schema  # type: ignore[union-attr]
