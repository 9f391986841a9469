"""Batches: contiguous row ranges of one source file, and how a batch is read.

A batch never spans files, so a new file in a source folder adds batches without moving
the old ones. Its fingerprint is the file identity and the range; no data is read for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import polars as pl
from fsspec import AbstractFileSystem

from nightshift.core import file_io
from nightshift.core.fingerprints import digest
from nightshift.tasks.operators.base import ROW_ID
from nightshift.tasks.sources import SourceFile


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


def with_row_ids(df: pl.DataFrame, file: SourceFile, start: int = 0) -> pl.DataFrame:
    """``df`` (rows ``start..`` of ``file``) with the stable ``_row_id`` column first.

    The one place the scheme lives: ``_row_id = (file.row_key << 32) + row number in the
    file``, so a row keeps its id whichever batch, preview or sample reads it."""
    base = (file.row_key << 32) + start
    ids = pl.int_range(base, base + df.height, dtype=pl.UInt64, eager=True).alias(ROW_ID)
    return df.select(pl.lit(ids), pl.all().exclude(ROW_ID))


def read_batch(batch: Batch, fs: AbstractFileSystem, path: str) -> pl.DataFrame:
    """The batch's rows (from ``path`` on ``fs``) with their stable ``_row_id`` first."""
    df = file_io.read_slice(fs, path, batch.start, batch.stop)
    return with_row_ids(df, batch.file, batch.start)
