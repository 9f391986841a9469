"""Stable content hashes: operator identity, step chains, batches and cache keys."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from typing import Any

_PLAIN = (str, int, float, bool, type(None))
#: Class attributes that say how ``validate`` may treat an operator, not what it computes:
#: setting one on an operator keeps its step keys.
_NOT_CODE = frozenset({"safe_on_sample"})


def digest(*parts: Any) -> str:
    """sha256 over the canonical JSON of ``parts`` (sorted keys, no whitespace)."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@functools.cache
def code_version(cls: type) -> str:
    """The operator's declared ``version`` plus a hash of its code.

    Editing an operator's methods or its plain class attributes (``name``, ``fusable``,
    ...; not ``safe_on_sample``, a hint to ``validate``) therefore recomputes its steps,
    like Prefect's ``TASK_SOURCE`` cache policy;
    config fields are fingerprinted separately, with their values. Only the class's own
    functions are read, by line number (``inspect.getsource`` of a *class* parses its
    whole module with ``ast``, and CPython 3.11.7 fails when two threads build ASTs at
    once: cpython#106905). Code without retrievable source (a REPL) is hashed by its
    bytecode.
    """
    declared = str(getattr(cls, "version", "1"))
    parts: list[str] = []
    for name, value in sorted(vars(cls).items()):
        if name.startswith("__") or name in _NOT_CODE:
            continue
        func = _function_of(value)
        if func is not None:
            try:
                parts.append(f"{name}:{inspect.getsource(func)}")
            except (OSError, TypeError):
                parts.append(f"{name}:{func.__code__.co_code.hex()}")
        elif isinstance(value, _PLAIN) or (
            isinstance(value, (tuple, list, frozenset))
            and all(isinstance(v, _PLAIN) for v in value)
        ):
            parts.append(f"{name}={value!r}")
    if not parts:
        return declared
    return f"{declared}:{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}"


def _function_of(value: Any) -> Any:
    """The plain function behind a method, property, cached property or static method."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    elif isinstance(value, functools.cached_property):
        value = value.func
    return value if inspect.isfunction(value) else None
