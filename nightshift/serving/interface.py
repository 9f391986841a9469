"""The one serving interface: ``Backend.generate(requests, on_result, usage) -> results``.

Every backend (in-process vLLM, an OpenAI-compatible HTTP server, the fake used in
orchestration tests) takes a sequence of :class:`GenerationRequest` and returns one
:class:`GenerationResult` per request, in the same order; it reports each row to the
optional ``on_result`` callback and ``usage`` counters (:func:`report` for backends whose
rows finish together). A request that cannot be
served (prompt too long, invalid JSON under a schema, ...) yields a result with
``error`` set; it never makes the whole batch raise.

Example::

    from nightshift.serving.interface import GenerationRequest, SamplingParams

    req = GenerationRequest(
        messages=[{"role": "user", "content": "Say hi"}],
        sampling=SamplingParams(max_tokens=16, temperature=0.0),
    )
    [result] = backend.generate([req])
    if result.error is None:
        print(result.text, result.finish_reason)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nightshift.core.usage import Usage

__all__ = [
    "Backend",
    "ChatMessage",
    "GenerationRequest",
    "GenerationResult",
    "RowCallback",
    "SamplingParams",
]


class SamplingParams(BaseModel):
    """How to sample one completion.

    ``temperature=0`` is greedy decoding (deterministic for a given backend identity).
    ``json_schema`` asks for output that is JSON valid under that schema: backends
    constrain decoding when they can and always parse and validate afterwards.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None
    json_schema: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    """One chat turn, as in the OpenAI chat API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(min_length=1)
    content: str


class GenerationRequest(BaseModel):
    """One generation: either chat ``messages`` or a raw ``prompt``, exactly one.

    Chat messages go through the model's chat template; a raw prompt is sent as is.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)

    @model_validator(mode="after")
    def _exactly_one_input(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of 'messages' or 'prompt'")
        if self.messages is not None and not self.messages:
            raise ValueError("GenerationRequest.messages must not be empty")
        return self

    def last_text(self) -> str:
        """The raw prompt, or the content of the last chat message."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return self.messages[-1].content


class GenerationResult(BaseModel):
    """The outcome of one request.

    Exactly one of ``text`` and ``error`` is set: a failed row has ``text=None`` and a
    one-line ``error``. ``finish_reason`` is ``"stop"`` or ``"length"`` on success.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @classmethod
    def failed(cls, error: str, prompt_tokens: int = 0) -> GenerationResult:
        """A result for a row that could not be served."""
        return cls(text=None, finish_reason=None, prompt_tokens=prompt_tokens, error=error)

    @property
    def ok(self) -> bool:
        """True when the row was served without error."""
        return self.error is None


@runtime_checkable
class Backend(Protocol):
    """What every serving backend implements.

    Implementations must be safe to call from several threads (serialise internally
    if the engine is not) and must return ``len(requests)`` results in input order.
    """

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
    ) -> list[GenerationResult]:
        """Serve ``requests``; per-row failures go into that row's ``error``.

        ``on_result(index, result)`` is called for each row as it finishes (HTTP backends,
        streaming) or for every row once the call returns (engines: :func:`report`);
        ``usage`` accumulates this call's requests, failures and tokens.
        """
        ...

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable facts that change outputs (model, weights, chat template
        hash, dtype, ...): they belong in a cache fingerprint."""
        ...

    def close(self) -> None:
        """Release the engine and its memory. Idempotent."""
        ...


#: ``on_result(index, result)``: a row of a ``generate`` call has its answer.
ResultCallback = Callable[[int, GenerationResult], None]

#: ``on_row(index, result)``: an early look at a row's answer, as soon as the engine has
#: it, while the rest of the call is still being served (backends whose class sets
#: ``rows_early = True`` take it as ``generate``'s ``on_row`` keyword: the in-process vLLM
#: engine, the fake). Called at most once per row, on the calling thread; a hint only:
#: the call's returned results are the answers (``on_result`` and ``usage`` count
#: them), and a row's hint may be missing (the call raised) but never differs from
#: its result in a call that returns. The serving pool uses it for the row-level
#: hand-over between LLM steps (``ServingPool.prefetch``).
RowCallback = ResultCallback


def report(
    results: Sequence[GenerationResult],
    on_result: ResultCallback | None = None,
    usage: Usage | None = None,
) -> None:
    """The bookkeeping of a ``generate`` call whose rows all finish together: count each
    row into ``usage`` and hand it to ``on_result``, in input order."""
    for index, result in enumerate(results):
        if usage is not None:
            usage.requests += 1
            if result.ok:
                usage.add_answer(result.prompt_tokens, result.completion_tokens)
            else:
                usage.failed += 1
        if on_result is not None:
            on_result(index, result)
