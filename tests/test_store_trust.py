"""The store trusts only what it wrote (issue 22): outputs prove their identity, runs
leave no litter, concurrent runs on S3 compute each unit once, kills on S3 resume exactly.

Real parts throughout: a real Prefect server, real Parquet, moto's S3 server, and real
SIGKILLs of real ``nightshift run`` processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import s3fs
import yaml
from conftest import ROOT, make_rows, start_cli, write_jsonl
from nightshift_testops import Count, read_log

from nightshift.core import file_io
from nightshift.core.identity import METADATA_KEY
from nightshift.flows.explain import explain
from nightshift.flows.outputs import read_output
from nightshift.flows.pipeline import Pipeline, run_spec
from nightshift.flows.plan import build_plan
from nightshift.tasks.operators import Dedup, Filter
from nightshift.tasks.spec import StoreSpec, load_spec


def _store(where: str, tmp_path: Path, request: pytest.FixtureRequest, name: str):
    """A store URL (local) or StoreSpec (moto S3), and an fsspec filesystem over it."""
    if where == "local":
        import fsspec

        return f"file://{tmp_path}/store", fsspec.filesystem("file")
    fs: s3fs.S3FileSystem = request.getfixturevalue("s3")
    endpoint = request.getfixturevalue("s3_endpoint")
    return StoreSpec(url=f"s3://nightly/{name}", endpoint_url=endpoint), fs


def _cat(fs, path: str) -> bytes:
    fs.invalidate_cache()
    return fs.cat_file(path)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_swapped_outputs_are_recomputed(
    where: str, tmp_path: Path, test_log: Path, request: pytest.FixtureRequest
) -> None:
    store, fs = _store(where, tmp_path, request, f"swap-{tmp_path.name}")
    source = write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(200, "a"))
    pipe = Pipeline(
        "swap",
        source=str(source),
        steps=[Count(tag="a"), Count(tag="b")],
        store=store,
        batch_size=40,
        fuse=False,
    )
    pipe.run()
    want = pipe.read()
    plan = pipe.plan()
    a1, a3 = plan.out_path(0, 1), plan.out_path(0, 3)
    first, third = _cat(fs, a1), _cat(fs, a3)
    assert METADATA_KEY.encode() in first, "the output carries its identity in its footer"
    # two valid outputs of one step swapped; one step's output copied over the next one's
    fs.pipe_file(a1, third)
    fs.pipe_file(a3, first)
    fs.pipe_file(plan.out_path(1, 4), _cat(fs, plan.out_path(0, 4)))

    lines = explain(pipe.plan(), None)
    assert "2 output file(s) present but not trusted" in lines[0], lines[0]
    assert "holds unit" in lines[0] and "not trusted" in lines[1], lines

    n = len(read_log(str(test_log)))
    again = pipe.run()
    computed = Counter(e["tag"] for e in read_log(str(test_log))[n:])
    got = pipe.read()
    lost = len(set(want["_row_id"]) - set(got["_row_id"]))
    dup = got.height - got["_row_id"].n_unique()
    assert computed == Counter(a=2, b=1), (computed, f"lost ids {lost}, duplicated {dup}")
    assert [s["computed"] for s in again["steps"]] == [2, 1]
    assert got.equals(want), f"lost ids {lost}, duplicated {dup}"

    # the next run trusts the recomputed files from the index alone
    n = len(read_log(str(test_log)))
    assert [s["reused"] for s in pipe.run()["steps"]] == [5, 5]
    assert read_log(str(test_log))[n:] == []


def test_old_outputs_without_identity_are_verified_once_then_recorded(
    tmp_path: Path, test_log: Path
) -> None:
    source = write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(120, "a"))
    pipe = Pipeline(
        "old",
        source=str(source),
        steps=[Count(tag="a")],
        store=f"file://{tmp_path}/store",
        batch_size=40,
    )
    pipe.run()
    want = pipe.read()
    plan = pipe.plan()
    stage_dir = Path(plan.stage_dir(0))
    for path in stage_dir.glob("*.parquet"):  # as an older Nightshift wrote them
        pl.read_parquet(path).write_parquet(path)
        assert METADATA_KEY.encode() not in path.read_bytes()
    (stage_dir / "outputs.json").unlink()

    n = len(read_log(str(test_log)))
    assert pipe.run()["steps"][0]["reused"] == 3
    assert read_log(str(test_log))[n:] == [], "old outputs are reused (verified the old way)"
    index = json.loads((stage_dir / "outputs.json").read_text())
    assert index["identities"] is True and len(index["files"]) == 3

    # recorded now: a swap of two of them is no longer trusted
    b0, b2 = plan.out_path(0, 0), plan.out_path(0, 2)
    first, third = Path(b0).read_bytes(), Path(b2).read_bytes()
    Path(b0).write_bytes(third)
    Path(b2).write_bytes(first)
    assert pipe.run()["steps"][0]["computed"] == 2
    assert pipe.read().equals(want)


def _litter(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if file_io.is_temp(p.name) or p.name.endswith(".tmp")
    )


def test_killed_writes_leave_no_litter(tmp_path: Path, test_log: Path) -> None:
    source = write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(120, "a", dup_every=5))
    root = tmp_path / "store"
    pipe = Pipeline(
        "litter",
        source=str(source),
        steps=[Count(tag="a"), Filter(where="n > 3"), Dedup(on=["text"])],
        store=f"file://{root}",
        batch_size=40,
    )
    pipe.run()
    want = pipe.read()
    plan = pipe.plan()
    stage_dir = plan.stage_dir(0)
    target = f"{stage_dir}/x-0-0000000000000000.parquet"
    # a writer killed (SIGKILL) in the middle of writing a unit's temporary file
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from nightshift.core import file_io\n"
            "tmp = file_io.temp_path(sys.argv[1]); f = open(tmp, 'wb'); f.write(b'PAR1' * 999)\n"
            "f.flush(); print(tmp, flush=True); time.sleep(600)",
            target,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    killed = Path(writer.stdout.readline().strip())  # type: ignore[union-attr]
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert killed.exists()
    live = Path(file_io.temp_path(target))  # this (live) process's write in progress
    live.write_bytes(b"PAR1")
    legacy = Path(f"{target}.tmp-{'ab' * 16}")  # an older Nightshift's, from 2 hours ago
    legacy.write_bytes(b"PAR1")
    os.utime(legacy, (time.time() - 7200,) * 2)
    recent_legacy = Path(f"{target}.tmp-{'cd' * 16}")  # maybe a live older writer's
    recent_legacy.write_bytes(b"PAR1")
    lock_tmp = root / "_locks" / f"somekey.lock.{file_io.host_tag()}-{writer.pid}-1.tmp"
    lock_tmp.parent.mkdir(exist_ok=True)
    lock_tmp.write_text("{}")
    barrier_index = Path(plan.barriers_dir()) / "outputs.json"
    assert barrier_index.exists()
    barrier_index.unlink()

    n = len(read_log(str(test_log)))
    pipe.run()
    assert read_log(str(test_log))[n:] == []
    assert not killed.exists() and not legacy.exists() and not lock_tmp.exists()
    assert live.exists() and recent_legacy.exists(), "a live writer's file is never removed"
    assert barrier_index.exists(), "a barrier's missing index is written again"
    assert pipe.read().equals(want)
    live.unlink()
    recent_legacy.unlink()
    assert _litter(root) == []


def _s3_spec(tmp_path: Path, endpoint: str, name: str, rows: int, **extra) -> Path:
    source = write_jsonl(tmp_path / f"{name}.jsonl", make_rows(rows, name, dup_every=7))
    spec = {
        "name": name,
        "source": {"path": str(source)},
        "batch_size": 20,
        "store": {"url": "s3://nightly/shared", "endpoint_url": endpoint},
        "fuse": False,
        "workers": 2,
        "steps": [
            {"nightshift_testops:Count": {"tag": "a", "sleep": 0.2}},
            {"filter": {"where": "n % 5 <> 0"}},
            {"nightshift_testops:Count": {"tag": "b", "sleep": 0.1}},
            {"dedup": {"on": ["text"]}},
        ],
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _expected_ids(name: str, rows: int) -> list[str]:
    kept = (
        pl.DataFrame(make_rows(rows, name, dup_every=7))
        .filter(pl.col("n") % 5 != 0)
        .unique("text", keep="first", maintain_order=True)
    )
    return kept["id"].to_list()


def _start(spec: Path, api: str, log: Path) -> subprocess.Popen:
    return start_cli(["run", str(spec), "--allow-imports"], api, log)


def _output_ids(spec: Path) -> list[str]:
    """The sink's ids as ``export`` writes them (read in this process: no flow run)."""
    return read_output(build_plan(str(spec), allow_imports=True))["id"].to_list()


