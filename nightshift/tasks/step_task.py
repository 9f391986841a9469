"""The step task: one Prefect task run per (stage, batch), returning a small reference.

The task's cache key is the batch's content address at that stage (see ``flows/plan.py``),
wired into Prefect's own caching through :class:`StepOutputPolicy`: a re-run or a UI Retry
shows reused batches as ``Cached``. Prefect's result records (the references) live in the
step store under ``_prefect/``; the data never passes through Prefect.

Runs that share a store take a lock per key (Prefect transactions with SERIALIZABLE
isolation and a file lock manager), so two flow runs never compute the same (step, batch)
at once; the second one finds the first one's record and is Cached. Holding the lock,
Prefect reads the record through :meth:`StepStore.read_path`, which vouches for it only
while its output proves to be the unit (its footer's identity): a stale record makes the
task compute the unit and write the record again; no run deletes a record.

Every output is written with its unit's identity in its Parquet footer
(``core/identity.py``): the key, the stage's fingerprint, the source batch and piece,
the row count and the ``_row_id`` range and digest.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from pydantic import BaseModel

from nightshift.blocks.step_store import StepStore
from nightshift.core import identity
from nightshift.core.errors import Deferred, NightshiftError, StepFailed, error_kind, one_line
from nightshift.tasks.answer_cache import batch_scope
from nightshift.tasks.batches import Batch, read_batch
from nightshift.tasks.dag import JoinSpec, join_frames
from nightshift.tasks.operators import ROW_ID, BarrierOperator, Operator, apply_operator
from nightshift.tasks.operators.base import BATCH
from nightshift.tasks.operators.llm import Handover
from nightshift.tasks.sources import filesystem
from nightshift.tasks.stages import output_compression

if TYPE_CHECKING:
    from nightshift.serving.pool import ServingPool


class BatchRef(BaseModel):
    """What a step task returns: where the batch's output is, never the data."""

    path: str
    rows: int
    rows_in: int = 0
    key: str
    seconds: float = 0.0
    #: when the computation started (Unix time, seconds): the run report's timeline
    started: float = 0.0
    reused: bool = False
    #: LLM token counts of this batch: {"prompt": n, "completion": n}.
    tokens: dict[str, int] = {}
    #: Serving usage of this computation (HTTP backends): requests, retries, tokens paid,
    #: answers reused from the answer cache, estimated cost_usd (tasks/answer_cache.py).
    usage: dict[str, float] = {}
    #: Rows whose LLM call (or parse) failed, by kind (``core.errors.error_kind``).
    errors: dict[str, int] = {}
    #: Byte size and tag (ETag or mtime) of the file written: the output index's entry.
    size: int = 0
    tag: str = ""


class StepOutputPolicy(CachePolicy):
    """Cache key = the output's content address (a pure function of the inputs).

    A record is valid only while the output file it points to proves to be its unit;
    that is checked when Prefect reads the record, under the unit's lock
    (:meth:`StepStore.read_path`), not here: a key is computed before the lock is held,
    when another run may be writing that very unit.
    """

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        return inputs["key"]


def configure_for(store: StepStore, retries: int, retry_delay_seconds: float) -> dict[str, Any]:
    """``with_options`` arguments binding the step tasks to one store."""
    policy = StepOutputPolicy().configure(
        lock_manager=store.lock_manager(), isolation_level="SERIALIZABLE"
    )
    return dict(
        cache_policy=policy,
        result_storage=store.as_result_storage(),
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=not_deferred,
    )


