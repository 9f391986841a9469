"""A deterministic fake :class:`~nightshift.serving.interface.Backend` for orchestration tests.

It never loads a model: the text of each row is ``f"echo: {prompt or last message}"``
(cut to ``max_tokens`` whitespace-separated words, with ``finish_reason="length"``
then). Token counts are word counts. It records every call and can be told to fail
chosen rows or chosen calls.

Example::

    from nightshift.serving.fake_backend import FakeBackend

    fake = FakeBackend(fail_texts={"bad"})
    results = fake.generate(requests)      # the row whose prompt is "bad" has .error
    assert fake.calls == 1
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, ClassVar

from nightshift.core.usage import Usage
from nightshift.serving.interface import GenerationRequest, GenerationResult, ResultCallback, report

__all__ = ["FakeBackend", "FakeBackendError"]


class FakeBackendError(RuntimeError):
    """Raised by :meth:`FakeBackend.generate` for the calls listed in ``fail_calls``."""


class FakeBackend:
    """Echoes its input; see the module docstring.

    Args:
        fail_texts: rows whose prompt (or last message content) is one of these get an
            ``error``.
        fail_if: a predicate; rows for which it returns True get an ``error``.
        fail_calls: 1-based call numbers on which ``generate`` raises
            :class:`FakeBackendError` for the whole call.
        delay_s: seconds each call sleeps (to simulate engine work).
        model: the name reported by :meth:`identity`.
    """

    def __init__(
        self,
        *,
        fail_texts: Collection[str] = (),
        fail_if: Callable[[GenerationRequest], bool] | None = None,
        fail_calls: Collection[int] = (),
        delay_s: float = 0.0,
        model: str = "fake-echo",
    ) -> None:
        self.fail_texts = frozenset(fail_texts)
        self.fail_if = fail_if
        self.fail_calls = frozenset(fail_calls)
        self.delay_s = delay_s
        self.model = model
        self.calls = 0
        """Number of ``generate`` calls so far."""
        self.batch_sizes: list[int] = []
        """Length of the request list of each call, in call order."""
        self.closed = False
        self._lock = threading.Lock()

    #: ``generate`` takes ``on_row`` (each row once it is answered, in input order).
    rows_early: ClassVar[bool] = True

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
        on_row: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        """Echo each request; failing rows get ``error``; listed calls raise."""
        with self._lock:
            if self.closed:
                raise RuntimeError("FakeBackend is closed")
            self.calls += 1
            call = self.calls
            self.batch_sizes.append(len(requests))
        if self.delay_s:
            time.sleep(self.delay_s)
        if call in self.fail_calls:
            raise FakeBackendError(f"fake failure on call {call}")
        results = [self._one(r) for r in requests]
        if on_row is not None:
            for index, result in enumerate(results):
                on_row(index, result)
        report(results, on_result, usage)
        return results

    def identity(self) -> dict[str, Any]:
        """The fake's identity (constant for a given ``model`` name)."""
        return {"backend": "fake", "model": self.model}

    def close(self) -> None:
        """Mark closed; later ``generate`` calls raise."""
        self.closed = True

    def _one(self, request: GenerationRequest) -> GenerationResult:
        source = request.last_text()
        prompt_tokens = sum(len((m.content).split()) for m in request.messages or []) or len(
            source.split()
        )
        if source in self.fail_texts or (self.fail_if is not None and self.fail_if(request)):
            return GenerationResult.failed(f"fake failure for {source[:40]!r}", prompt_tokens)
        words = f"echo: {source}".split(" ")
        limit = request.sampling.max_tokens
        finish = "length" if len(words) > limit else "stop"
        text = " ".join(words[:limit])
        return GenerationResult(
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=min(len(words), limit),
        )