def test_three_concurrent_pairs_on_s3_compute_each_unit_once(
    tmp_path: Path,
    s3: s3fs.S3FileSystem,
    s3_endpoint: str,
    prefect_api: str,
) -> None:
    pairs = [f"pair{i}" for i in range(3)]
    specs = {name: _s3_spec(tmp_path, s3_endpoint, name, 120) for name in pairs}
    logs = {name: tmp_path / f"{name}.log" for name in pairs}
    # the second run of a pair starts once the first has computed a few units, so its
    # survey sees some done and others being written (what a cached listing gets wrong)
    procs = [(name, _start(specs[name], prefect_api, logs[name])) for name in pairs]
    deadline = time.monotonic() + 240
    for name in pairs:
        while len(read_log(str(logs[name]))) < 2:
            assert time.monotonic() < deadline, "the first runs never started computing"
            time.sleep(0.02)
        procs.append((name, _start(specs[name], prefect_api, logs[name])))
    outputs = {}
    for _name, proc in procs:
        outputs[proc.pid] = proc.communicate(timeout=400)[0]
        assert proc.returncode == 0, outputs[proc.pid][-3000:]
    for name in pairs:
        per_unit = Counter((e["tag"], e["first"]) for e in read_log(str(logs[name])))
        twice = {unit: n for unit, n in per_unit.items() if n > 1}
        assert len(per_unit) == 6 + 6, per_unit
        assert not twice, f"{name}: {sum(per_unit.values())} units computed for 12: {twice}"
        assert _output_ids(specs[name]) == _expected_ids(name, 120)


