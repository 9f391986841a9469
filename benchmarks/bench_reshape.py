"""``explode`` and ``group`` on 10M rows: the operators' processing vs plain polars.

Both sides do the same reshaping on the same in-memory data, in one run:

* **explode**: 1M documents, each with a list of 10 questions -> 10M question rows.
  Plain polars, two ways: bare ``df.explode(...)`` (no row identity: polars re-slices the
  list buffers, nearly free), and **the same reshaping** (the goal's baseline): the same
  output columns made with polars' own tools: the parent's id, each child's index
  (``int_ranges`` exploded alongside) and a 64-bit id per child (``struct(...).hash()``).
  The operator: ``apply_operator(Explode)``,
  which also derives every child's ``_row_id`` (SplitMix64, ``tasks/batches.py``), writes
  ``_parent_id`` and checks the ids, on the whole frame and in the engine's way (batches
  of 100,000 documents, as step tasks get them).
* **group**: those 10M rows grouped by document (1M groups of 10): a list of the
  questions, a count and a max. Plain polars: bare ``group_by(maintain_order=True).agg(...)``,
  and the same reshaping: that plus a 64-bit id per group from its key (``struct.hash``).
  The operator: ``Group.index`` over the whole data set (lazily, as the barrier's index
  task scans it, each row with its batch number) plus ``read_state``/``apply`` for each of
  10 batches (as the step tasks run them), which also derives each group's ``_row_id``
  from its key (a vectorised 64-bit hash of the key's JSON).

Parquet I/O is left out of both sides (the engine's is measured by bench_overhead.py).

    python benchmarks/bench_reshape.py                    # 10M rows
    python benchmarks/bench_reshape.py --docs 100000      # quick: 1M rows
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl
from rich.console import Console
from rich.table import Table

from nightshift.tasks.operators import ROW_ID, Explode, Group, apply_operator
from nightshift.tasks.operators.explode import PARENT_ID
from nightshift.tasks.step_task import batch_numbers

PER_DOC = 10


def make_docs(docs: int) -> pl.DataFrame:
    """``docs`` rows: ``_row_id`` as a source gives it, a document id and text, a list of
    ``PER_DOC`` questions and a list of as many scores."""
    base = 0x5EED << 32
    ids = pl.int_range(base, base + docs, dtype=pl.UInt64, eager=True).alias(ROW_ID)
    df = pl.DataFrame(ids).with_columns(
        pl.int_range(0, docs).alias("doc"),
        pl.format("document number {} with some text", pl.int_range(0, docs)).alias("text"),
    )
    return df.with_columns(
        pl.concat_list(
            [pl.format("question {} of {}", pl.lit(str(j)), pl.col("doc")) for j in range(PER_DOC)]
        ).alias("questions"),
        pl.concat_list([(pl.col("doc") * 7 + j) % 101 for j in range(PER_DOC)]).alias("scores"),
    )


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def alternating(sides: list[Callable[[], object]], repeat: int) -> list[tuple[float, object]]:
    """Best time and last result of each side, over ``repeat`` rounds in which the sides
    take turns (so all see the same load on a shared machine)."""
    runs: list[tuple[float, object]] = [(float("inf"), None) for _ in sides]
    for _ in range(repeat):
        for k, fn in enumerate(sides):
            t, result = timed(fn, 1)
            runs[k] = (min(runs[k][0], t), result)
    return runs


def batches(df: pl.DataFrame, n: int) -> list[pl.DataFrame]:
    size = -(-df.height // n)
    return [df.slice(i, size) for i in range(0, df.height, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--docs", type=int, default=1_000_000, help="documents (x10 rows)")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    args = parser.parse_args()
    console = Console(width=150)
    docs = make_docs(args.docs)
    explode = Explode(columns=["questions", "scores"])

    # -- explode --------------------------------------------------------------------------
    def plain_explode() -> pl.DataFrame:
        return docs.explode(["questions", "scores"])

    def plain_explode_same() -> pl.DataFrame:
        """The operator's output columns, by plain polars: parent id, index, an id each."""
        out = docs.with_columns(
            pl.col(ROW_ID).alias(PARENT_ID),
            pl.int_ranges(pl.col("questions").list.len()).alias("_index"),
        ).explode(["questions", "scores", "_index"])
        return out.with_columns(pl.struct(PARENT_ID, "_index").hash().alias(ROW_ID)).drop("_index")

    parts = batches(docs, args.batches)
    (t_bare_x, plain_x), (t_same_x, same_x), (t_op_x, children), (t_op_xb, _) = alternating(
        [
            plain_explode,
            plain_explode_same,
            lambda: apply_operator(explode, docs),
            lambda: [apply_operator(explode, p) for p in parts],
        ],
        args.repeat,
    )
    assert isinstance(children, pl.DataFrame) and isinstance(plain_x, pl.DataFrame)
    assert isinstance(same_x, pl.DataFrame) and same_x.height == children.height
    assert children.height == plain_x.height == args.docs * PER_DOC
    assert children["questions"].equals(plain_x["questions"])
    assert children[PARENT_ID].equals(same_x[PARENT_ID])
    rows = children.height

    # -- group ----------------------------------------------------------------------------
    data = children.select(ROW_ID, "doc", "questions", "scores")
    group = Group(
        by=["doc"], collect={"questions": "list(questions)", "n": "count()", "best": "max(scores)"}
    )

    def plain_group() -> pl.DataFrame:
        return data.group_by("doc", maintain_order=True).agg(
            pl.col("questions"), pl.len().alias("n"), pl.col("scores").max().alias("best")
        )

    data_parts = batches(data, args.batches)
    # what the index task scans: every batch's output, each row with its batch number
    scanned = data.lazy().with_columns(
        batch_numbers(list(range(len(data_parts))), [p.height for p in data_parts])
    )

    def operator_group() -> pl.DataFrame:
        state = group.index(scanned)
        outs = []
        for b, part in enumerate(data_parts):
            piece = group.read_state(
                lambda where: state if where is None else state.filter(where), part, b
            )
            outs.append(apply_operator(group, part, piece))
        return pl.concat(outs)

    def plain_group_same() -> pl.DataFrame:
        out = plain_group()
        return out.with_columns(pl.struct("doc").hash().alias(ROW_ID))

    (t_bare_g, plain_g), (t_same_g, _), (t_op_g, grouped) = alternating(
        [plain_group, plain_group_same, operator_group], args.repeat
    )
    assert isinstance(grouped, pl.DataFrame) and isinstance(plain_g, pl.DataFrame)
    assert grouped["doc"].equals(plain_g["doc"]) and grouped["questions"].equals(
        plain_g["questions"]
    )
    assert grouped[ROW_ID].n_unique() == grouped.height == args.docs

    table = Table(title=f"explode and group: {rows:,} rows, best of {args.repeat}")
    for column in (
        "what",
        "plain polars, bare s",
        "plain polars, same reshaping s",
        "operator s",
        "vs same reshaping",
        "vs bare",
    ):
        table.add_column(column, justify="right" if column != "what" else "left")
    lines = [
        (f"explode {args.docs:,} -> {rows:,} (whole frame)", t_bare_x, t_same_x, t_op_x),
        (f"explode in {args.batches} batches", t_bare_x, t_same_x, t_op_xb),
        (
            f"group {rows:,} -> {args.docs:,} (index + {args.batches} batches)",
            t_bare_g,
            t_same_g,
            t_op_g,
        ),
    ]
    for what, bare, same, op in lines:
        table.add_row(
            what,
            f"{bare:.3f}",
            f"{same:.3f}",
            f"{op:.3f}",
            f"{op / same:.2f}x",
            f"{op / bare:.2f}x",
        )
    console.print(table)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(
        f"{platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
        f"Python {platform.python_version()}, polars {pl.__version__}"
    )


if __name__ == "__main__":
    main()
