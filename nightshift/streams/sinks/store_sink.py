"""The ``store`` sink: a clean dataset of the stream's rows, one Parquet file per window.

``<store>/<pipeline>/<path>/w-<first seq>-<last seq>.parquet``. Window names come from the
window journal, so a window replayed after a crash overwrites its own file (atomically)
with the same rows: the folder never holds a message twice. Read it with any Parquet
tool (``polars.scan_parquet(".../output/*.parquet")``).
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from nightshift.blocks.step_store import StepStore
from nightshift.core import file_io


class StoreSink:
    kind = "store"

    def __init__(self, label: str, store: StepStore, pipeline: str, path: str) -> None:
        self.label = label
        self.store = store
        self.folder = store.layout.stream(pipeline).sink_dir(path)

    def file(self, window_id: str) -> str:
        return f"{self.folder}/w-{window_id}.parquet"

    def open(self) -> None:
        self.store.check_writable()

    def write(self, window_id: str, frame: pl.DataFrame, supersedes: Sequence[str] = ()) -> int:
        target = self.file(window_id)
        if frame.height or self.store.frame_rows(target) is not None:
            self.store.write_frame(target, frame)
        for earlier in supersedes:  # after the write: a crash in between only repeats rows
            self.store.delete_file(self.file(earlier))  # of a window not yet committed (replayed)
        return frame.height

    def close(self) -> None:
        pass


def output_files(store: StepStore, pipeline: str, path: str = "output") -> list[str]:
    """The store sink's window files, by name (stream order of their first message)."""
    return sorted(
        file_io.glob(store.fs, f"{store.layout.stream(pipeline).sink_dir(path)}/w-*.parquet")
    )


def read_output(store: StepStore, pipeline: str, path: str = "output") -> pl.DataFrame:
    """Every row the store sink holds, in stream order (as stored: a repeat would show)."""
    files = output_files(store, pipeline, path)
    if not files:
        return pl.DataFrame()
    frames = [store.read_frame(f) for f in files]
    return pl.concat(frames, how="vertical_relaxed").sort("_row_id")
