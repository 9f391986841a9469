"""``select`` and ``rename``: shape the columns (``_row_id`` always stays)."""

from __future__ import annotations

import polars as pl
from pydantic import Field, field_validator

from nightshift.tasks.operators.base import ROW_ID, Operator, register_operator


@register_operator
class Select(Operator):
    """Keep only these columns (plus ``_row_id``): ``select: {columns: [a, b]}``."""

    name = "select"
    safe_on_sample = True
    keeps_untouched_columns = False
    columns: list[str] = Field(min_length=1)

    def reads(self) -> list[str]:
        return list(self.columns)

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        return df.select([ROW_ID, *[c for c in self.columns if c != ROW_ID]])


@register_operator
class Rename(Operator):
    """Rename columns: ``rename: {columns: {old: new}}``."""

    name = "rename"
    safe_on_sample = True
    keeps_untouched_columns = False
    columns: dict[str, str] = Field(min_length=1)

    @field_validator("columns")
    @classmethod
    def _keep_row_id(cls, value: dict[str, str]) -> dict[str, str]:
        if ROW_ID in value or ROW_ID in value.values():
            raise ValueError(f"{ROW_ID} cannot be renamed")
        return value

    def reads(self) -> list[str]:
        return list(self.columns)

    def writes(self) -> list[str]:
        return list(self.columns.values())

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        return df.rename(self.columns)
