"""What a Nightshift run logs through Prefect's loggers, kept to what a person reads.

Filters on Prefect's run loggers (``prefect.task_runs``, ``prefect.flow_runs``), the
loggers whose records go both to the console and to the API (the UI's log view), as
Prefect's ``logging.yml`` provides for (its ``filters:`` section); they are installed on
the loggers rather than through a logging config file so that a user's own
``PREFECT_LOGGING_SETTINGS_PATH`` keeps working:

* :class:`QuietTaskStates`: a task run's ``Finished in state Completed()`` (or
  ``Cached``) is dropped, one per batch (900 lines for 300 batches x 3 steps, where the
  progress lines of ``flows/progress.py`` say the same in a few); a task run that fails
  or is retried still logs (warnings and errors always do). Verbose keeps them all.
* :class:`OneLineErrors`: for a :class:`~nightshift.core.errors.NightshiftError` the
  message is the whole explanation (file, step, row), so its traceback is dropped; and
  Prefect's ``Engine execution exited with unexpected exception`` (a deployment's flow
  run process repeating a failure already logged) is dropped for it. Verbose keeps
  tracebacks.

Verbose is :mod:`nightshift.core.verbose` (``--verbose`` or ``NIGHTSHIFT_LOG_LEVEL=DEBUG``).
Nothing is installed when this module is imported: the Nightshift flows call
:func:`install_log_filters` as they start, so a process that only imports the package
keeps its logging as it was.
"""

from __future__ import annotations

import logging

from nightshift.core.errors import NightshiftError
from nightshift.core.verbose import is_verbose

#: The Prefect loggers that report task and flow runs.
LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
#: Prefect's last word on a flow run process that raised (``flow_engine.run_flow``).
ENGINE_EXIT = "Engine execution exited with unexpected exception"


#: Exceptions that end a task run without anything going wrong: its unit is left for
#: later (provider batches pending, the run's budget reached; ``core/errors.py``).
DEFERRED = ("ProviderBatchesPending", "BudgetReached")


class OneLineErrors(logging.Filter):
    """Drops the traceback of a record whose exception is a NightshiftError (unless
    verbose), and Prefect's engine-exit record for one; makes Prefect's ERROR lines about
    a deferred unit INFO lines (a unit waiting for its provider batches is not an error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, NightshiftError) and not is_verbose():
            if record.msg == ENGINE_EXIT:
                return False
            record.exc_info, record.exc_text = None, None
        if record.levelno >= logging.ERROR and any(d in record.getMessage() for d in DEFERRED):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


class QuietTaskStates(logging.Filter):
    """Drops ``Finished in state Completed()``/``Cached(...)`` of task runs at INFO
    (unless verbose); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or is_verbose():
            return True
        message = record.msg if isinstance(record.msg, str) else ""
        return not message.startswith("Finished in state ")


def install_log_filters() -> None:
    """Install the filters on Prefect's run loggers (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        kinds = [OneLineErrors, *([QuietTaskStates] if name == "prefect.task_runs" else [])]
        for kind in kinds:
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
