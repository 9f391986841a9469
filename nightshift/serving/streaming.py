"""Token streaming over any backend: ``stream(backend, requests)`` yields text deltas.

Backends that can stream (the vLLM backend: its engine loop emits each request's new
text after every engine step, ``RequestOutputKind.DELTA``) have a ``stream`` method;
for the others the whole text of each row comes as one delta when the call returns.
Either way each request ends with one event carrying its
:class:`~nightshift.serving.interface.GenerationResult`, the same result ``generate`` gives.

Example::

    from nightshift.serving.streaming import stream

    for event in stream(backend, requests):
        if event.result is None:
            print(event.delta, end="", flush=True)     # tokens as they come
        else:
            print(f"  [{event.result.finish_reason}]")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nightshift.serving.interface import GenerationRequest, GenerationResult

__all__ = ["StreamEvent", "stream", "unwrap"]


@dataclass(frozen=True)
class StreamEvent:
    """One piece of a streamed generation.

    ``index`` is the request's position in the streamed list; ``delta`` the text produced
    since that request's previous event; ``result`` is set (and ``delta`` empty) on the
    request's last event.
    """

    index: int
    delta: str = ""
    result: GenerationResult | None = None


def unwrap(backend: Any) -> Any:
    """The innermost backend under batchers and restart wrappers (their ``backend``)."""
    seen = 0
    while hasattr(backend, "backend") and seen < 8 and not hasattr(backend, "stream"):
        backend, seen = backend.backend, seen + 1
    return backend


def stream(backend: Any, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
    """Serve ``requests`` on ``backend``, yielding deltas as they come (see module doc)."""
    inner = unwrap(backend)
    if hasattr(inner, "stream"):
        yield from inner.stream(requests)
        return
    for index, result in enumerate(backend.generate(requests)):
        if result.text:
            yield StreamEvent(index, delta=result.text)
        yield StreamEvent(index, result=result)
