"""``generate`` and ``translate``: free text (or JSON under a schema) from an LLM."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from nightshift.tasks.operators.base import register_operator
from nightshift.tasks.operators.llm import PromptedLLM


@register_operator
class Generate(PromptedLLM):
    """``generate: {prompt: "Summarize: {{ text }}", output: summary, system: ...}``.

    ``json_schema`` asks for JSON valid under that schema: a JSON schema mapping (YAML or
    Python) or, from Python, a pydantic model class (its ``model_json_schema()`` is used
    and is what the fingerprint sees). Decoding is guided where the backend has it (vLLM)
    and every reply is parsed and validated against the schema afterwards: a reply that
    does not parse or validate is that row's error. The output column holds the JSON text.

    ``messages: chat`` (instead of ``prompt``/``input``) sends each row's own chat, a
    list of ``{role, content}`` (``llm_inputs.py``); ``n: 4`` keeps four samples per row
    in list columns (``llm.py``).
    """

    name = "generate"
    json_schema: dict[str, Any] | None = None
    #: a column of chat message lists (``List[Struct{role, content}]``), instead of
    #: ``prompt``/``input``: each row's whole chat is sent, ``system`` first when given
    messages: str | None = None

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_from_model(cls, value: Any) -> Any:
        from nightshift.serving.structured import schema_of

        return None if value is None else schema_of(value)

    def response_schema(self) -> dict[str, Any] | None:
        return self.json_schema

    def parse(self, text: str) -> tuple[Any, str | None]:
        if self.json_schema is None:
            return text, None
        from nightshift.serving.structured import json_problem

        problem = json_problem(text, self.json_schema)
        if problem is not None:
            return None, f"reply is not valid JSON for the schema: {problem}"
        return text, None


@register_operator
class Translate(PromptedLLM):
    """``translate: {input: text, to: French, output: text_fr}``."""

    name = "translate"
    to: str
    source_language: str | None = None
    system: str | None = "You are a professional translator. Reply with the translation only."

    def user_template(self) -> str:
        source = f" from {self.source_language}" if self.source_language else ""
        body = super().user_template()
        return f"Translate the following text{source} to {self.to}.\n\n{body}"
