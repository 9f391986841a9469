"""``judge`` / ``score`` (LLM-as-judge: a number) and ``classify`` (one of fixed labels)."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

import polars as pl
from pydantic import Field, model_validator

from nightshift.core.validation import Int
from nightshift.tasks.operators.base import register_operator
from nightshift.tasks.operators.llm import PromptedLLM


@register_operator
class Judge(PromptedLLM):
    """``judge: {input: text_fr, rubric: "fluency", min: 1, max: 5, output: quality}``.

    The output is the first integer in the reply within ``[min, max]``; the raw reply is
    kept in ``<output>_raw``. A reply without one is that row's error.
    """

    name = "judge"
    output_dtype: ClassVar[Any] = pl.Int64
    rubric: str
    min: Int = 1
    max: Int = 5
    max_tokens: Int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "Judge":
        if self.min >= self.max:
            raise ValueError("min must be below max")
        return self

    def writes(self) -> list[str]:
        return [*super().writes(), f"{self.output}_raw"]

    def user_template(self) -> str:
        return (
            f"Rate the following text for: {self.rubric}.\n"
            f"Answer with a single integer from {self.min} to {self.max} and nothing else.\n\n"
            f"Text:\n{super().user_template()}"
        )

    def parse(self, text: str) -> tuple[Any, str | None]:
        for match in re.findall(r"-?\d+", text):
            value = int(match)
            if self.min <= value <= self.max:
                return value, None
        return None, f"no score from {self.min} to {self.max} in reply {text[:80]!r}"

    def extra_outputs(self, texts: list[str | None]) -> dict[str, pl.Series]:
        return {"raw": pl.Series(f"{self.output}_raw", texts, dtype=pl.String)}


@register_operator
class Score(Judge):
    """``score``: the same as ``judge``."""

    name = "score"


@register_operator
class Classify(PromptedLLM):
    """``classify: {input: text, labels: [positive, negative], output: sentiment}``.

    Asks for ``{"label": ...}`` under a JSON schema whose ``enum`` is the labels (guided
    decoding where available); falls back to the first label named in the reply.
    """

    name = "classify"
    labels: list[str] = Field(min_length=2)
    max_tokens: Int = Field(default=32, ge=1)

    def user_template(self) -> str:
        options = ", ".join(self.labels)
        return (
            f"Classify the following text as one of: {options}.\n"
            'Answer in JSON as {"label": "<one of the labels>"}.\n\n'
            f"Text:\n{super().user_template()}"
        )

    def response_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": list(self.labels)}},
            "required": ["label"],
        }

    def parse(self, text: str) -> tuple[Any, str | None]:
        try:
            label = json.loads(text).get("label")
            if label in self.labels:
                return label, None
        except (ValueError, AttributeError):
            pass
        lowered = text.lower()
        for label in self.labels:
            if label.lower() in lowered:
                return label, None
        return None, f"no label of {self.labels} in reply {text[:80]!r}"
