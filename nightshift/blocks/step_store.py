"""The step store: where every (step, batch) result lives, as Parquet, local or on S3.

Its layout (stable; any Parquet tool can read it) is built in one module,
``core/layout.py`` (:class:`~nightshift.core.layout.StoreLayout`, ``StepStore.layout``);
docs/engine.md shows it. Every unit output carries its identity in its Parquet footer
(``core/identity.py``), so the store trusts a file only if it proves to be the unit its
name says; Prefect's result records (``_prefect/<key>``) are trusted only while the
output they point to does (:meth:`StepStore.read_path`).

Register the block with ``prefect block register -m nightshift.blocks.step_store`` and
use it by name in a spec (``store: {block: prod}``), or give a URL directly
(``store: {url: s3://bucket/x}``). Credentials are SecretStr fields (kept out of logs and
the UI) or come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) as s3fs
reads them.
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
from pydantic import Field, SecretStr, field_validator

from nightshift.core import file_io, identity, inventory
from nightshift.core.errors import StoreError, one_line
from nightshift.core.fingerprints import digest
from nightshift.core.layout import StoreLayout
from nightshift.core.locks import ProcessAwareLockManager

#: URL schemes a store may use: local files, and object stores fsspec reaches (their
#: writes are one PUT, whole or nothing). ``memory://`` is for tests.
SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")


def check_url(url: str) -> str:
    """``url`` if a store can live there, else a ValueError saying what is accepted."""
    if not url or not url.strip():
        raise ValueError("a store URL is empty; give file://PATH or s3://BUCKET/PREFIX")
    if "://" not in url:
        if ":" in url.split("/", 1)[0]:  # host:port/x, c:x, ...
            raise ValueError(f"{url!r} has no scheme; give file://PATH or s3://BUCKET/PREFIX")
        return url  # a plain local path
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SCHEMES:
        raise ValueError(
            f"{url!r}: scheme {scheme}:// is not a store; use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if scheme.lower() != "file" and not rest.strip("/"):
        raise ValueError(f"{url!r} names no bucket; give {scheme}://BUCKET[/PREFIX]")
    if scheme.lower() == "file" and not rest:
        raise ValueError(f"{url!r} names no folder; give file://PATH")
    return url


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

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        return check_url(url)

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

    @property
    def layout(self) -> StoreLayout:
        """Every path of the store (``core/layout.py``)."""
        return StoreLayout(self.root)

    def path(self, *parts: str) -> str:
        return self.layout.join(*parts)

    @property
    def scheme(self) -> str:
        return "file" if self.is_local else self.url.partition("://")[0].lower()

    def display(self, path: str) -> str:
        """A URI for humans and references: ``<scheme>://bucket/key`` on an object store
        (``s3://…``, ``memory://…``), the absolute path locally."""
        return path if self.is_local else f"{self.scheme}://{path.lstrip('/')}"

    # -- frames ---------------------------------------------------------------------
    def write_frame(
        self,
        path: str,
        df: pl.DataFrame,
        metadata: dict[str, str] | None = None,
        compression: str = file_io.COMPRESSION,
    ) -> None:
        """Write ``df`` atomically; ``metadata`` goes into its Parquet footer (a unit's
        identity: :func:`nightshift.core.identity.of_frame`); ``compression``: Parquet's
        codec."""
        try:
            file_io.write_atomic(self.fs, path, df, metadata, compression)
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
        """Rows in a stored Parquet file, or None if it is missing or unreadable (asked of
        the store itself, never of a cached listing: another run may just have written it)."""
        self.fs.invalidate_cache(path)
        return file_io.footer_rows(self.fs, path)

    def unit_rows(self, path: str, key: str) -> int | None:
        """Rows of the output of unit ``key`` at ``path`` if the file is there and proves
        to be that unit's (its footer's identity), else None: recompute it. Asked of the
        store itself (a HEAD and a footer read), never of a cached listing."""
        self.fs.invalidate_cache(path)
        footer = identity.read_footer(self.fs, path)
        if footer is None or identity.verify(footer, path.rsplit("/", 1)[-1], key) is not None:
            return None
        return footer.rows

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
        """Read a Prefect result record (``WritableFileSystem`` contract).

        A record of a step task points to its output (a ``BatchRef``): it is returned only
        while that output proves to be the record's unit (:meth:`unit_rows`); else this
        raises FileNotFoundError, so Prefect sees no record and the task, holding the
        unit's lock, computes the unit and writes the record again. Nothing is deleted:
        a record another run wrote is never removed by this one.
        """
        content = self.fs.cat_file(self.result_record_path(path))
        content = content.encode() if isinstance(content, str) else content
        ref = _record_ref(content)
        if ref is not None and self.unit_rows(ref[0], ref[1]) is None:
            raise FileNotFoundError(f"{path}: its output {ref[0]} is missing or not its unit's")
        return content

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
            if not self._saved_as(name):
                self.save(name=name, overwrite=True)
        return self

    def _saved_as(self, name: str) -> bool:
        """True, and this block bound to it, when the API already holds this very store
        under ``name`` (every run after the first): one read instead of a save, which
        builds the block's JSON schema on the client (~0.5 s of every run's start)."""
        if self.access_key_id is not None or self.secret_access_key is not None:
            return False
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                document = client.read_block_document_by_name(
                    name=name, block_type_slug=self.get_block_type_slug(), include_secrets=False
                )
        except ObjectNotFound:
            return False
        mine = self.model_dump(mode="json")
        mine.pop("block_type_slug", None)  # Prefect's serializer adds it; not block data
        if document.data != mine:
            return False
        self._block_document_id = document.id
        self._block_document_name = document.name
        return True

    def result_record_path(self, key: str) -> str:
        return self.layout.result_record(key)

    def lock_manager(self) -> ProcessAwareLockManager:
        """File locks for Prefect's SERIALIZABLE transactions (stale ones are broken).

        Local stores keep locks beside the data, so every process on the machine shares
        them. S3 stores lock on the local machine only (under PREFECT_HOME); runs on
        different machines are still safe from corruption because every write is atomic
        and deterministic, but may compute the same batch twice.
        """
        if self.is_local:
            return ProcessAwareLockManager(Path(self.layout.locks_dir()))
        name = self.url.replace("://", "_").replace("/", "_")
        return ProcessAwareLockManager(PREFECT_HOME.value() / "nightshift-locks" / name)


def _record_ref(content: bytes) -> tuple[str, str] | None:
    """``(path, key)`` of the output a step task's result record points to, else None."""
    try:
        record = json.loads(content)
        result = record.get("result")
        value = json.loads(result) if isinstance(result, str) else result
        if isinstance(value, dict) and isinstance(value.get("data"), dict):
            value = value["data"]  # Prefect's JSON envelope of a pydantic model
        if isinstance(value, dict) and isinstance(value.get("path"), str) and value.get("key"):
            return value["path"], str(value["key"])
    except (ValueError, AttributeError, TypeError):
        pass
    return None
