"""The ``run_pipeline`` flow: plan, run the step tasks pipelined, write manifests.

Deployments and the CLI call this flow; ``spec`` is a path to a YAML spec or the spec
itself as a mapping (what a deployment parameter typed into the UI gives).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from nightshift.core.errors import SpecError
from nightshift.core.usage import Budget
from nightshift.flows.explain import explain
from nightshift.flows.log_filters import quiet_nightshift_tracebacks
from nightshift.flows.plan import Plan, build_plan
from nightshift.flows.provider_status import provider_batches
from nightshift.flows.reporting import (
    Progress,
    cost_line,
    publish_plan,
    publish_provider_batches,
    publish_sample,
    publish_summary,
)
from nightshift.flows.scheduler import Execution
from nightshift.flows.survey import Inventory, survey
from nightshift.tasks.runner_choice import make_task_runner


def resolve_resume(resume_from_last: bool | None, resume_step: int | str | None) -> bool:
    """DataFlow's vocabulary: resume from completed batches, or recompute from step k."""
    if resume_step is not None and resume_from_last:
        raise SpecError(
            f"resume_step={resume_step} recomputes from that step; it cannot be combined with "
            "resume_from_last=True"
        )
    return resume_from_last if resume_from_last is not None else resume_step is None


def execute_plan(
    plan: Plan,
    resume_from_last: bool | None = None,
    resume_step: int | str | None = None,
    fail_at: tuple[int, int] | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """Run a plan inside the current flow run; returns the run summary.

    ``budget`` (US dollars; default: the spec's): the run sends no new LLM requests past
    it. Work left for a later run (the budget, provider batches pending) is in the
    summary's ``left`` (batches per step) and ``pending_batches``.

    The store is surveyed first (one listing per stage directory): the plan's log lines
    and its ``<pipeline>-plan`` artifact say per stage what is reused and why the rest is
    computed, and task runs are created only for the units left to compute.
    """
    resume = resolve_resume(resume_from_last, resume_step)
    force_from: int | set[int] | None = None
    if resume_step is not None:
        force_from = plan.stage_of_step(resume_step)
    elif not resume:
        force_from = {s.index for s in plan.stages}
    forced = plan.forced(force_from)
    logger = get_run_logger()
    recompute = ""
    if forced:
        recompute = "; recomputing " + (
            "every stage"
            if len(forced) == len(plan.stages)
            else "stages " + ", ".join(plan.stages[i].name for i in sorted(forced))
        )
    logger.info(
        "pipeline %s: %d file(s), %d batch(es) of up to %d rows, %d step(s) in %d task stage(s)%s",
        plan.spec.name,
        len(plan.files),
        len(plan.batches),
        plan.spec.batch_size,
        len(plan.spec.steps),
        len(plan.stages),
        recompute,
    )
    if not plan.linear:
        for stage in plan.stages:
            after = ", ".join(plan.stages[p].name for p in stage.parents) or "the source"
            logger.info(
                "stage %s: steps %s, after %s%s",
                stage.name,
                ", ".join(stage.names),
                after,
                " (a join on _row_id)" if len(stage.parents) > 1 else "",
            )
    inventory = Inventory(plan)
    lines = explain(plan, force_from, survey(plan, inventory, force_from))
    if swept := inventory.sweep():
        logger.info("removed %d temporary file(s) that killed writes left in the store", swept)
    for line in lines:
        logger.info(line)
    publish_plan(plan, lines)
    spec = plan.spec
    cap = budget if budget is not None else spec.budget
    run_budget = Budget(cap) if cap is not None else None
    batch_mode = any(getattr(c, "mode", "online") == "batch" for c in plan.serving.values())
    started = dt.datetime.now(dt.UTC)
    with make_task_runner(spec.task_runner, spec.workers, spec.dask, plan.serving) as runner:
        pool = getattr(runner, "pool", None)
        if pool is not None:
            pool.budget = run_budget
        execution = Execution(
            plan,
            force_from_stage=force_from,
            fail_at=fail_at,
            runner=runner,
            progress=Progress(plan),
            inventory=inventory,
            budget=run_budget,
        )
        try:
            execution.run()
        finally:
            if pool is not None:
                pool.budget = None
            for stage in execution.complete_stages():
                _write_manifest(plan, execution, stage)
            rows = [s.as_row() for s in execution.stats]
            publish_summary(plan, rows, pool)
            if batch_mode:
                publish_provider_batches(plan, provider_batches(plan))
            _write_run_stats(plan, started, rows, run_budget, execution)
            logger.info(cost_line(rows, run_budget, execution.left(), execution.pending_batches()))
    outputs = {
        plan.stages[i].name: [ref.path for _, ref in execution.units_of(i)] for i in plan.sinks
    }
    output = outputs[plan.stages[plan.sinks[-1]].name]
    publish_sample(plan, output)
    return {
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "pipeline": plan.spec.name,
        "batches": len(plan.batches),
        "steps": [s.as_row() for s in execution.stats],
        # the (last) sink's output; every sink's by stage name in ``outputs``
        "output": output,
        "outputs": outputs,
        # work left for a later run: batches per step, provider batches pending
        "left": execution.left(),
        "pending_batches": execution.pending_batches(),
        "budget": _budget_summary(run_budget),
    }


def _budget_summary(budget: Budget | None) -> dict[str, Any] | None:
    if budget is None:
        return None
    return {
        "cap_usd": budget.cap_usd,
        "spent_usd": round(budget.spent_usd, 6),
        "left_usd": round(budget.left_usd, 6),
        "reached": budget.exhausted,
    }


def _write_run_stats(
    plan: Plan,
    started: dt.datetime,
    rows: list[dict[str, Any]],
    budget: Budget | None,
    execution: Execution,
) -> None:
    """The run's stats in the store, ``<pipeline>/runs/<started>-<run>.json``: per step
    its batches, rows, tokens, requests, ``cost_usd`` and ``online_cost_usd`` (what the
    same tokens cost online), the budget and what is left (docs/generation.md)."""
    run = str(flow_run.id) if flow_run.id else "local"
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    try:
        plan.store.write_json(
            plan.layout.run_stats(stamp, run),
            {
                "pipeline": plan.spec.name,
                "flow_run_id": None if run == "local" else run,
                "started_at": started.isoformat(),
                "ended_at": dt.datetime.now(dt.UTC).isoformat(),
                "steps": [{k: v for k, v in row.items() if k != "batch_usage"} for row in rows],
                "cost_usd": round(sum(r.get("cost_usd") or 0.0 for r in rows), 6),
                "online_cost_usd": round(sum(r.get("online_cost_usd") or 0.0 for r in rows), 6),
                "budget": _budget_summary(budget),
                "left": execution.left(),
                "pending_batches": execution.pending_batches(),
            },
        )
    except Exception as exc:  # a report; the run's work is in the store already
        get_run_logger().warning("could not write the run's stats: %s", exc)


def _write_manifest(plan: Plan, execution: Execution, stage: int) -> None:
    s = plan.stages[stage]
    units = execution.units_of(stage)
    plan.store.write_json(
        plan.manifest_path(stage),
        {
            "pipeline": plan.spec.name,
            "stage": s.name,
            **({"directory": plan.stage_dir(stage).rsplit("/", 1)[-1]} if s.in_dag else {}),
            "steps": [op.spec_entry() for op in s.operators],
            "fingerprint": s.fingerprint,
            "batch_size": s.batch_size,
            "completed_at": dt.datetime.now(dt.UTC).isoformat(),
            "rows": sum(r.rows for _, r in units),
            "batches": [
                {
                    "path": plan.store.display(r.path),
                    "rows": r.rows,
                    "key": r.key,
                    "source": plan.batches[u.batch].file.uri,
                    "start": plan.batches[u.batch].start,
                    "stop": plan.batches[u.batch].stop,
                    **({"piece": [u.start, u.stop]} if u.stop is not None else {}),
                }
                for u, r in units
            ],
        },
    )


def _run_name() -> str:
    """``<pipeline>`` (and its partition): what the flow run is called in the UI."""
    spec = flow_run.parameters.get("spec")
    if isinstance(spec, dict):
        name, partition = spec.get("name") or "pipeline", spec.get("partition")
        return f"{name} {partition}" if partition else str(name)
    return Path(str(spec)).stem


def failure_at(
    plan: Plan, fail_at_batch: int | None, fail_at_step: int | str
) -> tuple[int, int] | None:
    """The (stage, batch index) where a rehearsed failure fires: first attempt only.

    ``fail_at_batch`` counts from 1, like the task runs' names (``batch 4/6``)."""
    if fail_at_batch is None or (flow_run.run_count or 1) > 1:
        return None
    if not 1 <= fail_at_batch <= len(plan.batches):
        raise SpecError(
            f"fail_at_batch {fail_at_batch}: the run has batches 1..{len(plan.batches)}"
        )
    return plan.stage_of_step(fail_at_step), fail_at_batch - 1


@flow(name="run-pipeline", flow_run_name=_run_name, validate_parameters=True)
def run_pipeline(
    spec: dict[str, Any] | str,
    resume_from_last: bool | None = None,
    resume_step: int | str | None = None,
    allow_imports: bool = False,
    fail_at_batch: int | None = None,
    fail_at_step: int | str = 0,
    budget: float | None = None,
) -> Any:
    """Run a pipeline spec, resuming from the batches already in its store.

    Args:
        spec: a YAML spec's path (relative to the working directory) or the spec itself
            as a mapping (name, source, store, steps, ...).
        resume_from_last: reuse the batches already in the store (the default); False
            alone computes everything again.
        resume_step: compute again from this step (its index, 0-based, or its name) on:
            that step and every step that depends on it; the others are reused.
        allow_imports: allow operators given as module:Class import paths in the spec.
        fail_at_batch: rehearse a failure: this batch (counted from 1, as in the task
            runs' names) fails on the first attempt only, so a Retry succeeds.
        fail_at_step: the step (index, 0-based, or name) where fail_at_batch fails.
        budget: the most this run may spend on LLM calls (US dollars; overrides the
            spec's ``budget``).

    A run that leaves work for a later one (provider batches pending with ``wait:
    false``, or its budget reached) ends Completed with the name ``Pending`` and a
    message saying what is left; its result is the summary all the same.
    """
    quiet_nightshift_tracebacks()
    plan = build_plan(Path(spec) if isinstance(spec, str) else spec, allow_imports=allow_imports)
    summary = execute_plan(
        plan,
        resume_from_last,
        resume_step,
        failure_at(plan, fail_at_batch, fail_at_step),
        budget=budget,
    )
    if summary["left"]:
        return Completed(name="Pending", message=pending_message(summary), data=summary)
    return summary


def pending_message(summary: dict[str, Any]) -> str:
    """What a run left for a later one, in one line."""
    parts = []
    if summary.get("pending_batches"):
        parts.append(f"{summary['pending_batches']} provider batch(es) pending")
    if (budget := summary.get("budget")) and budget.get("reached"):
        parts.append(f"budget ${budget['cap_usd']:g} reached (${budget['spent_usd']:.4f} spent)")
    left = ", ".join(f"{k} {v}" for k, v in summary["left"].items())
    return f"{'; '.join(parts) or 'work left'}; batches left per step: {left}; run again to go on"
