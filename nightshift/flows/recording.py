"""What a run did, recorded as it goes: the run report's data (``flows/report.py``).

Each attempt of a flow run (a first run, a UI Retry, a later ``nightshift run`` that
resumes) gets a folder in the store, ``<pipeline>/runs/<attempt>/`` (``core/layout.py``):

* ``attempt.json``: the flow run (id, name, attempt number), start and end, its status,
  the plan's stages (names, fingerprints, parents) and per-stage totals (batches, rows,
  tokens, requests, cost); written when the attempt starts and again at each flush, so a
  killed attempt leaves what it had; at its end also the run's ``cost_usd``,
  ``online_cost_usd``, ``budget`` and what is ``left`` (the one record of a run);
* ``units-<seq>.parquet``: one record per unit (a (stage, batch[, piece]) task's worth
  of work), flushed every :data:`FLUSH_SECONDS` while the attempt runs; compacted into
  one ``units.parquet`` when it ends (a killed attempt keeps its chunks).

A unit record (:data:`UNIT_SCHEMA`) says whether the unit was ``computed``, ``reused``
(from the store, or ``cached``: another run computed it meanwhile) or ``failed``; when
it started and ended (Unix seconds), rows in and out, tokens in and out of LLM steps,
requests, retries and estimated cost of HTTP serving, the unit's error (kind and
message) and its rows' LLM errors by kind, and its output's file name.

Every write is atomic like the rest of the store (``core/file_io.py``). Recording never
fails a run: a write that fails is logged as a warning and tried again at the next flush.

Example (what ``flows/run_pipeline.py`` does)::

    recorder = Recorder.start(plan)
    ...  # Execution(..., recorder=recorder) calls recorder.computed/reused/failed
    recorder.close([s.as_row() for s in execution.stats], "completed")
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl
from prefect.logging import get_run_logger

from nightshift.core import file_io
from nightshift.core.errors import error_kind, one_line

if TYPE_CHECKING:
    from nightshift.flows.plan import Plan, Unit
    from nightshift.tasks.step_task import BatchRef

#: Seconds between flushes of an attempt's unit records while it runs: a killed attempt
#: loses at most this much of its record (its outputs are in the store all the same).
FLUSH_SECONDS = 30.0

#: One unit's record. ``batch`` is -1 for a barrier's index task; ``piece`` 0 when a stage
#: takes whole batches.
UNIT_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "attempt": pl.String,
    "stage": pl.String,
    "stage_index": pl.Int32,
    "batch": pl.Int64,
    "piece": pl.Int32,
    "status": pl.String,
    "started": pl.Float64,
    "ended": pl.Float64,
    "seconds": pl.Float64,
    "rows_in": pl.Int64,
    "rows_out": pl.Int64,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "requests": pl.Int64,
    "retries": pl.Int64,
    "cached_answers": pl.Int64,
    "cost_usd": pl.Float64,
    "error_kind": pl.String,
    "error": pl.String,
    #: JSON object: rows whose LLM answer is an error, by kind
    "row_errors": pl.String,
    "file": pl.String,
}


def attempt_id(started: dt.datetime, flow_run_id: str | None, run_count: int) -> str:
    """``<UTC start, to the second>-<flow run id, 8 hex>-a<attempt>``: sorts by time."""
    run = (flow_run_id or uuid.uuid4().hex).replace("-", "")[:8]
    return f"{started:%Y%m%dT%H%M%SZ}-{run}-a{run_count}"


@dataclass
class Recorder:
    """Collects one attempt's unit records and writes them to the store."""

    plan: Plan
    attempt: str
    meta: dict[str, Any]
    _pending: list[dict[str, Any]] = field(default_factory=list)
    _seq: int = 0
    _flushed_at: float = field(default_factory=time.monotonic)
    _submitted: dict[tuple[int, int, int], float] = field(default_factory=dict)

    @classmethod
    def start(cls, plan: Plan, forced: list[int] | None = None) -> Recorder:
        """A recorder for the current flow run's attempt (``attempt.json`` written now)."""
        from prefect.runtime import flow_run

        now = dt.datetime.now(dt.UTC)
        run_id = str(flow_run.id) if flow_run.id else None
        run_count = flow_run.run_count or 1
        meta = {
            "attempt": attempt_id(now, run_id, run_count),
            "pipeline": plan.spec.name,
            "partition": plan.spec.partition,
            "flow_run_id": run_id,
            "flow_run_name": flow_run.name,
            "run_count": run_count,
            "started": now.timestamp(),
            "ended": None,
            "status": "running",
            "batches": len(plan.batches),
            "source_rows": sum(b.rows for b in plan.batches),
            "forced": sorted(forced or []),
            "stages": [
                {
                    "name": s.name,
                    "index": s.index,
                    "fingerprint": s.fingerprint,
                    "parents": list(s.parents),
                    "steps": list(s.names),
                    "operators": [op.name for op in s.operators],
                }
                for s in plan.stages
            ],
            "totals": [],
        }
        recorder = cls(plan, meta["attempt"], meta)
        recorder.flush()  # attempt.json now: a killed attempt still shows
        return recorder

    # -- what the scheduler tells it ------------------------------------------------------
    def submitted(self, unit: Unit) -> None:
        self._submitted[(unit.stage, unit.batch, unit.piece)] = time.time()

    def reused(self, unit: Unit, ref: BatchRef, status: str = "reused") -> None:
        self._add(unit.stage, unit.batch, unit.piece, status, ref)

    def computed(self, unit: Unit | None, stage: int, ref: BatchRef) -> None:
        batch, piece = (-1, 0) if unit is None else (unit.batch, unit.piece)
        self._add(stage, batch, piece, "computed", ref)

    def failed(self, unit: Unit | None, stage: int, message: str, label: str | None) -> None:
        batch, piece = (-1, 0) if unit is None else (unit.batch, unit.piece)
        now = time.time()
        started = self._submitted.pop((stage, batch, piece), now)
        self._add(
            stage,
            batch,
            piece,
            "failed",
            None,
            started=started,
            ended=now,
            error_kind=error_kind(message, label),
            error=message,
        )

    def _add(
        self,
        stage: int,
        batch: int,
        piece: int,
        status: str,
        ref: BatchRef | None,
        **extra: Any,
    ) -> None:
        record: dict[str, Any] = {
            "attempt": self.attempt,
            "stage": self.plan.stages[stage].name,
            "stage_index": stage,
            "batch": batch,
            "piece": piece,
            "status": status,
        }
        if ref is not None:
            self._submitted.pop((stage, batch, piece), None)
            usage = ref.usage or {}
            computed = status == "computed"
            record.update(
                rows_out=ref.rows,
                file=ref.path.rsplit("/", 1)[-1],
                **(
                    {
                        "started": ref.started or None,
                        "ended": (ref.started + ref.seconds) if ref.started else None,
                        "seconds": ref.seconds,
                        "rows_in": ref.rows_in,
                        "prompt_tokens": ref.tokens.get("prompt", 0),
                        "completion_tokens": ref.tokens.get("completion", 0),
                        "requests": int(usage.get("requests", 0)),
                        "retries": int(usage.get("retries", 0)),
                        "cached_answers": int(usage.get("cached", 0)),
                        "cost_usd": float(usage.get("cost_usd", 0.0)),
                        "row_errors": json.dumps(ref.errors) if ref.errors else None,
                    }
                    if computed
                    else {}
                ),
            )
        record.update(extra)
        self._pending.append(record)

    # -- writing ------------------------------------------------------------------------
    def due(self) -> bool:
        return time.monotonic() - self._flushed_at >= FLUSH_SECONDS

    def flush(self, totals: list[dict[str, Any]] | None = None) -> None:
        """Write the records gathered since the last flush as one chunk, and the
        attempt's metadata (with ``totals``: per-stage numbers so far)."""
        self._flushed_at = time.monotonic()
        if totals is not None:
            self.meta["totals"] = totals
        try:
            if self._pending:
                self.plan.store.write_frame(
                    self.plan.layout.unit_records(self.attempt, self._seq + 1),
                    records_frame(self._pending),
                )
                self._seq += 1
                self._pending = []
            self._write_meta()
        except Exception as exc:  # the record is an aid; the run goes on without it
            warn(f"could not record the run's progress: {one_line(exc)}")

    def close(
        self, totals: list[dict[str, Any]], status: str, outcome: dict[str, Any] | None = None
    ) -> None:
        """The attempt ended (``completed`` or ``failed``): flush (with ``outcome``: the
        run's cost, budget and what is left), then compact its chunks into
        ``units.parquet``."""
        self.meta.update(ended=time.time(), status=status, **(outcome or {}))
        self.flush(totals)
        layout, store = self.plan.layout, self.plan.store
        chunks = [layout.unit_records(self.attempt, i) for i in range(1, self._seq + 1)]
        if not chunks:
            return
        try:
            whole = pl.concat([store.read_frame(c) for c in chunks], how="vertical_relaxed")
            store.write_frame(layout.unit_records(self.attempt), whole)
            for chunk in chunks:
                store.delete_file(chunk)
        except Exception as exc:
            warn(f"could not compact the run's records: {one_line(exc)}")

    def _write_meta(self) -> None:
        self.plan.store.write_json(self.plan.layout.attempt_file(self.attempt), self.meta)


