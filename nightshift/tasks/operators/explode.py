"""``explode``: one row per element of a list column (1 -> N rows).

``explode: {column: questions}`` turns a row whose ``questions`` is a list of 3 into 3
rows, each with one element; ``columns: [answer, answer_error]`` explodes several list
columns together (zipped: element ``i`` of each goes to child ``i``). The other columns
are copied to every child.

* **Row identity**: child ``i`` of a row gets ``_row_id = child_row_ids(parent, i)``
  (``tasks/batches.py``: SplitMix64 of the parent's id and the index), the same in every
  run and for every batch size, and ``_parent_id`` = its parent's ``_row_id`` (replaced
  when a row is exploded again: it names the immediate parent).
* **Empty or null list**: no child row. ``keep_empty: true`` keeps one child (index 0)
  with a null instead.
* **Lists of unequal length** (zipped columns): that row is an error, not a failed
  batch: it gives one child (index 0) with nulls in the exploded columns and the reason
  in ``explode_error`` (``error_column``); the batch fails only when more than
  ``max_error_rate`` of its rows are errors.
* A column that is not a list (a JSON string: ``parse_json`` it first) fails ``validate``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from nightshift.core.errors import SpecError, StepFailed
from nightshift.tasks.operators.base import ROW_ID, Operator, register_operator

PARENT_ID = "_parent_id"


@register_operator
class Explode(Operator):
    """``explode: {column: C}`` or ``explode: {columns: [A, B]}`` (zipped)."""

    name = "explode"
    makes_rows: ClassVar[bool] = True
    keeps_untouched_columns: ClassVar[bool] = False
    safe_on_sample = True

    column: str | None = None
    columns: list[str] | None = Field(default=None, min_length=1)
    #: an empty or null list keeps one row (with a null) instead of none
    keep_empty: bool = False
    #: where a row's error goes (lists of unequal length)
    error_column: str = "explode_error"
    max_error_rate: float = Field(default=0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _one_of(self) -> Explode:
        if (self.column is None) == (self.columns is None):
            raise ValueError("give either column: C or columns: [A, B] (zipped)")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError("columns lists a column twice")
        if self.error_column in self.exploded() or self.error_column in (ROW_ID, PARENT_ID):
            raise ValueError(
                f"error_column {self.error_column!r} is an exploded or reserved column"
            )
        return self

    def exploded(self) -> list[str]:
        return [self.column] if self.column is not None else list(self.columns or [])

    def reads(self) -> list[str]:
        return self.exploded()

    def writes(self) -> list[str]:
        return [*self.exploded(), PARENT_ID, self.error_column]

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        from nightshift.tasks.batches import child_row_ids  # the one rule (imports operators)

        cols = self.exploded()
        for c in cols:
            dtype = df.schema[c]
            if not isinstance(dtype, (pl.List, pl.Array)):
                raise SpecError(
                    f"column {c!r} is {dtype}, not a list: explode needs a list column "
                    "(a JSON array in a string: parse_json it first)"
                )
        df = df.with_columns(
            pl.col(c).cast(pl.List(df.schema[c].inner))  # type: ignore[union-attr]
            for c in cols
            if isinstance(df.schema[c], pl.Array)
        )
        lengths = [pl.col(c).list.len().fill_null(0) for c in cols]
        bad = (
            pl.any_horizontal([n != lengths[0] for n in lengths[1:]])
            if len(cols) > 1
            else pl.lit(False)
        )
        n = lengths[0]
        single = bad | (n == 0) if self.keep_empty else bad
        facts = df.select(n.cast(pl.Int64).alias("n"), single.alias("single"))
        if not facts.get_column("single").any():  # the common case: explode as it is
            counts = facts.get_column("n").to_numpy()
            out = df.with_columns(pl.lit(None, dtype=pl.String).alias(self.error_column)).explode(
                cols, empty_as_null=False, keep_nulls=False
            )
        else:
            out, counts = self._explode_with_singles(df, cols, bad, lengths, single)
        # each child's index within its parent: its position minus its parent's first
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        index = np.arange(out.height, dtype=np.int64) - starts
        parents = out.get_column(ROW_ID)
        order = [ROW_ID, PARENT_ID, *(c for c in out.columns if c not in (ROW_ID, PARENT_ID))]
        return out.with_columns(child_row_ids(parents, index), parents.alias(PARENT_ID)).select(
            order
        )

    def _explode_with_singles(
        self,
        df: pl.DataFrame,
        cols: list[str],
        bad: pl.Expr,
        lengths: list[pl.Expr],
        single: pl.Expr,
    ) -> tuple[pl.DataFrame, np.ndarray]:
        """Explode where some rows give one child with nulls (an error, or an empty list
        kept); fail past ``max_error_rate``."""
        error = (
            pl.when(bad)
            .then(
                pl.format(
                    "lists of unequal length: " + ", ".join(f"{c} {{}}" for c in cols), *lengths
                )
            )
            .otherwise(pl.lit(None, dtype=pl.String))
        )
        count = pl.when(single).then(1).otherwise(lengths[0])
        marked = df.with_columns(
            error.alias(self.error_column),
            count.cast(pl.Int64).alias("__count"),
            single.alias("__single"),
        )
        failed = int(marked.get_column(self.error_column).is_not_null().sum())
        if df.height and failed / df.height > self.max_error_rate:
            first = marked.filter(pl.col(self.error_column).is_not_null()).row(0, named=True)
            raise StepFailed(
                f"{failed}/{df.height} rows failed ({100 * failed / df.height:.0f}% > "
                f"max_error_rate {100 * self.max_error_rate:.0f}%); first: row "
                f"{first[ROW_ID]}: {first[self.error_column]}"
            )
        kept = marked.filter(pl.col("__count") > 0).with_columns(
            pl.when(pl.col("__single")).then(None).otherwise(pl.col(c)).alias(c) for c in cols
        )
        counts = kept.get_column("__count").to_numpy()
        out = kept.drop("__count", "__single").explode(cols, empty_as_null=False, keep_nulls=True)
        return out, counts
