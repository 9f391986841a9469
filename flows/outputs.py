"""Reading a pipeline's state back: per-step progress and the merged final output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from flows.plan import Plan
from flows.survey import survey
from tasks.errors import StoreError


@dataclass
class StepStatus:
    stage: str
    steps: list[int]
    done: int
    total: int
    rows: int


def step_status(plan: Plan) -> list[StepStatus]:
    """For each stage: batches whose output is in the store (and readable), and rows.

    One listing per stage directory (see flows/survey.py); a stage that cuts batches
    into pieces counts a batch done when every piece is.
    """
    return [
        StepStatus(view.name, list(stage.steps), view.done, view.batches, view.rows)
        for stage, view in zip(plan.stages, survey(plan))
    ]


def final_paths(plan: Plan) -> list[str]:
    """The last step's output files in source order; error if any batch is missing."""
    last = survey(plan)[-1]
    if last.done < last.batches:
        missing = next(b for b, refs in enumerate(last.refs) if refs is None)
        batch = plan.batches[missing]
        raise StoreError(
            f"pipeline {plan.spec.name}: step {plan.stages[-1].dirname} has "
            f"{last.done}/{last.batches} batches; run it first (first missing: batch "
            f"{missing + 1}, rows {batch.start}-{batch.stop} of {batch.file.uri})"
        )
    return [ref.path for refs in last.refs for ref in refs or []]


def read_output(plan: Plan) -> pl.DataFrame:
    """The final step's rows, in source order (files by path, then row)."""
    frames = [plan.store.read_frame(p) for p in final_paths(plan)]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


def export(plan: Plan, to: Path) -> int:
    """Write the final output to ``.parquet`` or ``.jsonl``; returns the row count."""
    suffix = to.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".ndjson"):
        raise StoreError(f"export --to {to}: use a .parquet or .jsonl file name")
    paths = final_paths(plan)
    to.parent.mkdir(parents=True, exist_ok=True)
    if plan.store.is_local and paths:
        frame = pl.scan_parquet(paths)
        frame.sink_parquet(to) if suffix == ".parquet" else frame.sink_ndjson(to)
        return pl.scan_parquet(to).select(pl.len()).collect().item() if suffix == ".parquet" else sum(
            1 for _ in open(to, "rb")
        )
    df = read_output(plan)
    df.write_parquet(to) if suffix == ".parquet" else df.write_ndjson(to)
    return df.height
