"""``nightshift preview SPEC --rows 3``: a pipeline on a few rows, tokens streamed live.

Preview runs the spec's operators in this process on the first rows of the source, with
no Prefect flow run and **without touching the step store**: no staging of JSONL/CSV
inputs, no probe write, no batch outputs, no manifests (the store is not even resolved).
It is for trying a prompt before a night's run.

* Rows: the first ``rows`` source rows that reach the first LLM step (rows dropped by an
  earlier ``filter``/``dedup`` are replaced by the next ones, reading at most
  ``max_scan`` source rows); then every step runs on those rows. A barrier (``dedup``)
  sees only the rows read.
* LLM steps run on one engine per serving config, started for the preview (or the
  engines of an enclosing :func:`nightshift.serving.runner.shared_serving`). Each row's reply
  streams to the terminal token by token as the engine produces it, one row after the
  other, after a dimmed line showing the row's prompt. A backend that cannot stream
  prints each reply whole.
* ``devices`` is ignored (one local engine); other engine options apply as in a run.
* At the end, the rows are printed, one ``column: value`` line each (long texts cut).

Greedy replies in a preview equal those of a run: the vLLM backend's outputs do not
depend on how requests are batched (asserted in the test suite).

Example::

    from nightshift.flows.preview import preview

    df = preview("examples/nightly.yaml", rows=3)     # prints as it goes, returns the rows
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console

from nightshift.blocks.serving_config import BackendConfig
from nightshift.core import file_io
from nightshift.core.errors import NightshiftError, SpecError
from nightshift.core.usage import Usage
from nightshift.serving.interface import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ResultCallback,
    report,
)
from nightshift.serving.pool import ServingPool, build_backend
from nightshift.serving.runner import shared_pool_for
from nightshift.serving.streaming import stream
from nightshift.tasks.batches import with_row_ids
from nightshift.tasks.operators import ROW_ID, BarrierOperator, Operator, apply_operator
from nightshift.tasks.sources import SourceFile, discover, filesystem, load_text_file
from nightshift.tasks.spec import PipelineSpec, load_spec, resolve_serving
from nightshift.tasks.stages import dry_run

__all__ = ["preview", "read_head"]

Writer = Callable[[str], None]


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def preview(
    spec: str | Path | dict[str, Any] | PipelineSpec,
    rows: int = 3,
    *,
    allow_imports: bool = False,
    write: Writer = _stdout,
    console: Console | None = None,
    max_scan: int = 10_000,
) -> pl.DataFrame:
    """Run ``spec`` on its first ``rows`` rows, streaming LLM replies through ``write``.

    Returns the rows after the last step. Raises a one-line
    :class:`~nightshift.core.errors.NightshiftError` for a bad spec, source or column.
    """
    if rows < 1:
        raise SpecError(f"--rows {rows}: preview needs at least 1 row")
    parsed = load_spec(spec)
    operators = parsed.operators(allow_imports)
    if isinstance(operators[0], BarrierOperator):
        raise SpecError(f"steps[0] ({operators[0].name}): a barrier step cannot be the first step")
    serving = resolve_serving(parsed.serving, operators)
    files = discover(parsed.source)
    console = console or Console(soft_wrap=True)

    first_llm = next((i for i, op in enumerate(operators) if op.uses_serving), len(operators))
    head, scanned = _rows_reaching(parsed, files, operators, first_llm, rows, max_scan)
    write(
        f"preview of {parsed.name}: {head.height} row(s) from the first {scanned} source row(s); "
        "nothing is written to the store\n"
    )
    printer = _Printer(write)
    backends = {name: _StreamingBackend(name, config, printer) for name, config in serving.items()}
    pool = ServingPool(serving, backends=backends)  # handed to each LLM step
    df = head
    try:
        for i, op in enumerate(operators[first_llm:], start=first_llm):
            if op.uses_serving:
                printer.label = f"steps[{i}] {op.name} → {getattr(op, 'output', '?')}"
            try:
                df = _apply(op, df, pool)
            except NightshiftError as exc:
                raise NightshiftError(f"steps[{i}] ({op.name}): {exc}") from None
    finally:
        pool.close()
        for backend in backends.values():
            backend.close()
    _print_rows(console, df.drop(ROW_ID))
    return df


def read_head(spec: PipelineSpec, files: Sequence[SourceFile], n: int) -> pl.DataFrame:
    """The first ``n`` source rows (in batch order), with their ``_row_id``; reads
    sources directly, never the store."""
    frames: list[pl.DataFrame] = []
    left = n
    for file in files:
        if left <= 0:
            break
        if file.format == "parquet":
            fs, path = filesystem(file.uri, spec.source.storage_options)
            df = file_io.read_slice(fs, path, 0, left)
        else:
            df = load_text_file(file, spec.source.storage_options).head(left)
        frames.append(with_row_ids(df, file))
        left -= df.height
    if not frames:
        return pl.DataFrame(schema={ROW_ID: pl.UInt64})
    return pl.concat(frames, how="diagonal_relaxed")


def _rows_reaching(
    spec: PipelineSpec,
    files: Sequence[SourceFile],
    operators: list[Operator],
    first_llm: int,
    rows: int,
    max_scan: int,
) -> tuple[pl.DataFrame, int]:
    """Source rows through the steps before the first LLM step until ``rows`` survive
    (reading more if needed); every step is dry-run on the source schema first."""
    want = rows
    checked = False
    while True:
        source = read_head(spec, files, want)
        if not checked:
            dry_run(operators, source.drop(ROW_ID).clear().schema)
            checked = True
        df = source
        for i, op in enumerate(operators[:first_llm]):
            try:
                df = _apply(op, df)
            except NightshiftError as exc:
                raise NightshiftError(f"steps[{i}] ({op.name}): {exc}") from None
        exhausted = source.height < want
        if df.height >= rows or exhausted or want >= max_scan:
            return df.head(rows), source.height
        want = min(max_scan, want * 4)


def _apply(op: Operator, df: pl.DataFrame, pool: ServingPool | None = None) -> pl.DataFrame:
    state = op.index(df.lazy()) if isinstance(op, BarrierOperator) else None
    return apply_operator(op, df, state, pool)


class _Printer:
    """Where replies are written and which step they belong to (shared by the backends)."""

    def __init__(self, write: Writer) -> None:
        self.write = write
        self.label = ""


class _StreamingBackend:
    """A :class:`~nightshift.serving.interface.Backend` that streams each reply to the
    printer, row after row, through the backend of one serving name: an engine kept up
    by the caller (:func:`~nightshift.serving.runner.shared_serving`: tests, notebooks),
    else one it starts on first use and closes at the end."""

    def __init__(self, name: str, config: BackendConfig, printer: _Printer) -> None:
        self.name, self.config, self.printer = name, config, printer
        self._inner: Backend | None = None
        self._owned = False

    def _backend(self) -> Backend:
        if self._inner is None:
            shared = shared_pool_for({self.name: self.config})
            if shared is not None:
                self._inner = shared.backend(self.name)
            else:
                self.printer.write(
                    f"starting {self.config.backend} backend for serving "
                    f"{self.name!r} ({self.config.model})...\n"
                )
                self._inner, self._owned = build_backend(self.config), True
        return self._inner

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
    ) -> list[GenerationResult]:
        backend = self._backend()
        write = self.printer.write
        results: list[GenerationResult] = []
        for number, request in enumerate(requests, start=1):
            prompt = " ".join(request.last_text().split())
            write(f"\n[{self.printer.label}] row {number}/{len(requests)}\n")
            write(f"\x1b[2m> {prompt[:200]}\x1b[0m\n" if _color() else f"> {prompt[:200]}\n")
            result: GenerationResult | None = None
            for event in stream(backend, [request]):
                if event.result is not None:
                    result = event.result
                elif event.delta:
                    write(event.delta)
            assert result is not None
            if result.error is not None:
                write(f"error: {result.error}\n")
            else:
                write(f"\n  ({result.completion_tokens} tokens, {result.finish_reason})\n")
            report([result], None, usage)
            if on_result is not None:
                on_result(number - 1, result)
            results.append(result)
        return results

    def identity(self) -> dict[str, Any]:
        return self._backend().identity()

    def close(self) -> None:
        if self._owned and self._inner is not None:
            self._inner.close()
        self._inner = None


def _color() -> bool:
    return sys.stdout.isatty()


def _print_rows(console: Console, df: pl.DataFrame, width: int = 160) -> None:
    """Each row as ``column: value`` lines (long values cut), one block per row."""
    console.print(f"\n{df.height} row(s) after the last step:", markup=False, highlight=False)
    for number, row in enumerate(df.iter_rows(named=True), start=1):
        console.print(f"-- row {number}", markup=False, highlight=False)
        for column, value in row.items():
            text = "" if value is None else " ".join(str(value).split())
            text = text if len(text) <= width else text[: width - 1] + "…"
            console.print(f"  {column}: {text}", markup=False, highlight=False)
