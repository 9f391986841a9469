"""The ``nightshift`` command: run, status, export and validate a YAML pipeline spec.

Errors in the spec, the data or the store print one line (``error: ...``) and exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.outputs import export as export_output
from flows.outputs import step_status
from flows.plan import build_plan
from flows.spec import PipelineSpec, load_spec
from tasks.errors import NightshiftError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Piped output (make, CI logs, a worker's log) gets no terminal width: rich would assume
# 80 columns and cut step names, so give it room.
console = Console() if Console().is_terminal else Console(width=160)
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="pipeline spec (YAML)")]
AllowImports = Annotated[
    bool, typer.Option("--allow-imports", help="allow operators given as module:Class")
]


def _spec(path: Path, batch_size: int | None = None) -> PipelineSpec:
    spec = load_spec(path)
    if batch_size is not None:
        spec = PipelineSpec.model_validate({**spec.model_dump(), "batch_size": batch_size})
    return spec


@app.command()
def run(
    spec: SpecArg,
    batch_size: Annotated[Optional[int], typer.Option(help="override batch_size")] = None,
    resume_step: Annotated[
        Optional[int], typer.Option(help="recompute from this step index on")
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="recompute every step")] = False,
    allow_imports: AllowImports = False,
) -> None:
    """Run the pipeline, resuming from the batches already in the store."""
    from flows.run_pipeline import run_pipeline

    parsed = _spec(spec, batch_size)
    build_plan(parsed, allow_imports=allow_imports)  # every check, before any work
    state = run_pipeline(
        spec=parsed.model_dump(mode="json"),
        resume_from_last=False if (fresh or resume_step is not None) else None,
        resume_step=resume_step,
        allow_imports=allow_imports,
        return_state=True,
    )
    if not state.is_completed():
        raise NightshiftError(state.message or f"flow run ended {state.name}")
    summary = state.result()
    _print_steps(summary["steps"])


def _print_steps(rows: list[dict]) -> None:
    llm = any(r.get("prompt_tokens") or r.get("completion_tokens") for r in rows)
    priced = any(r.get("cost_usd") for r in rows)
    columns = ["step", "batches", "cached", "reused", "computed", "failed", "rows in", "rows out"]
    table = Table(*columns, *(["tokens in", "tokens out"] if llm else []),
                  *(["cost $"] if priced else []))
    for r in rows:
        cells = [r["name"], *(str(r[k]) for k in ("batches", "cached", "reused", "computed",
                                                  "failed", "rows_in", "rows_out"))]
        if llm:
            cells += [str(r.get("prompt_tokens", 0)), str(r.get("completion_tokens", 0))]
        if priced:
            cells.append(f"{r.get('cost_usd', 0.0):.4f}")
        table.add_row(*cells)
    console.print(table)


@app.command()
def status(spec: SpecArg, allow_imports: AllowImports = False) -> None:
    """Per step: batches done / total and rows, read from the store."""
    plan = build_plan(_spec(spec), allow_imports=allow_imports)
    table = Table("step", "steps", "batches done", "rows")
    for s in step_status(plan):
        table.add_row(s.stage, ",".join(map(str, s.steps)), f"{s.done}/{s.total}", str(s.rows))
    console.print(table)


@app.command()
def export(
    spec: SpecArg,
    to: Annotated[Path, typer.Option("--to", help="out.parquet or out.jsonl")],
    allow_imports: AllowImports = False,
) -> None:
    """Write the final step's rows, in source order, to one file."""
    plan = build_plan(_spec(spec), allow_imports=allow_imports)
    rows = export_output(plan, to)
    console.print(f"wrote {rows} rows to {to}")


@app.command()
def validate(spec: SpecArg, allow_imports: AllowImports = False) -> None:
    """Check the spec, the sources, the schema and the store; run nothing."""
    plan = build_plan(_spec(spec), allow_imports=allow_imports)
    console.print(
        f"ok: {len(plan.files)} file(s), {len(plan.batches)} batch(es), "
        f"{len(plan.stages)} stage(s)"
    )


@app.command()
def preview(
    spec: SpecArg,
    rows: Annotated[int, typer.Option("--rows", help="rows to run through the pipeline")] = 3,
    allow_imports: AllowImports = False,
) -> None:
    """Run the pipeline on a few rows, streaming LLM replies; the store is not touched."""
    from flows.preview import preview as run_preview

    run_preview(_spec(spec), rows=rows, allow_imports=allow_imports, console=console)


@app.command()
def stream(
    spec: Annotated[Path, typer.Argument(help="stream spec (YAML, with streams:)")],
    until_idle: Annotated[Optional[float], typer.Option(
        "--until-idle", help="stop once a stream has had nothing to do for this many seconds")] = None,
    check: Annotated[bool, typer.Option("--check", help="connect and check everything; run nothing")] = False,
    allow_imports: AllowImports = False,
) -> None:
    """Run stream pipelines (NATS JetStream -> windows -> steps -> sinks) until stopped."""
    from flows.stream import run_stream

    summary = run_stream(spec, until_idle_s=until_idle, check_only=check, allow_imports=allow_imports)
    console.print_json(data=summary)


def main() -> None:
    try:
        app(standalone_mode=False)
    except NightshiftError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise


if __name__ == "__main__":
    main()
