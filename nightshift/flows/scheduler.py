"""Pipelined execution of a plan inside a flow run, paying only for the work left.

Each batch walks the stages in order (a DAG's stages: a batch goes to every stage that
reads the source, and on to each stage whose parents all have it, so independent branches
run concurrently over the same batches; a join waits for every piece of the batch from
each of its parents). At each stage its units (the whole batch, or pieces
of a stage's own ``batch_size``) are looked up in the store's :class:`Inventory` (one
listing per stage directory, made at the start): a unit whose output is there and
readable is **reused** at once, with no Prefect task run; the others are submitted as
step tasks. As soon as every unit of a batch has left stage ``k`` the batch moves to
stage ``k+1`` (no per-step barrier), and at most ``max_in_flight`` tasks are submitted at
once, advancing admitted batches before admitting new ones, so memory and API load stay
bounded however many batches there are. A barrier stage (``dedup``) waits for every
batch, builds its index once (unless the index is in the store), then releases them.

A failed unit does not stop the others: every batch that can finish does, and the run
then fails naming the first failure. Completed units stay in the store for the re-run,
and the stage's output index is saved as the run goes, so the next run trusts them from
a listing.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.utilities.annotations import NotSet

from nightshift.core.errors import (
    BudgetReached,
    Deferred,
    ProviderBatchesPending,
    StepFailed,
    one_line,
)
from nightshift.flows.plan import Plan, Unit
from nightshift.flows.survey import Inventory, barrier_input_keys, stage_units
from nightshift.tasks.operators.llm import Handover, LLMOperator
from nightshift.tasks.step_task import BatchRef, build_barrier_index, configure_for, run_stage_batch

#: Seconds between saves of the output indexes while a run goes (a kill loses at most
#: this much of the index: those outputs are then verified by their footer, not redone).
INDEX_SAVE_SECONDS = 30.0
#: Seconds without a finished task after which the progress reporter is ticked (it
#: refreshes the provider batches' table, ``mode: batch``).
TICK_SECONDS = 5.0


@dataclass
class StageStats:
    """What happened to one stage in this run (counted in batches and in units)."""

    name: str
    steps: list[int]
    batches: int
    #: batches taken whole from the store, batches with at least one unit computed
    reused: int = 0
    computed: int = 0
    failed: int = 0
    #: units (tasks' worth of work): differ from batches when the stage cuts batches
    units_reused: int = 0
    units_computed: int = 0
    rows_in: int = 0
    rows_out: int = 0
    #: rows read by the batches this run computed (what the progress's rows/s counts)
    rows_computed: int = 0
    #: seconds of the units computed in this run, added up (they run concurrently)
    seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: HTTP serving, units computed in this run: attempts sent, retries, rows answered
    #: from the answer cache (paid by an earlier run), estimated cost; and per unit.
    requests: int = 0
    retries: int = 0
    cached_answers: int = 0
    cost_usd: float = 0.0
    #: what the same tokens cost through the online API (differs in ``mode: batch``)
    online_cost_usd: float = 0.0
    #: batches left for a later run: provider batches pending, or the budget reached
    deferred: int = 0
    pending_batches: int = 0
    batch_usage: list[dict[str, Any]] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def totals(self) -> dict[str, Any]:
        """Its numbers without the per-unit usage list (the run's record)."""
        return {k: v for k, v in self.__dict__.items() if k != "batch_usage"}

    def add_computed(self, batch: int, ref: BatchRef) -> None:
        self.units_computed += 1
        self.seconds += ref.seconds
        self.prompt_tokens += ref.tokens.get("prompt", 0)
        self.completion_tokens += ref.tokens.get("completion", 0)
        if not ref.usage:
            return
        self.requests += int(ref.usage.get("requests", 0))
        self.retries += int(ref.usage.get("retries", 0))
        self.cached_answers += int(ref.usage.get("cached", 0))
        self.cost_usd += float(ref.usage.get("cost_usd", 0.0))
        self.online_cost_usd += float(ref.usage.get("online_cost_usd", 0.0))
        self.batch_usage.append({"batch": batch + 1, "rows": ref.rows, **ref.usage})


@dataclass
class _Waiting:
    """A unit whose requests are in provider batches the run waits for."""

    unit: Unit
    due: float
    delay: float
    longest: float


@dataclass
class _Slot:
    """One batch at one stage: its units and, as they finish, their outputs."""

    units: list[Unit]
    refs: list[BatchRef | None]
    computed: bool = False
    failed: bool = False

    @property
    def complete(self) -> bool:
        return all(r is not None for r in self.refs)


@dataclass
class Execution:
    plan: Plan
    #: stages computed again: a stage and its descendants, or a set (``Plan.forced``)
    force_from_stage: int | set[int] | frozenset[int] | None = None
    fail_at: tuple[int, int] | None = None
    runner: Any = None  # a started TaskRunner; None submits through the flow's own runner
    progress: Any = None  # nightshift.flows.progress.RunProgress, or None
    recorder: Any = None  # nightshift.flows.recording.Recorder, or None
    inventory: Inventory | None = None
    #: the run's budget (``nightshift.core.usage.Budget``): once exhausted, nothing new
    #: is submitted; what is in flight finishes
    budget: Any = None
    #: per stage, per batch: the batch's outputs once every unit is done
    refs: list[list[list[BatchRef] | None]] = field(init=False)
    stats: list[StageStats] = field(init=False)
    failures: list[str] = field(default_factory=list)
    #: units left for a later run, with why (provider batches pending, budget reached)
    deferred: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n, stages = len(self.plan.batches), self.plan.stages
        self.inventory = self.inventory or Inventory(self.plan)
        self.refs = [[None] * n for _ in stages]
        self.stats = [StageStats(s.name, list(s.steps), n) for s in stages]
        self._slots: list[dict[int, _Slot]] = [{} for _ in stages]
        self._events: queue.Queue[tuple[Unit | None, int, Any]] = queue.Queue()
        self._arrivals: deque[tuple[int, int]] = deque()
        self._ready: deque[Unit] = deque()
        self._new: deque[int] = deque(range(n))
        self._at_barrier: dict[int, int] = {s.index: 0 for s in stages if s.barrier}
        self._barrier_units: dict[int, list[Unit]] = {}
        self._index_refs: dict[int, BatchRef] = {}
        self._running = 0
        self._waiting: list[_Waiting] = []
        self._saved_at = time.monotonic()
        options = configure_for(
            self.plan.store, self.plan.spec.retries, self.plan.spec.retry_delay_seconds
        )
        self._step_task = run_stage_batch.with_options(**options)
        self._forced_stages = self.plan.forced(self.force_from_stage)
        self._roots = [s.index for s in stages if not s.parents]
        self._index_task = build_barrier_index.with_options(**options)
        self._pool = getattr(self.runner, "pool", None)
        self._handover_group = uuid.uuid4().hex
        self._handover_to = self._handover_targets()

    # -- public ---------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._fill()
            while self._running or self._waiting:
                timeout = TICK_SECONDS
                if self._waiting:
                    due = min(w.due for w in self._waiting) - time.monotonic()
                    timeout = min(timeout, max(due, 0.0))
                try:
                    unit, stage, future = self._events.get(timeout=timeout)
                except queue.Empty:  # nothing finished for a while (provider batches)
                    if self.progress is not None:  # RunProgress
                        self.progress.tick()
                    self._poll_waiting()
                    continue
                self._running -= 1
                future.wait()
                self._finish(unit, stage, future.state)
                self._poll_waiting()
                self._fill()
                if time.monotonic() - self._saved_at > INDEX_SAVE_SECONDS:
                    self.save_index()
                if self.recorder is not None and self.recorder.due():
                    self.recorder.flush([s.totals() for s in self.stats])
        finally:
            if self._handover_to and self._pool is not None:
                self._pool.drop_prefetched(self._handover_group)
            self.save_index()
            if self.progress is not None:  # every step's last numbers, a failure included
                self.progress.close(self.stats)
        if self.failures:
            raise StepFailed(
                f"{len(self.failures)} task(s) failed, first: {self.failures[0]}; completed "
                "batches are kept in the store: retry or re-run to resume from them"
            )

    def save_index(self) -> None:
        self._saved_at = time.monotonic()
        try:
            assert self.inventory is not None
            self.inventory.save()
        except Exception as exc:  # an optimisation: the next run verifies footers instead
            get_run_logger().warning("could not save the output index: %s", one_line(exc))

    @property
    def stopped(self) -> bool:
        """The budget is reached: submit nothing new."""
        return bool(self.budget is not None and self.budget.exhausted)

    def left(self) -> dict[str, int]:
        """Per stage with work left (its batches not done), how many batches."""
        out = {}
        for s, stats in zip(self.plan.stages, self.stats, strict=True):
            done = sum(r is not None for r in self.refs[s.index])
            if done < stats.batches:
                out[s.name] = stats.batches - done
        return out

    def pending_batches(self) -> int:
        return sum(s.pending_batches for s in self.stats)

    def complete_stages(self) -> list[int]:
        return [s.index for s in self.plan.stages if all(r is not None for r in self.refs[s.index])]

    def units_of(self, stage: int) -> list[tuple[Unit, BatchRef]]:
        """Every unit of a stage with its output, in source order (complete batches)."""
        return [
            (unit, ref)
            for batch in range(len(self.plan.batches))
            if (slot := self._slots[stage].get(batch)) is not None and slot.complete
            for unit, ref in zip(slot.units, slot.refs, strict=True)
            if ref is not None
        ]

    # -- scheduling -------------------------------------------------------------------
    def _forced(self, stage: int) -> bool:
        return stage in self._forced_stages

    def _handover_targets(self) -> dict[int, list[tuple[int, LLMOperator]]]:
        """Per stage whose last step is an LLM step: the next stages (their only parent
        is it) whose first step is an LLM step on an in-process engine, with that step:
        the row-level hand-over (``operators.llm.Handover``)."""
        if not self.plan.spec.handover or self._pool is None:
            return {}
        configs = getattr(self._pool, "configs", {})
        targets: dict[int, list[tuple[int, LLMOperator]]] = {}
        for s in self.plan.stages:
            if s.barrier is not None or not s.operators:
                continue
            if not isinstance(s.operators[-1], LLMOperator):
                continue
            for child in self.plan.children[s.index]:
                c = self.plan.stages[child]
                first = c.operators[0] if c.operators else None
                if c.parents != [s.index] or c.barrier is not None:
                    continue
                if not isinstance(first, LLMOperator):
                    continue
                config = configs.get(first.serving)
                if config is not None and not config.is_http:  # HTTP: paid per request
                    targets.setdefault(s.index, []).append((child, first))
        return targets

    def _handover(self, unit: Unit) -> Handover | None:
        """What ``unit``'s rows are handed over to: the next stages' LLM steps whose
        output for this batch is not in the store already."""
        targets = self._handover_to.get(unit.stage)
        if not targets:
            return None
        assert self.inventory is not None
        keys = [u.key for u in self._slots[unit.stage][unit.batch].units]
        to = []
        for child, op in targets:
            if self.plan.stages[child].batch_size is None and not self._forced(child):
                units = self.plan.units(child, unit.batch, self.plan.input_key(keys), 0)
                if all(self.inventory.done(u) is not None for u in units):
                    continue  # reused: prefetching would be wasted engine work
            to.append(op)
        return Handover(to=to, group=self._handover_group) if to else None

    def _fill(self) -> None:
        limit = self.plan.spec.max_in_flight
        while True:
            if self._arrivals:
                self._arrive(*self._arrivals.popleft())
            elif self._running < limit and self._ready and not self.stopped:
                self._submit(self._ready.popleft())
            elif self._running < limit and self._new and not self.stopped:
                batch = self._new.popleft()
                self._arrivals.extend((batch, root) for root in self._roots)
            else:
                return

    def _arrive(self, batch: int, stage: int) -> None:
        """``batch``'s whole input for ``stage`` is ready: reuse or queue its units."""
        s = self.plan.stages[stage]
        if s.barrier is not None:
            self._at_barrier[stage] += 1
            if self._at_barrier[stage] == len(self.plan.batches):
                self._open_barrier(stage)
            return
        parents = [self.refs[p][batch] for p in s.parents]
        self._place(batch, stage, stage_units(self.plan, stage, batch, parents))  # type: ignore[arg-type]

    def _place(self, batch: int, stage: int, units: list[Unit]) -> None:
        assert self.inventory is not None
        found = [None if self._forced(stage) else self.inventory.done(u) for u in units]
        slot = self._slots[stage][batch] = _Slot(units, found)
        self.stats[stage].units_reused += sum(r is not None for r in found)
        if self.recorder is not None:
            for unit, ref in zip(units, found, strict=True):
                if ref is not None:
                    self.recorder.reused(unit, ref)
        if slot.complete:
            self._complete(batch, stage)
            return
        self._ready.extend(u for u, r in zip(units, found, strict=True) if r is None)

    def _open_barrier(self, stage: int) -> None:
        """Every batch is at the barrier: its keys are known; build the index if needed."""
        (parent,) = self.plan.stages[stage].parents
        keys = barrier_input_keys(self.plan, stage, self.refs[parent])  # type: ignore[arg-type]
        index_key, units = self.plan.barrier_units(stage, keys)
        self._barrier_units[stage] = units
        assert self.inventory is not None
        forced = self._forced(stage)
        if not forced and all(self.inventory.done(u) is not None for u in units):
            self.inventory.barrier_done(stage, index_key)  # keeps the barriers' index whole
            for unit in units:
                self._place(unit.batch, stage, [unit])
            return
        index = None if forced else self.inventory.barrier_done(stage, index_key)
        if index is not None:
            self._release_barrier(stage, index)
        else:
            self._submit_index(stage, index_key)

    def _release_barrier(self, stage: int, index: BatchRef) -> None:
        self._index_refs[stage] = index
        for unit in self._barrier_units[stage]:
            self._place(unit.batch, stage, [unit])

    def _label(self, unit: Unit) -> str:
        s = self.plan.stages[unit.stage]
        label = f"{s.label} batch {unit.batch + 1}/{len(self.plan.batches)}"
        return label if unit.stop is None else f"{label} rows {unit.start}-{unit.stop}"

    def _submit(self, unit: Unit) -> None:
        plan, stage, batch = self.plan, unit.stage, unit.batch
        s = plan.stages[stage]
        task = self._step_task.with_options(refresh_cache=True if self._forced(stage) else NotSet)
        parents = [self.refs[p][batch] or [] for p in s.parents]
        upstream: Any = None
        if len(parents) == 1:
            upstream = parents[0][0] if len(parents[0]) == 1 else parents[0]
        elif parents:
            upstream = parents
        future = self._submit_task(
            task,
            dict(
                label=self._label(unit),
                key=unit.key,
                out_path=plan.unit_path(unit),
                operators=s.operators,
                first_step=s.first_step,
                store=plan.store,
                batch=plan.batches[batch],
                source_options=plan.spec.source.storage_options,
                upstream=upstream,
                **({"join": s.join} if s.join is not None else {}),
                **(
                    {"pool": pool}
                    if (pool := getattr(self.runner, "pool", None)) is not None
                    else {}
                ),
                barrier_state=self._index_refs[stage].path if s.barrier else None,
                force=self._forced(stage),
                fail=self.fail_at == (stage, batch) and unit.piece == 0,
                rows=None if unit.stop is None else (unit.start, unit.stop),
                surveyed=True,
                fingerprint=s.fingerprint,
                **({"handover": h} if (h := self._handover(unit)) is not None else {}),
            ),
        )
        if self.recorder is not None:
            self.recorder.submitted(unit)
        self._watch(unit, stage, future)

    def _poll_waiting(self) -> None:
        """Ask the provider about the units whose batches are due a look; run each unit
        whose batches are finished again (it collects them), however full the run is:
        its requests are paid already."""
        from nightshift.flows.provider_status import unit_settled

        now = time.monotonic()
        for waiting in [w for w in self._waiting if w.due <= now]:
            try:
                settled = unit_settled(self.plan, self.plan.unit_path(waiting.unit))
            except Exception as exc:  # the provider is down: look again later
                get_run_logger().warning(
                    "%s: could not ask the provider: %s", self._label(waiting.unit), one_line(exc)
                )
                settled = False
            if settled:
                self._waiting.remove(waiting)
                self._submit(waiting.unit)
            else:
                waiting.delay = min(waiting.delay * 2, waiting.longest)
                waiting.due = time.monotonic() + waiting.delay

    def _submit_index(self, stage: int, index_key: str) -> None:
        plan, s = self.plan, self.plan.stages[stage]
        (parent,) = s.parents
        upstream = [ref.path for refs in self.refs[parent] for ref in refs or []]
        batches = [b for b, refs in enumerate(self.refs[parent]) for _ in refs or []]
        rows = [ref.rows for refs in self.refs[parent] for ref in refs or []]
        task = self._index_task.with_options(refresh_cache=True if self._forced(stage) else NotSet)
        future = self._submit_task(
            task,
            dict(
                label=f"{s.label} index",
                key=index_key,
                out_path=plan.barrier_path(stage, index_key),
                operator=s.barrier,
                store=plan.store,
                upstream_paths=upstream,
                upstream_batches=batches,
                upstream_rows=rows,
                force=self._forced(stage),
            ),
        )
        self._watch(None, stage, future)

    def _submit_task(self, task: Any, parameters: dict[str, Any]) -> Any:
        if self.runner is None:
            return task.submit(**parameters)
        return self.runner.submit(task, parameters)

    def _watch(self, unit: Unit | None, stage: int, future: Any) -> None:
        self._running += 1
        future.add_done_callback(lambda f: self._events.put((unit, stage, f)))

    def _finish(self, unit: Unit | None, stage: int, state: State) -> None:
        stats = self.stats[stage]
        if not state.is_completed():
            message = state.message or state.name or state.type.value
            try:
                state.result()
            except ProviderBatchesPending as exc:
                if exc.wait and unit is not None:  # this run polls them, then goes on
                    first, longest = exc.poll_s
                    self._waiting.append(_Waiting(unit, time.monotonic() + first, first, longest))
                    return
                stats.deferred += 1
                stats.pending_batches += exc.pending
                self.deferred.append(one_line(exc))
                return
            except Deferred as exc:  # left for a later run: not a failure
                stats.deferred += 1
                self.deferred.append(one_line(exc))
                if isinstance(exc, BudgetReached) and self.budget is not None:
                    self.budget.exhausted = True
                return
            except Exception as exc:  # the task's own one-line error
                message = one_line(exc)
            self.failures.append(message)
            if self.recorder is not None:
                self.recorder.failed(unit, stage, message, unit and self._label(unit))
            if unit is None:  # the barrier's index: none of its batches can go on
                stats.failed += len(self.plan.batches)
            elif not (slot := self._slots[stage][unit.batch]).failed:
                slot.failed = True
                stats.failed += 1
            if self.progress is not None:
                self.progress.update(stage, stats)
            return
        ref: BatchRef = state.result()
        assert self.inventory is not None
        self.inventory.record(unit, ref)
        if self.recorder is not None:
            cached = ref.reused or state.name == "Cached"
            if cached and unit is not None:
                self.recorder.reused(unit, ref, "cached")
            elif not cached:
                self.recorder.computed(unit, stage, ref)
        if unit is None:
            self._release_barrier(stage, ref)
            return
        slot = self._slots[stage][unit.batch]
        slot.refs[unit.piece] = ref
        if ref.reused or state.name == "Cached":  # another run computed it meanwhile
            stats.units_reused += 1
        else:
            slot.computed = True
            stats.add_computed(unit.batch, ref)
        if slot.complete:
            self._complete(unit.batch, stage)

    def _complete(self, batch: int, stage: int) -> None:
        slot = self._slots[stage][batch]
        refs = [r for r in slot.refs if r is not None]
        self.refs[stage][batch] = refs
        stats = self.stats[stage]
        s = self.plan.stages[stage]
        # a join's rows in: its smallest parent's (an upper bound of the joined rows)
        rows_in = min(
            (sum(r.rows for r in self.refs[p][batch] or []) for p in s.parents),
            default=self.plan.batches[batch].rows,
        )
        if slot.computed:
            stats.computed += 1
            stats.rows_computed += rows_in
        else:
            stats.reused += 1
        stats.rows_in += rows_in
        stats.rows_out += sum(r.rows for r in refs)
        if self.progress is not None:
            self.progress.update(stage, stats)
        for child in self.plan.children[stage]:
            if all(self.refs[p][batch] is not None for p in self.plan.stages[child].parents):
                self._arrivals.append((batch, child))
