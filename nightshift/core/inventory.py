"""What a step directory holds, from one listing: which outputs exist and can be trusted.

A run must not pay a Prefect task run (nor, on S3, a GET) for every batch that is already
done. So each step directory keeps an **output index**, ``outputs.json``: for every
Parquet file a run wrote (or verified), its row count, byte size and tag (the S3 ETag, or
the local modification time). At planning, one listing of the directory gives every
file's size and tag; a file whose size and tag match its index entry is the very file
that was written and checked, and is reused without being opened. Any other file (not in
the index, truncated, rewritten, corrupted) has its Parquet footer read: readable, it is
reused and added to the index; unreadable, it is recomputed. The index is only ever a
shortcut: losing it (a kill before it is saved, two runs saving at once) costs footer
reads, never a wrong answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from nightshift.core import file_io

INDEX_NAME = "outputs.json"


def file_tag(info: dict[str, Any]) -> str:
    """What changes when a file's bytes change: the S3 ETag, else the modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    stamp = getattr(mtime, "timestamp", None)  # a datetime (S3, memory): its epoch seconds
    return repr(stamp() if callable(stamp) else mtime)


@dataclass
class OutputIndex:
    """The Parquet files of one directory, listed once, with their verified row counts."""

    fs: AbstractFileSystem
    directory: str
    #: file name -> (size, tag), from the listing
    listing: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: file name -> {"rows", "size", "tag"}, from outputs.json and this run's writes
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)
    footer_reads: int = 0
    changed: bool = False

    @classmethod
    def load(cls, fs: AbstractFileSystem, directory: str) -> OutputIndex:
        index = cls(fs, directory)
        try:
            fs.invalidate_cache(directory)
            entries = fs.ls(directory, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return index
        names = set()
        for info in entries:
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            names.add(name)
            if name.endswith(".parquet") and info.get("type", "file") == "file":
                index.listing[name] = (int(info.get("size") or 0), file_tag(info))
        if INDEX_NAME in names:
            document = _read_json(fs, f"{directory}/{INDEX_NAME}")
            if isinstance(document, dict) and isinstance(document.get("files"), dict):
                index.recorded = {
                    name: entry
                    for name, entry in document["files"].items()
                    if name in index.listing and isinstance(entry, dict)
                }
                index.changed = len(index.recorded) != len(document["files"])
        return index

    def rows(self, name: str) -> int | None:
        """Rows of ``name`` if it is there and readable, else None (recompute it)."""
        listed = self.listing.get(name)
        if listed is None:
            return None
        entry = self.recorded.get(name)
        if entry and (entry.get("size"), entry.get("tag")) == listed:
            return int(entry["rows"])
        self.footer_reads += 1
        rows = file_io.footer_rows(self.fs, f"{self.directory}/{name}")
        if rows is None:
            self.recorded.pop(name, None)
            return None
        self.add(name, rows, *listed)
        return rows

    def add(self, name: str, rows: int, size: int, tag: str) -> None:
        self.recorded[name] = {"rows": rows, "size": size, "tag": tag}
        self.listing[name] = (size, tag)
        self.changed = True

    def save(self) -> None:
        """Merge this index into the directory's ``outputs.json`` (atomic write)."""
        if not self.changed:
            return
        path = f"{self.directory}/{INDEX_NAME}"
        current = _read_json(self.fs, path)
        files = dict(current.get("files", {})) if isinstance(current, dict) else {}
        files.update(self.recorded)
        data = json.dumps({"files": files}, sort_keys=True, separators=(",", ":")).encode()
        file_io.write_bytes_atomic(self.fs, path, data)
        self.changed = False


def stat(fs: AbstractFileSystem, path: str) -> tuple[int, str]:
    """``(size, tag)`` of a file just written, as a listing would show them."""
    info = fs.info(path)
    return int(info.get("size") or 0), file_tag(info)


def _read_json(fs: AbstractFileSystem, path: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
