"""What the store already holds for a plan, found without a Prefect task run per batch.

:class:`Inventory` lists each stage directory once (and the barriers directory) and
answers "is this unit's output there and readable?" from the listing and the directory's
output index (``core/inventory.py``): no per-batch GET on S3. :func:`survey` walks every
batch through the stages on that knowledge alone (nothing runs), which is what the plan
log, ``nightshift status`` and ``export`` report; the scheduler makes the same decisions
as it goes and submits task runs only for the units that are not done.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from nightshift.core.inventory import OutputIndex
from nightshift.flows.plan import Plan, Unit
from nightshift.tasks.step_task import BatchRef


class Inventory:
    """The outputs present in a plan's store, one listing per directory."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        fs = plan.store.fs
        self.stages = [OutputIndex.load(fs, plan.stage_dir(s.index)) for s in plan.stages]
        has_barrier = any(s.barrier is not None for s in plan.stages)
        self.barriers = OutputIndex.load(fs, plan.barriers_dir()) if has_barrier else None
        self._found: dict[Unit, BatchRef | None] = {}

    def done(self, unit: Unit) -> BatchRef | None:
        """The unit's output as a reference, if it is in the store and proves to be the
        unit's (``OutputIndex.rows``)."""
        if unit in self._found:  # the survey asked first; the scheduler asks again
            return self._found[unit]
        rows = self.stages[unit.stage].rows(self.plan.unit_name(unit), unit.key)
        ref = (
            None
            if rows is None
            else BatchRef.model_construct(  # no validation: 30,000
                path=self.plan.unit_path(unit), rows=rows, key=unit.key, reused=True
            )
        )  # per re-run
        self._found[unit] = ref
        return ref

    def barrier_done(self, stage: int, index_key: str) -> BatchRef | None:
        path = self.plan.barrier_path(stage, index_key)
        rows = self.barriers.rows(path.rsplit("/", 1)[-1], index_key) if self.barriers else None
        return None if rows is None else BatchRef(path=path, rows=rows, key=index_key, reused=True)

    def rejected(self, stage: int) -> dict[str, str]:
        """The files of a stage found not to be what their names say (name -> why)."""
        return self.stages[stage].rejected

    def sweep(self) -> int:
        """Remove the temporary files killed writers left in the directories surveyed (and
        the staged sources'); a live writer's are kept. Returns how many were removed."""
        indexes = [*self.stages, *([self.barriers] if self.barriers else [])]
        indexes.append(OutputIndex.load(self.plan.store.fs, self.plan.layout.sources_dir()))
        removed = sum(len(index.sweep()) for index in indexes)
        return removed + self.plan.store.lock_manager().sweep()

    def record(self, unit: Unit | None, ref: BatchRef) -> None:
        """Remember an output this run wrote, so the next run trusts it from a listing."""
        if not ref.tag:
            return
        index = self.stages[unit.stage] if unit is not None else self.barriers
        if index is not None:
            index.add(ref.path.rsplit("/", 1)[-1], ref.rows, ref.size, ref.tag)

    def save(self) -> None:
        for index in [*self.stages, *([self.barriers] if self.barriers else [])]:
            index.save()

    @property
    def footer_reads(self) -> int:
        indexes = [*self.stages, *([self.barriers] if self.barriers else [])]
        return sum(i.footer_reads for i in indexes)


def stage_units(plan: Plan, stage: int, batch: int, parents: list[list[BatchRef]]) -> list[Unit]:
    """The units of a row-local stage for one batch, given its parents' outputs (none for
    a stage that reads the source; several for a join)."""
    key, rows = plan.stage_input(
        stage,
        batch,
        [[r.key for r in refs] for refs in parents],
        [sum(r.rows for r in refs) for refs in parents],
    )
    return plan.units(stage, batch, key, rows)


def barrier_input_keys(plan: Plan, stage: int, upstream: list[list[BatchRef]]) -> list[str]:
    """A barrier's per-batch input keys (a barrier has one parent stage)."""
    return [plan.input_key([r.key for r in refs]) for refs in upstream]


@dataclass
class StageSurvey:
    """One stage, as the store has it now."""

    name: str
    batches: int
    #: batches whose every unit is in the store
    done: int = 0
    #: units in the store, and units known to be missing
    units_done: int = 0
    units_missing: int = 0
    #: batches whose units are not known yet (their input is still to be computed)
    waiting: int = 0
    rows: int = 0
    refs: list[list[BatchRef] | None] = field(default_factory=list)
    #: files of this stage not trusted although present (name -> why): another unit's
    #: output copied over, a foreign, truncated or unreadable file
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def to_compute(self) -> int:
        return self.batches - self.done


def survey(
    plan: Plan, inventory: Inventory | None = None, force_from: int | Collection[int] | None = None
) -> list[StageSurvey]:
    """Walk every batch through the stages on what the store holds (nothing runs).

    A unit's key needs its input's keys, and for a stage that cuts batches also its
    input's row count: where an earlier output is missing, those units are not known
    until it is computed (they are counted as ``waiting``). ``force_from``: the stages a
    run computes again (``Plan.forced``), counted as missing.
    """
    inventory = inventory or Inventory(plan)
    forced_stages = plan.forced(force_from)
    n = len(plan.batches)
    result: list[StageSurvey] = []
    #: per stage, per batch: its units' keys and its output rows, when known
    keys: dict[int, list[list[str] | None]] = {}
    rows: dict[int, list[int | None]] = {}
    for stage in plan.stages:
        forced = stage.index in forced_stages
        view = StageSurvey(stage.name, n)
        units: list[list[Unit] | None] = [None] * n
        known = [all(keys[p][b] is not None for p in stage.parents) for b in range(n)]
        if stage.barrier is not None:
            if all(known):
                (p,) = stage.parents
                inputs = [plan.input_key(k) for k in keys[p]]  # type: ignore[arg-type]
                units = [[u] for u in plan.barrier_units(stage.index, inputs)[1]]
        else:
            for b in range(n):
                if not known[b]:
                    continue
                parent_rows = [rows[p][b] for p in stage.parents]
                if stage.batch_size is not None and any(r is None for r in parent_rows):
                    continue
                key, count = plan.stage_input(
                    stage.index,
                    b,
                    [keys[p][b] for p in stage.parents],  # type: ignore[misc]
                    [r or 0 for r in parent_rows],
                )
                units[b] = plan.units(stage.index, b, key, count)
        refs: list[list[BatchRef] | None] = []
        keys[stage.index], rows[stage.index] = [None] * n, [None] * n
        for b, batch_units in enumerate(units):
            if batch_units is None:
                view.waiting += 1
                refs.append(None)
                continue
            found = [None if forced else inventory.done(u) for u in batch_units]
            view.units_done += sum(r is not None for r in found)
            view.units_missing += sum(r is None for r in found)
            keys[stage.index][b] = [u.key for u in batch_units]
            if all(r is not None for r in found):
                view.done += 1
                rows[stage.index][b] = sum(r.rows for r in found if r)
                view.rows += rows[stage.index][b] or 0
                refs.append([r for r in found if r])
            else:
                refs.append(None)
        view.refs = refs
        view.rejected = dict(inventory.rejected(stage.index))
        result.append(view)
    return result
