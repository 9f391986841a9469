"""Per-step batch sizes: a step with a smaller ``batch_size`` cuts each batch into pieces
with their own keys; row order, ``_row_id``, barriers and resume keep their guarantees."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from conftest import make_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nightshift_testops import Count, read_log

from nightshift.core.errors import SpecError
from nightshift.flows.pipeline import Pipeline
from nightshift.tasks.operators import Dedup, Filter, Map


def pipeline(tmp: Path, batch_size: int, sizes: list[int | None], fuse: bool) -> Pipeline:
    a, f, c = sizes
    return Pipeline(
        "sizes",
        source=str(tmp / "data" / "*.jsonl"),
        steps=[
            Count(tag="a", batch_size=a),
            Filter(where="n % 3 <> 1", batch_size=f),
            Map(columns={"m": "n * 2"}),
            Dedup(on=["text"]),
            Count(tag="c", batch_size=c),
        ],
        store=f"file://{tmp}/store",
        batch_size=batch_size,
        fuse=fuse,
    )


def expected(pipe: Pipeline, rows: dict[str, list[dict]]) -> pl.DataFrame:
    """The plain answer: the files in order, each row with its source ``_row_id``."""
    frames = []
    for file in pipe.plan().files:
        part = pl.DataFrame(rows[Path(file.uri).stem])
        ids = [(file.row_key << 32) + i for i in range(part.height)]
        frames.append(part.with_columns(pl.Series("_row_id", ids, dtype=pl.UInt64)))
    df = pl.concat(frames).filter(pl.col("n") % 3 != 1)
    return df.unique(subset=["text"], keep="first", maintain_order=True)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n_a=st.integers(1, 90),
    n_b=st.integers(0, 40),
    batch_size=st.integers(5, 40),
    sizes=st.lists(st.one_of(st.none(), st.integers(1, 40)), min_size=3, max_size=3),
    fuse=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_any_step_sizes_give_the_plain_answer_and_resume(
    tmp_path_factory: pytest.TempPathFactory,
    n_a: int,
    n_b: int,
    batch_size: int,
    sizes: list[int | None],
    fuse: bool,
    seed: int,
) -> None:
    tmp = tmp_path_factory.mktemp("sizes")
    log = tmp / "log.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("NIGHTSHIFT_TEST_LOG", str(log))
    try:
        rows_a, rows_b = make_rows(n_a, "a", dup_every=4), make_rows(n_b, "b", dup_every=3)
        write_jsonl(tmp / "data" / "a.jsonl", rows_a)
        if rows_b:
            write_jsonl(tmp / "data" / "b.jsonl", rows_b)
        sizes = [min(s, batch_size) if s else None for s in sizes]
        pipe = pipeline(tmp, batch_size, sizes, fuse)
        summary = pipe.run()
        out = pipe.read()
        want = expected(pipe, {"a": rows_a, "b": rows_b})
        assert out["id"].to_list() == want["id"].to_list()
        assert out["m"].to_list() == [v * 2 for v in want["n"].to_list()]
        # _row_id is the source row's, whatever the pieces
        assert out["_row_id"].to_list() == want["_row_id"].to_list()
        # a step with a smaller size ran once per piece: pieces of at most its size
        log_a = [e for e in read_log(str(log)) if e["tag"] == "a"]
        if sizes[0] is not None:
            assert max(e["rows"] for e in log_a) <= sizes[0]
        assert sum(e["rows"] for e in log_a) == n_a + n_b

        # lose some outputs (as a kill would leave it): only those are computed again
        files = sorted((tmp / "store" / "sizes" / "steps").glob("*/*.parquet"))
        lost = random.Random(seed).sample(files, k=max(1, len(files) // 4))
        for f in lost:
            f.unlink()
        before = len(read_log(str(log)))
        again = pipe.run()
        assert pipe.read().equals(out)
        recomputed = sum(s["units_computed"] for s in again["steps"])
        assert recomputed == len(lost), (recomputed, len(lost), summary["steps"])
        assert len(read_log(str(log))) - before <= len(lost)
    finally:
        mp.undo()


def test_pieces_have_their_own_keys_and_a_kill_loses_one_piece(
    tmp_path: Path, test_log: Path
) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(100, "a"))
    pipe = pipeline(tmp_path, 50, [None, None, 10], fuse=False)
    summary = pipe.run()
    # the CPU steps: 2 tasks each; the small step: 10-row pieces of what dedup kept
    assert [s["units_computed"] for s in summary["steps"][:3]] == [2, 2, 2]
    pieces = sorted((tmp_path / "store" / "sizes" / "steps" / "04-count").glob("*.parquet"))
    rows_c = [e["rows"] for e in read_log(str(test_log)) if e["tag"] == "c"]
    assert len(pieces) == len(rows_c) == summary["steps"][4]["units_computed"]
    assert max(rows_c) == 10 and sum(rows_c) == summary["steps"][4]["rows_out"]
    # one lost piece: one piece of 10 rows is computed again, nothing else
    pieces[3].unlink()
    n = len(read_log(str(test_log)))
    again = pipe.run()
    assert Counter(e["tag"] for e in read_log(str(test_log))[n:]) == Counter(c=1)
    assert [s["units_computed"] for s in again["steps"]] == [0, 0, 0, 0, 1]


def test_step_sizes_that_cannot_hold_are_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(10, "a"))
    too_big = pipeline(tmp_path, 20, [50, None, None], fuse=True)
    with pytest.raises(
        SpecError,
        match=r"steps\[0\] \(count\)\.batch_size 50 is larger than "
        r"the pipeline's batch_size 20",
    ):
        too_big.plan()
    barrier = Pipeline(
        "b",
        source=str(tmp_path / "data" / "a.jsonl"),
        steps=[Map(columns={"k": "text"}), Dedup(on=["k"], batch_size=5)],
        store=f"file://{tmp_path}/store",
        batch_size=20,
    )
    with pytest.raises(SpecError, match=r"steps\[1\] \(dedup\)\.batch_size: a barrier step"):
        barrier.plan()
