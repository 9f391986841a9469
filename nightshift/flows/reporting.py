"""What a run shows in the Prefect UI: the plan, a summary table (with LLM token usage
and estimated cost), per-batch LLM usage, sample rows; progress per step is
``flows/progress.py``'s. One artifact per kind per flow run (``flows/artifacts.py``).

Tables are for people: headers in words, counts with thousands separators (so the
values are text), a step that never started says so.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from nightshift.flows.artifacts import RunArtifacts
from nightshift.flows.plan import Plan
from nightshift.serving.pool import ServingPool
from nightshift.tasks.operators import ROW_ID


def publish_plan(plan: Plan, lines: list[str], artifacts: RunArtifacts) -> None:
    """The plan, one row per step: what this run reuses from the store and why it
    computes the rest (the same lines as the flow run's log)."""
    artifacts.table(
        "plan",
        [
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
        f"pipeline {plan.spec.name}: per step, batches reused from the store "
        "and batches to compute, with the reason",
    )


#: The summary's columns: (header, key in a step's row); LLM columns only with LLM usage.
SUMMARY_COLUMNS = (
    ("step", "name"),
    ("status", "status"),
    ("batches", "batches"),
    ("reused", "reused"),
    ("computed", "computed"),
    ("failed", "failed"),
    ("rows in", "rows_in"),
    ("rows out", "rows_out"),
)
LLM_COLUMNS = (
    ("prompt tokens", "prompt_tokens"),
    ("completion tokens", "completion_tokens"),
    ("requests", "requests"),
    ("retries", "retries"),
    ("cached answers", "cached_answers"),
    ("cost (USD)", "cost_usd"),
)
#: per step, the seconds its computed batches took, added up (they overlap in time)
SECONDS = ("batch time, summed (s)", "seconds")
#: Columns that add up across steps (rows do not: a step's rows in is the last one's out).
_SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "requests",
    "retries",
    "cached_answers",
    "cost_usd",
    "seconds",
)


def step_status(row: dict[str, Any]) -> str:
    """``done``, ``3 failed``, ``stopped at 120 of 300`` or ``not started``."""
    done = (row.get("reused") or 0) + (row.get("computed") or 0)
    if row.get("failed"):
        return f"{row['failed']} failed"
    if done >= (row.get("batches") or 0):
        return "done"
    return f"stopped at {done} of {row['batches']}" if done else "not started"


def cell(key: str, value: Any) -> Any:
    """A table cell for people: thousands separators, costs to 4 decimals (below a cent to
    6), seconds to 1."""
    if value is None:
        return ""
    if key.endswith("_usd"):  # to 4 decimals; amounts below a cent to 6
        return f"{value:,.4f}" if abs(value) >= 0.01 else f"{value:.6f}"
    if key == "seconds":
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return value


def summary_table(
    rows: list[dict[str, Any]], pool: ServingPool | None = None
) -> list[dict[str, Any]]:
    """The summary's rows (header -> cell), as :func:`publish_summary` publishes them."""
    llm = any(
        r.get("prompt_tokens") or r.get("requests") or r.get("cost_usd") for r in rows
    ) or bool(serving_usage(pool))
    columns = [*SUMMARY_COLUMNS, *(LLM_COLUMNS if llm else ()), SECONDS]
    raw: list[dict[str, Any]] = []
    for r in rows:
        row = {key: r.get(key) for _, key in columns}
        row["status"] = step_status(r)
        if row["status"] == "not started":  # nothing of it ran: no zeros to misread
            row.update({key: None for _, key in columns[3:]})
        raw.append(row)
    if llm:
        total: dict[str, Any] = {key: None for _, key in columns}
        total["name"] = "total (this run)"
        for k in _SUMMED:
            total[k] = sum(r.get(k) or 0 for r in raw)
        raw.append(total)
    for name, usage in serving_usage(pool).items():
        row: dict[str, Any] = {key: None for _, key in columns}
        row.update(
            name=f"serving {name} (all calls)",
            failed=usage.get("failed"),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            requests=usage.get("requests"),
            retries=usage.get("retries"),
            cost_usd=usage.get("cost_usd"),
        )
        raw.append(row)
    raw.extend(endpoint_rows(pool))
    if add_cost_columns(raw, rows):
        at = next((i for i, (_, key) in enumerate(columns) if key == "cost_usd"), len(columns) - 1)
        columns[at + 1 : at + 1] = COST_COLUMNS
    return [{header: cell(key, r.get(key)) for header, key in columns} for r in raw]


def publish_summary(
    plan: Plan,
    rows: list[dict[str, Any]],
    artifacts: RunArtifacts,
    pool: ServingPool | None = None,
    elapsed: float | None = None,
    report: str | None = None,
) -> None:
    """The run's summary artifact (``<pipeline>-summary``): one row per step (batches
    reused from the store and computed by this run, its status), then (with LLM steps)
    the run's total over its computed batches and, per HTTP serving backend, everything
    it sent in this run (failed batches included: those calls were paid too). Per-batch
    usage of LLM steps goes to a second table, ``<pipeline>-batch-usage``. ``pool``: the
    run's serving pool; ``elapsed``: the run's seconds so far; ``report``: where the run
    report (``flows/report.py``) was saved in the store.

    Everything the summary card says is built here, in one place: a line added to
    ``notes`` shows in the card's description."""
    notes = [
        f"pipeline {plan.spec.name}: per step, batches reused from the store and computed "
        "by this run, rows, tokens and estimated cost (USD) of LLM calls",
        f"{SECONDS[0]!r} adds up the seconds of each batch a step computed in this run; "
        "batches run concurrently, so it can exceed the run's own time"
        + (f" ({elapsed:,.1f} s so far)" if elapsed is not None else ""),
    ]
    if report:
        notes.append(f"run report (HTML, charts): `{report}`")
    artifacts.table("summary", summary_table(rows, pool), "; ".join(notes))
    per_batch = [{"step": r["name"], **u} for r in rows for u in r.get("batch_usage") or []]
    if per_batch:
        artifacts.table(
            "batch-usage",
            per_batch,
            f"pipeline {plan.spec.name}: LLM requests, retries, answers reused from "
            "the answer cache, tokens and estimated cost per computed batch",
        )


#: The cost columns :func:`add_cost_columns` adds after ``cost_usd``.
COST_COLUMNS = ("online_cost_usd", "saved_usd")


COST_COLUMNS = (("online cost (USD)", "online_cost_usd"), ("saved (USD)", "saved_usd"))


def add_cost_columns(table: list[dict[str, Any]], rows: list[dict[str, Any]]) -> bool:
    """What the same tokens cost through the online API and what the batch API saved,
    per step and on the total row (only when some step was priced; then True, and the
    summary shows :data:`COST_COLUMNS` next to the cost). ``table``: the summary's rows
    (one per step first, in ``rows``' order, then the total); a separate function so the
    summary's own layout can change around it."""
    if not any(r.get("online_cost_usd") for r in rows):
        return False
    for i, row in enumerate(table):
        if i < len(rows):
            online = rows[i].get("online_cost_usd") or 0.0
        elif row.get("name") == "total (this run)":
            online = sum(r.get("online_cost_usd") or 0.0 for r in rows)
        else:
            continue
        cost = row.get("cost_usd") or 0.0
        row.update(online_cost_usd=round(online, 6), saved_usd=round(online - cost, 6))
    return True


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


def publish_provider_batches(
    plan: Plan, records: list[dict[str, Any]], artifacts: RunArtifacts | None = None
) -> None:
    """One row per provider batch of this pipeline still recorded in the store (``mode:
    batch``): its step, unit, id, attempt, status (submitted / validating / in_progress /
    completed, ...), request counts, and whether its answers were collected."""
    if not records:
        return
    (artifacts or RunArtifacts(plan.spec.name)).table(
        "provider-batches",
        records,
        f"pipeline {plan.spec.name}: provider batches (mode: batch) of units not "
        "written yet, with their state at the provider",
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
            row: dict[str, Any] = {}
            state = "in service" if c.get("in_service") else "out"
            auto = f", auto limit {c['concurrency_limit']}" if "concurrency_limit" in c else ""
            row.update(
                name=f"serving {name} @ {where} ({state}, taken out {c.get('taken_out', 0)}x{auto})",
                requests=c.get("requests"),
                rows_out=c.get("answered"),
                failed=c.get("failed"),
                retries=c.get("resent"),
                prompt_tokens=c.get("prompt_tokens"),
                completion_tokens=c.get("completion_tokens"),
            )
            rows.append(row)
    return rows


def publish_sample(plan: Plan, last_paths: list[str], artifacts: RunArtifacts, n: int = 5) -> None:
    """The first ``n`` output rows as a markdown table: the source's columns first (the
    key and the text the steps read), then the columns the steps wrote, in step order;
    ``_row_id`` is left out (it is in every stored file)."""
    frames: list[pl.DataFrame] = []
    for path in last_paths:  # the first batches may be empty after a filter
        frames.append(plan.store.read_rows(path, 0, n))  # not the whole batch
        if sum(f.height for f in frames) >= n:
            break
    if not frames:
        return
    sample = pl.concat(frames, how="vertical_relaxed").head(n)
    written = [
        c
        for op in (o for s in plan.stages for o in s.operators)
        for c in op.writes()
        if c in sample.columns
    ]
    written = list(dict.fromkeys(written))
    source = [c for c in sample.columns if c != ROW_ID and c not in written]
    shown = sample.select([*source, *written])
    text_cols = [c for c, t in shown.schema.items() if t == pl.String]
    shown = shown.with_columns(pl.col(text_cols).str.slice(0, 200)) if text_cols else shown
    header = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "".join(
        "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |\n"
        for row in shown.iter_rows()
    )
    artifacts.markdown(
        "sample",
        f"### {plan.spec.name}: first {shown.height} output rows\n\n"
        "Source columns first, then the columns the steps wrote.\n\n"
        f"{header}{body}",
        f"pipeline {plan.spec.name}: sample rows of the last step",
    )