def test_sigkill_soak_on_s3_resumes_exactly_and_leaves_no_litter(
    tmp_path: Path,
    s3: s3fs.S3FileSystem,
    s3_endpoint: str,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _s3_spec(tmp_path, s3_endpoint, "soak", 200, max_in_flight=3)
    log = tmp_path / "soak.log"

    def outputs() -> set[tuple[str, int]]:
        s3.invalidate_cache()
        found = set()
        for path in s3.find("nightly/shared/soak/steps"):
            if path.endswith(".parquet"):
                stage = path.rsplit("/", 2)[-2]
                found.add((stage, int(path.rsplit("/", 1)[-1].rsplit("-", 2)[-2])))
        return found

    for kill_point in (2, 5, 4):
        before = outputs()
        proc = _start(spec, prefect_api, log)
        deadline = time.monotonic() + 240
        while len([e for e in read_log(str(log)) if e["pid"] == proc.pid]) < kill_point:
            assert proc.poll() is None, f"run ended before the kill:\n{proc.stdout.read()[-3000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for entry in (e for e in read_log(str(log)) if e["pid"] == proc.pid):
            stage = "00-count" if entry["tag"] == "a" else "02-count"
            start = (entry["first"] & 0xFFFFFFFF) // 20 * 20
            assert (stage, start) not in before, f"a stored unit was computed again: {entry}"
    assert 0 < len([o for o in outputs() if o[0] == "00-count"]) < 10, "the kills cut the run"
    monkeypatch.setenv("NIGHTSHIFT_TEST_LOG", str(log))  # the last run, in this process
    run_spec(load_spec(str(spec)), allow_imports=True)
    seen = {(e["tag"], (e["first"] & 0xFFFFFFFF) // 20) for e in read_log(str(log))}
    assert len(seen) == 2 * 10, "every batch went through each counted step"
    assert _output_ids(spec) == _expected_ids("soak", 200)
    s3.invalidate_cache()
    assert [p for p in s3.find("nightly/shared") if file_io.is_temp(p)] == []


# -- the layout: names that fit, URLs checked, URIs shown as given -------------------------


def test_long_stage_names_are_capped_and_hashed(tmp_path: Path) -> None:
    from nightshift.core.layout import MAX_NAME_BYTES, capped
    from nightshift.tasks.operators import Map

    assert capped("00-count") == "00-count", "short names (existing stores) are unchanged"
    long_a, long_b = "00-" + "+".join(["map"] * 90), "00-" + "+".join(["map"] * 91)
    assert len(capped(long_a).encode()) <= MAX_NAME_BYTES
    assert capped(long_a).startswith("00-map+map") and capped(long_a) != capped(long_b)
    assert len(capped("é" * 200).encode()) <= MAX_NAME_BYTES  # cut at a character boundary

    source = write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(30, "a"))
    steps = [Map(columns={f"c{i}": f"n + {i}"}) for i in range(90)]  # one fused stage
    pipe = Pipeline(
        "long", source=str(source), steps=steps, store=f"file://{tmp_path}/s", batch_size=10
    )
    summary = pipe.run()  # 90 fused steps: "00-map+map+..." is 362 characters
    assert summary["steps"][0]["computed"] == 3
    (folder,) = (tmp_path / "s" / "long" / "steps").iterdir()
    assert folder.name == capped(long_a) and len(folder.name) <= MAX_NAME_BYTES
    assert pipe.read()["c89"].to_list() == [i + 89 for i in range(30)]
    assert pipe.run()["steps"][0]["reused"] == 3


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://host/x", "scheme ftp:// is not a store"),
        ("127.0.0.1:9000/x", "has no scheme"),
        ("s3://", "names no bucket"),
        ("", "is empty"),
    ],
)
def test_a_bad_store_url_is_one_line_at_validate(url: str, fragment: str) -> None:
    from nightshift.core.errors import SpecError
    from nightshift.tasks.spec import load_spec

    with pytest.raises(SpecError) as caught:
        load_spec(
            {
                "name": "x",
                "source": {"path": "a.jsonl"},
                "store": {"url": url},
                "steps": [{"filter": {"where": "true"}}],
            }
        )
    message = str(caught.value)
    assert "store.url" in message and fragment in message and "\n" not in message


