"""Built-in operators over real polars frames: results, pass-through, errors."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nightshift.core.errors import SpecError
from nightshift.tasks.operators import (
    ROW_ID,
    Dedup,
    Filter,
    Map,
    Rename,
    Select,
    Template,
    apply_operator,
)


@pytest.fixture
def df() -> pl.DataFrame:
    return pl.DataFrame(
        {
            ROW_ID: [10, 11, 12, 13],
            "text": ["hello world", "hi", None, "hello world"],
            "n": [1, 2, 3, 4],
        },
        schema_overrides={ROW_ID: pl.UInt64},
    )


def test_map_adds_columns_from_sql(df: pl.DataFrame) -> None:
    out = apply_operator(Map(columns={"len": "length(text)", "twice": "n * 2"}), df)
    assert out["len"].to_list() == [11, 2, None, 11]
    assert out["twice"].to_list() == [2, 4, 6, 8]
    assert out.columns == [ROW_ID, "text", "n", "len", "twice"]


def test_filter_keeps_matching_rows_and_their_columns(df: pl.DataFrame) -> None:
    out = apply_operator(Filter(where="length(text) > 3"), df)
    assert out[ROW_ID].to_list() == [10, 13]
    assert out["n"].to_list() == [1, 4]


def test_filter_must_be_boolean(df: pl.DataFrame) -> None:
    with pytest.raises(SpecError, match="not a boolean"):
        apply_operator(Filter(where="n + 1"), df)


def test_template_fast_and_jinja_paths_agree(df: pl.DataFrame) -> None:
    fast = apply_operator(Template(output="p", template="Q: {{ text }}!"), df)
    # a filter expression forces the sandboxed Jinja path; same text expected
    slow = apply_operator(
        Template(output="p", template="Q: {{ text | string if text is not none else '' }}!"), df
    )
    assert fast["p"].to_list() == ["Q: hello world!", "Q: hi!", "Q: !", "Q: hello world!"]
    assert slow["p"].to_list() == fast["p"].to_list()


def test_template_is_sandboxed(df: pl.DataFrame) -> None:
    op = Template(output="p", template="{{ text.__class__.__mro__ }}")
    with pytest.raises(Exception, match=r"unsafe|access"):
        apply_operator(op, df)


def test_template_strict_undefined(df: pl.DataFrame) -> None:
    with pytest.raises(SpecError, match=r"undefined variable.*missing_col"):
        apply_operator(Template(output="p", template="{{ missing_col }}"), df)


def test_select_and_rename_keep_row_id(df: pl.DataFrame) -> None:
    out = apply_operator(Select(columns=["n"]), df)
    assert out.columns == [ROW_ID, "n"]
    renamed = apply_operator(Rename(columns={"n": "number"}), df)
    assert renamed.columns == [ROW_ID, "text", "number"]
    with pytest.raises(ValueError):
        Rename(columns={ROW_ID: "x"})


def test_dedup_keeps_first_occurrence(df: pl.DataFrame) -> None:
    op = Dedup(on=["text"])
    state = op.index(df.lazy())
    assert state[ROW_ID].to_list() == [13]
    assert apply_operator(op, df, state)[ROW_ID].to_list() == [10, 11, 12]


def test_operator_returning_only_its_column_gets_others_reattached(df: pl.DataFrame) -> None:
    class Upper(Map):
        def process(self, frame: pl.DataFrame) -> pl.DataFrame:
            # returns only _row_id and its output, in reverse order
            return frame.select(ROW_ID, pl.col("text").str.to_uppercase().alias("up")).reverse()

    out = apply_operator(Upper(columns={"up": "text"}), df)
    by_id = {r[ROW_ID]: r for r in out.iter_rows(named=True)}
    for row in df.iter_rows(named=True):
        got = by_id[row[ROW_ID]]
        assert got["n"] == row["n"] and got["text"] == row["text"]
        assert got["up"] == (row["text"].upper() if row["text"] else None)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=8), min_size=1, max_size=60), st.integers(1, 10))
def test_dedup_over_batches_equals_global_unique(texts: list[str], batch: int) -> None:
    frame = pl.DataFrame(
        {ROW_ID: list(range(len(texts))), "t": texts}, schema_overrides={ROW_ID: pl.UInt64}
    )
    op = Dedup(on=["t"])
    state = op.index(frame.lazy())
    parts = [apply_operator(op, frame.slice(i, batch), state) for i in range(0, len(texts), batch)]
    merged = pl.concat(parts)
    expected = frame.unique(subset=["t"], keep="first", maintain_order=True)
    assert merged.equals(expected)


def test_template_without_columns_renders_on_every_row(df: pl.DataFrame) -> None:
    out = apply_operator(Template(output="p", template="{{ 'x' | upper }}"), df)
    assert out["p"].to_list() == ["X"] * 4


def test_template_error_names_the_row(df: pl.DataFrame) -> None:
    frame = df.with_columns(
        pl.Series(ROW_ID, [(7 << 32) + 0, (7 << 32) + 1, (7 << 32) + 2, 5], dtype=pl.UInt64)
    )
    with pytest.raises(SpecError) as info:  # row 3 (index 2) has a null text
        apply_operator(Template(output="p", template="{{ text.upper() }}"), frame)
    message = str(info.value)
    assert "\n" not in message
    assert f"row 3 of its source file ({ROW_ID} {(7 << 32) + 2})" in message, message
    assert "'None' has no attribute 'upper'" in message


def test_an_operator_may_not_write_row_id(df: pl.DataFrame) -> None:
    with pytest.raises(SpecError, match="writes the reserved column _row_id"):
        apply_operator(Map(columns={ROW_ID: "n"}), df)

    class Renumber(Map):  # does not declare it, rewrites it anyway
        def writes(self) -> list[str]:
            return []

        def process(self, frame: pl.DataFrame) -> pl.DataFrame:
            return frame.with_columns(pl.col(ROW_ID) + 1)

    with pytest.raises(SpecError, match="changed the _row_id column"):
        apply_operator(Renumber(columns={"x": "n"}), df)

    class Retype(Renumber):
        def process(self, frame: pl.DataFrame) -> pl.DataFrame:
            return frame.with_columns(pl.col(ROW_ID).cast(pl.Int64))

    with pytest.raises(SpecError, match="changed the _row_id column"):
        apply_operator(Retype(columns={"x": "n"}), df)


def test_reattaching_columns_of_a_wide_frame_is_cheap() -> None:
    """10,000 columns: the bookkeeping around an operator must not be O(columns^2)."""
    import time

    wide = pl.DataFrame(
        {
            ROW_ID: pl.Series(range(5), dtype=pl.UInt64),
            "text": ["a"] * 5,
            **{f"c{j}": [j] * 5 for j in range(10_000)},
        }
    )

    class OnlyItsColumn(Map):  # returns _row_id and its output, rows reversed
        def process(self, frame: pl.DataFrame) -> pl.DataFrame:
            return frame.select(ROW_ID, pl.col("text").alias("t2")).reverse()

    started = time.process_time()
    for op in (
        Filter(where="length(text) > 0"),
        Map(columns={"m": "c5 * 2"}),
        Template(output="p", template="{{ text }}!"),
        OnlyItsColumn(columns={"t2": "text"}),
    ):
        out = apply_operator(op, wide)
        assert out.width >= wide.width and out.columns[:3] == [ROW_ID, "text", "c0"]
    assert time.process_time() - started < 3  # was 5-17 s per operator
    assert out["c9999"].to_list() == [9999] * 5 and out["t2"].to_list() == ["a"] * 5
