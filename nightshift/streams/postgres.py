"""A PostgreSQL connection, as a Prefect block: where a stream's ``postgres`` sink writes.

```yaml
sinks:
  - postgres: {connection: {block: pg-prod}, table: enriched, mode: upsert}
  - postgres: {connection: {url: "postgresql://app@db:5432/events"}, table: raw}  # password: PGPASSWORD
```

The password is a ``SecretStr`` (never shown in the UI, logs or artifacts). A connection
given by URL must not carry a password: libpq then takes it from ``PGPASSWORD`` or
``~/.pgpass``, like ``psql`` does.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class PostgresConnection(Block):
    """Host, port, database, user and a secret password for psycopg."""

    _block_type_name = "Nightshift PostgreSQL Connection"
    _block_type_slug = "nightshift-postgres-connection"
    _description = "A PostgreSQL database that Nightshift stream sinks write to."

    host: str = "127.0.0.1"
    port: int = Field(default=5432, ge=1, le=65535)
    database: str = "postgres"
    user: str = "postgres"
    password: SecretStr | None = None
    sslmode: str | None = Field(default=None, description="disable, require, verify-full, ...")
    connect_timeout_s: int = Field(default=10, ge=1)

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect`` (the secret unwrapped only here)."""
        kwargs: dict[str, Any] = dict(
            host=self.host,
            port=self.port,
            dbname=self.database,
            user=self.user,
            connect_timeout=self.connect_timeout_s,
            application_name="nightshift-stream",
        )
        if self.password is not None:
            kwargs["password"] = self.password.get_secret_value()
        if self.sslmode:
            kwargs["sslmode"] = self.sslmode
        return kwargs

    def display(self) -> str:
        """``user@host:port/database``: for logs and errors (no secret)."""
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


def create_table(conn: Any, statement: Any, table: str) -> None:
    """Run ``statement`` (a ``CREATE TABLE IF NOT EXISTS`` of ``table``) in its own
    transaction, holding a transaction-level advisory lock on the table's name: two
    processes that create the same table at once (two workers of a stream starting
    together) would otherwise race in PostgreSQL's catalog, and the loser fails with
    ``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"nightshift:{table}",))
        conn.execute(statement)
