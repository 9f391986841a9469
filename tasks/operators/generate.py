"""``generate`` and ``translate``: free text (or JSON under a schema) from an LLM."""

from __future__ import annotations

import json
from typing import Any

from tasks.operators.base import register_operator
from tasks.operators.llm import PromptedLLM


@register_operator
class Generate(PromptedLLM):
    """``generate: {prompt: "Summarize: {{ text }}", output: summary, system: ...}``.

    ``json_schema`` asks for JSON valid under that schema (guided decoding where the
    backend has it; always parsed and validated): a reply that does not parse is that
    row's error. The output column then holds the JSON text.
    """

    name = "generate"
    json_schema: dict[str, Any] | None = None

    def response_schema(self) -> dict[str, Any] | None:
        return self.json_schema

    def parse(self, text: str) -> tuple[Any, str | None]:
        if self.json_schema is None:
            return text, None
        try:
            json.loads(text)
        except ValueError as exc:
            return None, f"reply is not valid JSON: {exc}"
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
