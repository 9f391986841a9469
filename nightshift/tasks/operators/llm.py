"""The base of every LLM operator: prompts in, one request per row, results attached.

Each row becomes one request (chat messages: an optional system prompt and the user
prompt, or a row's own chat from a ``messages`` column) served by the named backend of
the running ``ServingTaskRunner``. Results come back attached to their own row whatever
the batch size or completion order. The operator
writes ``<output>`` plus ``<output>_error``, ``<output>_finish_reason``,
``<output>_prompt_tokens`` and ``<output>_completion_tokens``.

* ``skip_if`` (SQL): rows where it holds make no request and keep a null output.
* A row whose request fails (prompt too long, unparsable answer) gets its error in
  ``<output>_error``; the batch fails only when the share of failed rows is above
  ``max_error_rate``.
* The model identity (weights, chat template), sampling parameters and seed are in the
  step fingerprint: change any and the step recomputes.
* ``n`` (default 1) asks each row ``n`` times, sample ``i`` with seed ``seed + i`` (one
  request each); ``<output>``, ``<output>_error`` and ``<output>_finish_reason`` are then
  lists of ``n`` in sample order and the token columns the row's sums. A list ``input``
  column is asked element by element, with list outputs the same way (judge the
  candidates of a ``generate`` with ``n``). ``max_error_rate`` counts samples/elements.
  At ``n: 1`` (and without ``messages``) the config, keys and columns are what they
  were before ``n`` existed. See ``llm_inputs.py``.
* ``chat: false`` sends the rendered prompt as a raw completion (no chat template,
  no system message).
* Row-level hand-over: when the next stage's first step is an LLM step on an in-process
  engine (``generate -> judge`` on vLLM), the scheduler gives this step a
  :class:`Handover`: as soon as the engine has a row's answer, the row as this step
  will write it is built and the next step's requests for it are prefetched into the
  engine (``ServingPool.prefetch``), while the rest of the batch is still generating.
  The next step then runs as always and takes those answers for its equal requests;
  outputs, keys and the store are what they are without it.
* With an answer cache (on for ``openai_compatible`` serving), each answer is persisted
  in the step store as it arrives and a retried batch requests only the rows it is missing
  (``tasks/answer_cache.py``); the batch's requests, retries, tokens paid and estimated
  cost go to its ``BatchRef.usage``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nightshift.core.errors import StepFailed
from nightshift.core.fingerprints import digest
from nightshift.core.validation import Float, Int
from nightshift.tasks.operators.base import Operator
from nightshift.tasks.operators.llm_inputs import (
    Shape,
    chat_messages,
    check_messages_dtype,
    shape_of,
)
from nightshift.tasks.operators.sql import sql_expr
from nightshift.tasks.operators.template import Template

if TYPE_CHECKING:
    from nightshift.serving.interface import GenerationRequest, ResultCallback
    from nightshift.serving.pool import ServingPool

logger = logging.getLogger("nightshift.handover")

SUFFIXES = ("_error", "_finish_reason", "_prompt_tokens", "_completion_tokens")

#: Fields left out of the fingerprint and the spec entry at their default, so that steps
#: written before the field existed keep their keys (and ``explain`` sees no change).
_HIDDEN_DEFAULTS: dict[str, Any] = {"n": 1, "messages": None}

#: What a slot of a row holds before serving: a request's index, an error, or nothing.
_Slot = int | str | None


class LLMOperator(Operator):
    """Shared config and the request/response loop of LLM operators."""

    fusable: ClassVar[bool] = False
    uses_serving: ClassVar[bool] = True
    output_dtype: ClassVar[Any] = pl.String

    output: str
    serving: str = "default"
    system: str | None = None
    max_tokens: Int = Field(default=256, ge=1)
    temperature: Float = Field(default=0.0, ge=0)
    top_p: Float = Field(default=1.0, gt=0, le=1)
    seed: Int | None = 0
    stop: list[str] | None = None
    skip_if: str | None = None
    max_error_rate: Float = Field(default=0.1, ge=0, le=1)
    chat: bool = True
    #: samples per row (sample ``i`` is sampled with seed ``seed + i``); above 1 the
    #: output columns are lists of ``n`` samples.
    n: Int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _samples_differ(self) -> LLMOperator:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"n: {self.n} needs temperature > 0 (greedy decoding would give {self.n} "
                "identical samples)"
            )
        return self

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

    def messages_column(self) -> str | None:
        """The column of chat message lists the requests are built from (``generate``'s
        ``messages``), or None: the user message is :meth:`user_template`."""
        return None

    def list_input(self) -> str | None:
        """The column that, when it is a list, is asked element by element."""
        return None

    # -- contract -----------------------------------------------------------------------
    def _prompt_op(self) -> Template:
        template = "" if self.messages_column() else self.user_template()
        return Template(output="__prompt__", template=template)

    def reads(self) -> list[str]:
        column = self.messages_column()
        return [column] if column else self._prompt_op().reads()

    def writes(self) -> list[str]:
        return [self.output, *(self.output + s for s in SUFFIXES)]

    def config(self) -> dict[str, Any]:
        return _without_hidden_defaults(super().config())

    def spec_entry(self) -> dict[str, Any]:
        return {key: _without_hidden_defaults(value) for key, value in super().spec_entry().items()}

    def fingerprint(self, upstream: str, context: dict[str, Any] | None = None) -> str:
        serving = (context or {}).get("serving", {}).get(self.serving)
        return digest(super().fingerprint(upstream), serving)

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        """Serve through the pool of the ``ServingTaskRunner`` this runs under (the engine
        hands its pool over explicitly: :meth:`process_with`)."""
        return self.process_with(df, None)

    def process_with(self, df: pl.DataFrame, pool: ServingPool | None) -> pl.DataFrame:
        """``pool`` None: the running ``ServingTaskRunner``'s (looked up only when a row
        asks for a reply)."""
        from nightshift.serving.pool import current_pool

        shape, slots, requests = self._planned(df)
        results: list[Any] = []
        if requests:
            pool = pool or current_pool()
            results = self._serve(pool, requests, self._row_handover(df, shape, slots, pool))
        return self._collect(df, shape, slots, results)

    def requests_for(self, df: pl.DataFrame) -> list[GenerationRequest]:
        """The requests this step asks for the rows of ``df``, in order (what
        :meth:`process_with` sends): the row-level hand-over prefetches them."""
        return self._planned(df)[2]

    def _planned(self, df: pl.DataFrame) -> tuple[Shape, list[list[_Slot] | None], list[Any]]:
        shape = shape_of(self.n, self.list_input(), df.schema)
        column = self.messages_column()
        if column is not None:
            check_messages_dtype(column, df.schema[column])
        skip = (
            df.select(sql_expr(self.skip_if, "skip_if").fill_null(False)).to_series().to_list()
            if self.skip_if
            else [False] * df.height
        )
        todo = [i for i, s in enumerate(skip) if not s]
        slots, requests = self._plan(df, todo, shape)
        return shape, slots, requests

    def _row_handover(
        self, df: pl.DataFrame, shape: Shape, slots: list[list[_Slot] | None], pool: Any
    ) -> ResultCallback | None:
        """``on_row`` for :meth:`_serve` when the step task hands this step's rows over
        (its scope's :class:`Handover`): once every request of a row is answered, the
        row as :meth:`_collect` writes it is built and the next steps' requests for it
        are prefetched. Never fails the step: a row it cannot hand over is left to the
        next step to ask as usual."""
        from nightshift.tasks.answer_cache import current_scope

        scope = current_scope()
        handover: Handover | None = getattr(scope, "handover", None)
        if handover is None or not handover.to:
            return None
        owner: dict[int, int] = {}
        left = [0] * len(slots)
        for r, row_slots in enumerate(slots):
            for slot in row_slots or []:
                if isinstance(slot, int):
                    owner[slot] = r
                    left[r] += 1
        answers: dict[int, Any] = {}

        def on_row(index: int, result: Any) -> None:
            answers[index] = result
            r = owner[index]
            left[r] -= 1
            if left[r] == 0:
                try:
                    self._hand_over_row(df, shape, slots[r], answers, handover, pool, r)
                except Exception as exc:  # the next step asks it itself
                    logger.debug("row %d not handed over: %s", r, exc)

        return on_row

    def _hand_over_row(
        self,
        df: pl.DataFrame,
        shape: Shape,
        row_slots: list[_Slot] | None,
        answers: dict[int, Any],
        handover: Handover,
        pool: Any,
        r: int,
    ) -> None:
        own: list[Any] = []
        local: list[_Slot] = []
        for slot in row_slots or []:
            if isinstance(slot, int):
                own.append(answers[slot])
                local.append(len(own) - 1)
            else:
                local.append(slot)
        if any(not result.ok for result in own):
            return  # an error row: _collect may fail the batch; the next step decides
        row = self._collect(df.slice(r, 1), shape, [local], own)
        for step in handover.to:
            requests = step.requests_for(row)
            if requests:
                pool.prefetch(step.serving, requests, handover.group)

    # -- requests -------------------------------------------------------------------------
    def _plan(
        self, df: pl.DataFrame, todo: list[int], shape: Shape
    ) -> tuple[list[list[_Slot] | None], list[Any]]:
        """Per row its slots (None: skipped) and the requests they point at."""
        requests: list[Any] = []
        slots: list[list[_Slot] | None] = [None] * df.height
        ask = self._asker(requests)
        if shape == "elements":
            column = str(self.list_input())
            lists = df.get_column(column).to_list()
            flat = [e for r in todo for e in (lists[r] or [])]
            elements = pl.DataFrame([pl.Series(column, flat, dtype=df.schema[column].inner)])  # type: ignore[union-attr]
            rendered = iter(self._prompt_op().process(elements)["__prompt__"].to_list())
            for r in todo:
                if lists[r] is not None:
                    prompts = [next(rendered) for _ in lists[r]]
                    slots[r] = [
                        None if e is None else ask(p or "", self.seed)
                        for e, p in zip(lists[r], prompts, strict=True)
                    ]
            return slots, requests
        column = self.messages_column()
        contents: list[Any]
        if column is not None:
            values = df.get_column(column).gather(todo).to_list() if todo else []
            contents = [chat_messages(v, self.system) for v in values]
        else:
            subset = df[todo] if todo else df.clear()
            contents = [p or "" for p in self._prompt_op().process(subset)["__prompt__"].to_list()]
        for r, content in zip(todo, contents, strict=True):
            if isinstance(content, str) and column is not None:  # a bad message list: its error
                slots[r] = [content for _ in range(self.n)]
            elif shape == "samples":
                slots[r] = [
                    ask(content, None if self.seed is None else self.seed + i)
                    for i in range(self.n)
                ]
            else:
                slots[r] = [ask(content, self.seed)]
        return slots, requests

    def _asker(self, requests: list[Any]) -> Any:
        """``ask(content, seed) -> index``: append the request for a user message (a str)
        or a whole chat (a list of ``{role, content}``) with that seed to ``requests``."""
        from nightshift.serving.interface import ChatMessage, GenerationRequest, SamplingParams

        schema = self.response_schema()
        sampling: dict[int | None, SamplingParams] = {}
        system = [ChatMessage(role="system", content=self.system)] if self.system else []

        def ask(content: str | list[dict[str, str]], seed: int | None) -> int:
            if seed not in sampling:
                sampling[seed] = SamplingParams(
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    seed=seed,
                    stop=self.stop,
                    json_schema=schema,
                )
            params = sampling[seed]
            if isinstance(content, list):
                request = GenerationRequest(
                    messages=[ChatMessage(**m) for m in content], sampling=params
                )
            elif self.chat:
                request = GenerationRequest(
                    messages=[*system, ChatMessage(role="user", content=content)], sampling=params
                )
            else:
                request = GenerationRequest(prompt=content, sampling=params)
            requests.append(request)
            return len(requests) - 1

        return ask

    def _serve(
        self, pool: Any, requests: list[Any], on_row: ResultCallback | None = None
    ) -> list[Any]:
        """Answers for ``requests`` on this step's serving config, through the batch's
        answer cache (:func:`~nightshift.tasks.answer_cache.serve`); ``on_row`` sees each
        as soon as it is answered."""
        from nightshift.tasks.answer_cache import serve

        return serve(pool, self.serving, requests, on_row)

    # -- results --------------------------------------------------------------------------
    def _collect(
        self, df: pl.DataFrame, shape: Shape, slots: list[list[_Slot] | None], results: list[Any]
    ) -> pl.DataFrame:
        """Fold the answers back into their rows (lists for ``samples``/``elements``);
        fail the batch past ``max_error_rate`` (counted over slots: samples, elements)."""
        values: list[Any] = []
        errors: list[Any] = []
        finish: list[Any] = []
        texts: list[str | None] = []
        p_tok, c_tok, lengths = [0] * df.height, [0] * df.height, []
        asked = failed = 0
        first_error: str | None = None
        for r, row_slots in enumerate(slots):
            row: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
            for slot in row_slots or []:
                value = error = reason = text = None
                if isinstance(slot, str):
                    error = slot
                elif isinstance(slot, int):
                    result = results[slot]
                    reason = result.finish_reason
                    p_tok[r] += result.prompt_tokens
                    c_tok[r] += result.completion_tokens
                    if result.error is not None:
                        error = result.error
                    else:
                        text = result.text
                        value, error = self.parse(result.text or "")
                        if error is not None:
                            value = None
                asked += slot is not None
                if error is not None:
                    failed += 1
                    first_error = first_error or error
                for acc, item in zip(row, (value, error, reason), strict=True):
                    acc.append(item)
                texts.append(text)
            lengths.append(len(row_slots or []))
            if shape == "scalar":
                for acc, items in zip((values, errors, finish), row, strict=True):
                    acc.append(items[0] if items else None)
                if not row_slots:
                    texts.append(None)
            else:
                for acc, items in zip((values, errors, finish), row, strict=True):
                    acc.append(None if row_slots is None else items)
        if asked and failed / asked > self.max_error_rate:
            unit = {"scalar": "rows", "samples": "samples", "elements": "list elements"}[shape]
            raise StepFailed(
                f"{failed}/{asked} {unit} failed ({100 * failed / asked:.0f}% > "
                f"max_error_rate {100 * self.max_error_rate:.0f}%); first: {first_error}"
            )
        listed = shape != "scalar"
        o = self.output

        def typed(dtype: Any) -> Any:
            return pl.List(dtype) if listed else dtype

        extra = self.extra_outputs(texts)
        if listed:
            extra = {k: _nest(s, lengths, slots) for k, s in extra.items()}
        columns = [
            pl.Series(o, values, dtype=typed(self.output_dtype)),
            pl.Series(o + "_error", errors, dtype=typed(pl.String)),
            pl.Series(o + "_finish_reason", finish, dtype=typed(pl.String)),
            pl.Series(o + "_prompt_tokens", p_tok, dtype=pl.Int64),
            pl.Series(o + "_completion_tokens", c_tok, dtype=pl.Int64),
            *extra.values(),
        ]
        return df.with_columns(columns)


class Handover(BaseModel):
    """What a step task's last LLM step hands its rows over to, row by row: the first
    LLM step of each next stage (on an in-process engine), prefetched under ``group``
    (the run, for ``ServingPool.drop_prefetched``). Built by the scheduler."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    to: list[LLMOperator]
    group: str


def _nest(series: pl.Series, lengths: list[int], slots: list[Any]) -> pl.Series:
    """A per-slot series as one list per row (null for a row that asked nothing)."""
    flat, out, at = series.to_list(), [], 0
    for length, row_slots in zip(lengths, slots, strict=True):
        out.append(None if row_slots is None else flat[at : at + length])
        at += length
    return pl.Series(series.name, out, dtype=pl.List(series.dtype))


def _without_hidden_defaults(config: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in config.items() if not (k in _HIDDEN_DEFAULTS and v == _HIDDEN_DEFAULTS[k])
    }


class PromptedLLM(LLMOperator):
    """An LLM operator whose user message is a template or an input column (a list
    column: one request per element, a list of outputs); ``generate`` also takes a
    ``messages`` column of whole chats."""

    prompt: str | None = None
    input: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PromptedLLM:
        takes_messages = "messages" in type(self).model_fields
        given = [self.prompt, self.input, self.messages_column()]
        if sum(v is not None for v in given) != 1:
            raise ValueError(
                "give exactly one of 'prompt' (a template), 'input' (a column) or 'messages' "
                "(a column of chat message lists)"
                if takes_messages
                else "give exactly one of 'prompt' (a template) or 'input' (a column)"
            )
        if not self.chat and self.system:
            raise ValueError("'system' needs chat: true (a raw completion prompt has no roles)")
        if not self.chat and self.messages_column():
            raise ValueError("'messages' needs chat: true (a raw completion prompt has no roles)")
        return self

    def messages_column(self) -> str | None:
        return getattr(self, "messages", None)

    def list_input(self) -> str | None:
        return self.input

    def user_template(self) -> str:
        return self.prompt if self.prompt is not None else "{{ " + str(self.input) + " }}"
