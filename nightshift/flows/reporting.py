"""What a run shows in the Prefect UI: progress per step, a summary table (with LLM token
usage and estimated cost), per-batch LLM usage, sample rows.

Artifact keys are ``<pipeline>-<what>`` slugged to Prefect's rules (lowercase letters,
numbers and dashes), so the Artifacts page keeps one history per pipeline.
"""

from __future__ import annotations

import time
from typing import Any, cast
from uuid import UUID

import polars as pl
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from nightshift.core.naming import artifact_key
from nightshift.flows.plan import Plan
from nightshift.serving.pool import ServingPool
from nightshift.tasks.operators import ROW_ID


def attempt_note() -> str:
    """Which attempt of the flow run wrote an artifact (a UI Retry is attempt 2, ...)."""
    from prefect.runtime import flow_run

    count = flow_run.run_count or 1
    return f"attempt {count} of flow run {flow_run.name}" if flow_run.name else f"attempt {count}"


class Progress:
    """One progress artifact per stage: the share of its batches that are done.

    Batches reused from the store count as done from the start. Updates are throttled
    (at most one API call per stage every ``interval`` seconds, and one at the end of the
    stage), so a run of 10,000 batches does not make 10,000 calls.
    """

    def __init__(self, plan: Plan, interval: float = 2.0, batches_every: float = 30.0) -> None:
        self.plan = plan
        self.interval = interval
        #: ``mode: batch``: the provider batches' table is refreshed this often while
        #: the run waits on them (:meth:`tick`)
        self.batch_mode = any(getattr(c, "mode", "") == "batch" for c in plan.serving.values())
        self.batches_every = batches_every
        self._batches_at = time.monotonic()
        total = len(plan.batches)
        self.ids: list[UUID] = [
            cast(
                UUID,
                create_progress_artifact(
                    0.0,
                    key=artifact_key(plan.spec.name, f"progress-{stage.name}"),
                    description=f"step {stage.name}: share of its {total} batches done "
                    f"(reused or computed); {attempt_note()}",
                    _sync=True,  # pyright: ignore[reportCallIssue] Prefect's async_dispatch takes it
                ),
            )
            for stage in plan.stages
        ]
        self.done = [0] * len(plan.stages)
        self.sent = [0.0] * len(plan.stages)

    def tick(self) -> None:
        """Nothing finished for a while: refresh the provider batches' table (submitted /
        validating / in progress / completed, per provider batch), at most every
        ``batches_every`` seconds."""
        if not self.batch_mode or time.monotonic() - self._batches_at < self.batches_every:
            return
        self._batches_at = time.monotonic()
        from nightshift.flows.provider_status import provider_batches

        publish_provider_batches(self.plan, provider_batches(self.plan))

    def batch_done(self, stage: int) -> None:
        self.done[stage] += 1
        total = max(len(self.plan.batches), 1)
        now = time.monotonic()
        if self.done[stage] >= total or now - self.sent[stage] >= self.interval:
            self.sent[stage] = now
            update_progress_artifact(self.ids[stage], 100.0 * self.done[stage] / total)


def publish_plan(plan: Plan, lines: list[str]) -> None:
    """The plan, one row per stage: what this run reuses from the store and why it
    computes the rest (the same lines as the flow run's log)."""
    create_table_artifact(
        key=artifact_key(plan.spec.name, "plan"),
        table=[
            {
                "step": stage.name,
                **(
                    {}
                    if plan.linear
                    else {
                        "after": ", ".join(plan.stages[p].name for p in stage.parents) or "source"
                    }
                ),
                "plan": line.split(": ", 1)[-1],
            }
            for stage, line in zip(plan.stages, lines, strict=True)
        ],
        description=f"pipeline {plan.spec.name}: per step, batches reused from the store "
        f"and batches to compute, with the reason; {attempt_note()}",
    )


