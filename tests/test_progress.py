"""Watching a run: what ``nightshift run`` prints without a terminal (300 batches x 3
steps fit on one screen), the log filters, and what a failed or retried run leaves in
the Prefect UI (progress not stale, steps not started, one artifact per kind)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import ROOT, cli_env, make_rows, write_jsonl
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from nightshift.core.errors import StepFailed
from nightshift.core.verbose import ENV
from nightshift.flows.log_filters import OneLineErrors, QuietTaskStates
from nightshift.flows.run_pipeline import run_pipeline


def test_a_run_of_300_batches_and_3_steps_fits_on_a_screen(
    tmp_path: Path, prefect_api: str
) -> None:
    """The bar of issue 20: at most 40 lines without --verbose (it was 917, 901 of them
    a task run's "Finished in state Completed()"). No terminal here: plain lines."""
    write_jsonl(tmp_path / "in.jsonl", make_rows(300, "p"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: screenful\n"
        f"source: {{path: '{tmp_path}/in.jsonl'}}\n"
        "batch_size: 1\n"
        "fuse: false\n"
        f"store: {{url: 'file://{tmp_path}/store'}}\n"
        "steps:\n"
        '  - filter: {where: "n >= 0"}\n'
        "  - template: {output: prompt, template: 'Say {{ text }}'}\n"
        "  - rename: {columns: {prompt: question}}\n"
    )
    # Prefect's default log level (the test session's is WARNING), no terminal
    ran = subprocess.run(
        [sys.executable, "-m", "nightshift.flows.cli", "run", str(spec)],
        env={**cli_env(prefect_api), "PREFECT_LOGGING_LEVEL": "INFO"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    lines = (ran.stdout + ran.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert not any("Task run" in line for line in lines), "\n".join(lines)
    for step in ("00-filter", "01-template", "02-rename"):
        (end,) = [line for line in lines if f"step {step}: done, 300/300 batches" in line]
        assert "(0 reused, 300 computed, 0 failed), 300 rows in, 300 out" in end, end
        assert "rows/s" in end and "elapsed" in end, end
    # the run's name: the pipeline and its start, not the spec file's name
    assert "Beginning flow run 'screenful 20" in ran.stderr, ran.stderr[:500]


def _record(msg: str, level: int = logging.INFO, exc: BaseException | None = None):
    info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("prefect.task_runs", level, __file__, 1, msg, (), info)


def test_state_lines_only_when_verbose(monkeypatch) -> None:
    quiet = QuietTaskStates()
    monkeypatch.delenv(ENV, raising=False)
    assert not quiet.filter(_record("Finished in state Completed()"))
    assert not quiet.filter(_record("Finished in state Cached(type=COMPLETED)"))
    assert quiet.filter(_record("Finished in state Failed('x')", logging.ERROR))
    assert quiet.filter(_record("Task run failed; retry 1/3", logging.WARNING))
    monkeypatch.setenv(ENV, "DEBUG")
    assert quiet.filter(_record("Finished in state Completed()"))


def test_engine_exit_after_a_nightshift_error_is_dropped(monkeypatch) -> None:
    errors = OneLineErrors()
    monkeypatch.delenv(ENV, raising=False)
    ours = StepFailed("00-filter batch 4/4: failure injected")
    assert not errors.filter(
        _record("Engine execution exited with unexpected exception", logging.ERROR, ours)
    )
    other = _record("Engine execution exited with unexpected exception", logging.ERROR, OSError())
    assert errors.filter(other) and other.exc_info is not None
    monkeypatch.setenv(ENV, "DEBUG")
    assert errors.filter(
        _record("Engine execution exited with unexpected exception", logging.ERROR, ours)
    )


def _artifacts(flow_run_id: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def _spec(tmp_path: Path, name: str) -> dict:
    write_jsonl(tmp_path / name / "in.jsonl", make_rows(20, "q"))
    return {
        "name": name,
        "source": {"path": str(tmp_path / name / "in.jsonl")},
        "batch_size": 5,
        "fuse": False,
        "retries": 0,
        "store": {"url": f"file://{tmp_path}/{name}/store"},
        "steps": [
            {"filter": {"where": "n >= 0"}},
            {"dedup": {"on": ["text"]}},
            {"template": {"output": "prompt", "template": "P: {{ text }}"}},
        ],
    }


def test_a_failed_attempt_leaves_its_last_progress_and_steps_not_started(
    tmp_path: Path,
) -> None:
    state = run_pipeline(
        spec=_spec(tmp_path, "halted"), fail_at_batch=4, fail_at_step=0, return_state=True
    )
    assert state.is_failed()
    found = {a.key: a for a in _artifacts(str(state.state_details.flow_run_id))}
    # 3 of the 4 batches of step 00 were done when it failed: the artifact says so
    assert float(found["halted-progress-00-filter"].data) == 75.0
    rows = json.loads(found["halted-summary"].data)
    assert [(r["step"], r["status"]) for r in rows] == [
        ("00-filter", "1 failed"),
        ("01-dedup", "not started"),
        ("02-template", "not started"),
    ]
    assert (rows[0]["computed"], rows[0]["failed"]) == ("3", "1")
    assert rows[1]["reused"] == "" and rows[1]["computed"] == ""


def test_a_retried_run_has_one_artifact_per_kind(tmp_path: Path) -> None:
    """Attempt 1 fails at batch 4 of step 1 (the rehearsal fires on the first attempt
    only); Prefect retries the flow run in this process; attempt 2 updates attempt 1's
    artifacts instead of adding a second set."""
    state = run_pipeline.with_options(retries=1)(
        spec=_spec(tmp_path, "retried"), fail_at_batch=4, fail_at_step=1, return_state=True
    )
    assert state.is_completed(), state
    found = _artifacts(str(state.state_details.flow_run_id))
    keys = Counter(a.key for a in found if a.key)  # keyless: the flow's result
    assert set(keys) == {
        "retried-plan",
        "retried-summary",
        "retried-sample",
        "retried-progress-00-filter",
        "retried-progress-01-dedup",
        "retried-progress-02-template",
    }
    assert set(keys.values()) == {1}, keys
    by_key = {a.key: a for a in found}
    assert "attempt 2" in by_key["retried-summary"].description
    assert "replaces attempt 1" in by_key["retried-summary"].description
    rows = json.loads(by_key["retried-summary"].data)
    assert [r["status"] for r in rows] == ["done"] * 3
    assert float(by_key["retried-progress-02-template"].data) == 100.0


def test_deployment_parameters_have_descriptions_and_no_none_switch() -> None:
    """What the UI's run form shows: every parameter of the three deployed flows has a
    description, and an optional text or number is a plain field, not Prefect's
    "Property is type 'None'" switch (``anyOf`` with ``null``); ``resume_from_last``
    keeps its three states (unset, true, false) on purpose."""
    from prefect.utilities.callables import parameter_schema

    from nightshift.flows.nightly import nightly
    from nightshift.flows.stream import stream

    for flow in (nightly, run_pipeline, stream):
        properties = parameter_schema(flow.fn).model_dump()["properties"]
        for name, schema in properties.items():
            assert schema.get("description"), (flow.name, name)
            if name != "resume_from_last":
                assert "null" not in json.dumps(schema.get("anyOf", [])), (flow.name, name)


def test_a_terminal_gets_live_bars_instead_of_progress_lines(
    tmp_path: Path, prefect_api: str
) -> None:
    """``nightshift run`` on a terminal (a pseudo-terminal here): one bar per step drawn
    on Prefect's console, the plain progress lines kept off it."""
    import os
    import pty

    write_jsonl(tmp_path / "in.jsonl", make_rows(12, "t"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: bars\n"
        f"source: {{path: '{tmp_path}/in.jsonl'}}\n"
        "batch_size: 2\n"
        "fuse: false\n"
        f"store: {{url: 'file://{tmp_path}/store'}}\n"
        "steps:\n"
        '  - filter: {where: "n >= 0"}\n'
        "  - template: {output: prompt, template: 'Say {{ text }}'}\n"
    )
    master, slave = pty.openpty()
    env = {**cli_env(prefect_api), "PREFECT_LOGGING_LEVEL": "INFO", "COLUMNS": "160"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nightshift.flows.cli", "run", str(spec)],
        env=env,
        cwd=ROOT,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks = []
    while True:  # read until the child closes the terminal (it exited)
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", b"".join(chunks).decode(errors="replace"))
    for step in ("00-filter", "01-template"):
        assert any(
            step in line and "6/6" in line and "6 computed" in line and "━" in line
            for line in screen.splitlines()
        ), screen[-3000:]
    assert "batches (0 reused" not in screen, screen[-3000:]  # no plain progress line
    assert "Finished in state Completed()" in screen  # the flow run's own line stays
