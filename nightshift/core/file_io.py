"""Files on any fsspec filesystem: Parquet frames (atomic writes, slices, footers) and
whole files of bytes (the JSON manifests and markers), written atomically.

Local files are written to a temporary name and renamed (atomic on POSIX); object stores
get one PUT of the finished file, which is atomic too (an object is visible whole or not
at all). Readers therefore never see half a file.

A temporary file is named ``<file>.tmp-<host>-<pid>-<random>`` (:func:`temp_path`), so a
later run can tell a killed writer's leftover from a live writer's (:func:`stale_temp`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import IO, cast

import polars as pl
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

#: Parquet compression of what the store writes unless a caller chooses (the step task
#: chooses per stage: ``tasks.stages.output_compression``).
COMPRESSION = "zstd"

#: A temporary file of another machine (or of an unnamed writer) is a killed write's
#: leftover once it is this old: writing one unit's file takes seconds, not an hour.
TEMP_SAFE_AGE_S = 3600.0


def host_tag() -> str:
    """8 hex digits naming this machine in temporary files' names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


_HOST = host_tag()
_TEMP = re.compile(r"\.tmp-(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]+$")


def temp_path(path: str) -> str:
    """Where ``path`` is written before it is renamed into place (local files)."""
    return f"{path}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def is_temp(name: str) -> bool:
    return _TEMP.search(name) is not None


def stale_temp(name: str, mtime: float | None, now: float | None = None) -> bool:
    """Whether the temporary file ``name`` is a leftover whose writer is gone: its writer
    ran on this machine and its process is dead, or it is older than TEMP_SAFE_AGE_S
    (another machine's writer, a name from before writers were named, or a process id
    reused since: writing one file takes seconds). A live writer's file is never stale."""
    match = _TEMP.search(name)
    if match is None:
        return False
    if match["host"] == _HOST and match["pid"] is not None and not process_alive(int(match["pid"])):
        return True
    now = time.time() if now is None else now
    return mtime is not None and now - mtime > TEMP_SAFE_AGE_S


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one that exists but is not ours counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_atomic(
    fs: AbstractFileSystem,
    path: str,
    df: pl.DataFrame,
    metadata: Mapping[str, str] | None = None,
    compression: str = COMPRESSION,
) -> None:
    """Write ``df`` to ``path`` so that it appears whole or not at all; ``metadata`` goes
    into the Parquet footer's key-value metadata; ``compression`` is Parquet's codec
    (``zstd``, ``lz4``, ...)."""
    meta = dict(metadata) if metadata else None
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = temp_path(path)
        try:
            df.write_parquet(tmp, compression=compression, statistics=False, metadata=meta)  # type: ignore[arg-type]
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    buffer = io.BytesIO()
    df.write_parquet(buffer, compression=compression, statistics=False, metadata=meta)  # type: ignore[arg-type]
    fs.pipe_file(path, buffer.getvalue())


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
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
    import pyarrow.parquet as pq  # object stores only (imported when used: parquet_footer)

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


def parquet_footer(fs: AbstractFileSystem, path: str) -> tuple[int, dict[str, str]]:
    """The row count and the key-value metadata of a Parquet file, from its footer only
    (one ranged read on an object store); raises if the file is missing, truncated or
    not Parquet.

    pyarrow reads it (0.03 ms a local file; polars' row count takes 0.4 ms) and is
    imported on the first call: footers are read when a run checks outputs its index
    does not list (a resume after a kill), so a run that finds them listed, or a fresh
    one, never loads pyarrow and numpy's ~40 MB (``benchmarks/bench_memory.py``)."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    pairs = (meta.metadata or {}).items()
    return meta.num_rows, {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def footer_rows(fs: AbstractFileSystem, path: str) -> int | None:
    """Row count from the Parquet footer, or None if the file is missing or unreadable
    (asked once per source file or stream piece: a local file is counted by polars, so
    this does not load pyarrow)."""
    try:
        if is_local(fs):
            return int(pl.scan_parquet(path, glob=False).select(pl.len()).collect().item())
        return parquet_footer(fs, path)[0]
    except Exception:  # missing, truncated, not Parquet: all mean "recompute"
        return None


def schema(fs: AbstractFileSystem, path: str) -> pl.Schema:
    if is_local(fs):
        return pl.scan_parquet(path).collect_schema()
    import pyarrow.parquet as pq  # object stores only (imported when used: parquet_footer)

    with fs.open(path, "rb") as handle:
        return pl.from_arrow(pq.ParquetFile(handle).schema_arrow.empty_table()).schema  # type: ignore[union-attr]
