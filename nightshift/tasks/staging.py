"""Source preparation for a batch run: every file of a source ready to be cut into batches.

:func:`prepare_sources` is what the planner asks of the sources layer::

    files = prepare_sources(spec.source, store, staging_dir=store.layout.pipeline("demo").sources_dir())
    for f in files:          # in source order
        f.read_uri, f.rows, f.schema, f.sample

For each file found (``sources.discover``):

* **Staging**: a Parquet file is read in place (its row count from the footer, its types
  checked against ``source.schema``); a JSONL or CSV file is read and validated once
  (``sources.load_text_file``) and staged as Parquet under ``staging_dir``, named after
  the file's identity, so a later run (or a changed file) finds it or stages it again.
* **Sampling**: the file's first :data:`SAMPLE_ROWS` rows, with their ``_row_id``, which
  validate runs the steps on (``tasks.stages.sample_run``); rows that cannot be read
  leave the file without a sample (its batches will report them).
* **Cross-file checks**: the files of one source have the same columns with the same
  types (a column null in every row of a file matches any type), and none has a
  ``_row_id`` column; an error names the file and the column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from nightshift.blocks.step_store import StepStore
from nightshift.core import file_io
from nightshift.core.errors import SourceError
from nightshift.core.fingerprints import digest
from nightshift.core.layout import capped
from nightshift.tasks.batches import with_row_ids
from nightshift.tasks.sources import (
    ROW_ID,
    SourceFile,
    SourceSpec,
    check_declared,
    discover,
    filesystem,
    load_text_file,
)

#: Rows of each source file that validate runs the steps on.
SAMPLE_ROWS = 5
#: Bump when JSONL/CSV reading or validation changes, so that files staged under older
#: rules are read (and checked) again; step keys do not depend on it.
STAGING_RULES = "2"


@dataclass(frozen=True)
class PreparedFile:
    """One source file, ready to be cut into batches."""

    file: SourceFile
    #: where its batches are read from: the file itself (Parquet) or its staged copy
    read_uri: str
    rows: int
    schema: pl.Schema
    #: its first rows with ``_row_id`` (None: empty, or not readable here)
    sample: pl.DataFrame | None = None

    @property
    def in_store(self) -> bool:
        """Its batches are read from the store (a staged JSONL/CSV file)."""
        return self.file.format != "parquet"


def prepare_sources(source: SourceSpec, store: StepStore, staging_dir: str) -> list[PreparedFile]:
    """Every file of ``source``, staged, counted, sampled and checked against the others;
    a problem is a one-line :class:`SourceError` naming the file (and line, column)."""
    prepared = [prepare_file(file, source, store, staging_dir) for file in discover(source)]
    check_same_columns({p.file.uri: p.schema for p in prepared})
    for p in prepared:
        if ROW_ID in p.schema:
            raise SourceError(f"source file {p.file.uri}: column {ROW_ID} is reserved")
    return prepared


def prepare_file(
    file: SourceFile, source: SourceSpec, store: StepStore, staging_dir: str
) -> PreparedFile:
    """One file: read in place (Parquet) or staged under ``staging_dir`` (JSONL/CSV)."""
    if file.format == "parquet":
        fs, path = filesystem(file.uri, source.storage_options)
        rows = file_io.footer_rows(fs, path)
        if rows is None:
            raise SourceError(f"source file {file.uri}: not a readable Parquet file")
        schema = file_io.schema(fs, path)
        check_declared(file, schema)
        sample = _sample(file, lambda: file_io.read_slice(fs, path, 0, SAMPLE_ROWS))
        return PreparedFile(file, file.uri, rows, schema, sample)
    staged = f"{staging_dir}/{staged_name(file)}"
    rows = store.frame_rows(staged)
    head: pl.DataFrame | None = None
    if rows is None:
        df = load_text_file(file, source.storage_options)
        if ROW_ID in df.columns:
            raise SourceError(f"source file {file.uri}: column {ROW_ID} is reserved")
        store.write_frame(staged, df)
        rows, head = df.height, df.head(SAMPLE_ROWS)
    schema = file_io.schema(store.fs, staged)
    first = head
    sample = _sample(
        file,
        lambda: (
            first if first is not None else (file_io.read_slice(store.fs, staged, 0, SAMPLE_ROWS))
        ),
    )
    return PreparedFile(file, staged, rows, schema, sample)


def staged_name(file: SourceFile) -> str:
    """The staged copy's file name: the file's stem and a hash of its identity."""
    return f"{capped(file.stem)}-{digest(file.identity, STAGING_RULES)[:24]}.parquet"


def check_same_columns(schemas: dict[str, pl.Schema]) -> None:
    """Every file of a source has the same columns with the same types (a column that is
    null in every row of a file matches any type); otherwise name the file and column."""
    if len(schemas) < 2:
        return
    (first_uri, first), *others = schemas.items()
    types = {c: (t, first_uri) for c, t in first.items() if t != pl.Null}
    for uri, schema in others:
        extra = [c for c in schema if c not in first]
        if extra:
            raise SourceError(
                f"source file {uri}: column {extra[0]!r} is not in {first_uri}"
                f"{f' ({len(extra)} such columns)' if len(extra) > 1 else ''}; "
                "every file of a source must have the same columns"
            )
        lacking = [c for c in first if c not in schema]
        if lacking:
            raise SourceError(
                f"source file {uri}: no column {lacking[0]!r}, which {first_uri} has"
                f"{f' ({len(lacking)} such columns)' if len(lacking) > 1 else ''}; "
                "every file of a source must have the same columns"
            )
        for column, dtype in schema.items():
            if dtype == pl.Null:
                continue
            known = types.setdefault(column, (dtype, uri))
            if known[0] != dtype:
                raise SourceError(
                    f"source files differ: column {column!r} is {known[0]} in {known[1]} but "
                    f"{dtype} in {uri}; give it one type in every file (JSONL/CSV: or declare "
                    f"it in source.schema, e.g. schema: {{{column}: string}})"
                )


def _sample(file: SourceFile, head: Callable[[], pl.DataFrame | None]) -> pl.DataFrame | None:
    """The file's first rows with ``_row_id``; rows that cannot be read give None."""
    try:
        rows = head()
    except Exception:  # the data is read again (and reported) by the batches themselves
        return None
    return with_row_ids(rows, file) if rows is not None and rows.height else None
