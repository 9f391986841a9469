"""Pipelined execution of a plan inside a flow run.

Each batch walks the stages in order; as soon as its task for stage ``k`` finishes, its
task for stage ``k+1`` is submitted (no per-step barrier), and at most ``max_in_flight``
tasks are submitted at once, advancing admitted batches before admitting new ones, so
memory and API load stay bounded however many batches there are. A barrier stage
(``dedup``) waits for every batch, builds its index once, then releases the batches.

A failed batch does not stop the others: every batch that can finish does, and the run
then fails naming the first failure. Completed batches stay in the store for the re-run.
"""

from __future__ import annotations

import queue
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prefect.logging import get_run_logger
from prefect.states import State

from flows.plan import Plan
from tasks.errors import StepFailed, one_line
from tasks.step_task import BatchRef, build_barrier_index, configure_for, run_stage_batch

INDEX = -1  # the batch number used for a barrier's index task


@dataclass
class StageStats:
    """What happened to one stage's batches in this run."""

    name: str
    steps: list[int]
    batches: int
    cached: int = 0
    reused: int = 0
    computed: int = 0
    failed: int = 0
    rows_in: int = 0
    rows_out: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: HTTP serving, batches computed in this run: attempts sent, retries, rows answered
    #: from the answer cache (paid by an earlier run), estimated cost; and per batch.
    requests: int = 0
    retries: int = 0
    cached_answers: int = 0
    cost_usd: float = 0.0
    batch_usage: list[dict[str, Any]] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def add_usage(self, batch: int, ref: BatchRef) -> None:
        if not ref.usage:
            return
        self.requests += int(ref.usage.get("requests", 0))
        self.retries += int(ref.usage.get("retries", 0))
        self.cached_answers += int(ref.usage.get("cached", 0))
        self.cost_usd += float(ref.usage.get("cost_usd", 0.0))
        self.batch_usage.append({"batch": batch, "rows": ref.rows, **ref.usage})


