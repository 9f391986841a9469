"""A run's progress as it goes, per step: batches done of total (reused and computed
apart), rows in and out, rows/s, tokens/s of LLM steps, failed batches, elapsed, ETA.

:class:`RunProgress` is fed by the scheduler (``flows/scheduler.py``) each time a batch
leaves a step, and tells three audiences:

* **Prefect's progress artifacts**, one per step (``<pipeline>-progress-<step>``): at most
  one API call per step every 2 s, and always one when the step ends, the run fails
  included (a failed attempt's artifact says how far it got);
* **the run's log** (the terminal of a CI job or a worker, and the UI's log view): one plain
  line per running step at each tick (the first tick 10 s into the run, then every half of
  the time elapsed so far, between 10 s and 10 min: a 30 s run logs 2 ticks, a night of 8
  hours about 50), and one line when a step ends. These records carry the attribute
  :data:`MARK`, so a live display can keep them off the terminal (they still reach the
  UI);
* **a live display** (``nightshift run`` on a terminal, :mod:`nightshift.flows.live`):
  every update is a record on the :data:`LOGGER` logger with the snapshot of every step
  in ``record.steps``. The logger has no handler of its own and does not propagate, so
  without a display nothing is formatted or sent. Anyone can attach a handler::

      logging.getLogger("nightshift.progress").addHandler(my_handler)  # record.steps

Rates are over the run's elapsed time (steps run concurrently, batch by batch), counting
only what this run computed; the ETA is the step's batches left at its rate so far.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from prefect.logging import get_run_logger

from nightshift.flows.artifacts import RunArtifacts
from nightshift.flows.plan import Plan
from nightshift.tasks.operators import LLMOperator

if TYPE_CHECKING:
    from nightshift.flows.scheduler import StageStats

#: The logger that carries every update to a live display (``record.steps``).
LOGGER = "nightshift.progress"
#: The attribute set on the plain progress lines of the run's log.
MARK = "nightshift_progress"
#: Plain progress lines: the first tick, the shortest and the longest interval (seconds).
FIRST_TICK, MIN_INTERVAL, MAX_INTERVAL = 10.0, 10.0, 600.0
#: Seconds between two updates of a step's progress artifact.
ARTIFACT_INTERVAL = 2.0
#: ``mode: batch``: seconds between refreshes of the provider batches' table while a run waits
PROVIDER_BATCHES_EVERY = 30.0


@dataclass(frozen=True)
class StepProgress:
    """One step's progress at one moment."""

    name: str
    total: int
    reused: int = 0
    computed: int = 0
    failed: int = 0
    rows_in: int = 0
    rows_out: int = 0
    #: rows read by the batches this run computed (what rows/s counts)
    rows_computed: int = 0
    #: completion tokens of the batches this run computed (0: not an LLM step)
    tokens: int = 0
    llm: bool = False
    #: seconds since the run started; ``ended``: when it ended (None: still running)
    elapsed: float = 0.0
    ended: bool = False

    @property
    def done(self) -> int:
        return self.reused + self.computed

    @property
    def started(self) -> bool:
        return self.done + self.failed > 0

    @property
    def rows_per_s(self) -> float:
        return self.rows_computed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at this step's rate so far (None: no rate yet, or it ended)."""
        left = self.total - self.done - self.failed
        if self.ended or left <= 0 or not self.computed or self.elapsed <= 0:
            return None
        return left * self.elapsed / self.computed

    def line(self) -> str:
        """The plain progress line of the run's log."""
        state = ""
        if self.ended:
            state = (
                "done, " if self.done >= self.total else "failed, " if self.failed else "stopped, "
            )
        parts = [
            f"step {self.name}: {state}{self.done}/{self.total} batches "
            f"({self.reused} reused, {self.computed} computed, {self.failed} failed)",
            f"{self.rows_in:,} rows in, {self.rows_out:,} out",
        ]
        if self.computed:
            parts.append(f"{self.rows_per_s:,.1f} rows/s")
        if self.llm:
            parts.append(f"{self.tokens_per_s:,.1f} tokens/s")
        parts.append(f"{seconds(self.elapsed)} elapsed")
        if (eta := self.eta) is not None:
            parts.append(f"ETA {seconds(eta)}")
        return ", ".join(parts)


