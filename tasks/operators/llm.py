"""The base of every LLM operator: prompts in, one request per row, results attached.

Each row becomes one request (chat messages: an optional system prompt and the user
prompt) served by the named backend of the running ``ServingTaskRunner``. Results come back
attached to their own row whatever the batch size or completion order. The operator
writes ``<output>`` plus ``<output>_error``, ``<output>_finish_reason``,
``<output>_prompt_tokens`` and ``<output>_completion_tokens``.

* ``skip_if`` (SQL): rows where it holds make no request and keep a null output.
* A row whose request fails (prompt too long, unparsable answer) gets its error in
  ``<output>_error``; the batch fails only when the share of failed rows is above
  ``max_error_rate``.
* The model identity (weights, chat template), sampling parameters and seed are in the
  step fingerprint: change any and the step recomputes.
* ``chat: false`` sends the rendered prompt as a raw completion (no chat template,
  no system message).
* With an answer cache (on for ``openai_compatible`` serving), each answer is persisted
  in the step store as it arrives and a retried batch requests only the rows it is missing
  (``tasks/answer_cache.py``); the batch's requests, retries, tokens paid and estimated
  cost go to its ``BatchRef.usage``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl
from pydantic import Field, model_validator

from nightshift.core.errors import StepFailed
from nightshift.core.fingerprints import digest
from nightshift.tasks.operators.base import Operator
from nightshift.tasks.operators.sql import sql_expr
from nightshift.tasks.operators.template import Template

SUFFIXES = ("_error", "_finish_reason", "_prompt_tokens", "_completion_tokens")


class LLMOperator(Operator):
    """Shared config and the request/response loop of LLM operators."""

    fusable: ClassVar[bool] = False
    uses_serving: ClassVar[bool] = True
    output_dtype: ClassVar[Any] = pl.String

    output: str
    serving: str = "default"
    system: str | None = None
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = 0
    stop: list[str] | None = None
    skip_if: str | None = None
    max_error_rate: float = Field(default=0.1, ge=0, le=1)
    chat: bool = True

    def token_counts(self, df: pl.DataFrame) -> dict[str, int]:
        """The prompt and completion tokens in this step's ``<output>_*_tokens`` columns."""
        counts = {}
        for kind in ("prompt", "completion"):
            column = f"{self.output}_{kind}_tokens"
            if column in df.columns:
                counts[kind] = int(df[column].sum() or 0)
        return counts

    # -- what subclasses define -------------------------------------------------------
    def user_template(self) -> str:
        """Jinja template of the user message (over the row's columns)."""
        raise NotImplementedError

    def response_schema(self) -> dict[str, Any] | None:
        """A JSON schema the reply must follow (guided decoding), or None."""
        return None

    def parse(self, text: str) -> tuple[Any, str | None]:
        """The output value from the reply text, or an error message for this row."""
        return text, None

    def extra_outputs(self, texts: list[str | None]) -> dict[str, pl.Series]:
        return {}

    # -- contract -----------------------------------------------------------------------
    def _prompt_op(self) -> Template:
        return Template(output="__prompt__", template=self.user_template())

    def reads(self) -> list[str]:
        return self._prompt_op().reads()

    def writes(self) -> list[str]:
        return [self.output, *(self.output + s for s in SUFFIXES)]

    def fingerprint(self, upstream: str, context: dict[str, Any] | None = None) -> str:
        serving = (context or {}).get("serving", {}).get(self.serving)
        return digest(super().fingerprint(upstream), serving)

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        from nightshift.serving.interface import ChatMessage, GenerationRequest, SamplingParams
        from nightshift.serving.pool import current_pool

        skip = (
            df.select(sql_expr(self.skip_if, "skip_if").fill_null(False)).to_series().to_list()
            if self.skip_if
            else [False] * df.height
        )
        todo = [i for i, s in enumerate(skip) if not s]
        prompts = self._prompt_op().process(df[todo] if todo else df.clear())["__prompt__"].to_list()
        if df.height == 0:
            return self._attach(df, [None] * 0, [None] * 0, [None] * 0, [0] * 0, [0] * 0, [])
        sampling = SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=self.seed, stop=self.stop, json_schema=self.response_schema(),
        )
        requests = [
            GenerationRequest(
                messages=[
                    *([ChatMessage(role="system", content=self.system)] if self.system else []),
                    ChatMessage(role="user", content=p or ""),
                ],
                sampling=sampling,
            )
            if self.chat
            else GenerationRequest(prompt=p or "", sampling=sampling)
            for p in prompts
        ]
        results = self._serve(current_pool(), requests) if requests else []
        n = df.height
        values: list[Any] = [None] * n
        texts: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        finish: list[str | None] = [None] * n
        p_tok, c_tok = [0] * n, [0] * n
        for row, result in zip(todo, results):
            finish[row], p_tok[row], c_tok[row] = result.finish_reason, result.prompt_tokens, result.completion_tokens
            if result.error is not None:
                errors[row] = result.error
                continue
            texts[row] = result.text
            values[row], errors[row] = self.parse(result.text or "")
            if errors[row] is not None:
                values[row] = None
        failed = [i for i in todo if errors[i] is not None]
        if todo and len(failed) / len(todo) > self.max_error_rate:
            raise StepFailed(
                f"{len(failed)}/{len(todo)} rows failed ({100 * len(failed) / len(todo):.0f}% > "
                f"max_error_rate {100 * self.max_error_rate:.0f}%); first: {errors[failed[0]]}"
            )
        return self._attach(df, values, errors, finish, p_tok, c_tok, texts)

    def _serve(self, pool: Any, requests: list[Any]) -> list[Any]:
        """Answers for ``requests`` on this step's serving config, through the batch's
        answer cache (:func:`~nightshift.tasks.answer_cache.serve`)."""
        from nightshift.tasks.answer_cache import serve

        return serve(pool, self.serving, requests)

    def _attach(self, df, values, errors, finish, p_tok, c_tok, texts) -> pl.DataFrame:  # type: ignore[no-untyped-def]
        o = self.output
        columns = [
            pl.Series(o, values, dtype=self.output_dtype),
            pl.Series(o + "_error", errors, dtype=pl.String),
            pl.Series(o + "_finish_reason", finish, dtype=pl.String),
            pl.Series(o + "_prompt_tokens", p_tok, dtype=pl.Int64),
            pl.Series(o + "_completion_tokens", c_tok, dtype=pl.Int64),
            *self.extra_outputs(texts if texts else [None] * df.height).values(),
        ]
        return df.with_columns(columns)


class PromptedLLM(LLMOperator):
    """An LLM operator whose user message is a template or an input column."""

    prompt: str | None = None
    input: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "PromptedLLM":
        if (self.prompt is None) == (self.input is None):
            raise ValueError("give exactly one of 'prompt' (a template) or 'input' (a column)")
        if not self.chat and self.system:
            raise ValueError("'system' needs chat: true (a raw completion prompt has no roles)")
        return self

    def user_template(self) -> str:
        return self.prompt if self.prompt is not None else "{{ " + str(self.input) + " }}"