def test_display_keeps_the_scheme() -> None:
    from nightshift.blocks.step_store import StepStore

    memory = StepStore(url="memory://bucket/x")
    assert memory.display(memory.path("p", "a.parquet")) == "memory://bucket/x/p/a.parquet"
    s3_store = StepStore(url="s3://bucket/prefix", endpoint_url="http://127.0.0.1:1")
    assert s3_store.display("bucket/prefix/a") == "s3://bucket/prefix/a"
    local = StepStore(url="file:///tmp/st")
    assert local.display(local.path("a")) == "/tmp/st/a"


def test_a_listing_cached_before_another_run_wrote_does_not_hide_its_output(
    tmp_path: Path, s3: s3fs.S3FileSystem, s3_endpoint: str, test_log: Path
) -> None:
    """What made two runs on S3 compute units twice: run B lists a step folder (s3fs
    caches the listing), run A then writes a unit and its record, and B's check of that
    unit must see it, and must not delete A's record."""
    from nightshift.core.inventory import OutputIndex
    from nightshift.tasks.step_task import StepOutputPolicy

    source = write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(80, "a"))
    store = StoreSpec(url=f"s3://nightly/stale-{tmp_path.name}", endpoint_url=s3_endpoint)
    pipe = Pipeline("stale", source=str(source), steps=[Count(tag="a")], store=store, batch_size=40)
    pipe.run()  # "run A": every unit and record written
    plan = pipe.plan()  # "run B"
    out, key = plan.out_path(0, 1), plan.keys[0][1]
    record = plan.store.result_record_path(key)
    data = s3.cat_file(out)
    s3.rm(out)  # as B saw the folder: unit 1 not written yet
    index = OutputIndex.load(plan.store.fs, plan.stage_dir(0))
    assert out.rsplit("/", 1)[-1] not in index.listing
    s3.pipe_file(out, data)  # A writes it (its record is there)

    inputs = {"store": plan.store, "out_path": out, "key": key}
    assert StepOutputPolicy().compute_key(None, inputs, {}) == key  # type: ignore[arg-type]
    assert s3.exists(record), "a run deleted a record it did not write"
    assert plan.store.unit_rows(out, key) == 40
    assert plan.store.read_path(key), "the record is valid: its output proves to be its unit"
    n = len(read_log(str(test_log)))
    assert pipe.run()["steps"][0]["reused"] == 2 and read_log(str(test_log))[n:] == []
