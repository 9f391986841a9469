"""One verbose switch for a whole run: ``--verbose`` on the command line, or
``NIGHTSHIFT_LOG_LEVEL=DEBUG`` in the environment.

Verbose shows what is otherwise kept short: a vLLM engine's whole start-up log, the
traceback of an unexpected error, the traceback Prefect logs with a Nightshift error.
The switch lives in the environment so that what a run starts in other processes (a
deployment's flow run, an engine's workers) sees it too::

    from nightshift.core.verbose import is_verbose, set_verbose

    set_verbose()          # what ``nightshift run --verbose`` does
    assert is_verbose()
"""

from __future__ import annotations

import os

#: The environment variable that holds the switch (``DEBUG``: verbose).
ENV = "NIGHTSHIFT_LOG_LEVEL"


def is_verbose() -> bool:
    """Whether this run is verbose: ``NIGHTSHIFT_LOG_LEVEL=DEBUG`` (any case)."""
    return os.environ.get(ENV, "").strip().upper() == "DEBUG"


def set_verbose(on: bool = True) -> None:
    """Turn the switch on (or off) for this process and the processes it starts."""
    if on:
        os.environ[ENV] = "DEBUG"
    else:
        os.environ.pop(ENV, None)
