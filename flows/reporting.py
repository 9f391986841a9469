"""What a run shows in the Prefect UI: progress per step, a summary table, sample rows.

Artifact keys are ``<pipeline>-<what>`` slugged to Prefect's rules (lowercase letters,
numbers and dashes), so the Artifacts page keeps one history per pipeline.
"""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

import polars as pl
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.plan import Plan


def artifact_key(pipeline: str, what: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{pipeline}-{what}".lower()).strip("-")


class Progress:
    """One progress artifact per stage, updated as its batches finish."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.ids: list[UUID] = [
            create_progress_artifact(
                0.0,
                key=artifact_key(plan.spec.name, f"progress-{stage.dirname}"),
                description=f"step {stage.dirname}: batches done of {len(plan.batches)}",
            )
            for stage in plan.stages
        ]
        self.done = [0] * len(plan.stages)

    def batch_done(self, stage: int) -> None:
        self.done[stage] += 1
        total = max(len(self.plan.batches), 1)
        update_progress_artifact(self.ids[stage], 100.0 * self.done[stage] / total)


def publish_summary(plan: Plan, rows: list[dict[str, Any]]) -> None:
    create_table_artifact(
        key=artifact_key(plan.spec.name, "summary"),
        table=[
            {k: r[k] for k in ("name", "batches", "cached", "reused", "computed", "failed",
                               "rows_in", "rows_out", "prompt_tokens", "completion_tokens", "seconds")}
            for r in rows
        ],
        description=f"pipeline {plan.spec.name}: per step, what this run reused and computed",
    )


def publish_sample(plan: Plan, last_paths: list[str], n: int = 5) -> None:
    frames: list[pl.DataFrame] = []
    for path in last_paths:  # the first batches may be empty after a filter
        frames.append(plan.store.read_frame(path).head(n))
        if sum(f.height for f in frames) >= n:
            break
    if not frames:
        return
    sample = pl.concat(frames, how="vertical_relaxed").head(n)
    text_cols = [c for c, t in sample.schema.items() if t == pl.String]
    shown = sample.with_columns(pl.col(text_cols).str.slice(0, 200)) if text_cols else sample
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "".join(
        "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |\n"
        for row in shown.iter_rows()
    )
    create_markdown_artifact(
        key=artifact_key(plan.spec.name, "sample"),
        markdown=f"### {plan.spec.name}: first {shown.height} output rows\n\n{header}{body}",
        description="sample rows of the last step",
    )
