"""``group``: one row per group of rows over the whole data set (N -> 1, a barrier step).

``group: {by: [question], collect: {answers: list(answer), n: count(), best: max(score)}}``
gives one row per distinct ``question`` with the aggregates ``collect`` names, e.g. to
gather every answer of one question for a consensus judge.

* **Aggregates**: ``list(c)`` (the values in source order), ``count()`` (rows),
  ``count(c)`` (non-null values), ``first(c)``, ``last(c)``, ``min(c)``, ``max(c)``,
  ``mean(c)``, ``sum(c)``, ``n_unique(c)``. Other columns are dropped: a row of the
  output holds ``_row_id``, the ``by`` columns and the ``collect`` columns.
* **Order**: groups in order of their first row in source order (files sorted by path,
  then row order), members in source order inside ``list``/``first``/``last``. Null keys
  form a group of their own.
* **Row identity**: ``_row_id = group_row_ids(key)`` (``tasks/batches.py``: a 64-bit
  hash of the key's JSON), so a group keeps its id whichever rows and batches it came from.
* **Batches**: the index (every group, aggregated) is built once from every upstream
  batch; batch ``j`` then writes the groups whose first row is in it (reading only the
  part of the index that names batch ``j``). Each batch's output depends on every
  batch (a later row may join an earlier group), so adding a file recomputes every
  batch of this step.
"""

from __future__ import annotations

import re
from typing import ClassVar

import polars as pl
from pydantic import Field, model_validator

from nightshift.tasks.operators.base import (
    BATCH,
    ROW_ID,
    BarrierOperator,
    StateReader,
    register_operator,
)

#: aggregate name -> whether it needs a column
AGGREGATES: dict[str, bool] = {
    "list": True,
    "count": False,
    "first": True,
    "last": True,
    "min": True,
    "max": True,
    "mean": True,
    "sum": True,
    "n_unique": True,
}
_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(\s*([^()]*?)\s*\)\s*$")
#: the column of an index built without batches naming each group's first row
FIRST = "__first_row_id"


def parse_aggregate(text: str) -> tuple[str, str | None]:
    """``"max(score)"`` -> ``("max", "score")``; ``"count()"`` -> ``("count", None)``."""
    match = _CALL.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an aggregate call such as list(answer) or count()")
    func, arg = match.group(1), match.group(2) or None
    if func not in AGGREGATES:
        raise ValueError(f"unknown aggregate {func!r} in {text!r} (known: {', '.join(AGGREGATES)})")
    if AGGREGATES[func] and arg is None:
        raise ValueError(f"{text!r}: {func} needs a column, e.g. {func}(answer)")
    return func, arg


def _expr(func: str, column: str | None) -> pl.Expr:
    if func == "count":
        return (pl.len() if column is None else pl.col(column).count()).cast(pl.Int64)
    col = pl.col(column)  # type: ignore[arg-type]
    if func == "list":
        return col  # a group's values, as a list
    if func == "n_unique":
        return col.n_unique().cast(pl.Int64)
    return getattr(col, func)()


@register_operator
class Group(BarrierOperator):
    """``group: {by: [cols], collect: {name: "aggregate(column)", ...}}``."""

    name = "group"
    makes_rows: ClassVar[bool] = True
    keeps_untouched_columns: ClassVar[bool] = False
    global_index: ClassVar[bool] = True
    safe_on_sample = True

    by: list[str] = Field(min_length=1)
    collect: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Group:
        for name, text in self.collect.items():
            try:
                parse_aggregate(text)
            except ValueError as exc:
                raise ValueError(f"collect.{name}: {exc}") from None
        clash = [n for n in self.collect if n in self.by or n == ROW_ID]
        if clash:
            raise ValueError(f"collect.{clash[0]}: the name is a by column or reserved; rename it")
        if len(set(self.by)) != len(self.by):
            raise ValueError("by lists a column twice")
        return self

    def aggregates(self) -> dict[str, tuple[str, str | None]]:
        return {name: parse_aggregate(text) for name, text in self.collect.items()}

    def reads(self) -> list[str]:
        used = [c for _, c in self.aggregates().values() if c is not None]
        return list(dict.fromkeys([*self.by, *used]))

    def writes(self) -> list[str]:
        return [*self.by, *self.collect]

    def index(self, data: pl.LazyFrame) -> pl.DataFrame:
        """Every group, in output order, with its aggregates, its id and where its first
        row is: the batch (``BATCH``) when the engine built ``data``, which only grows in
        output order, so a Parquet reader skips the other batches' row groups; its
        ``_row_id`` (``FIRST``) otherwise (a dry run, a preview, a caller's own frame)."""
        from nightshift.tasks.batches import group_row_ids  # the one rule (imports operators)

        aggs = [_expr(f, c).alias(n) for n, (f, c) in self.aggregates().items()]
        if BATCH in data.collect_schema():
            aggs.insert(0, pl.col(BATCH).first())
        else:
            aggs.insert(0, pl.col(ROW_ID).first().alias(FIRST))
        groups = data.group_by(self.by, maintain_order=True).agg(*aggs).collect(engine="in-memory")
        return groups.select(group_row_ids(groups.select(self.by)), pl.all())

    def read_state(self, read: StateReader, df: pl.DataFrame, batch: int) -> pl.DataFrame:
        """Only the groups whose first row is in batch ``batch`` (a barrier step runs on
        whole batches, so those are the groups whose first row is in ``df``)."""
        return read(pl.col(BATCH) == batch)

    def apply(self, df: pl.DataFrame, state: pl.DataFrame) -> pl.DataFrame:
        """The groups whose first row is in ``df``, in output order. An index the engine
        built (with ``BATCH``) comes through ``read_state``: those groups already."""
        if FIRST in state.columns:
            state = state.filter(pl.col(FIRST).is_in(df.get_column(ROW_ID).implode()))
        return state.drop(FIRST, BATCH, strict=False)
