"""Errors a user can act on: one line that names the file, row, column, step or key at fault.

Every error Nightshift raises on purpose is a :class:`NightshiftError`; the CLI prints its
message alone (no traceback) and exits with status 2, and a flow run fails with it as the
state message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


class NightshiftError(Exception):
    """Base class: ``str(err)`` is the whole, single-line explanation."""


class SpecError(NightshiftError):
    """The pipeline spec is invalid (bad YAML, unknown operator, bad config, bad key)."""


class SourceError(NightshiftError):
    """The input data cannot be read (missing file, bad JSONL line, bad CSV, bad schema)."""


class StoreError(NightshiftError):
    """The step store cannot be used (unwritable, unreachable, incomplete step)."""


class Unavailable(NightshiftError):
    """A server cannot be reached now: a connection-class failure of a sink, the source or
    the Prefect API. Transient: a stream waits it out (retries with capped backoff, one log
    line when the outage starts, one a minute, one when it ends) instead of counting it as
    a failure. ``what`` names the server for those lines (``streams[0].sinks[1].postgres``).
    """

    def __init__(self, message: str, what: str = "") -> None:
        super().__init__(message)
        self.what = what or message.split(":", 1)[0]

    def __reduce__(self) -> tuple[type[Unavailable], tuple[str, str]]:  # pickles by message
        return (type(self), (str(self), self.what))


class StepFailed(NightshiftError):
    """One or more batches failed in a step; completed batches stay in the store."""


class Deferred(NightshiftError):
    """A unit left for a later run, not failed: nothing of it is lost, nothing is retried
    by Prefect now (the scheduler counts it apart from failures)."""


class ProviderBatchesPending(Deferred):
    """A unit's requests are in provider batches not finished yet: the run polls them and
    runs the unit again (``wait: true``), or a later run (the collector) picks their
    answers up (``wait: false``)."""

    def __init__(
        self,
        message: str,
        pending: int,
        wait: bool = False,
        poll_s: tuple[float, float] = (5.0, 300.0),
    ) -> None:
        super().__init__(message)
        self.pending = pending
        #: the run waits for them (``batch.wait``): the scheduler polls the provider every
        #: ``poll_s`` (first, longest; doubling) and runs the unit again once they are done
        self.wait = wait
        self.poll_s = poll_s


class BudgetReached(Deferred):
    """Sending a unit's requests would pass the run's ``budget``: the unit is left for
    the next run."""


def one_line(exc: BaseException | str, limit: int = 300, *, whole: bool = False) -> str:
    """An exception message (or a text) as one shortened line, for error messages: the
    one rule every layer uses.

    The first line by default (polars and pydantic put hints and plans below it);
    ``whole=True`` joins every line instead, white space folded, for messages whose
    reason continues on the next lines (the vLLM engine's, JSON schema checks).
    """
    if not str(exc).strip():
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    text = " ".join(str(exc).split()) if whole else str(exc).strip().splitlines()[0]
    return shorten(text, limit)


def shorten(text: str, limit: int = 300) -> str:
    """``text`` whole if it fits in ``limit`` characters, else cut at a word (never inside
    one, unless a single word is longer than the limit) and ended with ``...``."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    if space > (limit - 3) // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "..."


#: What a unit's failure message starts with when a step raised (``tasks/step_task.py``):
#: ``<task label>: steps[<i>] (<operator>): ``; the kind is read after it.
_STEP_PREFIX = re.compile(r"^.*?steps\[\d+\] \([^)]*\): ")


def error_kind(message: str, label: str | None = None) -> str:
    """A short, stable name for the kind of an error, to count errors by kind (the run
    report): the message's head before its first ``:``, ``(`` or ``[`` (an exception's
    type, ``HTTP 429``, ``output is not valid JSON for the schema``), without a unit's
    ``label`` and ``steps[i] (op)`` prefix, counts such as ``3/20`` as ``N/M``, at most
    60 characters.

    Example::

        error_kind("gen batch 2/9: steps[1] (generate): ValueError: bad")   # 'ValueError'
        error_kind("HTTP 429: rate limited")                                # 'HTTP 429'
    """
    text = message.strip()
    if label and text.startswith(f"{label}: "):
        text = text[len(label) + 2 :]
    text = _STEP_PREFIX.sub("", text, count=1)
    head = re.split(r"[:(\[\n]", text, maxsplit=1)[0].strip()
    head = re.sub(r"\d+/\d+", "N/M", head)
    return shorten(head, 60) if head else "error"
