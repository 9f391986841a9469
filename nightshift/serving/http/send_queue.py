"""The requests ready to send, and the order they go in: prefix-aware or first come.

Every generation task of a flow run (all batches in flight, every step using the
serving entry) puts its rows here; the backend's lanes take them one at a time.

* ``prefix`` (the default): the rows waiting are kept sorted by their prompt text (a chat
  request's messages, roles included, in order) and taken by an *elevator sweep*: the
  next row is the first one after the last row taken, in that order, wrapping around at
  the end. Rows whose prompts share a long prefix (a few-shot template, a long system
  prompt, the same document) are therefore sent one after another, so the server's prefix
  cache (vLLM's automatic prefix caching, SGLang's radix cache) computes the prefix once
  and serves the following rows from it, instead of evicting it between two rows of the
  same template that the data order put far apart. A row put while the sweep is under
  way goes in its place: one sharing the prefix being sent goes out with its group. No row
  waits longer than one sweep over what is waiting (a new row sorted before the cursor
  waits for the wrap-around), so no batch is starved.
* ``fifo``: arrival order (data order within a batch), as a plain asyncio script sends.

Only the order of sending changes: every row gets its own answer, and at temperature 0 the
answers are those of data-order sending (``tests/test_api_send_order.py``).

Example::

    queue = SendQueue("prefix")
    queue.put(job, prompt_text(job.request))
    job = await queue.get()      # None once closed and empty
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Generic, Literal, TypeVar

from sortedcontainers import SortedList

from nightshift.serving.interface import GenerationRequest

__all__ = ["SendOrder", "SendQueue", "prompt_text"]

SendOrder = Literal["prefix", "fifo"]
T = TypeVar("T")


def prompt_text(request: GenerationRequest) -> str:
    """What the server's prefix cache sees first: the raw prompt, or the messages in
    order with their roles (the chat template renders them in that order)."""
    if request.prompt is not None:
        return request.prompt
    return "\x00".join(f"{m.role}\x01{m.content}" for m in request.messages or ())


class SendQueue(Generic[T]):
    """Items waiting to be sent, taken in ``order`` (see the module doc). Runs on one
    asyncio loop."""

    def __init__(self, order: SendOrder = "prefix") -> None:
        self.order: SendOrder = order
        self._fifo: deque[T] = deque()
        self._sorted: SortedList = SortedList()  # (text, seq, item)
        self._cursor: tuple[str, int] | None = None
        self._seq = itertools.count()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._sorted) if self.order == "prefix" else len(self._fifo)

    def empty(self) -> bool:
        return len(self) == 0

    def put(self, item: T, text: str) -> None:
        """Add ``item`` whose prompt text is ``text``."""
        if self.order == "prefix":
            self._sorted.add((text, next(self._seq), item))
        else:
            self._fifo.append(item)
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break

    def get_nowait(self) -> T | None:
        """The next item, or None when nothing waits."""
        if self.order == "fifo":
            return self._fifo.popleft() if self._fifo else None
        if not self._sorted:
            return None
        index = 0 if self._cursor is None else self._sorted.bisect_right(self._cursor)
        if index >= len(self._sorted):
            index = 0  # the sweep wraps around
        text, seq, item = self._sorted.pop(index)
        self._cursor = (text, seq)
        return item

    async def get(self) -> T | None:
        """The next item; waits for one. None once :meth:`close` was called and nothing
        waits."""
        while True:
            item = self.get_nowait()
            if item is not None or self._closed:
                return item
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                if getter.done() and not getter.cancelled() and not self.empty():
                    self._wake_one()  # pass the wake-up on
                raise

    def close(self) -> None:
        """Wake every waiting :meth:`get`: they return what is left, then None."""
        self._closed = True
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return
