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

from nightshift.core.errors import SpecError
from nightshift.flows.explain import explain
from nightshift.flows.log_filters import quiet_nightshift_tracebacks
from nightshift.flows.plan import Plan, build_plan
from nightshift.flows.recording import Recorder
from nightshift.flows.reporting import Progress, publish_plan, publish_sample, publish_summary
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
) -> dict[str, Any]:
    """Run a plan inside the current flow run; returns the run summary.

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
    recorder = Recorder.start(plan, sorted(forced))
    with make_task_runner(spec.task_runner, spec.workers, spec.dask, plan.serving) as runner:
        execution = Execution(
            plan,
            force_from_stage=force_from,
            fail_at=fail_at,
            runner=runner,
            progress=Progress(plan),
            inventory=inventory,
            recorder=recorder,
        )
        status = "failed"
        try:
            execution.run()
            status = "completed"
        finally:
            for stage in execution.complete_stages():
                _write_manifest(plan, execution, stage)
            recorder.close([s.totals() for s in execution.stats], status)
            from nightshift.flows.report import save_report  # altair: imported when used

            report = save_report(plan, recorder.attempt)
            publish_summary(
                plan,
                [s.as_row() for s in execution.stats],
                getattr(runner, "pool", None),
                report=report,
            )
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
        # the run report saved in the store (flows/report.py), or None if it failed
        "report": report,
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
) -> dict[str, Any]:
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
    """
    quiet_nightshift_tracebacks()
    plan = build_plan(Path(spec) if isinstance(spec, str) else spec, allow_imports=allow_imports)
    return execute_plan(
        plan, resume_from_last, resume_step, failure_at(plan, fail_at_batch, fail_at_step)
    )