SUMMARY_COLUMNS = (
    "name",
    "batches",
    "reused",
    "computed",
    "failed",
    "rows_in",
    "rows_out",
    "prompt_tokens",
    "completion_tokens",
    "requests",
    "retries",
    "cached_answers",
    "cost_usd",
    "seconds",
)
#: Columns that add up across steps (rows do not: a step's rows_in is the last one's out).
_SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "requests",
    "retries",
    "cached_answers",
    "cost_usd",
    "seconds",
)


def publish_summary(
    plan: Plan, rows: list[dict[str, Any]], pool: ServingPool | None = None
) -> None:
    """The run's summary table: one row per step (batches reused from the store and
    computed by this run), then (with LLM steps) the run's total over its computed
    batches and, per HTTP serving backend, everything it sent in this run (failed
    batches included: those calls were paid too). Per-batch usage of LLM steps goes to a
    second table, ``<pipeline>-batch-usage``. ``pool``: the run's serving pool."""
    table = [{k: r.get(k) for k in SUMMARY_COLUMNS} for r in rows]
    for row in table:
        row["seconds"] = round(row["seconds"] or 0.0, 2)
    if any(r.get("prompt_tokens") or r.get("requests") for r in rows):
        total: dict[str, Any] = {k: None for k in SUMMARY_COLUMNS}
        total["name"] = "total (this run)"
        for k in _SUMMED:
            total[k] = sum(r.get(k) or 0 for r in table)
        total["cost_usd"] = round(total["cost_usd"], 6)
        total["seconds"] = round(total["seconds"], 2)
        table.append(total)
    for name, usage in serving_usage(pool).items():
        row: dict[str, Any] = {k: None for k in SUMMARY_COLUMNS}
        row.update(
            name=f"serving {name} (all calls)",
            failed=usage.get("failed"),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            requests=usage.get("requests"),
            retries=usage.get("retries"),
            cost_usd=usage.get("cost_usd"),
        )
        table.append(row)
    table.extend(endpoint_rows(pool))
    add_cost_columns(table, rows)
    create_table_artifact(
        key=artifact_key(plan.spec.name, "summary"),
        table=table,
        description=f"pipeline {plan.spec.name}: per step, batches reused from the store and "
        "computed by this run, rows, tokens and estimated cost (USD) of LLM calls; "
        f"{attempt_note()}",
    )
    per_batch = [{"step": r["name"], **u} for r in rows for u in r.get("batch_usage") or []]
    if per_batch:
        create_table_artifact(
            key=artifact_key(plan.spec.name, "batch-usage"),
            table=per_batch,
            description=f"pipeline {plan.spec.name}: LLM requests, retries, answers reused from "
            "the answer cache, tokens and estimated cost per computed batch; "
            f"{attempt_note()}",
        )


#: The cost columns :func:`add_cost_columns` adds after ``cost_usd``.
COST_COLUMNS = ("online_cost_usd", "saved_usd")


def add_cost_columns(table: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Next to ``cost_usd``: what the same tokens cost through the online API and what
    the batch API saved, per step and on the total row (only when some step was priced).
    ``table``: the summary's rows (one per step first, in ``rows``' order, then the
    total); a separate function so the summary's own layout can change around it."""
    if not any(r.get("online_cost_usd") for r in rows):
        return
    for i, row in enumerate(table):
        if i < len(rows):
            online = rows[i].get("online_cost_usd") or 0.0
        elif row.get("name") == "total (this run)":
            online = sum(r.get("online_cost_usd") or 0.0 for r in rows)
        else:
            continue
        cost = row.get("cost_usd") or 0.0
        extra = {"online_cost_usd": round(online, 6), "saved_usd": round(online - cost, 6)}
        items = list(row.items())
        at = next((j + 1 for j, (k, _) in enumerate(items) if k == "cost_usd"), len(items))
        row.clear()
        row.update(items[:at])
        row.update(extra)
        row.update(items[at:])


