"""``dedup``: exact de-duplication across the whole data set (a barrier step).

The first occurrence in source order (files sorted by path, then row order) is kept. The
index of duplicate ``_row_id`` values is computed once over every upstream batch; batch
``j``'s output depends only on batches ``0..j``, so a nightly run over a folder that gained
a later file recomputes only that file's batches.
"""

from __future__ import annotations

import polars as pl
from pydantic import Field

from nightshift.tasks.operators.base import ROW_ID, BarrierOperator, register_operator


@register_operator
class Dedup(BarrierOperator):
    """``dedup: {on: [text]}``: drop rows whose ``on`` values appeared earlier."""

    name = "dedup"
    safe_on_sample = True
    on: list[str] = Field(min_length=1)

    def reads(self) -> list[str]:
        return list(self.on)

    def index(self, data: pl.LazyFrame) -> pl.DataFrame:
        return (
            data.select([ROW_ID, *self.on])
            .filter(~pl.struct(self.on).is_first_distinct())
            .select(ROW_ID)
            .collect()
        )

    def apply(self, df: pl.DataFrame, state: pl.DataFrame) -> pl.DataFrame:
        return df.filter(~pl.col(ROW_ID).is_in(state[ROW_ID].implode()))
