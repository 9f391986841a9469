"""The ``nightshift`` CLI end to end: run, status, export, on a CSV source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import polars as pl

from conftest import make_rows, run_cli


def test_run_status_export_csv(tmp_path: Path, prefect_api: str) -> None:
    rows = make_rows(90, "c", dup_every=8)
    pl.DataFrame(rows).write_csv(tmp_path / "in.csv")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: clitest\n"
        f"source: {{path: '{tmp_path}/in.csv'}}\n"
        "batch_size: 20\n"
        f"store: {{url: 'file://{tmp_path}/store'}}\n"
        "steps:\n"
        "  - filter: {where: \"n >= 10\"}\n"
        "  - template: {output: prompt, template: 'Say {{ text }}'}\n"
        "  - dedup: {on: [text]}\n"
        "  - rename: {columns: {prompt: question}}\n"
    )
    status = run_cli(["status", str(spec)], prefect_api)
    assert status.returncode == 0, status.stderr
    assert "0/5" in status.stdout

    ran = run_cli(["run", str(spec)], prefect_api)
    assert ran.returncode == 0, ran.stderr[-2000:]

    status = run_cli(["status", str(spec)], prefect_api)
    assert status.stdout.count("5/5") == 3, status.stdout

    out = tmp_path / "out" / "final.jsonl"
    exported = run_cli(["export", str(spec), "--to", str(out)], prefect_api)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    expected = (
        pl.DataFrame(rows).filter(pl.col("n") >= 10).unique("text", keep="first", maintain_order=True)
    )
    assert [r["id"] for r in lines] == expected["id"].to_list()
    assert lines[0]["question"] == f"Say {lines[0]['text']}"
    assert "prompt" not in lines[0]
    assert f"wrote {len(lines)} rows" in exported.stdout

    bad = run_cli(["export", str(spec), "--to", str(tmp_path / "out.csv")], prefect_api)
    assert bad.returncode == 2 and "use a .parquet or .jsonl" in bad.stderr


def test_run_table_shows_tokens_and_cost_only_for_llm_runs(capsys: pytest.CaptureFixture) -> None:
    from flows.cli import _print_steps

    row = dict(name="00-generate", batches=2, cached=0, reused=0, computed=2, failed=0,
               rows_in=10, rows_out=10, prompt_tokens=512, completion_tokens=77, cost_usd=0.0123)
    _print_steps([row])
    out = capsys.readouterr().out
    assert "tokens in" in out and "512" in out and "77" in out and "0.0123" in out
    _print_steps([{**row, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}])
    assert "tokens" not in capsys.readouterr().out
