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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from nightshift.core.errors import NightshiftError
from nightshift.flows.local_api import prefect_api
from nightshift.flows.outputs import export, read_output, step_status, StepStatus
from nightshift.flows.plan import Plan, build_plan
from nightshift.flows.run_pipeline import run_pipeline
from nightshift.tasks.operators import Operator, registered_operators
from nightshift.tasks.sources import SourceSpec
from nightshift.tasks.spec import PipelineSpec, StoreSpec


def run_spec(
    spec: PipelineSpec,
    resume_from_last: bool | None = None,
    resume_step: int | None = None,
    allow_imports: bool = False,
) -> dict[str, Any]:
    """Check everything, then run the ``run-pipeline`` flow on the Prefect API that
    ``nightshift.flows.local_api.prefect_api`` finds (configured, already running here, or a
    temporary one); returns the run summary or raises one NightshiftError line."""
    build_plan(spec, allow_imports=allow_imports)  # every check, before any work
    with prefect_api():
        state = run_pipeline(
            spec=spec.model_dump(mode="json"),
            resume_from_last=resume_from_last,
            resume_step=resume_step,
            allow_imports=allow_imports,
            return_state=True,
        )
        if not state.is_completed():
            try:
                state.result()
            except NightshiftError:
                raise
            except Exception:
                pass
            raise NightshiftError(state.message or f"flow run ended {state.name}")
        return state.result()


class Pipeline:
    """An ordered list of operators over a source, run as a Prefect flow."""

    def __init__(
        self,
        name: str,
        source: str | list[str] | SourceSpec,
        steps: list[Operator],
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
        for op in self.steps:
            registered = registered_operators().get(op.name) is type(op)
            key = op.name if registered else op.import_path()
            entries.append({key: op.model_dump(mode="json")})
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
        resume_step: int | None = None,
    ) -> dict[str, Any]:
        """Run (or resume) the pipeline; returns the per-step summary."""
        return run_spec(self.spec(batch_size), resume_from_last, resume_step, allow_imports=True)

    def status(self, batch_size: int | None = None) -> list[StepStatus]:
        return step_status(self.plan(batch_size))

    def read(self, batch_size: int | None = None) -> pl.DataFrame:
        return read_output(self.plan(batch_size))

    def export(self, to: str | Path, batch_size: int | None = None) -> int:
        return export(self.plan(batch_size), Path(to))
