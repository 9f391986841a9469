"""Stream definitions kept in a PostgreSQL table, for ``nightshift stream SPEC --discover``.

The spec file keeps what the streams share (store, serving, restart, ``artifact_every_s``)
and says where the table is::

    discover: {connection: {block: pg-prod}, table: nightshift_streams, poll_s: 5}

The table (created when missing, unless ``create_table: false``)::

    CREATE TABLE nightshift_streams (
        name        text PRIMARY KEY,             -- the stream's name
        definition  jsonb NOT NULL,               -- one ``streams:`` entry (its name optional)
        enabled     boolean NOT NULL DEFAULT true,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );

Every ``poll_s`` the process reads the table and compares it with what runs: a new
enabled row starts a stream; a removed or disabled one drains (its open window and the
windows in flight finish, are sunk and acked) and stops; a **changed** one (the SHA-256
of its canonical JSON ``definition`` differs; ``enabled`` and ``updated_at`` are not
part of it) drains and starts again with the new definition. A bad definition is one
log line naming the row and the key at fault; that stream does not start, the others go
on, and the line is not repeated until the definition changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from nightshift.blocks.loading import load_block
from nightshift.core.errors import NightshiftError, SourceError, SpecError, one_line
from nightshift.core.validation import validation_message
from nightshift.streams.spec import (
    DiscoverSpec,
    PostgresConnectionSpec,
    StreamPipelineSpec,
    StreamSpec,
)


@dataclass(frozen=True)
class Definition:
    """One row of the table."""

    name: str
    entry: dict[str, Any]
    enabled: bool
    digest: str
    table: str = "nightshift_streams"

    @property
    def label(self) -> str:
        """How errors name it: ``nightshift_streams['reviews-live']``."""
        return f"{self.table}[{self.name!r}]"


def definition_digest(definition: Any) -> str:
    """What "changed" means: the SHA-256 of the definition's canonical JSON."""
    return hashlib.sha256(
        json.dumps(definition, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def connection_kwargs(spec: PostgresConnectionSpec, label: str) -> tuple[dict[str, Any], str]:
    """``(psycopg.connect kwargs, display)`` for a ``{block}`` or ``{url}`` connection."""
    from nightshift.streams.postgres import PostgresConnection

    if spec.block is not None:
        block = load_block(PostgresConnection, spec.block, f"{label}.block")
        return block.connect_kwargs(), block.display()
    return ({"conninfo": spec.url, "application_name": "nightshift-stream"}, spec.url or "")


def pipeline_spec(definition: Definition, shared: StreamSpec) -> StreamSpec:
    """The definition as a one-stream spec (with the shared store, serving, restart);
    a problem raises one line naming the row and the key."""
    entry = definition.entry
    if not isinstance(entry, dict):
        raise SpecError(
            f"{definition.label}.definition: expected a JSON object (one streams: "
            f"entry), got {type(entry).__name__}"
        )
    if entry.get("name", definition.name) != definition.name:
        raise SpecError(
            f"{definition.label}.definition.name: {entry['name']!r} is not the "
            f"row's name {definition.name!r}"
        )
    entry = {**entry, "name": definition.name}
    try:
        stream = StreamPipelineSpec.model_validate(entry)
    except ValidationError as exc:
        raise SpecError(validation_message(exc, definition.label)) from None
    return shared.model_copy(update={"streams": [stream], "discover": None})


class DefinitionTable:
    """Reads the definitions table (one connection, reopened when lost)."""

    def __init__(self, spec: DiscoverSpec) -> None:
        self.spec = spec
        self.label = "discover"
        self.conn: Any = None
        self.display = ""

    def open(self) -> None:
        import psycopg
        from psycopg import sql

        kwargs, self.display = connection_kwargs(self.spec.connection, f"{self.label}.connection")
        try:
            self.conn = psycopg.connect(**kwargs, autocommit=True)
        except psycopg.Error as exc:
            raise SourceError(
                f"{self.label}.connection: cannot connect to {self.display}: {one_line(exc)}"
            ) from None
        table = sql.Identifier(*self.spec.table.split("."))
        try:
            if self.spec.create_table:
                from nightshift.streams.postgres import create_table

                create_table(
                    self.conn,
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, definition jsonb NOT NULL,"
                        " enabled boolean NOT NULL DEFAULT true,"
                        " updated_at timestamptz NOT NULL DEFAULT now())"
                    ).format(table),
                    self.spec.table,
                )
            self.conn.execute(
                sql.SQL("SELECT name, definition, enabled FROM {} LIMIT 0").format(table)
            )
        except psycopg.Error as exc:
            raise SpecError(
                f"{self.label}.table {self.spec.table} on {self.display}: {one_line(exc)}"
            ) from None

    def read(self) -> list[Definition]:
        """Every row, by name."""
        import psycopg
        from psycopg import sql

        query = sql.SQL("SELECT name, definition, enabled FROM {} ORDER BY name").format(
            sql.Identifier(*self.spec.table.split("."))
        )
        for attempt in range(2):
            try:
                if self.conn is None or self.conn.closed:
                    self.open()
                assert self.conn is not None  # open() connects or raises
                rows = self.conn.execute(query).fetchall()
                return [
                    Definition(
                        name,
                        definition,
                        bool(enabled),
                        definition_digest(definition),
                        self.spec.table,
                    )
                    for name, definition, enabled in rows
                ]
            except psycopg.OperationalError as exc:
                self.close()
                if attempt:
                    raise SourceError(
                        f"{self.label}: cannot read {self.spec.table} on "
                        f"{self.display}: {one_line(exc)}"
                    ) from None
        raise NightshiftError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None
