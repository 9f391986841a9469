"""``map``: new or replaced columns from SQL expressions, e.g. ``{n_chars: "length(text)"}``."""

from __future__ import annotations

import polars as pl
from pydantic import Field

from nightshift.tasks.operators.base import Operator, register_operator
from nightshift.tasks.operators.sql import sql_expr


@register_operator
class Map(Operator):
    """Add or replace columns: ``map: {columns: {name: "SQL expression", ...}}``."""

    name = "map"
    safe_on_sample = True
    columns: dict[str, str] = Field(min_length=1)

    def writes(self) -> list[str]:
        return list(self.columns)

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        exprs = [sql_expr(text, f"map.columns.{col}").alias(col) for col, text in self.columns.items()]
        return df.with_columns(exprs)