def records_frame(records: list[dict[str, Any]]) -> pl.DataFrame:
    """Unit records as a frame of :data:`UNIT_SCHEMA` (missing fields are null)."""
    return pl.DataFrame(
        [{k: r.get(k) for k in UNIT_SCHEMA} for r in records], schema=UNIT_SCHEMA, orient="row"
    )


@dataclass
class RunRecords:
    """Every recorded attempt of a pipeline that ran the plan's steps (a stage
    fingerprint in common), oldest first, and their unit records."""

    attempts: list[dict[str, Any]]
    units: pl.DataFrame


def load_records(plan: Plan) -> RunRecords:
    """The attempts recorded under the plan's pipeline folder that share at least one
    stage fingerprint with the plan (so a changed prompt's earlier runs still show for
    the steps before it), and all their unit records."""
    store, layout = plan.store, plan.layout
    fingerprints = {s.fingerprint for s in plan.stages}
    attempts: list[dict[str, Any]] = []
    for path in sorted(file_io.glob(store.fs, f"{layout.runs_dir()}/*/attempt.json")):
        meta = store.read_json(path)
        if not isinstance(meta, dict):
            continue
        if fingerprints & {s.get("fingerprint") for s in meta.get("stages", [])}:
            attempts.append(meta)
    attempts.sort(key=lambda m: m.get("started") or 0)
    frames: list[pl.DataFrame] = []
    for meta in attempts:
        attempt = str(meta["attempt"])
        whole = layout.unit_records(attempt)
        paths = (
            [whole]
            if store.fs.exists(whole)
            else sorted(file_io.glob(store.fs, f"{layout.attempt_dir(attempt)}/units-*.parquet"))
        )
        frames.extend(store.read_frame(p) for p in paths)
    units = (
        pl.concat(frames, how="vertical_relaxed").cast(UNIT_SCHEMA)  # pyright: ignore[reportArgumentType] a schema mapping is what cast takes
        if frames
        else pl.DataFrame(schema=UNIT_SCHEMA)
    )
    return RunRecords(attempts, units)


def warn(message: str) -> None:
    _log(logging.WARNING, message)


def info(message: str) -> None:
    _log(logging.INFO, message)


def _log(level: int, message: str) -> None:
    try:
        logger: Any = get_run_logger()
    except Exception:  # outside a flow run
        logger = logging.getLogger("nightshift")
    logger.log(level, message)
