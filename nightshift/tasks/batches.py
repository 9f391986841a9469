"""Batches: contiguous row ranges of one source file, how a batch is read, and the
``_row_id`` scheme: the one place where every row identity is made.

* a source row: ``(crc32(file uri) << 32) + its row number in the file``
  (:func:`with_row_ids`);
* a row ``explode`` makes: the ``index + 1``-th output of SplitMix64 seeded with its
  parent's ``_row_id`` (:func:`child_row_ids`);
* a row ``group`` makes: the first 8 bytes of BLAKE2b over the group key's JSON
  (:func:`group_row_ids`).

A batch never spans files, so a new file in a source folder adds batches without moving
the old ones. Its fingerprint is the file identity and the range; no data is read for it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
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


#: SplitMix64's increment (the golden ratio in 64 bits) and its finalizer's multipliers.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def child_row_ids(parents: pl.Series | np.ndarray, index: pl.Series | np.ndarray) -> pl.Series:
    """The ``_row_id`` of the ``index``-th child (0-based) of each parent row (``explode``).

    ``child = mix64(parent + (index + 1) * 0x9E3779B97F4A7C15 mod 2**64)``, where
    ``mix64`` is SplitMix64's finalizer (``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
    z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``, all mod 2**64): the
    ``index + 1``-th number SplitMix64 draws when seeded with the parent's id. It depends
    on the parent's id and the index only, so it is the same in every run, on every
    machine and for every batch size; two children collide with probability ~n²/2⁶⁵.
    """
    p = parents.to_numpy() if isinstance(parents, pl.Series) else parents
    i = index.to_numpy() if isinstance(index, pl.Series) else index
    with np.errstate(over="ignore"):  # every step is mod 2**64, in place
        z = i.astype(np.uint64)
        z += np.uint64(1)
        z *= _GAMMA
        z += p.astype(np.uint64, copy=False)
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    return pl.Series(ROW_ID, z, dtype=pl.UInt64)


def group_row_ids(keys: pl.DataFrame) -> pl.Series:
    """The ``_row_id`` of each group a ``group`` step makes, from its key columns.

    ``id = first 8 bytes (little-endian) of BLAKE2b-64(key JSON, person=b"ns-group")``,
    the key JSON being the row of key columns as one object, written by polars'
    ``struct.json_encode`` (``{"question":"What is 2+2?"}``): the id depends on the key's
    column names and values only, never on where the group's rows were.
    """
    encoded = keys.select(pl.struct(keys.columns).struct.json_encode()).to_series()
    ids = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(text.encode(), digest_size=8, person=b"ns-group").digest(), "little"
            )
            for text in encoded
        ),
        dtype=np.uint64,
        count=len(encoded),
    )
    return pl.Series(ROW_ID, ids, dtype=pl.UInt64)
