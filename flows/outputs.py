"""Reading a pipeline's state back: per-step progress and the merged final output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from flows.plan import Plan
from tasks.errors import StoreError


@dataclass
class StepStatus:
    stage: str
    steps: list[int]
    done: int
    total: int
    rows: int


def step_status(plan: Plan) -> list[StepStatus]:
    """For each stage: batches whose output is in the store (and readable), and rows."""
    report = []
    for stage in plan.stages:
        done = rows = 0
        for batch in range(len(plan.batches)):
            n = plan.store.frame_rows(plan.out_path(stage.index, batch))
            if n is not None:
                done += 1
                rows += n
        report.append(StepStatus(stage.dirname, list(stage.steps), done, len(plan.batches), rows))
    return report


def final_paths(plan: Plan) -> list[str]:
    """The last step's batch files in source order; error if any is missing."""
    last = len(plan.stages) - 1
    paths = [plan.out_path(last, b) for b in range(len(plan.batches))]
    missing = [p for p in paths if plan.store.frame_rows(p) is None]
    if missing:
        raise StoreError(
            f"pipeline {plan.spec.name}: step {plan.stages[last].dirname} has "
            f"{len(paths) - len(missing)}/{len(paths)} batches; run it first "
            f"(first missing: {plan.store.display(missing[0])})"
        )
    return paths


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
