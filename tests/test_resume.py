"""Resume semantics: what recomputes after a config change, a new file, a lost output."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from conftest import make_rows, write_jsonl
from helpers_api import task_run_states
from nightshift_testops import Count, read_log

from nightshift.core.errors import SpecError
from nightshift.flows.pipeline import Pipeline
from nightshift.tasks.operators import Dedup, Filter, Map


def build(tmp_path: Path, map_expr: str = "n * 2") -> Pipeline:
    return Pipeline(
        "resume",
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=[
            Count(tag="a"),
            Map(columns={"m": map_expr}),
            Count(tag="b"),
            Filter(where="n % 3 <> 1"),
            Count(tag="c"),
        ],
        store=f"file://{tmp_path}/store",
        batch_size=50,
        fuse=False,
    )


def calls(log: Path, since: int = 0) -> Counter:
    return Counter(entry["tag"] for entry in read_log(str(log))[since:])


def stage_files(tmp_path: Path, stage: str) -> list[Path]:
    return sorted((tmp_path / "store" / "resume" / "steps" / stage).glob("*.parquet"))


def test_resume_recomputes_only_what_changed(tmp_path: Path, test_log: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(200, "a"))
    pipe = build(tmp_path)

    first = pipe.run()
    assert calls(test_log) == Counter(a=4, b=4, c=4)
    expected = pipe.read()
    assert expected.height == 200 - len([i for i in range(200) if i % 3 == 1])

    # same spec again: nothing recomputes, every batch is reused without a task run
    n = len(read_log(str(test_log)))
    again = pipe.run()
    assert calls(test_log, n) == Counter()
    assert [(s["reused"], s["computed"]) for s in again["steps"]] == [(4, 0)] * 5
    assert pipe.read().equals(expected)

    # change the map step (step 1): steps 1.. recompute, step 0 does not
    n = len(read_log(str(test_log)))
    changed = build(tmp_path, "n * 3")
    summary = changed.run()
    assert calls(test_log, n) == Counter(b=4, c=4)
    assert summary["steps"][0]["reused"] == 4 and summary["steps"][1]["computed"] == 4
    # task runs only for the work left: 4 stages x 4 batches computed, none for step 0;
    # once those are recorded, the fully done run above is seen to have made none
    assert task_run_states(summary["flow_run_id"], expected=16) == Counter(Completed=16)
    assert task_run_states(again["flow_run_id"], expected=0, timeout=0) == Counter()
    assert changed.read()["m"].to_list() == [v * 3 for v in expected["n"].to_list()]

    # a new file in the folder: only its batches compute
    n = len(read_log(str(test_log)))
    write_jsonl(tmp_path / "data" / "b.jsonl", make_rows(100, "b"))
    changed.run()
    assert calls(test_log, n) == Counter(a=2, b=2, c=2)

    # one deleted output file and one corrupted one: only those batches recompute
    n = len(read_log(str(test_log)))
    plan = changed.plan()
    b_files = [Path(plan.out_path(2, j)) for j in range(len(plan.batches))]
    assert len(b_files) == 6 and all(f.exists() for f in b_files)
    assert len(stage_files(tmp_path, "02-count")) == 10, "old config's outputs stay too"
    b_files[0].unlink()
    b_files[3].write_bytes(b"PAR1 this is not parquet")
    result = changed.run()
    assert calls(test_log, n) == Counter(b=2)
    assert result["steps"][2]["computed"] == 2 and result["steps"][4]["reused"] == 6
    assert changed.read().height == expected.height + 100 - len(
        [i for i in range(100) if i % 3 == 1]
    )

    # first_run recorded in the flow result
    assert first["batches"] == 4


def test_resume_step_recomputes_from_that_step(tmp_path: Path, test_log: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(100, "a"))
    pipe = build(tmp_path)
    pipe.run()
    n = len(read_log(str(test_log)))
    pipe.run(resume_from_last=False, resume_step=2)
    assert calls(test_log, n) == Counter(b=2, c=2)
    n = len(read_log(str(test_log)))
    pipe.run(resume_from_last=False)
    assert calls(test_log, n) == Counter(a=2, b=2, c=2)
    with pytest.raises(SpecError, match="cannot be combined"):
        pipe.run(resume_from_last=True, resume_step=1)


def test_dedup_is_global_across_files_and_batches(tmp_path: Path) -> None:
    rows_a = make_rows(120, "a", dup_every=10)
    rows_b = make_rows(80, "b", dup_every=7)
    write_jsonl(tmp_path / "data" / "a.jsonl", rows_a)
    write_jsonl(tmp_path / "data" / "b.jsonl", rows_b)
    pipe = Pipeline(
        "dedup",
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=[Map(columns={"k": "text"}), Dedup(on=["k"])],
        store=f"file://{tmp_path}/store",
        batch_size=25,
    )
    pipe.run()
    out = pipe.read()
    everything = pl.DataFrame(rows_a + rows_b)
    expected = everything.unique(subset=["text"], keep="first", maintain_order=True)
    assert out["id"].to_list() == expected["id"].to_list()
    assert out.filter(pl.col("text") == "a duplicated text")["id"].to_list() == ["a0"]


def test_batches_move_on_without_waiting_for_the_step(tmp_path: Path, test_log: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(120, "a"))
    pipe = Pipeline(
        "pipelined",
        source=str(tmp_path / "data" / "a.jsonl"),
        steps=[Count(tag="a", sleep=0.4), Count(tag="b")],
        store=f"file://{tmp_path}/store",
        batch_size=20,
        fuse=False,
        workers=2,
        max_in_flight=2,
    )
    pipe.run()
    log = read_log(str(test_log))
    last_a_end = max(e["end"] for e in log if e["tag"] == "a")
    first_b_start = min(e["start"] for e in log if e["tag"] == "b")
    assert first_b_start < last_a_end, "step b must start before step a has seen every batch"
    assert Counter(e["tag"] for e in log) == Counter(a=6, b=6)


def test_failed_batch_fails_the_run_and_keeps_the_others(
    tmp_path: Path, test_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(100, "a"))
    pipe = Pipeline(
        "fails",
        source=str(tmp_path / "data" / "a.jsonl"),
        steps=[Count(tag="a"), Count(tag="b")],
        store=f"file://{tmp_path}/store",
        batch_size=25,
        fuse=False,
    )
    failing_row = (pipe.plan().batches[2].file.row_key << 32) + 60
    monkeypatch.setenv("NIGHTSHIFT_TEST_FAIL_B", str(failing_row))
    with pytest.raises(Exception, match=r"01-count batch 3/4.*bad value in row"):
        pipe.run()
    assert calls(test_log) == Counter(a=4, b=3)
    # the cause is gone: the re-run computes only the failed batch's step b
    monkeypatch.delenv("NIGHTSHIFT_TEST_FAIL_B")
    n = len(read_log(str(test_log)))
    summary = pipe.run()
    assert calls(test_log, n) == Counter(b=1)
    assert [s["reused"] for s in summary["steps"]] == [4, 3]


def test_explains_what_is_reused_and_why_the_rest_recomputes(tmp_path: Path) -> None:
    from nightshift.flows.explain import explain

    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(200, "a"))
    pipe = build(tmp_path)
    first = explain(pipe.plan(), None)
    assert all(
        "0 of 4 batches done and reused, 4 to compute (no run has finished this step" in line
        for line in first
    ), first
    pipe.run()
    assert all("all 4 batches done, reused" in line for line in explain(pipe.plan(), None))

    # a config change names the step; the later steps changed through their upstream
    write_jsonl(tmp_path / "data" / "b.jsonl", make_rows(60, "b"))
    changed = explain(build(tmp_path, map_expr="n * 3").plan(), None)
    assert (
        "step 00-count: 4 of 6 batches done and reused, 2 to compute (step unchanged" in changed[0]
    )
    assert "changed since its last finished run: steps[1] (map) config" in changed[1]
    assert (
        "changed since its last finished run: operator code, model or an upstream step"
        in changed[2]
    )
    assert explain(pipe.plan(), 3)[3].endswith(
        "computing all 6 batches, as asked (resume_step / --fresh)"
    )