@dataclass
class Execution:
    plan: Plan
    force_from_stage: int | None = None
    fail_at: tuple[int, int] | None = None
    refs: list[list[BatchRef | None]] = field(init=False)
    stats: list[StageStats] = field(init=False)
    failures: list[str] = field(default_factory=list)

    runner: Any = None  # a started TaskRunner; None submits through the flow's own runner
    progress: Any = None  # flows.reporting.Progress, or None

    def __post_init__(self) -> None:
        n, stages = len(self.plan.batches), self.plan.stages
        self.refs = [[None] * n for _ in stages]
        self.stats = [StageStats(s.dirname, list(s.steps), n) for s in stages]
        self._events: queue.Queue[tuple[int, int, Any]] = queue.Queue()
        self._ready: deque[tuple[int, int]] = deque()
        self._new: deque[int] = deque(range(n))
        self._waiting: dict[int, list[int]] = {s.index: [] for s in stages if s.barrier}
        self._index_refs: dict[int, BatchRef] = {}
        self._running = 0
        options = configure_for(
            self.plan.store, self.plan.spec.retries, self.plan.spec.retry_delay_seconds
        )
        self._step_task = run_stage_batch.with_options(**options)
        self._index_task = build_barrier_index.with_options(**options)

    # -- public ---------------------------------------------------------------------
    def run(self) -> None:
        logger = get_run_logger()
        self._fill()
        while self._running:
            batch, stage, future = self._events.get()
            self._running -= 1
            future.wait()
            self._finish(batch, stage, future.state)
            self._fill()
        for stats in self.stats:
            logger.info(
                "step %s: %d cached, %d reused, %d computed, %d failed of %d batches; "
                "%d rows in, %d rows out",
                stats.name, stats.cached, stats.reused, stats.computed, stats.failed,
                stats.batches, stats.rows_in, stats.rows_out,
            )
        if self.failures:
            raise StepFailed(
                f"{len(self.failures)} task(s) failed, first: {self.failures[0]}; completed "
                "batches are kept in the store: retry or re-run to resume from them"
            )

    # -- scheduling -------------------------------------------------------------------
    def _forced(self, stage: int) -> bool:
        return self.force_from_stage is not None and stage >= self.force_from_stage

    def _fill(self) -> None:
        limit = self.plan.spec.max_in_flight
        while self._running < limit and (self._ready or self._new):
            if self._ready:
                batch, stage = self._ready.popleft()
                self._submit(batch, stage)
            else:
                self._route(self._new.popleft(), 0)

    def _route(self, batch: int, stage: int) -> None:
        """Send ``batch`` to ``stage``: queue it, park it at a barrier, or finish it."""
        if stage == len(self.plan.stages):
            return
        if self.plan.stages[stage].barrier is None or stage in self._index_refs:
            self._ready.append((batch, stage))
            return
        waiting = self._waiting[stage]
        waiting.append(batch)
        if len(waiting) == len(self.plan.batches):
            self._submit_index(stage)

    def _label(self, stage: int, batch: int) -> str:
        s = self.plan.stages[stage]
        ops = "+".join(op.name for op in s.operators)
        return f"{ops}[{s.first_step}] batch {batch + 1}/{len(self.plan.batches)}"

    def _submit(self, batch: int, stage: int) -> None:
        plan, s = self.plan, self.plan.stages[stage]
        task = self._step_task.with_options(refresh_cache=self._forced(stage) or None)
        future = self._submit_task(task, dict(
            label=self._label(stage, batch),
            key=plan.keys[stage][batch],
            out_path=plan.out_path(stage, batch),
            operators=s.operators,
            first_step=s.first_step,
            store=plan.store,
            batch=plan.batches[batch],
            source_options=plan.spec.source.storage_options,
            upstream=self.refs[stage - 1][batch] if stage else None,
            barrier_state=self._index_refs[stage].path if s.barrier else None,
            force=self._forced(stage),
            fail=self.fail_at == (stage, batch),
        ))
        self._watch(batch, stage, future)

    def _submit_index(self, stage: int) -> None:
        plan, s = self.plan, self.plan.stages[stage]
        upstream = [ref.path for ref in self.refs[stage - 1] if ref is not None] if stage else []
        task = self._index_task.with_options(refresh_cache=self._forced(stage) or None)
        future = self._submit_task(task, dict(
            label=f"{s.operators[0].name}[{s.first_step}] index",
            key=plan.barrier_keys[stage],
            out_path=plan.barrier_path(stage),
            operator=s.barrier,
            store=plan.store,
            upstream_paths=upstream,
            force=self._forced(stage),
        ))
        self._watch(INDEX, stage, future)

    def _submit_task(self, task: Any, parameters: dict[str, Any]) -> Any:
        if self.runner is None:
            return task.submit(**parameters)
        return self.runner.submit(task, parameters)

    def _watch(self, batch: int, stage: int, future: Any) -> None:
        self._running += 1
        future.add_done_callback(lambda f: self._events.put((batch, stage, f)))

    def _finish(self, batch: int, stage: int, state: State) -> None:
        stats = self.stats[stage]
        if not state.is_completed():
            stats.failed += 1
            message = state.message or state.name
            try:
                state.result()
            except Exception as exc:  # the task's own one-line error
                message = one_line(exc)
            self.failures.append(message)
            return
        ref: BatchRef = state.result()
        if batch == INDEX:
            self._index_refs[stage] = ref
            for waiting in self._waiting[stage]:
                self._ready.append((waiting, stage))
            return
        self.refs[stage][batch] = ref
        if self.progress is not None:
            self.progress.batch_done(stage)
        if state.name == "Cached":
            stats.cached += 1
        elif ref.reused:
            stats.reused += 1
        else:
            stats.computed += 1
            stats.seconds += ref.seconds
            stats.prompt_tokens += ref.tokens.get("prompt", 0)
            stats.completion_tokens += ref.tokens.get("completion", 0)
            stats.add_usage(batch, ref)
        upstream = self.refs[stage - 1][batch] if stage else None
        stats.rows_in += upstream.rows if upstream else self.plan.batches[batch].rows
        stats.rows_out += ref.rows
        self._route(batch, stage + 1)

    def complete_stages(self) -> list[int]:
        return [s.index for s in self.plan.stages if all(r is not None for r in self.refs[s.index])]
