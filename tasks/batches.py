"""Batches: contiguous row ranges of one source file, and how a batch is read.

A batch never spans files, so a new file in a source folder adds batches without moving
the old ones. Its fingerprint is the file identity and the range; no data is read for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import polars as pl
from fsspec import AbstractFileSystem

from tasks import parquet_io
from tasks.fingerprints import digest
from tasks.operators.base import ROW_ID
from tasks.sources import SourceFile


@dataclass(frozen=True)
class Batch:
    """Rows ``[start, stop)`` of ``file``; ``read_uri`` is the Parquet to read them from.

    ``in_store`` is true for JSONL/CSV inputs, which are read from their Parquet copy in
    the step store (``read_uri`` is then a path on the store's filesystem).
    """

    index: int
    file: SourceFile
    read_uri: str
    start: int
    stop: int
    in_store: bool = False

    @functools.cached_property
    def fingerprint(self) -> str:
        return digest(self.file.identity, self.start, self.stop)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @functools.cached_property
    def file_label(self) -> str:
        return f"{self.file.stem}-{self.start}"


def cut(
    file: SourceFile, read_uri: str, in_store: bool, rows: int, batch_size: int, first_index: int
) -> list[Batch]:
    """Cut one file of ``rows`` rows into batches of ``batch_size`` rows."""
    return [
        Batch(first_index + i, file, read_uri, start, min(start + batch_size, rows), in_store)
        for i, start in enumerate(range(0, rows, batch_size))
    ]


def read_batch(batch: Batch, fs: AbstractFileSystem, path: str) -> pl.DataFrame:
    """The batch's rows (from ``path`` on ``fs``) with their stable ``_row_id`` first."""
    df = parquet_io.read_slice(fs, path, batch.start, batch.stop)
    base = (batch.file.row_key << 32) + batch.start
    ids = pl.int_range(base, base + df.height, dtype=pl.UInt64, eager=True).alias(ROW_ID)
    return df.select(pl.lit(ids), pl.all().exclude(ROW_ID))
