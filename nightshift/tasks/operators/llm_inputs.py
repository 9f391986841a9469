"""What an LLM step asks per row: one request, ``n`` samples, or one per list element.

An LLM operator's row becomes one or more *slots*, each its own request (so each goes
through the answer cache on its own and each has its own error):

* ``scalar``: one slot per row, today's scalar output columns;
* ``samples``: ``n > 1`` slots per row, sample ``i`` sampled with seed ``seed + i``;
* ``elements``: the ``input`` column is a list (the candidates of a ``generate`` with
  ``n``): one slot per element, each rendered through the operator's template alone.

The output of ``samples`` and ``elements`` is a list column, in slot order.

It also checks a ``messages`` column (multi-turn chat, a list of ``{role, content}``):
its type at validate time (:func:`check_messages_dtype`, run by the schema dry run) and
each row's list when the row is asked (:func:`chat_messages`: a bad row is that row's
error, not the batch's).
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl

from nightshift.core.errors import SpecError

__all__ = ["ROLES", "Shape", "chat_messages", "check_messages_dtype", "is_list", "shape_of"]

Shape = Literal["scalar", "samples", "elements"]

#: The roles a ``messages`` column may use (what chat templates know).
ROLES = ("system", "user", "assistant")


def is_list(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.List)


def shape_of(n: int, input_column: str | None, schema: pl.Schema) -> Shape:
    """How a row of this schema is asked: see the module docstring."""
    listed = input_column is not None and input_column in schema and is_list(schema[input_column])
    if listed and n > 1:
        raise SpecError(
            f"n: {n} over the list column '{input_column}' is not supported (each element "
            "would need n samples); use n: 1 to ask once per element"
        )
    if listed:
        return "elements"
    return "samples" if n > 1 else "scalar"


def check_messages_dtype(column: str, dtype: pl.DataType) -> None:
    """A ``messages`` column must be ``List[Struct{role: String, content: String}]``."""
    inner = dtype.inner if isinstance(dtype, pl.List) else None
    fields = {f.name: f.dtype for f in inner.fields} if isinstance(inner, pl.Struct) else {}
    if fields.get("role") != pl.String or fields.get("content") != pl.String:
        raise SpecError(
            f"messages column '{column}' must be a list of {{role, content}} string structs "
            f"(List[Struct{{role: String, content: String}}]), not {dtype}"
        )


def chat_messages(value: Any, system: str | None) -> list[dict[str, str]] | str:
    """The chat of one row (``system`` first when given), or what is wrong with it (a
    one-line message that becomes the row's error)."""
    if value is None:
        return "messages is null"
    if not value:
        return "messages is an empty list"
    out = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(value):
        if message is None:
            return f"messages[{i}] is null"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{i}].role is {role!r}, not one of {', '.join(ROLES)}"
        if content is None:
            return f"messages[{i}].content is null"
        out.append({"role": role, "content": content})
    return out
