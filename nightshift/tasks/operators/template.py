"""``template``: render a prompt column from a sandboxed Jinja template.

Rendering uses Jinja's ``SandboxedEnvironment`` with ``StrictUndefined``: a template that
names a column the data does not have fails before any work. Null values render as an
empty string. Templates made only of text and ``{{ column }}`` over string columns are
compiled to a polars ``concat_str`` (the same result, without a Python loop per row).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import polars as pl
from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from nightshift.core.errors import SpecError, one_line
from nightshift.tasks.operators.base import ROW_ID, Operator, register_operator


def _finalize(value: Any) -> Any:
    return "" if value is None else value


_ENV = SandboxedEnvironment(undefined=StrictUndefined, finalize=_finalize, autoescape=False)


@register_operator
class Template(Operator):
    """``template: {output: prompt, template: "Translate to French:\\n{{ text }}"}``."""

    name = "template"
    safe_on_sample = True
    output: str
    template: str

    @cached_property
    def _ast(self) -> nodes.Template:
        try:
            return _ENV.parse(self.template)
        except TemplateSyntaxError as exc:
            raise SpecError(f"template: line {exc.lineno}: {exc.message}") from None

    def reads(self) -> list[str]:
        return sorted(meta.find_undeclared_variables(self._ast))

    def writes(self) -> list[str]:
        return [self.output]

    def _plain_parts(self) -> list[str | nodes.Name] | None:
        """Text and bare ``{{ name }}`` pieces, or None when the template does more."""
        if len(self._ast.body) != 1 or not isinstance(self._ast.body[0], nodes.Output):
            return None if self._ast.body else []
        parts: list[str | nodes.Name] = []
        for node in self._ast.body[0].nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append(node.data)
            elif isinstance(node, nodes.Name):
                parts.append(node)
            else:
                return None
        return parts

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        names = self.reads()
        columns = set(df.columns)
        missing = [n for n in names if n not in columns]
        if missing:
            raise SpecError(
                f"template: undefined variable(s) {', '.join(missing)} "
                f"(columns: {', '.join(c for c in df.columns[:20] if c != ROW_ID)}"
                f"{', ...' if df.width > 20 else ''})"
            )
        parts = self._plain_parts()
        if parts is not None and all(df.schema[n] == pl.String for n in names):
            exprs = [
                pl.lit(p) if isinstance(p, str) else pl.col(p.name).fill_null("") for p in parts
            ]
            rendered = pl.concat_str(exprs) if exprs else pl.lit("")
            return df.with_columns(rendered.alias(self.output))
        return df.with_columns(pl.Series(self.output, self.render_rows(df), dtype=pl.String))

    def render_rows(self, df: pl.DataFrame) -> list[str]:
        """Render the template on every row (Jinja); a row that fails is a one-line error
        naming it (``_row_id`` and its row in its source file)."""
        compiled = _ENV.from_string(self.template)
        names = self.reads()
        rows = (
            df.select(names).iter_rows(named=True) if names else ({} for _ in range(df.height))
        )
        values = []
        for i, row in enumerate(rows):
            try:
                values.append(compiled.render(row))
            except Exception as exc:  # UndefinedError, SecurityError, TypeError in a filter...
                row_id = df.get_column(ROW_ID)[i] if ROW_ID in df.columns else None
                raise TemplateRenderError(row_id, i, _jinja_error(exc)) from None
        return values


class TemplateRenderError(SpecError):
    """A template failed on one row: names the row (its ``_row_id``, and its row number in
    its source file, counting from 1) and what failed, in one line."""

    def __init__(self, row_id: int | None, index: int, detail: str) -> None:
        self.row_id, self.detail = row_id, detail
        #: the row's number in its source file, from 1 (the low 32 bits of ``_row_id``)
        self.row = (row_id & 0xFFFFFFFF) + 1 if row_id is not None else None
        where = (
            f"row {self.row} of its source file ({ROW_ID} {row_id})" if row_id is not None
            else f"row {index + 1} of the batch"
        )
        super().__init__(f"template: {where}: {detail}")


def _jinja_error(exc: Exception) -> str:
    kind = {
        "UndefinedError": "undefined",
        "SecurityError": "blocked by the sandbox",
    }.get(type(exc).__name__, type(exc).__name__)
    return f"{kind}: {one_line(exc)}"
