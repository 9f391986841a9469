"""What a step directory holds, from one listing: which outputs exist and can be trusted.

A run must not pay a Prefect task run (nor, on S3, a GET) for every batch that is already
done. So each step directory keeps an **output index**, ``outputs.json``: for every
Parquet file a run wrote (or verified), its row count, byte size and tag (the S3 ETag, or
the local modification time). At planning, one listing of the directory gives every
file's size and tag; a file whose size and tag match its index entry is the very file
that was written and checked, and is reused without being opened. Any other file (not in
the index, truncated, rewritten, corrupted, copied over) has its Parquet footer read and
the unit identity in it checked (``core/identity.py``): the file is reused and added to
the index only if it proves to be the unit its name says; otherwise it is recomputed and
the reason kept (:attr:`OutputIndex.rejected`) for the run's story. The index is only
ever a shortcut: losing it (a kill before it is saved, two runs saving at once) costs
footer reads, never a wrong answer.

Files from before identities existed carry none: in a directory whose index was not yet
vouching for every file there, such a file is verified the old way (a readable footer)
once and recorded; once the index vouches for every file of its directory (it then says
``"identities": true``), a file without an identity that the index does not vouch for
is recomputed.

The listing also shows temporary files (``*.tmp-<host>-<pid>-<random>``) that killed
writers left; :meth:`OutputIndex.sweep` removes those whose writer is gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from nightshift.core import file_io, identity
from nightshift.core.layout import INDEX_NAME, outputs_index


def file_tag(info: dict[str, Any]) -> str:
    """What changes when a file's bytes change: the S3 ETag, else the modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return repr(mtime.timestamp() if isinstance(mtime, dt.datetime) else mtime)


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
    #: the index was written by an identity-aware run: files without one are not trusted
    identities: bool = False
    #: file name -> why it was not trusted (not the unit its name says, unreadable)
    rejected: dict[str, str] = field(default_factory=dict)
    #: temporary files in the directory (name -> modification time), killed writes' or live
    temps: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def load(cls, fs: AbstractFileSystem, directory: str) -> OutputIndex:
        index = cls(fs, directory)
        try:
            fs.invalidate_cache(directory)
            entries = fs.ls(directory, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return index
        # the listing stays cached for the footer reads of the survey (no HEAD per file);
        # a check that decides "missing, compute it" later asks the store itself
        # (``StepStore.unit_rows`` drops the cached listing first)
        names = set()
        for info in entries:
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            names.add(name)
            if info.get("type", "file") != "file":
                continue
            if name.endswith(".parquet"):
                index.listing[name] = (int(info.get("size") or 0), file_tag(info))
            elif file_io.is_temp(name):
                index.temps[name] = _mtime(info)
        document = _read_json(fs, outputs_index(directory)) if INDEX_NAME in names else None
        if isinstance(document, dict) and isinstance(document.get("files"), dict):
            index.recorded = {
                name: entry
                for name, entry in document["files"].items()
                if name in index.listing and isinstance(entry, dict)
            }
            index.identities = document.get("identities") is True
            index.changed = len(index.recorded) != len(document["files"])
        return index

    def rows(self, name: str, key: str | None = None) -> int | None:
        """Rows of ``name`` if it is there and proves to be the unit ``key`` (its name's,
        when not given), else None (recompute it; :attr:`rejected` says why)."""
        listed = self.listing.get(name)
        if listed is None:
            return None
        entry = self.recorded.get(name)
        if entry and (entry.get("size"), entry.get("tag")) == listed:
            return int(entry["rows"])
        self.footer_reads += 1
        footer = identity.read_footer(self.fs, f"{self.directory}/{name}")
        why = identity.verify(footer, name, key)
        if why == identity.LEGACY and not self.identities:
            why = None  # written before identities: verified the old way, once
        if why is not None or footer is None:
            self.recorded.pop(name, None)
            self.rejected[name] = why or "unreadable"
            self.changed = True
            return None
        self.add(name, footer.rows, *listed)
        return footer.rows

    def sweep(self) -> list[str]:
        """Remove the temporary files whose writer is gone (never a live writer's)."""
        removed = []
        for name, mtime in self.temps.items():
            if file_io.stale_temp(name, mtime):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(f"{self.directory}/{name}")
                removed.append(name)
        for name in removed:
            del self.temps[name]
        return removed

    def add(self, name: str, rows: int, size: int, tag: str) -> None:
        self.recorded[name] = {"rows": rows, "size": size, "tag": tag}
        self.listing[name] = (size, tag)
        self.changed = True

    def save(self) -> None:
        """Merge this index into the directory's ``outputs.json`` (atomic write)."""
        if not self.changed:
            return
        path = outputs_index(self.directory)
        current = _read_json(self.fs, path)
        files = dict(current.get("files", {})) if isinstance(current, dict) else {}
        for name in self.rejected:  # another run's entry for a file this one found wrong
            if name not in self.recorded:
                files.pop(name, None)
        files.update(self.recorded)
        # files without an identity are no longer trusted once every file here is vouched for
        vouched = self.identities or all(n in files or n in self.rejected for n in self.listing)
        document = {"files": files, "identities": vouched}
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        file_io.write_bytes_atomic(self.fs, path, data)
        self.changed = False


def stat(fs: AbstractFileSystem, path: str) -> tuple[int, str]:
    """``(size, tag)`` of a file just written, as a listing would show them."""
    info = fs.info(path)
    return int(info.get("size") or 0), file_tag(info)


def _mtime(info: dict[str, Any]) -> float | None:
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, dt.datetime):
        return mtime.timestamp()
    return float(mtime) if isinstance(mtime, (int, float)) else None


def _read_json(fs: AbstractFileSystem, path: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
