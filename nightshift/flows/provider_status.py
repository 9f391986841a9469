"""The provider batches (``mode: batch``) a pipeline has in its store: list, cancel.

``nightshift status SPEC`` shows the ones not collected yet; ``nightshift cancel SPEC``
cancels them at the provider (what it already answered is still collected by the next
run; the rest become row errors, "cancelled", and are not sent again). Records are
written by ``nightshift.tasks.provider_batches`` under
``<pipeline>/provider-batches/<stage>/<unit>/`` and deleted with the unit's answers once
its output is written.

Example::

    plan = build_plan(load_spec("nightly.yaml"))
    for row in provider_batches(plan):
        print(row["stage"], row["batch_id"], row["status"])
"""

from __future__ import annotations

from typing import Any

from nightshift.blocks.serving_config import OpenAICompatibleConfig
from nightshift.core.errors import NightshiftError, one_line
from nightshift.core.layout import provider_batches_dir
from nightshift.flows.plan import Plan
from nightshift.serving.http.batch_api import FINAL, BatchAPIError
from nightshift.tasks.provider_batches import BatchRecord, batch_api_for, load_records

__all__ = ["cancel_pending", "provider_batches", "unit_settled"]


def _records(plan: Plan) -> list[tuple[str, str, str, BatchRecord]]:
    """``(stage, unit, directory, record)`` for every record in the pipeline's store."""
    fs = plan.store.fs
    base = plan.layout.provider_batches_dir()
    try:
        found = [str(p) for p in fs.glob(f"{base}/*/*/a*-p*.json")]  # pyright: ignore[reportGeneralTypeIssues] fsspec glob: a list of paths
        units = sorted({p.rsplit("/", 1)[0] for p in found})
    except FileNotFoundError:
        return []
    out = []
    for directory in units:
        stage, unit = directory.rsplit("/", 2)[-2:]
        out.extend((stage, unit, directory, r) for r in load_records(plan.store, directory))
    return out


def provider_batches(plan: Plan, pending_only: bool = False) -> list[dict[str, Any]]:
    """One row per provider batch recorded in the store (``pending_only``: those whose
    answers are not collected yet), as last seen by a run."""
    rows = []
    for stage, unit, _, r in _records(plan):
        if pending_only and r.collected:
            continue
        rows.append(
            {
                "stage": stage,
                "unit": unit,
                "batch_id": r.batch_id or "(not created)",
                "attempt": r.attempt,
                "part": r.part,
                "requests": len(r.ids),
                "status": r.status if r.batch_id else "submitting",
                "completed": r.counts.get("completed", 0),
                "failed": r.counts.get("failed", 0),
                "collected": r.collected,
                "submitted_at": r.submitted_at,
            }
        )
    return rows


def _config_for(plan: Plan, base_url: str) -> OpenAICompatibleConfig:
    for config in plan.serving.values():
        url = config.base_url if isinstance(config, OpenAICompatibleConfig) else None
        if url and url.rstrip("/") == base_url.rstrip("/"):
            return config  # type: ignore[return-value] - url set: an OpenAICompatibleConfig
    raise NightshiftError(
        f"no serving config of this spec sends to {base_url}: cannot cancel its batches"
    )


def unit_settled(plan: Plan, out_path: str) -> bool:
    """True when the unit's step task has something to do: each of its live provider
    batches is finished at the provider (or was never created). One ``GET`` per live
    batch; the records are brought up to date (state, request counts) for ``nightshift
    status`` and the run's table."""
    directory = provider_batches_dir(out_path)
    for record in load_records(plan.store, directory):
        if record.collected:
            continue
        if record.batch_id is None:
            return True
        with batch_api_for(_config_for(plan, record.base_url)) as api:
            batch = api.retrieve(record.batch_id)
        status = str(batch.get("status"))
        counts = {k: int(v) for k, v in (batch.get("request_counts") or {}).items()}
        if (status, counts) != (record.status, record.counts):
            record.status, record.counts = status, counts
            plan.store.write_json(f"{directory}/{record.name}", record.as_dict())
        if status not in FINAL:
            return False
    return True


def cancel_pending(plan: Plan) -> list[tuple[str, str]]:
    """Cancel every provider batch of the pipeline not finished at the provider;
    ``(batch id, status after the cancel)`` of each one cancelled (one finished already
    is left alone; its record is brought up to date)."""
    done: list[tuple[str, str]] = []
    for _, _, directory, record in _records(plan):
        if record.collected or record.batch_id is None:
            continue
        config = _config_for(plan, record.base_url)
        with batch_api_for(config) as api:
            try:
                batch = api.retrieve(record.batch_id)
                live = batch.get("status") not in FINAL
                if live:
                    batch = api.cancel(record.batch_id)
            except BatchAPIError as exc:
                raise NightshiftError(f"batch {record.batch_id}: {one_line(exc)}") from None
        record.status = str(batch.get("status"))
        plan.store.write_json(f"{directory}/{record.name}", record.as_dict())
        if live:
            done.append((record.batch_id, record.status))
    return done
