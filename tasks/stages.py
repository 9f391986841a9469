"""Stages and the schema dry run: what the batch planner, the stream planner and preview
share about a list of operators.

A stage is one Prefect task per unit of work: one operator, or several consecutive
fusable (cheap, row-local) ones. :func:`dry_run` runs every operator on an empty frame of
a schema, so missing columns, wrong types and bad expressions fail before any data is
read, naming the step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import polars as pl

from nightshift.blocks.serving_config import ServingConfig
from nightshift.core.errors import NightshiftError, SpecError, one_line
from nightshift.tasks.operators import ROW_ID, BarrierOperator, Operator, apply_operator


@dataclass
class Stage:
    """One Prefect task per unit: one operator, or several fused row-local ones."""

    index: int
    first_step: int
    operators: list[Operator]
    fingerprint: str
    #: rows per task when smaller than the pipeline's batch_size, else None (whole batches)
    batch_size: int | None = None

    @property
    def barrier(self) -> BarrierOperator | None:
        op = self.operators[0]
        return op if isinstance(op, BarrierOperator) else None

    @property
    def steps(self) -> range:
        return range(self.first_step, self.first_step + len(self.operators))

    @functools.cached_property
    def dirname(self) -> str:
        return f"{self.index:02d}-" + "+".join(op.name or type(op).__name__ for op in self.operators)



def build_stages(
    operators: list[Operator],
    fuse: bool,
    context: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> list[Stage]:
    """Group operators into stages: consecutive fusable ones with the same rows per task
    share one; a step's own ``batch_size`` below the pipeline's makes it cut batches."""

    def size(op: Operator) -> int | None:
        if op.batch_size is None or batch_size is None or op.batch_size >= batch_size:
            return None
        return op.batch_size

    groups: list[list[Operator]] = []
    for op in operators:
        last = groups[-1][-1] if groups else None
        if fuse and last is not None and op.fusable and last.fusable and size(op) == size(last):
            groups[-1].append(op)
        else:
            groups.append([op])
    stages, upstream, first = [], "source", 0
    for index, ops in enumerate(groups):
        for op in ops:
            upstream = op.fingerprint(upstream, context)
        stages.append(Stage(index, first, ops, upstream, size(ops[0])))
        first += len(ops)
    return stages


def serving_identities(serving: dict[str, ServingConfig]) -> dict[str, Any]:
    """What each serving config contributes to the step keys (``build_stages``'s
    ``context["serving"]``); a model that cannot be found (a local path that is not
    there) is a one-line error naming the serving entry."""
    identities = {}
    for name, config in serving.items():
        try:
            identities[name] = config.identity()
        except NightshiftError as exc:
            raise SpecError(f"serving.{name}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise SpecError(f"serving.{name}: {one_line(exc)}") from None
    return identities


def column_list(columns: list[str], limit: int = 20) -> str:
    """The columns an error names (``_row_id`` left out, at most ``limit`` of them)."""
    names = [c for c in columns if c != ROW_ID]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def dry_run(operators: list[Operator], schema: pl.Schema, on: str | None = None) -> pl.Schema:
    """Run every operator on an empty frame of ``schema`` (``_row_id`` added when it lacks
    one) and return the output schema; a one-line :class:`SpecError` names the step (and
    ``on``, the source file, when given)."""
    df = pl.DataFrame(schema=schema if ROW_ID in schema else {ROW_ID: pl.UInt64, **schema})
    source = f" on {on}" if on else ""
    for i, op in enumerate(operators):
        where = f"steps[{i}] ({op.name or op.import_path()})"
        if ROW_ID in op.writes():
            raise SpecError(
                f"{where}: writes the reserved column {ROW_ID} (the engine's row identity, "
                "which dedup and resume rely on); give the column another name"
            )
        missing = [c for c in op.reads() if c not in df.columns]
        if missing:
            raise SpecError(
                f"{where}: missing column {', '.join(missing)}{source} "
                f"(columns: {column_list(df.columns)})"
            )
        try:
            state = op.index(df.lazy()) if isinstance(op, BarrierOperator) else None
            df = apply_operator(op, df, state)
        except NightshiftError as exc:
            raise SpecError(f"{where}{source}: {exc}") from None
        except Exception as exc:  # polars type/column errors
            raise SpecError(f"{where}{source}: {one_line(exc)}") from None
    return df.schema
