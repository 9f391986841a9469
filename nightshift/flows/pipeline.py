"""The Python API, in DataFlow's vocabulary::

    from nightshift import Pipeline
    from nightshift.ops import Filter, Map, Template

    pipe = Pipeline(
        "demo",
        source="data/*.jsonl",
        steps=[Map(columns={"n": "length(text)"}), Filter(where="n > 20"),
               Template(output="prompt", template="Summarize: {{ text }}")],
        store="file://./.nightshift",
    )
    pipe.run(batch_size=1000)                          # resumes from completed batches
    pipe.run(resume_from_last=False, resume_step=2)    # recompute step 2 and later
    df = pipe.read()                                   # final output, source order

Steps as a DAG (``docs/engine.md``, "DAGs"): wrap an operator in :class:`Step` to give it a
``name`` and ``after``, exactly as ``name:`` and ``after:`` in YAML::

    steps=[Filter(where="length(text) > 20", ...),
           Step(Template(output="fr", ...), name="fr", after=["filter"]),
           Step(Template(output="de", ...), name="de", after=["filter"])]
    pipe.run(resume_step="de")                         # recompute the de branch only
    pipe.read(step="fr")                               # a branch's output
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from nightshift.core.errors import NightshiftError
from nightshift.flows.local_api import prefect_api
from nightshift.flows.outputs import StepStatus, export, read_output, step_status
from nightshift.flows.parameters import check_parameter_size, parameters_accepted
from nightshift.flows.plan import Plan, build_plan
from nightshift.flows.run_pipeline import run_pipeline
from nightshift.tasks.operators import Operator, registered_operators
from nightshift.tasks.sources import SourceSpec
from nightshift.tasks.spec import PipelineSpec, StoreSpec

#: Heartbeats of ad-hoc runs: ``on``, ``off`` or ``auto`` (the default; see ad_hoc_run).
HEARTBEATS_ENV = "NIGHTSHIFT_HEARTBEATS"


def heartbeats_wanted(heartbeats: bool | None = None) -> bool:
    """Whether an ad-hoc run sends Prefect's flow run heartbeats: ``heartbeats`` if given,
    else ``NIGHTSHIFT_HEARTBEATS`` (on/off), else (``auto``) only inside a flow run that
    a deployment started (``Pipeline.run`` called from a deployed flow)."""
    if heartbeats is not None:
        return heartbeats
    raw = (os.environ.get(HEARTBEATS_ENV) or "auto").strip().lower()
    if raw in ("1", "true", "on", "yes"):
        return True
    if raw in ("0", "false", "off", "no"):
        return False
    if raw != "auto":
        raise NightshiftError(f"{HEARTBEATS_ENV}={raw!r}: expected on, off or auto")
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


@contextmanager
def ad_hoc_run(heartbeats: bool) -> Iterator[None]:
    """Prefect settings for a flow run started in this process (``nightshift run``,
    ``Pipeline.run``), not by a worker from a deployment.

    Prefect's flow run heartbeats (``flows.heartbeat_frequency``, every 180 s by default)
    feed its detection of crashed ("zombie") runs, which matters for the runs a worker
    starts from a deployment: nobody watches them, and a night that died is retried from
    the UI. Those runs never come through here and keep Prefect's setting. An ad-hoc run
    is watched by whoever started it, and its heartbeat thread costs every run 0.5-1 s
    at its end (the sync engine joins the thread, which sleeps in 1 s steps). So ad-hoc
    runs go without heartbeats unless :func:`heartbeats_wanted` says otherwise
    (``heartbeats``); the setting is Prefect's own (``flows.heartbeat_frequency`` set to
    None), for this run only: a settings context as ``temporary_settings`` enters, with
    the current settings copied rather than validated again from the environment (75 ms
    a run)."""
    if heartbeats:
        yield
        return
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    settings = context.settings
    flows = settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(
        profile=context.profile, settings=settings.model_copy(update={"flows": flows})
    ):
        yield


def run_spec(
    spec: PipelineSpec,
    resume_from_last: bool | None = None,
    resume_step: int | str | None = None,
    allow_imports: bool = False,
    budget: float | None = None,
    heartbeats: bool | None = None,
) -> dict[str, Any]:
    """Check everything, then run the ``run-pipeline`` flow on the Prefect API that
    ``nightshift.flows.local_api.prefect_api`` finds (configured, already running here, or a
    temporary one); returns the run summary or raises one NightshiftError line.
    ``heartbeats``: Prefect's flow run heartbeats for this run (default: see
    :func:`ad_hoc_run`)."""
    build_plan(spec, allow_imports=allow_imports)  # every check, before any work
    parameters: dict[str, Any] = {
        "spec": spec.model_dump(mode="json"),
        "resume_from_last": resume_from_last,
        "resume_step": resume_step,
        "allow_imports": allow_imports,
        **({"budget": budget} if budget is not None else {}),
    }
    check_parameter_size(parameters, "spec")  # before a temporary server starts
    beats = heartbeats_wanted(heartbeats)
    with prefect_api(), ad_hoc_run(beats), parameters_accepted(parameters, "spec"):
        state = run_pipeline(**parameters, return_state=True)
        if not state.is_completed():
            try:
                state.result()
            except NightshiftError:
                raise
            except Exception:
                pass
            raise NightshiftError(state.message or f"flow run ended {state.name}")
        return state.result()


@dataclass(frozen=True)
class Step:
    """An operator with a step ``name`` and the steps it comes ``after`` (a DAG); ``after``
    None follows the step before, ``[]`` reads the source."""

    operator: Operator
    name: str | None = None
    after: list[str] | None = None
    #: a join across an explode: ``{"ids": "answers"}`` keeps that parent's rows and ids,
    #: as ``join:`` in YAML (docs/operators.md)
    join: dict[str, str] | None = None


class Pipeline:
    """Operators over a source (an ordered list, or a DAG through :class:`Step`), run as
    a Prefect flow."""

    def __init__(
        self,
        name: str,
        source: str | list[str] | SourceSpec,
        steps: list[Operator | Step],
        store: str | StoreSpec = "file://./.nightshift",
        batch_size: int = 10_000,
        **options: Any,
    ) -> None:
        self.name = name
        self.source = source if isinstance(source, SourceSpec) else SourceSpec(path=source)
        self.steps = steps
        self.store = store if isinstance(store, StoreSpec) else StoreSpec(url=store)
        self.batch_size = batch_size
        self.options = options

    def spec(self, batch_size: int | None = None) -> PipelineSpec:
        entries = []
        for item in self.steps:
            op = item.operator if isinstance(item, Step) else item
            registered = registered_operators().get(op.name) is type(op)
            key = op.name if registered else op.import_path()
            entry: dict[str, Any] = {key: op.model_dump(mode="json")}
            if isinstance(item, Step) and item.name is not None:
                entry["name"] = item.name
            if isinstance(item, Step) and item.after is not None:
                entry["after"] = list(item.after)
            if isinstance(item, Step) and item.join is not None:
                entry["join"] = dict(item.join)
            entries.append(entry)
        return PipelineSpec(
            name=self.name,
            source=self.source,
            store=self.store,
            batch_size=batch_size or self.batch_size,
            steps=entries,
            **self.options,
        )

    def plan(self, batch_size: int | None = None) -> Plan:
        return build_plan(self.spec(batch_size), allow_imports=True)

    def run(
        self,
        batch_size: int | None = None,
        resume_from_last: bool | None = None,
        resume_step: int | str | None = None,
        heartbeats: bool | None = None,
    ) -> dict[str, Any]:
        """Run (or resume) the pipeline; returns the per-step summary. ``resume_step``
        (an index or a step name) recomputes that step and the steps depending on it.
        ``heartbeats``: send Prefect's flow run heartbeats (default: only inside a
        deployment's flow run, or as ``NIGHTSHIFT_HEARTBEATS`` says; docs/engine.md)."""
        return run_spec(
            self.spec(batch_size),
            resume_from_last,
            resume_step,
            allow_imports=True,
            heartbeats=heartbeats,
        )

    def status(
        self, batch_size: int | None = None, step: int | str | None = None
    ) -> list[StepStatus]:
        return step_status(self.plan(batch_size), step)

    def read(self, batch_size: int | None = None, step: int | str | None = None) -> pl.DataFrame:
        """The sink's rows (or ``step``'s), in source order."""
        return read_output(self.plan(batch_size), step)

    def export(
        self, to: str | Path, batch_size: int | None = None, step: int | str | None = None
    ) -> int:
        return export(self.plan(batch_size), Path(to), step)
