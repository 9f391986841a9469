"""The ``nightly-pipeline`` flow: one dated partition of a pipeline per scheduled run.

A deployment (see ``prefect.yaml``) runs it on a cron schedule with ``spec`` set to a
YAML spec in the repository. Each run works on one date:

* ``date`` defaults to the flow run's scheduled start date in the deployment schedule's
  timezone (a 02:00 Europe/Paris run is that day's date, whatever UTC says); a manual
  run without a schedule uses today's date in UTC;
* ``{date}`` in ``source.path`` is replaced by it (e.g. ``s3://raw/{date}/*.jsonl``);
* every store path gets a ``date=YYYY-MM-DD`` segment after the pipeline name, so each
  night's outputs, manifests and cache records are their own and a Retry of a failed
  night resumes that night's batches.

``overrides`` is shallow-merged into the spec (``{"batch_size": 50}``, or a whole
``{"store": {...}}``). The step tasks run inside this flow run (no subflow), so the UI
shows them, Cached or computed, under the nightly run itself.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import deployment, flow_run
from prefect.states import Completed

from nightshift.core.errors import SpecError
from nightshift.flows.log_filters import install_log_filters
from nightshift.flows.parameters import OptionalFloat, OptionalInt, OptionalText, StepRef
from nightshift.flows.plan import build_plan
from nightshift.flows.run_pipeline import (
    execute_plan,
    failure_at,
    pending_message,
    pipeline_name,
)
from nightshift.tasks.spec import PipelineSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]


def nightly_spec(
    spec: str | Path, date: str, overrides: dict[str, Any] | None = None
) -> PipelineSpec:
    """The spec of one night: ``spec`` (relative to the repo root) + overrides + date."""
    try:
        dt.date.fromisoformat(date)
        if len(date) != 10:
            raise ValueError
    except ValueError:
        raise SpecError(f"date {date!r}: expected YYYY-MM-DD") from None
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    data = load_spec(path).model_dump(mode="json", exclude_unset=True)
    data.update(overrides or {})
    source = data.get("source")
    if isinstance(source, dict):
        paths = source.get("path")
        if isinstance(paths, str):
            source["path"] = paths.replace("{date}", date)
        elif isinstance(paths, list):
            source["path"] = [p.replace("{date}", date) if isinstance(p, str) else p for p in paths]
    data["partition"] = f"date={date}"
    return load_spec(data)


def _schedule_timezone() -> ZoneInfo:
    """The timezone of the deployment's (first active) schedule, else UTC."""
    if not deployment.id:
        return ZoneInfo("UTC")
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            schedules = client.read_deployment(deployment.id).schedules or []
    except Exception:  # the date still has a sensible default
        return ZoneInfo("UTC")
    for item in sorted(schedules, key=lambda s: not s.active):
        tz = getattr(item.schedule, "timezone", None)
        if tz:
            return ZoneInfo(tz)
    return ZoneInfo("UTC")


def scheduled_date() -> str:
    """This run's scheduled start date in its deployment's timezone, as YYYY-MM-DD."""
    start = flow_run.scheduled_start_time
    tz = _schedule_timezone()
    return dt.datetime.fromtimestamp(start.timestamp(), tz).date().isoformat()


def _night_name() -> str:
    """``<pipeline> date=YYYY-MM-DD``: what a night is called in the UI (the pipeline's
    ``name`` from its spec, as its store and artifacts are)."""
    params = flow_run.parameters
    try:
        date = params.get("date") or scheduled_date()
    except Exception:  # the name is a courtesy; the run itself reports a bad date
        date = params.get("date") or "?"
    spec = Path(str(params.get("spec")))
    if not spec.is_absolute() and not spec.exists():
        spec = ROOT / spec
    return f"{pipeline_name(spec)} date={date}"


@flow(name="nightly-pipeline", flow_run_name=_night_name, validate_parameters=True)
def nightly(
    spec: str,
    date: OptionalText = None,
    overrides: dict[str, Any] = {},  # noqa: B006 (a JSON parameter; never mutated)
    fail_at_batch: OptionalInt = None,
    fail_at_step: StepRef = 0,
    allow_imports: bool = False,
    budget: OptionalFloat = None,
) -> Any:
    """Run one night of a pipeline in its own date partition of the store.

    Args:
        spec: the pipeline's YAML spec, a path relative to the repository root.
        date: the night to run, YYYY-MM-DD; default: the scheduled start date in the
            schedule's timezone (today in UTC for a manual run).
        overrides: top-level spec keys to replace, e.g. {"batch_size": 50}.
        fail_at_batch: rehearse a failure: this batch (counted from 1, as in the task
            runs' names) fails on the first attempt only, so a Retry succeeds.
        fail_at_step: the step (its number NN, as in the NN-name of task runs, logs and
            artifacts, or a step's name) where fail_at_batch fails.
        allow_imports: allow operators given as module:Class import paths in the spec.
        budget: the most this run may spend on LLM calls (US dollars; overrides the
            spec's). A run that leaves work for the next (budget reached, provider
            batches pending) ends Completed named ``Pending`` (see ``run_pipeline``).
    """
    install_log_filters()
    date = date or scheduled_date()
    plan = build_plan(nightly_spec(spec, date, overrides), allow_imports=allow_imports)
    get_run_logger().info(
        "nightly %s for %s (store partition %s)", plan.spec.name, date, plan.spec.partition
    )
    summary = execute_plan(
        plan, fail_at=failure_at(plan, fail_at_batch, fail_at_step), budget=budget
    )
    summary = {**summary, "date": date, "partition": plan.spec.partition}
    if summary["left"]:
        return Completed(name="Pending", message=pending_message(summary), data=summary)
    return summary
