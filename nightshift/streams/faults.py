"""Crash rehearsal: SIGKILL this process at a named point of the window cycle.

``NIGHTSHIFT_STREAM_KILL_AT=after-sink:postgres`` (optionally ``#N``: the N-th time the
point is reached, default 1) kills the process right after that sink wrote a window:
the exact moment a half-written window must not produce duplicates. Points:
``after-steps``, ``after-sink:<kind>``, ``after-commit``. Unset (always, outside crash
tests), it does nothing.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_SEEN: Counter[str] = Counter()


def fault_point(name: str) -> None:
    target = os.environ.get("NIGHTSHIFT_STREAM_KILL_AT")
    if not target:
        return
    point, _, nth = target.partition("#")
    if point != name:
        return
    _SEEN[name] += 1
    if _SEEN[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
