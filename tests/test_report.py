"""The run report: what runs record as they go (per unit, per attempt), the HTML that
``nightshift report`` writes from it, and that page opened in a real headless Chromium.

One tiny pipeline (fake LLM backend: the test is about recording and the report, not
generation) runs twice in-process: the first attempt fails at a rehearsed batch, the
second resumes. Both the recording assertions and the browser test use those runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from browser_fixtures import chromium_or_skip, launch
from conftest import ROOT, make_rows, write_jsonl
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from typer.testing import CliRunner

from nightshift.core.errors import error_kind
from nightshift.flows.cli import app
from nightshift.flows.pipeline import Pipeline
from nightshift.flows.run_pipeline import run_pipeline
from nightshift.tasks.operators import Filter, Generate, Judge

FAKE = {"default": {"backend": "fake", "model": "echo", "max_batch": 8}}
#: the failure rehearsed in the first attempt: batch 3 of the answer step
FAIL_BATCH, FAIL_STEP = 3, "answer"


def test_error_kinds() -> None:
    assert error_kind("gen batch 2/9: steps[1] (generate): ValueError: bad") == "ValueError"
    assert error_kind("HTTP 429: too many requests") == "HTTP 429"
    assert error_kind("3/20 rows failed (15% > max_error_rate 10%); first: x") == "N/M rows failed"
    label = "gen batch 2/9"
    assert error_kind(f"{label}: failure injected", label) == "failure injected"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two attempts of one pipeline (the first fails, the second resumes) and the report
    the CLI writes of them."""
    tmp = tmp_path_factory.mktemp("report")
    write_jsonl(tmp / "data" / "a.jsonl", make_rows(40, "q"))
    pipe = Pipeline(
        "reported",
        source=str(tmp / "data" / "*.jsonl"),
        steps=[
            Filter(where="n <> 3"),
            Generate(prompt="Answer {{ text }}", output="answer", max_tokens=12),
            Judge(input="answer", rubric="helpfulness", output="score"),
            # never JSON: every row's answer is an error, kept (max_error_rate 1)
            Generate(
                input="text", json_schema={"type": "object"}, output="meta", max_error_rate=1.0
            ),
        ],
        store=f"file://{tmp}/store",
        batch_size=10,
        serving=FAKE,
    )
    spec = pipe.spec().model_dump(mode="json")
    spec["steps"][1]["name"] = FAIL_STEP
    first = run_pipeline(
        spec=spec, fail_at_batch=FAIL_BATCH, fail_at_step=FAIL_STEP, return_state=True
    )
    assert first.is_failed()
    second = run_pipeline(spec=spec, return_state=True)
    assert second.is_completed()
    spec_path = tmp / "reported.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp / "out" / "report.html"
    result = CliRunner().invoke(app, ["report", str(spec_path), "--to", str(out)])
    assert result.exit_code == 0, result.output
    return {
        "runs": tmp / "store" / "reported" / "runs",
        "summary": second.result(),
        "report": out,
        "cli": result.output,
        "tmp": tmp,
    }


def test_each_attempt_records_its_units(runs: dict) -> None:
    folders = sorted(p for p in runs["runs"].iterdir() if p.is_dir())  # the attempts
    assert len(folders) == 2
    metas = [json.loads((f / "attempt.json").read_text()) for f in folders]
    assert [m["status"] for m in metas] == ["failed", "completed"]
    assert metas[0]["flow_run_id"] != metas[1]["flow_run_id"]
    assert all(m["ended"] >= m["started"] for m in metas)
    # compacted at the end of each attempt: one file of unit records, no chunks left
    for folder in folders:
        assert (folder / "units.parquet").exists() and not list(folder.glob("units-*"))
        assert (folder / "report.html").stat().st_size > 500_000  # the inlined JS
    first, second = (pl.read_parquet(f / "units.parquet") for f in folders)
    stages = [s["name"] for s in metas[0]["stages"]]
    answer = next(s["name"] for s in metas[0]["stages"] if FAIL_STEP in s["steps"])

    failed = first.filter(pl.col("status") == "failed")
    assert failed.select("stage", "batch").rows() == [(answer, FAIL_BATCH - 1)]
    assert failed["error_kind"][0] == "failure injected by the run's fail_at parameter"
    done = first.filter(pl.col("status") == "computed")
    assert (done["ended"] >= done["started"]).all() and (done["seconds"] >= 0).all()
    llm = done.filter(pl.col("stage") != stages[0])
    assert (llm["prompt_tokens"] > 0).all() and (llm["completion_tokens"] > 0).all()
    assert done.filter(pl.col("stage") == stages[0])["rows_in"].sum() == 40

    # the second attempt reuses what the first computed and computes the rest
    assert second.filter(pl.col("status") == "failed").is_empty()
    reused = set(second.filter(pl.col("status") == "reused").select("stage", "batch").rows())
    assert reused == set(done.select("stage", "batch").rows())
    assert (answer, FAIL_BATCH - 1) in second.filter(pl.col("status") == "computed").select(
        "stage", "batch"
    ).rows()
    # every unit has an outcome; the last stage's rows out are the run's output rows
    last = second.filter(pl.col("stage") == stages[-1])
    assert (
        last.height == 4
        and last["rows_out"].sum() == 39 == runs["summary"]["steps"][-1]["rows_out"]
    )
    meta = (
        pl.concat([first, second])
        .filter(pl.col("stage") == stages[-1], pl.col("status") == "computed")
        .get_column("row_errors")
    )
    kinds = [json.loads(v) for v in meta]
    assert sum(k.get("reply is not valid JSON for the schema", 0) for k in kinds) == 39


