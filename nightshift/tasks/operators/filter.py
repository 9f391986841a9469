"""``filter``: keep the rows where a boolean SQL expression holds."""

from __future__ import annotations

import polars as pl

from nightshift.core.errors import SpecError
from nightshift.tasks.operators.base import Operator, register_operator
from nightshift.tasks.operators.sql import sql_expr


@register_operator
class Filter(Operator):
    """Keep rows: ``filter: {where: "length(text) > 20"}`` (nulls count as false)."""

    name = "filter"
    safe_on_sample = True
    where: str

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        expr = sql_expr(self.where, "filter.where")
        dtype = df.lazy().select(expr).collect_schema().dtypes()[0]
        if dtype != pl.Boolean:
            raise SpecError(f"filter.where {self.where!r} gives {dtype}, not a boolean")
        return df.filter(expr)
