"""Crash and failure rehearsal: SIGKILL this process, or fail the window, at a named
point of the window cycle.

``NIGHTSHIFT_STREAM_KILL_AT=after-sink:postgres`` (optionally ``#N``: the N-th time the
point is reached, default 1) kills the process right after that sink wrote a window:
the exact moment a half-written window must not produce duplicates.
``NIGHTSHIFT_STREAM_FAIL_AT=after-steps#2`` makes the 2nd window reaching that point fail
(an error that is neither a step's nor an outage's: the stream's run fails and its
supervisor restarts it). Points: ``after-steps``, ``after-sink:<kind>``, ``after-commit``.
Unset (always, outside rehearsals), they do nothing.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from nightshift.core.errors import NightshiftError

_SEEN: Counter[tuple[str, str]] = Counter()


def fault_point(name: str) -> None:
    for variable in ("NIGHTSHIFT_STREAM_KILL_AT", "NIGHTSHIFT_STREAM_FAIL_AT"):
        target = os.environ.get(variable)
        if not target:
            continue
        point, _, nth = target.partition("#")
        if point != name:
            continue
        _SEEN[variable, name] += 1
        if variable.endswith("KILL_AT") and _SEEN[variable, name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
        if variable.endswith("FAIL_AT") and _SEEN[variable, name] == int(nth or 1):
            raise NightshiftError(f"failure rehearsed at {name} ({variable}={target})")