def not_deferred(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failure, never a unit left for a later
    run (provider batches pending, the budget reached): a retry now would only wait."""
    return not isinstance(state.data, Deferred)


def _existing(store: StepStore, out_path: str, key: str, label: str) -> BatchRef | None:
    rows = store.unit_rows(out_path, key)
    if rows is None:
        return None
    get_run_logger().info("%s: output already in the store (%d rows), reused", label, rows)
    size, tag = store.stat(out_path)
    return BatchRef(path=out_path, rows=rows, key=key, reused=True, size=size, tag=tag)


@task(name="step", persist_result=True, result_serializer="json", task_run_name="{label}")
def run_stage_batch(
    label: str,
    key: str,
    out_path: str,
    operators: list[Operator],
    first_step: int,
    store: StepStore,
    batch: Batch,
    source_options: dict[str, Any],
    upstream: BatchRef | list[BatchRef] | list[list[BatchRef]] | None = None,
    barrier_state: str | None = None,
    force: bool = False,
    fail: bool = False,
    rows: tuple[int, int] | None = None,
    surveyed: bool = False,
    join: JoinSpec | None = None,
    pool: ServingPool | None = None,
    fingerprint: str = "",
    handover: Handover | None = None,
) -> BatchRef:
    """Compute one unit of one stage and write it to the store atomically.

    ``upstream`` is the batch's output at the stage before (one reference, or the pieces
    of a stage that cut it); ``rows`` selects ``[start, stop)`` of that input (a stage
    with its own, smaller batch_size). ``surveyed`` says the run's survey of the store
    found no readable output for it (so it is not looked for again). ``join``: the step
    has several parents; ``upstream`` holds each one's outputs, joined on ``_row_id``.
    ``pool``: the serving pool of the run's task runner, for LLM steps (handed over
    explicitly, never found in a process-wide registry).
    ``fingerprint``: the stage's, written into the output's identity.
    ``handover``: the stage's last (LLM) step hands each row over to the next stage's
    LLM step as soon as it is answered (``operators.llm.Handover``): a prefetch only,
    the output is the same without it.
    """
    # ``surveyed``: the run's survey found no readable output just now (one less read)
    if not force and not surveyed and (ref := _existing(store, out_path, key, label)):
        return ref
    if fail:
        raise StepFailed(f"{label}: failure injected by the run's fail_at parameter")
    started_at = time.time()
    started = time.perf_counter()
    if upstream is None:
        fs, path = (
            (store.fs, batch.read_uri)
            if batch.in_store
            else filesystem(batch.read_uri, source_options)
        )
        if rows is not None:  # a piece: read only its rows (their _row_ids are absolute)
            batch = dataclasses.replace(
                batch, start=batch.start + rows[0], stop=batch.start + rows[1]
            )
        df = read_batch(batch, fs, path)
    elif join is not None:
        df = join_frames([read_input(store, refs, None) for refs in upstream], join)  # type: ignore[arg-type]
    else:
        df = read_input(store, upstream if isinstance(upstream, list) else [upstream], rows)  # type: ignore[arg-type]
    rows_in = df.height
    state = None
    if barrier_state and isinstance(operators[0], BarrierOperator):
        state = operators[0].read_state(
            lambda where: read_state(store, barrier_state, where), df, batch.index
        )
    with batch_scope(store, out_path) as scope:  # LLM answers persist as they arrive
        for offset, op in enumerate(operators):
            scope.handover = handover if offset == len(operators) - 1 else None
            try:
                df = apply_operator(op, df, state, pool)
            except Deferred:
                raise
            except NightshiftError as exc:
                raise StepFailed(
                    f"{label}: steps[{first_step + offset}] ({op.name}): {exc}"
                ) from None
            except Exception as exc:
                raise StepFailed(
                    f"{label}: steps[{first_step + offset}] ({op.name}): {type(exc).__name__}: "
                    f"{one_line(exc)}"
                ) from exc
        piece = None if rows is None else list(rows)
        store.write_frame(
            out_path,
            df,
            identity.of_frame(
                df,
                key,
                out_path.rsplit("/", 1)[-1],
                fingerprint=fingerprint,
                source=batch.file.uri,
                batch=[batch.start, batch.stop],
                piece=piece,
            ),
            compression=output_compression(operators),
        )
        scope.completed()
    size, tag = store.stat(out_path)
    return BatchRef(
        path=out_path,
        rows=df.height,
        rows_in=rows_in,
        key=key,
        seconds=time.perf_counter() - started,
        started=started_at,
        tokens=_token_counts(operators, df),
        usage=scope.as_dict(),
        errors=row_errors(operators, df),
        size=size,
        tag=tag,
    )


def read_state(store: StepStore, path: str, where: pl.Expr | None) -> pl.DataFrame:
    """A barrier's stored index, or its rows where ``where`` holds (a local store scans
    the file, skipping row groups by their statistics)."""
    if where is None:
        return store.read_frame(path)
    if store.is_local:
        return pl.scan_parquet(path).filter(where).collect()
    return store.read_frame(path).filter(where)


def batch_numbers(batches: list[int], rows: list[int]) -> pl.Expr:
    """Each row's batch, for rows concatenated from files of ``rows`` rows each, the
    ``i``-th from batch ``batches[i]``: one column of 8 bytes a row, made at once (a
    barrier's ``first()`` of it costs what the aggregation of a plain column costs; a
    binary search of each row's position, evaluated inside the group-by, cost 2x more)."""
    numbers = np.repeat(np.asarray(batches, dtype=np.int64), np.asarray(rows, dtype=np.int64))
    return pl.lit(pl.Series(BATCH, numbers, dtype=pl.Int64))


def read_input(
    store: StepStore, parts: list[BatchRef], rows: tuple[int, int] | None
) -> pl.DataFrame:
    """Rows ``[start, stop)`` (all without ``rows``) of the concatenated ``parts``."""
    if rows is None and len(parts) == 1:
        return store.read_frame(parts[0].path)
    start, stop = rows if rows is not None else (0, sum(p.rows for p in parts))
    frames, offset = [], 0
    for part in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, part.rows)
        if lo < hi:
            whole = (lo, hi) == (0, part.rows)
            frames.append(
                store.read_frame(part.path) if whole else store.read_rows(part.path, lo, hi)
            )
        offset += part.rows
    if not frames:  # an empty input still has its columns
        frames = [store.read_rows(parts[0].path, 0, 0)]
    return pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]


