"""A run pays for the work left: done batches are found by a listing, never a task run,
and an output that is missing, truncated or corrupted is computed again, never trusted.
The same checks on a local store and on S3 (moto's server through s3fs)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_rows, write_jsonl
from helpers_api import task_run_states
from nightshift_testops import Count, read_log

from nightshift.flows.pipeline import Pipeline
from nightshift.flows.survey import Inventory, survey
from nightshift.tasks.operators import Map
from nightshift.tasks.spec import StoreSpec


def build(store: str | StoreSpec, source: str) -> Pipeline:
    return Pipeline(
        "skip",
        source=source,
        steps=[Count(tag="a"), Map(columns={"m": "n * 2"}), Count(tag="c")],
        store=store,
        batch_size=20,
        fuse=False,
    )


def calls(log: Path, since: int) -> Counter:
    return Counter(e["tag"] for e in read_log(str(log))[since:])


class Files:
    """Byte-level access to the store's objects, local or S3."""

    def __init__(
        self,
        read: Callable[[str], bytes],
        write: Callable[[str, bytes], None],
        remove: Callable[[str], None],
    ) -> None:
        self.read, self.write, self.remove = read, write, remove

    def truncate(self, path: str) -> None:
        data = self.read(path)
        self.write(path, data[: len(data) // 2])

    def corrupt_footer(self, path: str) -> None:
        """Same size, last bytes (footer length and magic) overwritten."""
        data = self.read(path)
        self.write(path, data[:-12] + b"\x00garbage\x00\xff\xff\xff")


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str | StoreSpec, Files]:
    if request.param == "local":
        files = Files(
            lambda p: Path(p).read_bytes(),
            lambda p, b: Path(p).write_bytes(b),
            lambda p: Path(p).unlink(),
        )
        return f"file://{tmp_path}/store", files
    fs = request.getfixturevalue("s3")
    endpoint = request.getfixturevalue("s3_endpoint")
    prefix = f"nightly/skip-{tmp_path.name}"
    files = Files(fs.cat_file, fs.pipe_file, fs.rm_file)
    return StoreSpec(url=f"s3://{prefix}", endpoint_url=endpoint), files


def test_done_batches_cost_no_task_run_and_bad_outputs_are_recomputed(
    tmp_path: Path, test_log: Path, where: tuple[str | StoreSpec, Files]
) -> None:
    store, files = where
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(120, "a"))
    pipe = build(store, str(tmp_path / "data" / "a.jsonl"))
    first = pipe.run()
    assert [s["computed"] for s in first["steps"]] == [6, 6, 6]
    expected = pipe.read()

    # fully done: every batch reused from one listing per stage, no footer read at all
    plan = pipe.plan()
    inventory = Inventory(plan)
    assert [v.done for v in survey(plan, inventory)] == [6, 6, 6]
    assert inventory.footer_reads == 0, "outputs.json must vouch for files seen in a listing"
    n = len(read_log(str(test_log)))
    again = pipe.run()
    assert calls(test_log, n) == Counter()
    assert [(s["reused"], s["computed"]) for s in again["steps"]] == [(6, 0)] * 3

    # one output deleted, one truncated, one with a corrupted footer (same size)
    files.remove(plan.out_path(2, 0))
    files.truncate(plan.out_path(1, 2))
    files.corrupt_footer(plan.out_path(0, 4))
    n = len(read_log(str(test_log)))
    mended = pipe.run()
    assert [s["computed"] for s in mended["steps"]] == [1, 1, 1]
    # exactly those three (stage, batch) outputs: a later step's output of the same batch
    # is still valid (its key does not change when its input is rewritten identically)
    assert calls(test_log, n) == Counter(a=1, c=1)
    assert pipe.read().equals(expected)
    # the repaired run's task runs are the computed units only (no reused ones, no extras)
    assert task_run_states(mended["flow_run_id"], expected=3) == Counter(Completed=3)
    assert task_run_states(again["flow_run_id"], expected=0, timeout=0) == Counter()


def test_resume_step_and_fresh_keep_their_meaning(tmp_path: Path, test_log: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(60, "a"))
    pipe = build(f"file://{tmp_path}/store", str(tmp_path / "data" / "a.jsonl"))
    pipe.run()
    n = len(read_log(str(test_log)))
    summary = pipe.run(resume_from_last=False, resume_step=2)
    assert calls(test_log, n) == Counter(c=3)
    assert [s["computed"] for s in summary["steps"]] == [0, 0, 3]
    n = len(read_log(str(test_log)))
    pipe.run(resume_from_last=False)
    assert calls(test_log, n) == Counter(a=3, c=3)
