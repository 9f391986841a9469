"""The step store: where every (step, batch) result lives, as Parquet, local or on S3.

Layout under the root URL (stable; any Parquet tool can read it)::

    <root>/<pipeline>/sources/<file-identity>.parquet   JSONL/CSV inputs staged as Parquet
    <root>/<pipeline>/steps/<NN>-<ops>/<file>-<start>-<key>.parquet   one file per (step, batch)
    <root>/<pipeline>/steps/<NN>-<ops>/manifest.json    written when the step completes
    <root>/<pipeline>/barriers/<NN>-<op>-<key>.parquet  state of a barrier step (dedup index)
    <root>/<pipeline>/answers/<NN>-<ops>/<file>-<start>-<key>/  LLM answers of a batch in progress
    <root>/_prefect/<cache key>                          Prefect result records (small refs)

``<key>`` is the content address of the batch at that step: the source file identity and
row range chained through each step's fingerprint (operator, code version, config).

Register the block with ``prefect block register -m blocks`` and use it by name in a
spec (``store: {block: prod}``), or give a URL directly (``store: {url: s3://bucket/x}``).
Credentials are SecretStr fields (kept out of logs and the UI) or come from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) as s3fs reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
from fsspec import AbstractFileSystem
from prefect.filesystems import WritableFileSystem
from prefect.settings import PREFECT_HOME
from pydantic import Field, SecretStr

from nightshift.core import file_io, inventory
from nightshift.core.errors import StoreError, one_line
from nightshift.core.fingerprints import digest
from nightshift.core.locks import ProcessAwareLockManager


class StepStore(WritableFileSystem):
    """A Parquet step store rooted at ``url`` (``file://…`` or ``s3://bucket/prefix``)."""

    _block_type_name = "Nightshift Step Store"
    _block_type_slug = "nightshift-step-store"
    _description = "Where Nightshift keeps one Parquet file per (step, batch)."

    url: str = Field(
        default="file://./.nightshift", description="file://PATH or s3://BUCKET/PREFIX"
    )
    endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto, ...)")
    access_key_id: SecretStr | None = Field(default=None, description="S3 key (or from env)")
    secret_access_key: SecretStr | None = Field(default=None, description="S3 secret (or from env)")
    region: str | None = None
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="extra fsspec options"
    )

    # -- filesystem ---------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.url.startswith("file://") or "://" not in self.url

    def fs_options(self) -> dict[str, Any]:
        options = dict(self.storage_options)
        if not self.is_local:
            if self.endpoint_url:
                options.setdefault("endpoint_url", self.endpoint_url)
            if self.access_key_id:
                options.setdefault("key", self.access_key_id.get_secret_value())
            if self.secret_access_key:
                options.setdefault("secret", self.secret_access_key.get_secret_value())
            if self.region:
                options.setdefault("client_kwargs", {"region_name": self.region})
        return options

    @cached_property
    def _fs_and_root(self) -> tuple[AbstractFileSystem, str]:
        url = self.url
        if self.is_local:
            path = url[len("file://") :] if url.startswith("file://") else url
            return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
        try:
            fs, root = fsspec.core.url_to_fs(url, **self.fs_options())
        except Exception as exc:
            raise StoreError(f"store {url}: cannot open: {one_line(exc)}") from None
        return fs, root.rstrip("/")

    @property
    def fs(self) -> AbstractFileSystem:
        return self._fs_and_root[0]

    @property
    def root(self) -> str:
        return self._fs_and_root[1]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def display(self, path: str) -> str:
        """A URI for humans and references: ``s3://…`` on S3, the absolute path locally."""
        return path if self.is_local else f"s3://{path}"

    # -- frames ---------------------------------------------------------------------
    def write_frame(self, path: str, df: pl.DataFrame) -> None:
        try:
            file_io.write_atomic(self.fs, path, df)
        except Exception as exc:
            raise StoreError(f"store: cannot write {self.display(path)}: {one_line(exc)}") from None

    def read_frame(self, path: str, columns: list[str] | None = None) -> pl.DataFrame:
        return file_io.read(self.fs, path, columns)

    def read_rows(self, path: str, start: int, stop: int) -> pl.DataFrame:
        """Rows ``[start, stop)`` of a stored Parquet file (only the row groups needed)."""
        return file_io.read_slice(self.fs, path, start, stop)

    def stat(self, path: str) -> tuple[int, str]:
        """``(size, tag)`` of a stored file, as a directory listing shows them."""
        return inventory.stat(self.fs, path)

    def frame_rows(self, path: str) -> int | None:
        """Rows in a stored Parquet file, or None if it is missing or unreadable."""
        return file_io.footer_rows(self.fs, path)

    def scan_frames(self, paths: list[str], columns: list[str]) -> pl.LazyFrame:
        """The given files as one lazy frame, in order (only ``columns`` are read)."""
        if self.is_local:
            return pl.scan_parquet(paths).select(columns) if paths else pl.LazyFrame()
        frames = [self.read_frame(p, columns) for p in paths]
        return pl.concat(frames).lazy() if frames else pl.LazyFrame()

    # -- small JSON documents (manifests, source index) -------------------------------
    def write_json(self, path: str, document: Any) -> None:
        data = json.dumps(document, indent=1, sort_keys=True, default=str).encode()
        file_io.write_bytes_atomic(self.fs, path, data)

    def read_json(self, path: str) -> Any | None:
        try:
            return json.loads(file_io.read_bytes(self.fs, path))
        except FileNotFoundError:
            return None

    def delete_file(self, path: str) -> None:
        """Remove one file; a missing file is fine. (Not ``delete``: that is Prefect's
        ``Block.delete(name)``, which removes a saved block document.)"""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def check_writable(self) -> None:
        """Fail early, naming the store, if a file cannot be written and removed there."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        try:
            file_io.write_bytes_atomic(self.fs, probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise StoreError(f"store {self.url} is not writable: {one_line(exc)}") from None

    # -- Prefect integration: the store is also Prefect's result storage ----------------
    # WritableFileSystem declares read_path/write_path async; Prefect calls aread_path /
    # awrite_path when a block has them, and its own blocks (LocalFileSystem) are sync here too
    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Read a Prefect result record (``WritableFileSystem`` contract)."""
        return file_io.read_bytes(self.fs, self.result_record_path(path))

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Write a Prefect result record atomically (``WritableFileSystem`` contract)."""
        target = self.result_record_path(path)
        file_io.write_bytes_atomic(self.fs, target, content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self.write_path, path, content)

    def as_result_storage(self) -> StepStore:
        """This store, saved as a block so Prefect can keep its result records here.

        A store given by URL in a spec is saved under a name derived from its URL
        (``auto-<hash>``); it holds no secrets (credentials then come from the
        environment). A store loaded by name is used as it is.
        """
        if getattr(self, "_block_document_id", None) is None:
            name = "auto-" + digest(self.url, self.endpoint_url or "")[:16]
            self.save(name=name, overwrite=True)
        return self

    def result_record_path(self, key: str) -> str:
        return self.path("_prefect", key)

    def lock_manager(self) -> ProcessAwareLockManager:
        """File locks for Prefect's SERIALIZABLE transactions (stale ones are broken).

        Local stores keep locks beside the data, so every process on the machine shares
        them. S3 stores lock on the local machine only (under PREFECT_HOME); runs on
        different machines are still safe from corruption because every write is atomic
        and deterministic, but may compute the same batch twice.
        """
        if self.is_local:
            return ProcessAwareLockManager(Path(self.path("_locks")))
        name = self.url.replace("://", "_").replace("/", "_")
        return ProcessAwareLockManager(PREFECT_HOME.value() / "nightshift-locks" / name)
