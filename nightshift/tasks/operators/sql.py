"""Parse user expressions as SQL (``polars.sql_expr``): a spec is never evaluated as Python."""

from __future__ import annotations

import polars as pl

from nightshift.core.errors import SpecError, one_line


def sql_expr(text: str, where: str) -> pl.Expr:
    """A polars expression from SQL text; ``where`` names the spec key for the error."""
    try:
        return pl.sql_expr(text)
    except Exception as exc:  # polars raises several SQL error types
        raise SpecError(f"{where}: cannot parse SQL expression {text!r}: {one_line(exc)}") from None
