"""``nightshift run``'s live progress on a terminal: one bar per step under the log.

The display is drawn on the console of Prefect's own console handler (the ``console``
handler of Prefect's ``logging.yml``, a rich console on stderr), so the run's log lines
print above the bars instead of through them. While it shows, the plain progress lines
of the run's log (``flows/progress.py``; they carry ``MARK``) are kept off that console:
the bars say the same (they still reach the API, so the UI's log view has them).

Each bar's line: the step, its bar, batches done/total, then reused / computed /
failed batches, rows in -> out, rows/s (what this run computed), tokens/s (LLM steps),
elapsed and ETA. Without a terminal (a pipe, a CI log, a worker) nothing is drawn and
the plain lines print as they are::

    with live_progress():
        summary = run_spec(spec)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.theme import Theme

from nightshift.flows.progress import LOGGER, MARK, StepProgress, seconds


def prefect_console() -> tuple[logging.Handler, Console] | None:
    """Prefect's console handler (on the root logger) and its rich console, if any."""
    import prefect.main  # noqa: F401 (Prefect configures logging when it loads)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            return handler, handler.console
    return None


def detail(step: StepProgress) -> str:
    """The numbers after a step's bar."""
    parts = [
        f"{step.reused:,} reused, {step.computed:,} computed"
        + (f", [red]{step.failed:,} failed[/]" if step.failed else ""),
        f"rows {step.rows_in:,} -> {step.rows_out:,}",
    ]
    if step.computed:
        parts.append(f"{step.rows_per_s:,.1f} rows/s")
    if step.llm:
        parts.append(f"{step.tokens_per_s:,.1f} tok/s")
    parts.append(seconds(step.elapsed))
    eta = step.eta
    parts.append(f"ETA {seconds(eta)}" if eta is not None else "")
    return " | ".join(p for p in parts if p)


class _NotProgressLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, MARK, False)


class _Bars(logging.Handler):
    """Draws the records of the progress logger as bars."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
            refresh_per_second=4,
        )
        self.tasks: dict[str, TaskID] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._draw(getattr(record, "steps", []))
        except Exception:  # a display problem never fails the run
            self.handleError(record)

    def _draw(self, steps: list[StepProgress]) -> None:
        for step in steps:
            task = self.tasks.get(step.name)
            if task is None:
                task = self.tasks[step.name] = self.progress.add_task(
                    step.name, total=step.total, detail=""
                )
            self.progress.update(
                task, completed=step.done + step.failed, total=step.total, detail=detail(step)
            )


@contextmanager
def live_progress() -> Iterator[bool]:
    """Show the bars while the block runs, when stderr is a terminal; yields whether it
    does."""
    found = prefect_console()
    if found is None or not found[1].is_terminal or found[1].is_dumb_terminal:
        yield False
        return
    handler, console = found
    bars = _Bars(console)
    quiet = _NotProgressLines()
    logger = logging.getLogger(LOGGER)
    logger.propagate = False
    # Prefect's console has its log styles only (no inheritance): add rich's defaults,
    # which the bars use, for as long as they show
    console.push_theme(Theme())
    handler.addFilter(quiet)
    logger.addHandler(bars)
    logger.setLevel(logging.INFO)
    bars.progress.start()
    try:
        yield True
    finally:
        bars.progress.stop()
        logger.removeHandler(bars)
        handler.removeFilter(quiet)
        console.pop_theme()
