"""Reading a pipeline's state back: per-step progress and the merged final output."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from nightshift.core.errors import StoreError
from nightshift.flows.plan import Plan
from nightshift.flows.survey import survey


@dataclass
class StepStatus:
    stage: str
    steps: list[int]
    done: int
    total: int
    rows: int
    #: the names of its steps, and the stages it reads (DAGs: ``tasks/dag.py``)
    names: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    #: rows its input holds in the store: the source's for a step that reads it, else
    #: its parent's (a join: its smallest parent's); ``rows`` is its output's, so explode
    #: and group show their multiplication
    rows_in: int = 0


def step_status(plan: Plan, step: int | str | None = None) -> list[StepStatus]:
    """For each stage (or the one of ``step``, by number or name): batches whose output is
    in the store (and readable), and rows.

    One listing per stage directory (see flows/survey.py); a stage that cuts batches
    into pieces counts a batch done when every piece is.
    """
    only = None if step is None else plan.stage_of_step(step, "--step")
    views = survey(plan)
    source_rows = sum(b.rows for b in plan.batches)
    return [
        StepStatus(
            view.name,
            list(stage.steps),
            view.done,
            view.batches,
            view.rows,
            list(stage.names),
            [plan.stages[p].name for p in stage.parents],
            min((views[p].rows for p in stage.parents), default=source_rows),
        )
        for stage, view in zip(plan.stages, views, strict=True)
        if only is None or stage.index == only
    ]


def final_paths(plan: Plan, step: int | str | None = None) -> list[str]:
    """A step's output files in source order (default: the sink, the one step nothing
    comes after); error if any batch is missing."""
    index = plan.stage_of_output(step)
    last = survey(plan)[index]
    if last.done < last.batches:
        missing = next(b for b, refs in enumerate(last.refs) if refs is None)
        batch = plan.batches[missing]
        raise StoreError(
            f"pipeline {plan.spec.name}: step {plan.stages[index].name} has "
            f"{last.done}/{last.batches} batches; run it first (first missing: batch "
            f"{missing + 1}, rows {batch.start}-{batch.stop} of {batch.file.uri})"
        )
    return [ref.path for refs in last.refs for ref in refs or []]


def read_output(plan: Plan, step: int | str | None = None) -> pl.DataFrame:
    """The final step's (or ``step``'s) rows, in source order (files by path, then row)."""
    frames = [plan.store.read_frame(p) for p in final_paths(plan, step)]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


def export(plan: Plan, to: Path, step: int | str | None = None) -> int:
    """Write the final output (the sink's, or ``step``'s) to ``.parquet`` or ``.jsonl``;
    returns the row count.

    The rows go to a temporary file beside ``to`` that replaces it only once complete: an
    export that fails leaves an earlier ``to`` as it was and says why in one line.
    """
    import os
    import uuid

    from nightshift.core.errors import NightshiftError, one_line

    suffix = to.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".ndjson"):
        raise StoreError(f"export --to {to}: use a .parquet or .jsonl file name")
    paths = final_paths(plan, step)
    if to.is_dir():
        raise StoreError(f"export --to {to}: is a directory; give a file name")
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"export --to {to}: cannot create {to.parent}: {exc.strerror}") from None
    tmp = to.with_name(f".{to.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        if plan.store.is_local and paths:
            frames = [pl.scan_parquet(p) for p in paths]
            frame = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
            if suffix == ".parquet":
                frame.sink_parquet(tmp)
                rows = pl.scan_parquet(tmp).select(pl.len()).collect().item()
            else:
                frame.sink_ndjson(tmp)
                with open(tmp, "rb") as handle:
                    rows = sum(1 for _ in handle)
        else:
            df = read_output(plan, step)
            df.write_parquet(tmp) if suffix == ".parquet" else df.write_ndjson(tmp)
            rows = df.height
        os.replace(tmp, to)
    except NightshiftError as exc:
        raise StoreError(f"export --to {to}: {exc} ({to} left as it was)") from None
    except Exception as exc:
        raise StoreError(
            f"export --to {to}: {type(exc).__name__}: {one_line(exc)} ({to} left as it was)"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return rows
