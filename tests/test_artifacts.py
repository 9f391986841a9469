"""What a run leaves in the Prefect UI, read back through the API."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_rows, write_jsonl
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from nightshift.flows.pipeline import Pipeline
from nightshift.tasks.operators import Filter, Template


def artifacts(flow_run_id: str) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def test_summary_progress_and_sample_artifacts(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(90, "a"))
    pipe = Pipeline(
        "Arti_Facts",
        source=str(tmp_path / "data" / "a.jsonl"),
        steps=[Filter(where="n >= 30"), Template(output="prompt", template="P: {{ text }}")],
        store=f"file://{tmp_path}/store",
        batch_size=30,
        fuse=False,
    )
    first = pipe.run()
    second = pipe.run()
    found = artifacts(second["flow_run_id"])
    assert {
        "arti-facts-summary",
        "arti-facts-sample",
        "arti-facts-progress-00-filter",
        "arti-facts-progress-01-template",
        "arti-facts-plan",
    } <= set(found)
    table = found["arti-facts-summary"].data
    rows = json.loads(table) if isinstance(table, str) else table
    # headers in words, counts as text with thousands separators, a status per step
    assert list(rows[0]) == [
        "step",
        "status",
        "batches",
        "reused",
        "computed",
        "failed",
        "rows in",
        "rows out",
        "batch time, summed (s)",
    ]
    assert [r["step"] for r in rows] == ["00-filter", "01-template"]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [r["reused"] for r in rows] == ["3", "3"] and [r["computed"] for r in rows] == ["0"] * 2
    assert rows[0]["rows in"] == "90" and rows[0]["rows out"] == "60"
    assert "adds up the seconds of each batch" in found["arti-facts-summary"].description
    assert float(found["arti-facts-progress-01-template"].data) == 100.0
    # the plan says per step what was reused, in one artifact (no task run per batch)
    plan = found["arti-facts-plan"].data
    plan_rows = json.loads(plan) if isinstance(plan, str) else plan
    assert [r["plan"] for r in plan_rows] == ["all 3 batches done, reused"] * 2
    # the sample shows the source's columns (the key first), then the generated ones;
    # no row id; which attempt wrote it
    sample = found["arti-facts-sample"].data
    assert "P: a text number 30" in sample
    header = next(line for line in sample.splitlines() if line.startswith("| "))
    assert header == "| id | text | n | prompt |", header
    assert "attempt 1" in found["arti-facts-sample"].description
    first_rows = json.loads(artifacts(first["flow_run_id"])["arti-facts-summary"].data)
    assert [r["computed"] for r in first_rows] == ["3", "3"]
