"""Nightshift errors in Prefect's logs: the message alone, without the traceback.

Prefect logs a failed task or flow run with its traceback; for a
:class:`~nightshift.core.errors.NightshiftError` the message is the whole explanation
(file, step, row), so the traceback is dropped from the log unless the run is verbose
(:mod:`nightshift.core.verbose`). Nothing is installed when this module is imported: the
Nightshift flows call :func:`quiet_nightshift_tracebacks` as they start, so a process
that only imports the package keeps its logging as it was.
"""

from __future__ import annotations

import logging

from nightshift.core.errors import NightshiftError
from nightshift.core.verbose import is_verbose

#: The Prefect loggers that report failed task and flow runs.
LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


#: Exceptions that end a task run without anything going wrong: its unit is left for
#: later (provider batches pending, the run's budget reached; ``core/errors.py``).
DEFERRED = ("ProviderBatchesPending", "BudgetReached")


class OneLineErrors(logging.Filter):
    """Drops the traceback of a record whose exception is a NightshiftError (unless
    verbose), and makes Prefect's ERROR lines about a deferred unit INFO lines (a unit
    waiting for its provider batches is not an error); every record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, NightshiftError) and not is_verbose():
            record.exc_info, record.exc_text = None, None
        if record.levelno >= logging.ERROR and any(d in record.getMessage() for d in DEFERRED):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_nightshift_tracebacks() -> None:
    """Install :class:`OneLineErrors` on Prefect's run loggers (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineErrors) for f in logger.filters):
            logger.addFilter(OneLineErrors())
