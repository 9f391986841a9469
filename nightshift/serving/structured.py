"""Structured output: a JSON schema (or a pydantic model) that a reply must satisfy.

Backends with guided decoding (vLLM: ``StructuredOutputsParams(json=schema)``, grammar
compiled by xgrammar) constrain generation to the schema; every reply is still parsed
and validated here afterwards, so backends without it (or a reply cut by ``max_tokens``)
give a per-row error instead of bad data.

Example::

    from pydantic import BaseModel
    from nightshift.serving.structured import json_problem, schema_of

    class Person(BaseModel):
        name: str
        age: int

    schema = schema_of(Person)                     # a plain JSON schema dict
    assert json_problem('{"name": "Ada", "age": 36}', schema) is None
    assert "age" in json_problem('{"name": "Ada"}', schema)
"""

from __future__ import annotations

import json
from typing import Any

from nightshift.core.errors import one_line

__all__ = ["json_problem", "schema_of"]


def schema_of(schema: Any) -> dict[str, Any]:
    """A JSON schema dict from a dict or a pydantic model class."""
    if isinstance(schema, dict):
        return schema
    json_schema = getattr(schema, "model_json_schema", None)
    if isinstance(schema, type) and callable(json_schema):
        result = json_schema()
        if isinstance(result, dict):
            return result
    raise TypeError(f"expected a JSON schema (dict) or a pydantic model class, got {schema!r}")


def json_problem(text: str, schema: dict[str, Any]) -> str | None:
    """None if ``text`` is JSON valid under ``schema``, else a short reason.

    Validation uses ``jsonschema`` (a dependency of Prefect, hence always installed).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"JSON parse error: {exc.msg} at char {exc.pos}"
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"schema violation{f' at {where}' if where else ''}: {one_line(exc.message, whole=True)}"
    except jsonschema.SchemaError as exc:
        return f"invalid schema: {one_line(exc.message, whole=True)}"
    return None
