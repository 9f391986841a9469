"""The ``postgres`` sink: rows inserted or upserted by key, one transaction per window.

The window's rows are copied (``COPY``) into a temporary table and moved with
``INSERT ... ON CONFLICT (key) DO NOTHING`` (``mode: insert``: the first write of a key
stays) or ``DO UPDATE SET`` every other column (``mode: upsert``: the last write wins).
The default key is ``_row_id``, the stream sequence of the message: a window written
again after a crash changes nothing. With a key of your own (a business id), rows of one
window that share a key keep the last in stream order.

``create_table: true`` creates a missing table with a primary key on the key columns;
an existing table must have every written column and a unique index on the key (both
checked at start, before any window).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, LiteralString

import polars as pl

from nightshift.core.errors import NightshiftError, SpecError, Unavailable, one_line
from nightshift.streams.postgres import create_table
from nightshift.tasks.operators import ROW_ID


def pg_type(dtype: pl.DataType) -> LiteralString:
    """The PostgreSQL column type for a polars type (nested values become jsonb)."""
    if dtype.is_integer():
        return "bigint"
    if dtype.is_float():
        return "double precision"
    if dtype == pl.Boolean:
        return "boolean"
    if isinstance(dtype, pl.Datetime):
        return "timestamptz" if dtype.time_zone else "timestamp"
    if dtype == pl.Date:
        return "date"
    if isinstance(dtype, (pl.List, pl.Array, pl.Struct)):
        return "jsonb"
    return "text"


class PostgresSink:
    kind = "postgres"

    def __init__(
        self,
        label: str,
        connect_kwargs: dict[str, Any],
        display: str,
        table: str,
        mode: str,
        key: list[str],
        columns: list[str] | None,
        create_table: bool,
        schema: pl.Schema,
    ) -> None:
        self.label = label
        self.connect_kwargs = connect_kwargs
        self.display = display
        self.table = table
        self.mode = mode
        self.key = key
        self.create_table = create_table
        self.columns = list(columns) if columns else list(schema.names())
        missing = [c for c in [*self.columns, *key] if c not in schema]
        if missing:
            raise SpecError(
                f"{label}: column {', '.join(missing)} not in the stream's output "
                f"(columns: {', '.join(schema.names())})"
            )
        for k in key:
            if k not in self.columns:
                self.columns.append(k)
        self.schema = schema
        self.nested = {c for c in self.columns if pg_type(schema[c]) == "jsonb"}
        self.conn: Any = None

    # -- SQL -------------------------------------------------------------------------------
    def _ident(self, name: str) -> Any:
        from psycopg import sql

        return sql.Identifier(*name.split(".")) if "." in name else sql.Identifier(name)

    def _insert_sql(self) -> Any:
        from psycopg import sql

        cols = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        keys = sql.SQL(", ").join(map(sql.Identifier, self.key))
        others = [c for c in self.columns if c not in self.key]
        if self.mode == "upsert" and others:
            action = sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in others
            )
        else:
            action = sql.SQL("DO NOTHING")
        return sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM {s} ON CONFLICT ({k}) {a}").format(
            t=self._ident(self.table), c=cols, s=sql.Identifier(self._stage), k=keys, a=action
        )

    @property
    def _stage(self) -> str:
        return "nightshift_stage_" + self.table.replace(".", "_")

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        import psycopg
        from psycopg import sql

        self.close()
        try:
            self.conn = psycopg.connect(**{"connect_timeout": 10, **self.connect_kwargs})
        except psycopg.OperationalError as exc:  # refused, timed out, starting up: transient
            raise Unavailable(
                f"{self.label}: cannot connect to {self.display}: {one_line(exc)}", self.label
            ) from None
        except psycopg.Error as exc:
            raise NightshiftError(
                f"{self.label}: cannot connect to {self.display}: {one_line(exc)}"
            ) from None
        try:
            if self.create_table:
                defs = [
                    sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(pg_type(self.schema[c])))
                    for c in self.columns
                ]
                defs.append(
                    sql.SQL("PRIMARY KEY ({})").format(
                        sql.SQL(", ").join(map(sql.Identifier, self.key))
                    )
                )
                create_table(
                    self.conn,
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                        self._ident(self.table), sql.SQL(", ").join(defs)
                    ),
                    self.table,
                )
            self.conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {s} (LIKE {t} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                ).format(s=sql.Identifier(self._stage), t=self._ident(self.table))
            )
            self.conn.commit()
            with self.conn.transaction(force_rollback=True):  # plans the real statement
                self.conn.execute(self._insert_sql())
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:  # connection lost
            self.close()
            raise Unavailable(
                f"{self.label}: {self.display}: {one_line(exc)}", self.label
            ) from None
        except psycopg.Error as exc:
            self.conn.rollback()
            raise SpecError(
                f"{self.label}: table {self.table} on {self.display}: {one_line(exc)}"
            ) from None

    def write(self, window_id: str, frame: pl.DataFrame, supersedes: Sequence[str] = ()) -> int:
        from psycopg import sql
        from psycopg.types.json import Jsonb

        if frame.height == 0:
            return 0
        out = frame.select(self.columns)
        if self.key != [ROW_ID]:  # one row per key in a statement: the last in stream order
            out = (
                out.sort(ROW_ID).unique(subset=self.key, keep="last", maintain_order=True)
                if ROW_ID in out.columns
                else out.unique(subset=self.key, keep="last", maintain_order=True)
            )
        nulls = [k for k in self.key if out[k].null_count()]
        if nulls:
            raise NightshiftError(
                f"{self.label}: window {window_id}: null key column {', '.join(nulls)}"
            )
        nested = [i for i, c in enumerate(self.columns) if c in self.nested]
        copy_sql = sql.SQL("COPY {s} ({c}) FROM STDIN").format(
            s=sql.Identifier(self._stage), c=sql.SQL(", ").join(map(sql.Identifier, self.columns))
        )
        import psycopg

        if self.conn is None or self.conn.closed:  # lost in an outage: connect again
            self.open()
        conn = self.conn
        assert conn is not None  # open() connected or raised
        try:
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(copy_sql) as copy:
                    for row in out.iter_rows():
                        if nested:
                            row = list(row)
                            for i in nested:
                                row[i] = None if row[i] is None else Jsonb(row[i])
                        copy.write_row(row)
                cur.execute(self._insert_sql())
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # the connection is gone (a restart, a failover): the transaction did not
            # commit; the window is written again, whole, once the server answers
            self.close()
            raise Unavailable(
                f"{self.label}: window {window_id}: {self.display}: {one_line(exc)}", self.label
            ) from None
        except Exception as exc:
            raise NightshiftError(f"{self.label}: window {window_id}: {one_line(exc)}") from None
        return out.height

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # a connection lost in an outage: nothing to release
                pass
            finally:
                self.conn = None
