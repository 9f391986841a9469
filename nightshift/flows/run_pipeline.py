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
from nightshift.flows.artifacts import RunArtifacts
from nightshift.flows.explain import explain
from nightshift.flows.log_filters import install_log_filters
from nightshift.flows.parameters import OptionalFloat, OptionalInt, OptionalStep, StepRef
from nightshift.flows.plan import Plan, build_plan
from nightshift.flows.progress import RunProgress
from nightshift.flows.provider_status import provider_batches
from nightshift.flows.recording import Recorder
from nightshift.flows.reporting import (
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
    (one per step; in a DAG each names the steps it comes after) and its
    ``<pipeline>-plan`` artifact say per step what is reused and why the rest is
    computed, and task runs are created only for the units left to compute.
    """
    import time

    started = time.monotonic()
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
    inventory = Inventory(plan)
    lines = explain(plan, force_from, survey(plan, inventory, force_from))
    if swept := inventory.sweep():
        logger.info("removed %d temporary file(s) that killed writes left in the store", swept)
    for line in lines:
        logger.info(line)
    artifacts = RunArtifacts(plan.spec.name)
    publish_plan(plan, lines, artifacts)
    spec = plan.spec
    recorder = Recorder.start(plan, sorted(forced))
    cap = budget if budget is not None else spec.budget
    run_budget = Budget(cap) if cap is not None else None
    batch_mode = any(getattr(c, "mode", "online") == "batch" for c in plan.serving.values())
    with make_task_runner(spec.task_runner, spec.workers, spec.dask, plan.serving) as runner:
        pool = getattr(runner, "pool", None)
        if pool is not None:
            pool.budget = run_budget
        execution = Execution(
            plan,
            force_from_stage=force_from,
            fail_at=fail_at,
            runner=runner,
            progress=RunProgress(plan, artifacts),
            inventory=inventory,
            recorder=recorder,
            budget=run_budget,
        )
        status = "failed"
        try:
            execution.run()
            status = "completed"
        finally:
            if pool is not None:
                pool.budget = None
            for stage in execution.complete_stages():
                _write_manifest(plan, execution, stage)
            totals = [s.totals() for s in execution.stats]
            recorder.close(totals, status, _outcome(totals, run_budget, execution))
            from nightshift.flows.report import save_report  # imported when used

            report = save_report(plan, recorder.attempt)
            rows = [s.as_row() for s in execution.stats]
            publish_summary(
                plan,
                rows,
                artifacts,
                pool,
                elapsed=time.monotonic() - started,
                report=report,
            )
            if batch_mode:
                publish_provider_batches(plan, provider_batches(plan), artifacts)
            logger.info(cost_line(rows, run_budget, execution.left(), execution.pending_batches()))
    outputs = {
        plan.stages[i].name: [ref.path for _, ref in execution.units_of(i)] for i in plan.sinks
    }
    output = outputs[plan.stages[plan.sinks[-1]].name]
    publish_sample(plan, output, artifacts)
    return {
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "pipeline": plan.spec.name,
        "batches": len(plan.batches),
        "steps": [s.as_row() for s in execution.stats],
        # the (last) sink's output; every sink's by stage name in ``outputs``
        "output": output,
        "outputs": outputs,
        # the run report saved in the store (flows/report.py), or None if it failed
        "report": report,
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


def _outcome(
    totals: list[dict[str, Any]], budget: Budget | None, execution: Execution
) -> dict[str, Any]:
    """What the attempt's record (``runs/<attempt>/attempt.json``) adds at its end, beside
    the per-stage ``totals`` (with each step's ``cost_usd`` and ``online_cost_usd``): the
    run's cost, the budget, and what is left for a later run (docs/generation.md)."""
    return {
        "cost_usd": round(sum(t.get("cost_usd") or 0.0 for t in totals), 6),
        "online_cost_usd": round(sum(t.get("online_cost_usd") or 0.0 for t in totals), 6),
        "budget": _budget_summary(budget),
        "left": execution.left(),
        "pending_batches": execution.pending_batches(),
    }


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


def pipeline_name(spec: Any) -> str:
    """The pipeline's ``name``, from a spec mapping or (cheaply, without validating it) a
    YAML path; the path's stem when the file does not say."""
    if isinstance(spec, dict):
        return str(spec.get("name") or "pipeline")
    path = Path(str(spec))
    try:
        import yaml

        found = yaml.safe_load(path.read_text()) if path.is_file() else None
    except Exception:  # the name is a courtesy; the run reports a bad spec itself
        found = None
    name = found.get("name") if isinstance(found, dict) else None
    return str(name or path.stem)


def started_at() -> str:
    """The flow run's expected start (UTC, to the second): kept by a retry, and two runs
    of one spec started at different times differ by it."""
    start = flow_run.scheduled_start_time
    return dt.datetime.fromtimestamp(start.timestamp(), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _run_name() -> str:
    """``<pipeline> [<partition>] <start, UTC>``: what the flow run is called in the UI."""
    spec = flow_run.parameters.get("spec")
    partition = spec.get("partition") if isinstance(spec, dict) else None
    return " ".join(p for p in (pipeline_name(spec), partition, started_at()) if p)


def failure_at(
    plan: Plan, fail_at_batch: int | None, fail_at_step: int | str
) -> tuple[int, int] | None:
    """The (stage, batch index) where a rehearsed failure fires: first attempt only.

    ``fail_at_batch`` counts from 1, like the task runs' names (``batch 4/6``);
    ``fail_at_step`` is a step's number (the ``NN`` of ``NN-name``) or a name."""
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
    resume_step: OptionalStep = None,
    allow_imports: bool = False,
    fail_at_batch: OptionalInt = None,
    fail_at_step: StepRef = 0,
    budget: OptionalFloat = None,
) -> Any:
    """Run a pipeline spec, resuming from the batches already in its store.

    Args:
        spec: a YAML spec's path (relative to the working directory) or the spec itself
            as a mapping (name, source, store, steps, ...).
        resume_from_last: reuse the batches already in the store (the default); False
            alone computes everything again.
        resume_step: compute again from this step on (its number, the NN of the NN-name
            that task runs, logs and artifacts show, or a step's name): that step and
            every step that depends on it; the others are reused.
        allow_imports: allow operators given as module:Class import paths in the spec.
        fail_at_batch: rehearse a failure: this batch (counted from 1, as in the task
            runs' names) fails on the first attempt only, so a Retry succeeds.
        fail_at_step: the step (its number NN, as in NN-name, or a name) where
            fail_at_batch fails.
        budget: the most this run may spend on LLM calls (US dollars; overrides the
            spec's ``budget``).

    A run that leaves work for a later one (provider batches pending with ``wait:
    false``, or its budget reached) ends Completed with the name ``Pending`` and a
    message saying what is left; its result is the summary all the same.
    """
    install_log_filters()
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