def row_errors(operators: list[Operator], df: pl.DataFrame) -> dict[str, int]:
    """Rows (or samples, list elements) of LLM steps whose answer is an error, by kind:
    the non-null values of their ``<output>_error`` columns."""
    counts: dict[str, int] = {}
    for op in operators:
        if not op.uses_serving:
            continue
        for column in op.writes():
            if not column.endswith("_error") or column not in df.columns:
                continue
            values = df.get_column(column)
            if isinstance(values.dtype, pl.List):
                values = values.explode()
            for message in values.drop_nulls().to_list():
                kind = error_kind(str(message))
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def _token_counts(operators: list[Operator], df: pl.DataFrame) -> dict[str, int]:
    counts = {"prompt": 0, "completion": 0}
    for op in operators:
        for kind, n in op.token_counts(df).items():
            counts[kind] += n
    return counts if any(counts.values()) else {}


@task(name="barrier-index", persist_result=True, result_serializer="json", task_run_name="{label}")
def build_barrier_index(
    label: str,
    key: str,
    out_path: str,
    operator: BarrierOperator,
    store: StepStore,
    upstream_paths: list[str],
    force: bool = False,
    upstream_batches: list[int] | None = None,
    upstream_rows: list[int] | None = None,
) -> BatchRef:
    """The state a barrier operator needs, from every upstream batch in source order;
    ``upstream_batches`` and ``upstream_rows`` (each path's batch and rows) give its rows
    a ``BATCH`` column."""
    if not force and (ref := _existing(store, out_path, key, label)):
        return ref
    started_at = time.time()
    started = time.perf_counter()
    data = store.scan_frames(upstream_paths, [ROW_ID, *operator.reads()])
    if upstream_paths and upstream_batches is not None and upstream_rows is not None:
        data = data.with_columns(batch_numbers(upstream_batches, upstream_rows))
    state: pl.DataFrame = operator.index(data)
    store.write_frame(
        out_path,
        state,
        identity.of_frame(state, key, out_path.rsplit("/", 1)[-1], inputs=len(upstream_paths)),
    )
    size, tag = store.stat(out_path)
    return BatchRef(
        path=out_path,
        rows=state.height,
        key=key,
        seconds=time.perf_counter() - started,
        started=started_at,
        size=size,
        tag=tag,
    )
