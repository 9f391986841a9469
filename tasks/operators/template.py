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

from tasks.errors import SpecError
from tasks.operators.base import Operator, register_operator


def _finalize(value: Any) -> Any:
    return "" if value is None else value


_ENV = SandboxedEnvironment(undefined=StrictUndefined, finalize=_finalize, autoescape=False)


@register_operator
class Template(Operator):
    """``template: {output: prompt, template: "Translate to French:\\n{{ text }}"}``."""

    name = "template"
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
        missing = [n for n in names if n not in df.columns]
        if missing:
            raise SpecError(
                f"template: undefined variable(s) {', '.join(missing)} "
                f"(columns: {', '.join(df.columns)})"
            )
        parts = self._plain_parts()
        if parts is not None and all(df.schema[n] == pl.String for n in names):
            exprs = [
                pl.lit(p) if isinstance(p, str) else pl.col(p.name).fill_null("") for p in parts
            ]
            rendered = pl.concat_str(exprs) if exprs else pl.lit("")
            return df.with_columns(rendered.alias(self.output))
        compiled = _ENV.from_string(self.template)
        values = [compiled.render(row) for row in df.select(names).iter_rows(named=True)]
        return df.with_columns(pl.Series(self.output, values, dtype=pl.String))
