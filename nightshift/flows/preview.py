"""``nightshift preview SPEC --rows 3``: a pipeline on a few rows, tokens streamed live.

Preview runs the spec's operators in this process on the first rows of the source, with
no Prefect flow run and **without touching the step store**: no staging of JSONL/CSV
inputs, no probe write, no batch outputs, no manifests (the store is not even resolved).
It is for trying a prompt before a night's run.

* Steps run as a run runs them: a chain, or a DAG (``after:``, branches, joins on
  ``_row_id``, ``tasks/dag.py``) in its topological order; the rows shown are the sink's
  (the step nothing comes after; the last in that order if there are several).
* Rows: the first ``rows`` source rows that reach the first LLM step (of each branch):
  rows dropped by an earlier ``filter``/``dedup`` are replaced by the next ones, reading
  at most ``max_scan`` source rows; then every later step runs on what its parents made.
  The steps before any LLM step see every row read; a barrier (``dedup``) sees only them.
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
from nightshift.tasks.dag import JoinSpec, StepNode, join_frames, topological_order
from nightshift.tasks.operators import ROW_ID, BarrierOperator, Operator, apply_operator
from nightshift.tasks.sources import SourceFile, discover, filesystem, load_text_file
from nightshift.tasks.spec import PipelineSpec, load_spec, resolve_serving
from nightshift.tasks.stages import dry_run_dag

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
    nodes = parsed.step_nodes(allow_imports)  # a chain, or a DAG (after:, joins)
    serving = resolve_serving(parsed.serving, [node.operator for node in nodes])
    files = discover(parsed.source)
    console = console or Console(soft_wrap=True)

    walk, reaching = _rows_reaching(parsed, files, nodes, rows, max_scan)
    firsts = walk.first_llm_steps()
    write(
        f"preview of {parsed.name}: {min(rows, reaching)} row(s) from the first "
        f"{walk.source.height} source row(s); nothing is written to the store\n"
    )
    printer = _Printer(write)
    backends = {name: _StreamingBackend(name, config, printer) for name, config in serving.items()}
    pool = ServingPool(serving, backends=backends)  # handed to each LLM step
    try:
        for i in walk.order:
            if i in walk.frames:
                continue
            node = nodes[i]
            if node.operator.uses_serving:
                output = getattr(node.operator, "output", "?")
                printer.label = f"steps[{i}] {node.operator.name} → {output}"
            df = walk.input(i)
            # at most ``rows`` rows go into a first LLM step (the scan may have read more)
            walk.frames[i] = _step(node, df.head(rows) if i in firsts else df, pool)
    finally:
        pool.close()
        for backend in backends.values():
            backend.close()
    last = walk.frames[walk.order[-1]]
    shown = last if firsts else last.head(rows)
    _print_rows(console, shown.drop(ROW_ID))
    return shown


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


class _Walk:
    """A preview's pass over the steps in their topological order: the source rows read,
    each step's output so far (by spec index), and how each join is made."""

    def __init__(
        self,
        nodes: list[StepNode],
        order: list[int],
        joins: dict[int, JoinSpec],
        source: pl.DataFrame,
    ) -> None:
        self.nodes = nodes
        self.order = order
        self.joins = joins
        self.source = source
        self.frames: dict[int, pl.DataFrame] = {}
        #: the steps with no LLM step among themselves and their ancestors
        self.cheap: set[int] = set()
        for i in self.order:
            node = nodes[i]
            if not node.operator.uses_serving and all(p in self.cheap for p in node.parents):
                self.cheap.add(i)

    def input(self, i: int) -> pl.DataFrame:
        """Step ``i``'s input: the source rows, its parent's output, or its parents'
        outputs joined (``tasks/dag.py``)."""
        node = self.nodes[i]
        if not node.parents:
            return self.source
        if len(node.parents) == 1:
            return self.frames[node.parents[0]]
        return join_frames([self.frames[p] for p in node.parents], self.joins[i])

    def first_llm_steps(self) -> list[int]:
        """The LLM steps (and what follows them) whose inputs come from cheap steps only."""
        return [
            i
            for i in self.order
            if i not in self.cheap and all(p in self.cheap for p in self.nodes[i].parents)
        ]

    def run_cheap_steps(self) -> None:
        for i in self.order:
            if i in self.cheap:
                self.frames[i] = _step(self.nodes[i], self.input(i))


def _rows_reaching(
    spec: PipelineSpec,
    files: Sequence[SourceFile],
    nodes: list[StepNode],
    rows: int,
    max_scan: int,
) -> tuple[_Walk, int]:
    """Source rows through the steps that no LLM step precedes, until ``rows`` of them
    reach every first LLM step (reading more if a filter dropped some). Returns that walk
    and how many rows reach them (or the last step, in a pipeline without LLM steps)."""
    want = rows
    order = topological_order(nodes)
    joins: dict[int, JoinSpec] | None = None
    while True:
        source = read_head(spec, files, want)
        if joins is None:  # every step dry-run on the source schema first, once
            joins = dry_run_dag(nodes, order, source.drop(ROW_ID).clear().schema).joins
        walk = _Walk(nodes, order, joins, source)
        walk.run_cheap_steps()
        firsts = walk.first_llm_steps()
        if firsts:
            reaching = min(walk.input(i).height for i in firsts)
        else:  # no LLM step: the last step's rows are what is shown
            reaching = walk.frames[walk.order[-1]].height
        exhausted = walk.source.height < want
        if reaching >= rows or exhausted or want >= max_scan:
            return walk, reaching
        want = min(max_scan, want * 4)


def _step(node: StepNode, df: pl.DataFrame, pool: ServingPool | None = None) -> pl.DataFrame:
    try:
        return _apply(node.operator, df, pool)
    except NightshiftError as exc:
        raise NightshiftError(f"{node.where}: {exc}") from None


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