def seconds(value: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    value = max(value, 0.0)
    if value < 60:
        return f"{value:.0f} s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class RunProgress:
    """The progress of one run: fed by :meth:`update`, finished by :meth:`close`."""

    def __init__(self, plan: Plan, artifacts: RunArtifacts | None = None) -> None:
        self.plan = plan
        self.started = time.monotonic()
        self.steps = [
            StepProgress(
                stage.name,
                len(plan.batches),
                llm=any(isinstance(op, LLMOperator) for op in stage.operators),
            )
            for stage in plan.stages
        ]
        self._ended = [False] * len(plan.stages)
        self._next_tick = self.started + FIRST_TICK
        self._artifacts = artifacts
        self._sent = [0.0] * len(plan.stages)
        self._ids: list[Any] = []
        if artifacts is not None:
            total = len(plan.batches)
            self._ids = [
                artifacts.progress(
                    f"progress-{stage.name}",
                    description=f"step {stage.name}: share of its {total} batches done "
                    "(reused or computed)",
                )
                for stage in plan.stages
            ]
        #: ``mode: batch``: the provider batches' table is refreshed this often while the
        #: run waits on them (:meth:`tick`)
        self.batch_mode = any(getattr(c, "mode", "") == "batch" for c in plan.serving.values())
        self.batches_every = PROVIDER_BATCHES_EVERY
        self._batches_at = self.started
        self._live = logging.getLogger(LOGGER)
        self._live.propagate = False
        self._live.setLevel(logging.INFO)  # Prefect sets the root logger to WARNING

    def update(self, stage: int, stats: StageStats) -> None:
        """A batch of ``stage`` completed or failed (``stats``: the stage's so far)."""
        now = time.monotonic()
        step = self._snapshot(stage, stats, now)
        ended = step.done + step.failed >= step.total
        if ended:
            step = replace(step, ended=True)
        self.steps[stage] = step
        self._artifact(stage, now, force=ended)
        if ended and not self._ended[stage]:
            self._ended[stage] = True
            self._log(step)
        elif now >= self._next_tick:
            elapsed = now - self.started
            self._next_tick = now + min(max(elapsed / 2, MIN_INTERVAL), MAX_INTERVAL)
            for s in self.steps:
                if s.started and not s.ended:
                    self._log(replace(s, elapsed=elapsed))
        self._show()

    def tick(self) -> None:
        """Nothing finished for a while: refresh the provider batches' table (submitted /
        validating / in progress / completed, per provider batch), at most every
        ``batches_every`` seconds."""
        if not self.batch_mode or time.monotonic() - self._batches_at < self.batches_every:
            return
        self._batches_at = time.monotonic()
        from nightshift.flows.provider_status import provider_batches
        from nightshift.flows.reporting import publish_provider_batches

        publish_provider_batches(self.plan, provider_batches(self.plan), self._artifacts)

    def close(self, stats: list[StageStats]) -> None:
        """The run ends (completed or not): every step's last numbers, everywhere."""
        now = time.monotonic()
        for stage, stage_stats in enumerate(stats):
            step = replace(self._snapshot(stage, stage_stats, now), ended=True)
            self.steps[stage] = step
            self._artifact(stage, now, force=True)
            if not self._ended[stage] and step.started:
                self._ended[stage] = True
                self._log(step)
        self._show(final=True)

    # -- the audiences ------------------------------------------------------------------
    def _snapshot(self, stage: int, stats: StageStats, now: float) -> StepProgress:
        before = self.steps[stage]
        elapsed = now - self.started if not before.ended else before.elapsed
        return replace(
            before,
            reused=stats.reused,
            computed=stats.computed,
            failed=stats.failed,
            rows_in=stats.rows_in,
            rows_out=stats.rows_out,
            rows_computed=stats.rows_computed,
            tokens=stats.completion_tokens,
            elapsed=elapsed,
        )

    def _artifact(self, stage: int, now: float, force: bool) -> None:
        if not self._ids or (not force and now - self._sent[stage] < ARTIFACT_INTERVAL):
            return
        self._sent[stage] = now
        step = self.steps[stage]
        assert self._artifacts is not None
        self._artifacts.set_progress(self._ids[stage], 100.0 * step.done / max(step.total, 1))

    def _log(self, step: StepProgress) -> None:
        get_run_logger().info(step.line(), extra={MARK: True})

    def _show(self, final: bool = False) -> None:
        if self._live.hasHandlers():
            self._live.info(
                "progress", extra={"steps": list(self.steps), "final": final, MARK: True}
            )
