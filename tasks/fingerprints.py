"""Stable content hashes: operator identity, step chains, batches and cache keys."""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any


def digest(*parts: Any) -> str:
    """sha256 over the canonical JSON of ``parts`` (sorted keys, no whitespace)."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def code_version(cls: type) -> str:
    """The operator's declared ``version`` plus a hash of its source code.

    Editing an operator's code therefore recomputes its steps, like Prefect's
    ``TASK_SOURCE`` cache policy; classes without retrievable source (defined in a REPL)
    fall back to the declared version alone.
    """
    declared = str(getattr(cls, "version", "1"))
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return declared
    return f"{declared}:{hashlib.sha256(source.encode()).hexdigest()[:16]}"