def test_summary_artifact_names_the_saved_report(runs: dict) -> None:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[runs["summary"]["flow_run_id"]])
            )
        )
    [summary] = [a for a in found if a.key == "reported-summary"]
    saved = sorted(runs["runs"].glob("*/report.html"))[-1]
    assert runs["summary"]["report"] == str(saved)
    assert f"`{saved}`" in (summary.description or "")


def test_the_page_script_carries_the_vega_lite_version_of_the_specs() -> None:
    import vl_convert as vlc

    from nightshift.flows import vegalite

    assert ".".join(vegalite.VERSION.split(".")[:2]) in vlc.get_vegalite_versions()


def test_report_shows_every_chart_in_a_browser(runs: dict) -> None:
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    report: Path = runs["report"]
    assert "2 recorded attempt(s)" in runs["cli"]
    page_html = report.read_text()
    assert "<script src" not in page_html and "https://" not in page_html.split("<script")[0]
    messages: list[str] = []
    with sync_playwright() as p:
        browser = launch(p, chromium)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
        page.route(
            "**/*", lambda r: r.abort() if not r.request.url.startswith("file:") else r.continue_()
        )
        page.goto(report.as_uri())
        page.wait_for_selector("body[data-charts=done]", timeout=60_000)
        charts = page.evaluate(
            """() => [...document.querySelectorAll('.chart')].map(el => {
                const svg = el.querySelector('svg');
                const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
                return {id: el.id, rendered: el.dataset.rendered || '',
                        width: box.width, height: box.height,
                        marks: svg ? svg.querySelectorAll('.mark-rect path, .mark-symbol path, '
                            + '.mark-line path, .mark-rule line, .mark-text text').length : 0};
            })"""
        )
        shot = runs["tmp"] / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    kept = ROOT / "out" / "test-artifacts" / "report.png"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, kept)
    print(f"report screenshot: {kept}")
    ids = {c["id"] for c in charts}
    # the bar: the funnel, a throughput timeline, a length histogram, a score distribution
    for wanted in (
        "graph",
        "funnel",
        "timeline",
        "throughput",
        "tokens",
        "errors",
        "lengths",
        "scores",
    ):
        assert f"chart-{wanted}" in ids, ids
    for chart in charts:
        assert chart["rendered"] == "yes", chart
        assert chart["width"] > 50 and chart["height"] > 50 and chart["marks"] > 0, chart
    errors = [m for m in messages if m.startswith(("error", "pageerror"))]
    assert not errors, errors


def test_a_killed_attempt_keeps_its_chunks_and_shows(tmp_path: Path) -> None:
    """An attempt that never closed (killed) leaves chunks and a 'running' attempt.json;
    the records and the report still show it, next to a later attempt that closed."""
    from nightshift.flows import recording
    from nightshift.flows.plan import Unit, build_plan
    from nightshift.flows.report import build_report
    from nightshift.tasks.step_task import BatchRef

    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(30, "k"))
    plan = build_plan(
        {
            "name": "killed",
            "source": {"path": str(tmp_path / "data" / "*.jsonl")},
            "store": {"url": f"file://{tmp_path}/store"},
            "batch_size": 10,
            "steps": [{"filter": {"where": "n > 2"}}],
        }
    )
    killed = recording.Recorder.start(plan)
    for batch in range(2):  # two flushes while running, then SIGKILL: no close()
        unit = Unit(0, batch, 0, 0, None, plan.keys[0][batch])
        killed.submitted(unit)
        ref = BatchRef(path=f"x/{batch}.parquet", rows=9, rows_in=10, key=unit.key, started=1.0)
        killed.computed(unit, 0, ref)
        killed.flush()
    folder = tmp_path / "store" / "killed" / "runs" / killed.attempt
    assert sorted(p.name for p in folder.iterdir()) == [
        "attempt.json",
        "units-000001.parquet",
        "units-000002.parquet",
    ]
    later = recording.Recorder.start(plan)
    later.failed(Unit(0, 2, 0, 0, None, plan.keys[0][2]), 0, "HTTP 503: down", None)
    later.close([], "failed")
    records = recording.load_records(plan)
    assert [a["status"] for a in records.attempts] == ["running", "failed"]
    assert records.units.group_by("status").len().sort("status").rows() == [
        ("computed", 2),
        ("failed", 1),
    ]
    page = build_report(plan, records).html
    assert "did not end (killed?)" in page and "HTTP 503" in page
