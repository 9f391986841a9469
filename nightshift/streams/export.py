"""``nightshift stream export SPEC --stream NAME --to out.parquet|out.jsonl``: the store
sink's windows of one stream as one file.

The store sink writes one Parquet file per window (``<store>/<stream>/<path>/w-*.parquet``);
this reads them all (lazily on a local store), keeps each ``_row_id`` (message) once —
a snapshot taken while a part-window is replacing an earlier window could otherwise see
both for a moment — sorts by ``_row_id`` (stream order), and writes the result next to
its target under a temporary name, then renames it into place: a reader never sees half
a file, and an export that fails leaves the previous file as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import polars as pl

from nightshift.core.errors import SpecError, StoreError, one_line
from nightshift.streams.sinks.store_sink import output_files
from nightshift.streams.spec import StoreSinkSpec, StreamSpec
from nightshift.tasks.operators import ROW_ID

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def export_stream(spec: StreamSpec, name: str, to: Path) -> tuple[int, int]:
    """Write stream ``name``'s store-sink rows to ``to``; returns ``(rows, window files)``."""
    fmt = FORMATS.get(to.suffix.lower())
    if fmt is None:
        raise SpecError(f"--to {to}: give a .parquet or .jsonl file")
    path = _sink_path(spec, name)
    store = spec.store.resolve()
    files = output_files(store, name, path)
    if not files:
        raise StoreError(
            f"--stream {name}: no store-sink windows under {store.display(store.layout.stream(name).sink_dir(path))}"
        )
    if store.is_local:
        frames = [pl.scan_parquet(f) for f in files]
    else:
        frames = [store.read_frame(f).lazy() for f in files]
    rows = (
        pl.concat(frames, how="diagonal_relaxed")
        .unique(subset=ROW_ID, keep="last", maintain_order=True)
        .sort(ROW_ID)
    )
    to.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{to.name}.", suffix=".tmp", dir=to.parent)
    os.close(handle)
    try:
        frame = rows.collect()
        if fmt == "parquet":
            frame.write_parquet(tmp, compression="zstd")
        else:
            frame.write_ndjson(tmp)
        os.replace(tmp, to)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"--to {to}: cannot write: {one_line(exc)}") from None
    return frame.height, len(files)


def _sink_path(spec: StreamSpec, name: str) -> str:
    """The stream's store-sink folder (``output`` for a stream not in the file: a
    discovered one with the default path)."""
    for stream in spec.streams:
        if stream.name == name:
            sinks = [s for s in stream.sink_specs() if isinstance(s, StoreSinkSpec)]
            if not sinks:
                raise SpecError(f"--stream {name}: the stream has no store sink")
            return sinks[0].path
    if spec.discover is not None:
        return StoreSinkSpec().path
    known = ", ".join(s.name for s in spec.streams)
    raise SpecError(f"--stream {name}: no such stream in the spec (streams: {known})")
