"""What a run shows in the Prefect UI: progress per step, a summary table (with LLM token
usage and estimated cost), per-batch LLM usage, sample rows.

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


SUMMARY_COLUMNS = ("name", "batches", "cached", "reused", "computed", "failed", "rows_in",
                   "rows_out", "prompt_tokens", "completion_tokens", "requests", "retries",
                   "cached_answers", "cost_usd", "seconds")


def publish_summary(plan: Plan, rows: list[dict[str, Any]]) -> None:
    """The run's summary table: one row per step, then (with LLM steps) the run's total
    over its computed batches and, per HTTP serving backend, everything it sent in this
    run (failed batches included: those calls were paid too). Per-batch usage of LLM
    steps goes to a second table, ``<pipeline>-batch-usage``."""
    table = [{k: r.get(k) for k in SUMMARY_COLUMNS} for r in rows]
    if any(r.get("prompt_tokens") or r.get("requests") for r in rows):
        total: dict[str, Any] = {k: None for k in SUMMARY_COLUMNS}
        total["name"] = "total (this run)"
        for k in SUMMARY_COLUMNS[1:]:
            total[k] = sum(r.get(k) or 0 for r in rows)
        total["cost_usd"] = round(total["cost_usd"], 6)
        table.append(total)
    for name, usage in serving_usage().items():
        row: dict[str, Any] = {k: None for k in SUMMARY_COLUMNS}
        row.update(name=f"serving {name} (all calls)", failed=usage.get("failed"),
                   prompt_tokens=usage.get("prompt_tokens"),
                   completion_tokens=usage.get("completion_tokens"),
                   requests=usage.get("requests"), retries=usage.get("retries"),
                   cost_usd=usage.get("cost_usd"))
        table.append(row)
    create_table_artifact(
        key=artifact_key(plan.spec.name, "summary"),
        table=table,
        description=f"pipeline {plan.spec.name}: per step, what this run reused and computed; "
                    "tokens and estimated cost (USD) of LLM calls",
    )
    per_batch = [
        {"step": r["name"], **u} for r in rows for u in r.get("batch_usage") or []
    ]
    if per_batch:
        create_table_artifact(
            key=artifact_key(plan.spec.name, "batch-usage"),
            table=per_batch,
            description=f"pipeline {plan.spec.name}: LLM requests, retries, answers reused from "
                        "the answer cache, tokens and estimated cost per computed batch",
        )


def serving_usage() -> dict[str, dict[str, float | int]]:
    """Usage of the running flow's HTTP serving backends, by serving name (or nothing)."""
    from serving.pool import active_pool

    pool = active_pool()
    return pool.usage() if pool is not None else {}


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