def cost_line(
    rows: list[dict[str, Any]],
    budget: Any = None,
    left: dict[str, int] | None = None,
    pending: int = 0,
) -> str:
    """The run's last log line: its cost per step and in total, the online price of the
    same tokens, the budget left, and what is left to do."""
    priced = [r for r in rows if r.get("cost_usd") or r.get("online_cost_usd")]
    total = sum(r.get("cost_usd") or 0.0 for r in rows)
    online = sum(r.get("online_cost_usd") or 0.0 for r in rows)
    steps = ", ".join(f"{r['name']} ${r.get('cost_usd') or 0.0:.4f}" for r in priced)
    text = f"cost: ${total:.4f} this run ({steps or 'no priced LLM calls'})"
    if online > total + 1e-9:
        text += f"; online price ${online:.4f} (saved ${online - total:.4f})"
    if budget is not None:
        text += f"; budget ${budget.cap_usd:g}, ${budget.left_usd:.4f} left"
        if budget.exhausted:
            text += " (reached)"
    if pending:
        text += f"; {pending} provider batch(es) pending"
    if left:
        text += "; left for the next run: " + ", ".join(
            f"{name} {n} batch(es)" for name, n in left.items()
        )
    return text


def publish_provider_batches(plan: Plan, records: list[dict[str, Any]]) -> None:
    """One row per provider batch of this pipeline still recorded in the store (``mode:
    batch``): its step, unit, id, attempt, status (submitted / validating / in_progress /
    completed, ...), request counts, and whether its answers were collected."""
    if not records:
        return
    create_table_artifact(
        key=artifact_key(plan.spec.name, "provider-batches"),
        table=records,
        description=f"pipeline {plan.spec.name}: provider batches (mode: batch) of units not "
        f"written yet, with their state at the provider; {attempt_note()}",
    )


def serving_usage(pool: ServingPool | None) -> dict[str, dict[str, float | int]]:
    """Usage of the run's HTTP serving backends, by serving name (or nothing)."""
    return pool.usage() if pool is not None else {}


def endpoint_rows(pool: ServingPool | None) -> list[dict[str, Any]]:
    """One summary row per endpoint of each fleet (``base_urls``): ``requests`` sent there,
    ``rows_out`` it answered, ``failed`` attempts on it, ``retries`` of those re-sent,
    its tokens; the name says whether it was taken out and is in service at the end."""
    rows: list[dict[str, Any]] = []
    for name, endpoints in (pool.endpoint_usage() if pool is not None else {}).items():
        for where, c in endpoints.items():
            row: dict[str, Any] = {k: None for k in SUMMARY_COLUMNS}
            state = "in service" if c.get("in_service") else "out"
            row.update(
                name=f"serving {name} @ {where} ({state}, taken out {c.get('taken_out', 0)}x)",
                requests=c.get("requests"),
                rows_out=c.get("answered"),
                failed=c.get("failed"),
                retries=c.get("resent"),
                prompt_tokens=c.get("prompt_tokens"),
                completion_tokens=c.get("completion_tokens"),
            )
            rows.append(row)
    return rows


def publish_sample(plan: Plan, last_paths: list[str], n: int = 5) -> None:
    frames: list[pl.DataFrame] = []
    for path in last_paths:  # the first batches may be empty after a filter
        frames.append(plan.store.read_frame(path).head(n))
        if sum(f.height for f in frames) >= n:
            break
    if not frames:
        return
    sample = pl.concat(frames, how="vertical_relaxed").head(n)
    # what the last steps wrote first, the row id last: the new columns are on screen
    written = [
        c
        for op in reversed([o for s in plan.stages for o in s.operators])
        for c in op.writes()
        if c in sample.columns
    ]
    order = list(dict.fromkeys([*written, *(c for c in sample.columns if c != ROW_ID)]))
    sample = sample.select([*order, *([ROW_ID] if ROW_ID in sample.columns else [])])
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
        description=f"sample rows of the last step; {attempt_note()}",
    )
