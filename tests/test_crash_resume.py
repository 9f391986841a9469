"""Crash test, for real: SIGKILL the flow process at several points, run again.

The final output must equal an uninterrupted run's row for row, no batch that was
complete at a kill is computed again, and no row is lost or duplicated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import zlib
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import make_rows, run_cli, start_cli, write_jsonl
from nightshift_testops import read_log

from nightshift.flows.outputs import read_output
from nightshift.flows.pipeline import run_spec
from nightshift.flows.plan import build_plan
from nightshift.tasks.spec import load_spec

BATCH = 50


def write_spec(tmp_path: Path, store: Path) -> Path:
    spec = {
        "name": "crash",
        "source": {"path": str(tmp_path / "data" / "*.jsonl")},
        "batch_size": BATCH,
        "store": {"url": f"file://{store}"},
        "fuse": False,
        "workers": 2,
        "max_in_flight": 3,
        "steps": [
            {"nightshift_testops:Count": {"tag": "a", "sleep": 0.25}},
            {"map": {"columns": {"m": "n * 7"}}},
            {"nightshift_testops:Count": {"tag": "b", "sleep": 0.1}},
            {"filter": {"where": "n % 5 <> 0"}},
            {"dedup": {"on": ["text"]}},
            {"template": {"output": "prompt", "template": "Q{{ m }}: {{ text }}"}},
        ],
    }
    path = store.parent / f"{store.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def completed_batches(store: Path) -> dict[str, set[tuple[str, int]]]:
    """(file stem, batch start) of every readable output file, per step directory."""
    done: dict[str, set[tuple[str, int]]] = {}
    for stage_dir in (store / "crash" / "steps").glob("*"):
        entries = set()
        for f in stage_dir.glob("*.parquet"):
            try:
                pl.read_parquet_schema(f)
            except Exception:
                continue
            stem, start, _key = f.stem.rsplit("-", 2)
            entries.add((stem, int(start)))
        done[stage_dir.name] = entries
    return done


def batch_of(entry: dict, stems: dict[int, str]) -> tuple[str, int]:
    first = entry["first"]
    return stems[first >> 32], (first & 0xFFFFFFFF) // BATCH * BATCH


def start_run(spec: Path, api: str, log: Path) -> subprocess.Popen:
    return start_cli(["run", str(spec), "--allow-imports"], api, log)


def kill_after(proc: subprocess.Popen, log: Path, invocations: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [e for e in read_log(str(log)) if e["pid"] == proc.pid]
        if len(mine) >= invocations:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"run finished before the kill point:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("kill point never reached")


def test_sigkill_at_several_points_then_resume(tmp_path: Path, prefect_api: str) -> None:
    files = {
        "a": write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(300, "a", dup_every=9)),
        "b": write_jsonl(tmp_path / "data" / "b.jsonl", make_rows(200, "b", dup_every=4)),
    }
    stems = {zlib.crc32(str(p).encode()): name for name, p in files.items()}
    total_batches = 6 + 4

    # the uninterrupted reference run, in its own store (in this process: the CLI runs
    # below are the ones killed and resumed)
    ref_spec = write_spec(tmp_path, tmp_path / "ref-store")
    run_spec(load_spec(ref_spec), allow_imports=True)
    want = read_output(build_plan(load_spec(ref_spec), allow_imports=True))

    # the same pipeline killed three times at different points, then run to the end
    log = tmp_path / "crash.jsonl"
    spec = write_spec(tmp_path, tmp_path / "store")
    for kill_point in (3, 6, 5):
        before = completed_batches(tmp_path / "store")
        proc = start_run(spec, prefect_api, log)
        kill_after(proc, log, kill_point)
        rerun_entries = [e for e in read_log(str(log)) if e["pid"] == proc.pid]
        for entry in rerun_entries:
            stage = "00-count" if entry["tag"] == "a" else "02-count"
            assert batch_of(entry, stems) not in before.get(stage, set()), (
                f"completed batch {batch_of(entry, stems)} of step {entry['tag']} recomputed"
            )
    before = completed_batches(tmp_path / "store")
    assert 0 < len(before["00-count"]) < total_batches, "kills must leave the run unfinished"
    final = start_run(spec, prefect_api, log)
    output, _ = final.communicate(timeout=300)
    assert final.returncode == 0, output[-3000:]
    for entry in (e for e in read_log(str(log)) if e["pid"] == final.pid):
        stage = "00-count" if entry["tag"] == "a" else "02-count"
        assert batch_of(entry, stems) not in before[stage]

    # no litter: the killed writes' temporary files are gone once a run has finished
    litter = [p.name for p in (tmp_path / "store").rglob("*") if ".tmp" in p.name]
    assert litter == [], litter

    # every batch went through each counted step, at least once, in some run
    seen = {(e["tag"], batch_of(e, stems)) for e in read_log(str(log))}
    assert len(seen) == 2 * total_batches

    out = tmp_path / "out.parquet"
    exported = run_cli(["export", str(spec), "--to", str(out), "--allow-imports"], prefect_api)
    assert exported.returncode == 0, exported.stderr
    got = pl.read_parquet(out)
    assert got.equals(want), "output differs from the uninterrupted run"
    assert got["_row_id"].is_unique().all()
    rows = make_rows(300, "a", dup_every=9) + make_rows(200, "b", dup_every=4)
    kept = (
        pl.DataFrame(rows)
        .filter(pl.col("n") % 5 != 0)
        .unique("text", keep="first", maintain_order=True)
    )
    assert got["id"].to_list() == kept["id"].to_list()
