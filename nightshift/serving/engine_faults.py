"""Test-only fault hooks inside the real vLLM backend: make a real engine die or hang.

The fault-handling tests (tests/test_serving_faults.py) need a *real* engine that dies on
a chosen request (a poison request) or whose loop stops producing tokens (a stall),
without a fake engine and without patching the engine object from the test. Two
environment variables, read when a :class:`~nightshift.serving.vllm_backend.VLLMBackend`
is created, turn the hooks on; **they are for tests only and ignored unless set**:

``NIGHTSHIFT_TEST_DIE_ON=MARKER``
    Every engine step taken while a request whose prompt (or any chat message) contains
    ``MARKER`` is in the engine raises :class:`EngineFault` from the step, before the
    real ``LLMEngine.step()`` runs: the engine dies as on a crash or an out-of-memory
    error, with every other request in flight.
``NIGHTSHIFT_TEST_BLOCK_ON=MARKER``
    The first engine step of this process taken while such a request is in the engine
    blocks the engine loop (as a stuck kernel or collective would) until the backend is
    closed. Once per process and marker, so that the replay on the next engine runs: it
    models a transient hang (a request that hangs every engine is a poison request, and
    is found like one).

Nothing here runs when neither variable is set (the backend keeps ``None``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from nightshift.serving.interface import GenerationRequest

__all__ = ["BLOCK_ON", "DIE_ON", "EngineFault", "EngineFaults"]

DIE_ON = "NIGHTSHIFT_TEST_DIE_ON"
BLOCK_ON = "NIGHTSHIFT_TEST_BLOCK_ON"

logger = logging.getLogger("nightshift.serving")

_BLOCKED: set[str] = set()  # markers that already blocked an engine of this process
_BLOCKED_LOCK = threading.Lock()


class EngineFault(RuntimeError):
    """The engine step failure that ``NIGHTSHIFT_TEST_DIE_ON`` injects."""


@dataclass(frozen=True)
class EngineFaults:
    """The hooks one backend was created with (see the module docstring)."""

    die_on: str | None = None
    block_on: str | None = None

    @classmethod
    def from_env(cls) -> EngineFaults | None:
        """The hooks the environment asks for, or None (the normal case)."""
        die_on = os.environ.get(DIE_ON) or None
        block_on = os.environ.get(BLOCK_ON) or None
        if die_on is None and block_on is None:
            return None
        return cls(die_on=die_on, block_on=block_on)

    def marks(self, request: GenerationRequest) -> tuple[bool, bool]:
        """Whether ``request`` carries the die marker and the block marker."""
        text = (
            "\n".join(m.content for m in request.messages)
            if request.messages
            else request.prompt or ""
        )
        return (
            self.die_on is not None and self.die_on in text,
            self.block_on is not None and self.block_on in text,
        )

    def before_step(self, marks: Iterable[tuple[bool, bool]], release: threading.Event) -> None:
        """Called by the engine loop before each ``step()`` with the marks of the
        requests in the engine: raises (die) or waits for ``release`` (block)."""
        dying = blocking = False
        for die, block in marks:
            dying |= die
            blocking |= block
        if dying:
            raise EngineFault(
                f"simulated engine failure ({DIE_ON} test hook): a request in the "
                f"engine contains {self.die_on!r}"
            )
        if blocking and self.block_on is not None:
            with _BLOCKED_LOCK:
                if self.block_on in _BLOCKED:
                    return
                _BLOCKED.add(self.block_on)
            logger.warning(
                "%s test hook: the engine loop is blocked until the backend is closed", BLOCK_ON
            )
            release.wait()
