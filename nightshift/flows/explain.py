"""Why a run reuses or computes: one line per stage, before any batch runs.

The words are the ones used everywhere (logs, artifacts, ``nightshift run``'s table):
a batch is **done** when its output is in the store and readable; a run **reuses** done
batches (no task run) and **computes** the others. Each stage is compared with the
manifest its last completed run left in the store:

* same fingerprint: the step is unchanged; the batches to compute are new source batches
  or outputs that are missing or unreadable; files present but not trusted (another
  unit's output copied over one, a truncated or foreign file) are named with the reason;
* another fingerprint: the steps whose config changed are named (or "operator code, model
  or an upstream step" when the configs are equal), and its batches get new keys;
* no manifest: no run has finished this step in this store (and partition) yet;
* forced: ``resume_step``/``--fresh`` asked for it.

Checking costs what the survey costs (one listing per stage directory) and one small JSON
read per stage.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from nightshift.flows.plan import Plan
from nightshift.flows.survey import StageSurvey
from nightshift.flows.survey import survey as take_survey


def explain(
    plan: Plan, force_from: int | Collection[int] | None, survey: list[StageSurvey] | None = None
) -> list[str]:
    """One line per stage: what this run will reuse and why the rest is computed.

    ``force_from``: the stages computed again as asked (``Plan.forced``). In a DAG each
    line names the stages the stage reads (``after ...``)."""
    views = survey if survey is not None else take_survey(plan, force_from=force_from)
    forced = plan.forced(force_from)
    return [_explain_stage(plan, stage.index, forced, views[stage.index]) for stage in plan.stages]


def _explain_stage(plan: Plan, index: int, forced: Collection[int], view: StageSurvey) -> str:
    stage = plan.stages[index]
    total = len(plan.batches)
    name = f"step {stage.name}"
    if not plan.linear:
        after = ", ".join(plan.stages[p].name for p in stage.parents) or "the source"
        join = ", a join on _row_id" if len(stage.parents) > 1 else ""
        name = f"{name} (after {after}{join})"
    if index in forced:
        return f"{name}: computing all {total} batches, as asked (resume_step / --fresh)"
    if view.done == total:
        return f"{name}: all {total} batches done, reused"
    manifest = plan.store.read_json(plan.manifest_path(index))
    if not isinstance(manifest, dict):
        why = (
            "an earlier run stopped before finishing this step"
            if view.done
            else "no run has finished this step in this store yet"
        )
    elif manifest.get("fingerprint") == stage.fingerprint:
        why = "step unchanged: new source batches, or outputs missing or unreadable"
    else:
        why = f"changed since its last finished run: {_what_changed(stage, manifest)}"
    pieces = ""
    if stage.batch_size is not None and view.units_done:
        pieces = f"; {view.units_done} pieces of {stage.batch_size} rows done"
    waiting = f", {view.waiting} of them after an earlier step" if view.waiting else ""
    return (
        f"{name}: {view.done} of {total} batches done and reused, "
        f"{view.to_compute} to compute{waiting} ({why}){pieces}{_rejected(view)}"
    )


def _rejected(view: StageSurvey) -> str:
    """The files present but not trusted, with the first one's reason."""
    if not view.rejected:
        return ""
    name, why = next(iter(view.rejected.items()))
    more = f" (and {len(view.rejected) - 1} more)" if len(view.rejected) > 1 else ""
    return (
        f"; {len(view.rejected)} output file(s) present but not trusted, computed again: "
        f"{name} {why}{more}"
    )


def _what_changed(stage: Any, manifest: dict[str, Any]) -> str:
    before = manifest.get("steps") or []
    now = [op.spec_entry() for op in stage.operators]
    changed = [
        f"steps[{stage.steps[i]}] ({next(iter(entry))}) config"
        for i, entry in enumerate(now)
        if i >= len(before) or before[i] != entry
    ]
    return ", ".join(changed) if changed else "operator code, model or an upstream step"
