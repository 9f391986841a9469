"""Two runs over the same store at once compute each (step, batch) once, uncorrupted."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import yaml
from conftest import ROOT, cli_env, make_rows, run_cli, write_jsonl
from nightshift_testops import read_log


def test_two_concurrent_runs_share_the_work(tmp_path: Path, prefect_api: str) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(240, "a"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "twice",
                "source": {"path": str(tmp_path / "data" / "a.jsonl")},
                "batch_size": 30,
                "store": {"url": f"file://{tmp_path}/store"},
                "fuse": False,
                "workers": 2,
                "steps": [
                    {"nightshift_testops:Count": {"tag": "a", "sleep": 0.3}},
                    {"nightshift_testops:Count": {"tag": "b", "sleep": 0.1}},
                ],
            }
        )
    )
    log = tmp_path / "log.jsonl"
    cmd = [sys.executable, "-m", "nightshift.flows.cli", "run", str(spec), "--allow-imports"]
    procs = [
        subprocess.Popen(
            cmd,
            env=cli_env(prefect_api, log),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    entries = read_log(str(log))
    per_batch = Counter((e["tag"], e["first"]) for e in entries)
    assert len(per_batch) == 2 * 8
    assert set(per_batch.values()) == {1}, "a (step, batch) was computed twice"
    out = tmp_path / "out.parquet"
    assert (
        run_cli(["export", str(spec), "--to", str(out), "--allow-imports"], prefect_api).returncode
        == 0
    )
    assert pl.read_parquet(out)["id"].to_list() == [f"a{i}" for i in range(240)]
