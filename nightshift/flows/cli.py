"""The ``nightshift`` command line (entry point ``nightshift.flows.cli:main``).

* Errors in the spec, the data or the store print one line (``error: ...``) and exit 2.
* Usage errors (an unknown command or option, a missing or malformed argument) print
  ``error: ...``, the command's usage line and a ``--help`` hint, and exit 2; no
  traceback. ``nightshift`` with no arguments prints the help on stderr and exits 2, as
  click does (a bare command is a usage error, not a request for help).
* ``--help``, ``--version`` and usage errors import neither Prefect, polars nor vLLM:
  those imports live in the command bodies (``tests/test_cli.py`` asserts it).
* A vLLM engine start logs one line; ``--verbose`` (or ``NIGHTSHIFT_LOG_LEVEL=DEBUG``)
  shows vLLM's whole start-up log and the traceback of an unexpected error: one switch,
  ``nightshift.core.verbose``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from nightshift.core.errors import NightshiftError, one_line
from nightshift.core.verbose import is_verbose, set_verbose

if TYPE_CHECKING:
    from nightshift.tasks.spec import PipelineSpec

HELP = """Batched, resumable LLM data pipelines: check, run, inspect and export a YAML
pipeline spec.

Errors in the spec, the data or the store print one line (error: ...) and exit 2.
"""

# Plain (click-style) help: flags are shown as flags, without a <bool> type column.
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, rich_markup_mode=None)
# Piped output (make, CI logs, a worker's log) gets no terminal width: rich would assume
# 80 columns and cut step names, so give it room.
console = Console() if Console().is_terminal else Console(width=160)
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(metavar="SPEC", help="pipeline spec (YAML)")]
AllowImports = Annotated[
    bool, typer.Option("--allow-imports", help="allow operators given as module:Class")
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="show every task run's state line, the LLM engine's full start-up log and "
        "tracebacks (also: NIGHTSHIFT_LOG_LEVEL=DEBUG)",
    ),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("nightshift")
        except PackageNotFoundError:
            installed = "unknown (not installed as a distribution)"
        print(f"nightshift {installed}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    pass


def _verbose(verbose: bool, *, log_to_stderr: bool = False) -> None:
    """``--verbose`` turns on the one verbose switch (``nightshift.core.verbose``, kept in
    the environment so that engines started in worker processes of this run see it too).
    ``log_to_stderr``: show Nightshift's own INFO lines (the one line per engine start) on
    stderr, for commands that run outside a Prefect flow run (in one, Prefect's loggers
    show them)."""
    if verbose:
        set_verbose()
    if log_to_stderr:
        import logging

        logger = logging.getLogger("nightshift")
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG if verbose else logging.INFO)
            logger.propagate = False


def _spec(path: Path, batch_size: int | None = None) -> PipelineSpec:
    from nightshift.tasks.spec import PipelineSpec, load_spec

    spec = load_spec(path)
    if batch_size is not None:
        spec = PipelineSpec.model_validate({**spec.model_dump(), "batch_size": batch_size})
    return spec


@app.command()
def run(
    spec: SpecArg,
    batch_size: Annotated[int | None, typer.Option(help="override batch_size")] = None,
    resume_step: Annotated[
        str | None,
        typer.Option(
            help="recompute this step (its number NN as in NN-name, or a name) and the steps "
            "that depend on it"
        ),
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="recompute every step")] = False,
    budget: Annotated[
        float | None,
        typer.Option(help="the most this run may spend on LLM calls, US dollars"),
    ] = None,
    heartbeats: Annotated[
        bool | None,
        typer.Option(
            "--heartbeats/--no-heartbeats",
            help="send Prefect's flow run heartbeats (crash detection); default: off for "
            "a run started here, or as NIGHTSHIFT_HEARTBEATS=on|off says",
            show_default=False,
        ),
    ] = None,
    allow_imports: AllowImports = False,
    verbose: Verbose = False,
) -> None:
    """Run the pipeline; batches done in the store are not recomputed.

    On a terminal, one live bar per step; otherwise a progress line per running step now
    and then (docs/engine.md, "Watching a run"). Task runs' "Finished in state" lines
    only with --verbose.
    """
    from nightshift.flows.local_api import prepare_temporary_database

    _verbose(verbose)
    prepare_temporary_database()  # first, while this process is small (see there)
    from nightshift.flows.live import live_progress
    from nightshift.flows.pipeline import run_spec

    with live_progress():
        summary = run_spec(
            _spec(spec, batch_size),
            resume_from_last=False if (fresh or resume_step is not None) else None,
            resume_step=resume_step,
            allow_imports=allow_imports,
            budget=budget,
            heartbeats=heartbeats,
        )
    _print_steps(summary["steps"])
    if summary.get("left"):
        from nightshift.flows.run_pipeline import pending_message

        console.print(pending_message(summary), markup=False, highlight=False)
    if summary.get("report"):
        console.print(f"run report: {summary['report']}")


def _print_steps(rows: list[dict]) -> None:
    llm = any(r.get("prompt_tokens") or r.get("completion_tokens") for r in rows)
    priced = any(r.get("cost_usd") for r in rows)
    # mode: batch: what the same tokens cost online, next to what they cost
    discounted = any((r.get("online_cost_usd") or 0) > (r.get("cost_usd") or 0) for r in rows)
    columns = ["step", "batches", "reused", "computed", "failed", "rows in", "rows out"]
    table = Table(
        *columns,
        *(["tokens in", "tokens out"] if llm else []),
        *(["cost $"] if priced else []),
        *(["online $"] if discounted else []),
    )
    for r in rows:
        cells = [
            r["name"],
            *(
                f"{r[k]:,}"
                for k in ("batches", "reused", "computed", "failed", "rows_in", "rows_out")
            ),
        ]
        if llm:
            cells += [f"{r.get('prompt_tokens', 0):,}", f"{r.get('completion_tokens', 0):,}"]
        if priced:
            cells.append(f"{r.get('cost_usd', 0.0):.4f}")
        if discounted:
            cells.append(f"{r.get('online_cost_usd') or 0.0:.4f}")
        table.add_row(*cells)
    console.print(table)


StepOpt = Annotated[
    str | None,
    typer.Option("--step", metavar="NAME", help="a step by name or number (NN, as in NN-name)"),
]


@app.command()
def status(spec: SpecArg, step: StepOpt = None, allow_imports: AllowImports = False) -> None:
    """Per step: batches done / total, rows in and rows out, read from the store."""
    from nightshift.flows.outputs import step_status
    from nightshift.flows.plan import build_plan

    plan = build_plan(_spec(spec), allow_imports=allow_imports)
    dag = not plan.linear
    table = Table(
        "step", "steps", *(["after"] if dag else []), "batches done", "rows in", "rows out"
    )
    for s in step_status(plan, step):
        steps = ", ".join(s.names)
        table.add_row(
            s.stage,
            steps,
            *([", ".join(s.after) or "source"] if dag else []),
            f"{s.done}/{s.total}",
            str(s.rows_in),
            str(s.rows),
        )
    console.print(table)
    _print_provider_batches(plan)


def _print_provider_batches(plan: Any) -> None:
    """The pipeline's provider batches not collected yet (``mode: batch``), if any."""
    from nightshift.flows.provider_status import provider_batches

    rows = provider_batches(plan, pending_only=True)
    if not rows:
        return
    table = Table("step", "unit", "provider batch", "attempt", "requests", "status", "done")
    for r in rows:
        table.add_row(
            r["stage"],
            r["unit"],
            r["batch_id"],
            str(r["attempt"]),
            str(r["requests"]),
            r["status"],
            f"{r['completed']}/{r['requests']}",
        )
    console.print(f"{len(rows)} provider batch(es) pending:", markup=False, highlight=False)
    console.print(table)


@app.command()
def cancel(spec: SpecArg, allow_imports: AllowImports = False) -> None:
    """Cancel the pipeline's provider batches (mode: batch) not finished yet.

    What the provider answered before the cancel is still collected by the next run; the
    rest become row errors ("cancelled") and are not sent again."""
    from nightshift.flows.plan import build_plan
    from nightshift.flows.provider_status import cancel_pending

    plan = build_plan(_spec(spec), allow_imports=allow_imports)
    cancelled = cancel_pending(plan)
    for batch_id, state in cancelled:
        console.print(f"{batch_id}: {state}", markup=False, highlight=False)
    console.print(f"{len(cancelled)} provider batch(es) cancelled", markup=False, highlight=False)


@app.command()
def export(
    spec: SpecArg,
    to: Annotated[Path, typer.Option("--to", help="out.parquet or out.jsonl")],
    step: Annotated[
        str | None,
        typer.Option(
            "--step",
            metavar="NAME",
            help="the step whose rows to write (default: the one step nothing comes after)",
        ),
    ] = None,
    allow_imports: AllowImports = False,
) -> None:
    """Write the final step's rows, in source order, to one file."""
    from nightshift.flows.outputs import export as export_output
    from nightshift.flows.plan import build_plan

    plan = build_plan(_spec(spec), allow_imports=allow_imports)
    rows = export_output(plan, to, step)
    console.print(f"wrote {rows} rows to {to}")


@app.command()
def report(
    spec: SpecArg,
    to: Annotated[
        Path | None,
        typer.Option("--to", help="the HTML file to write (default: <pipeline>-report.html)"),
    ] = None,
    allow_imports: AllowImports = False,
) -> None:
    """Write the run report: one HTML file with charts and samples that opens offline."""
    from nightshift.flows.plan import build_plan
    from nightshift.flows.report import write_report

    plan = build_plan(_spec(spec), allow_imports=allow_imports)
    target = to or Path(f"{plan.spec.name}-report.html")
    built = write_report(plan, target)
    console.print(
        f"wrote {target} ({len(built.charts)} charts; {built.attempts} recorded attempt(s), "
        f"{built.units:,} unit records; built in {built.seconds:.1f} s)"
    )


@app.command()
def validate(spec: SpecArg, allow_imports: AllowImports = False) -> None:
    """Check the spec, sources, schema and store; run nothing."""
    from nightshift.flows.parameters import check_parameter_size
    from nightshift.flows.plan import build_plan

    plan = build_plan(_spec(spec), allow_imports=allow_imports)
    check_parameter_size({"spec": plan.spec.model_dump(mode="json")}, str(spec))
    console.print(
        f"ok: {len(plan.files)} file(s), {len(plan.batches)} batch(es), {len(plan.stages)} stage(s)"
    )
    if not plan.linear:
        for s in plan.stages:
            after = ", ".join(plan.stages[p].name for p in s.parents) or "source"
            console.print(f"  {s.name}: after {after}", markup=False, highlight=False)


@app.command()
def preview(
    spec: SpecArg,
    rows: Annotated[int, typer.Option("--rows", help="rows to run through the pipeline")] = 3,
    allow_imports: AllowImports = False,
    verbose: Verbose = False,
) -> None:
    """Run the pipeline on a few rows, streaming LLM replies.

    Nothing is read from or written to the step store.
    """
    from nightshift.flows.preview import preview as run_preview

    _verbose(verbose, log_to_stderr=True)
    run_preview(_spec(spec), rows=rows, allow_imports=allow_imports, console=console)


class _StreamGroup(TyperGroup):
    """``nightshift stream SPEC ...`` is ``nightshift stream run SPEC ...``: the first word,
    when it is not a subcommand (nor --help), is the spec of the default command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


stream_app = typer.Typer(
    cls=_StreamGroup,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Run stream pipelines (NATS JetStream to sinks), or export a stream's store sink.\n\n"
    "nightshift stream SPEC [OPTIONS] is short for nightshift stream run SPEC [OPTIONS].",
)
app.add_typer(stream_app, name="stream")


@stream_app.command("run")
def stream_run(
    spec: Annotated[Path, typer.Argument(help="stream spec (YAML, with streams: or discover:)")],
    until_idle: Annotated[
        float | None,
        typer.Option(
            "--until-idle", help="stop once a stream has had nothing to do for this many seconds"
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="connect and check everything; run nothing")
    ] = False,
    discover: Annotated[
        bool,
        typer.Option(
            "--discover",
            help="also run the streams defined in the spec's discover: table, "
            "started, drained or restarted as its rows change",
        ),
    ] = False,
    poll: Annotated[
        float | None,
        typer.Option(
            "--poll",
            min=0.1,
            help="seconds between reads of the discover: table (default: discover.poll_s)",
        ),
    ] = None,
    allow_imports: AllowImports = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="show the traceback of a failed check or a failed stream run "
            "(also: NIGHTSHIFT_LOG_LEVEL=DEBUG)",
        ),
    ] = False,
) -> None:
    """Run stream pipelines (NATS JetStream to sinks) until stopped."""
    from nightshift.flows.stream import run_stream

    _verbose(verbose)

    summary = run_stream(
        spec,
        until_idle_s=until_idle,
        check_only=check,
        allow_imports=allow_imports,
        discover=discover,
        poll_s=poll,
    )
    console.print_json(data=summary)


@stream_app.command("export")
def stream_export(
    spec: Annotated[Path, typer.Argument(help="stream spec (YAML)")],
    stream: Annotated[str, typer.Option("--stream", help="the stream's name")],
    to: Annotated[Path, typer.Option("--to", help="output file: .parquet or .jsonl")],
) -> None:
    """Write a stream's store-sink windows as one file (each message once, stream order).

    The file is written under a temporary name and renamed into place.
    """
    from nightshift.streams.export import export_stream
    from nightshift.streams.spec import load_stream_spec

    rows, files = export_stream(load_stream_spec(spec), stream, to)
    err.print(
        f"{stream}: {rows} rows from {files} window file(s) -> {to}", markup=False, highlight=False
    )


@app.command()
def server(
    port: Annotated[
        int, typer.Option(help="port on 127.0.0.1 (runs find it there by itself)")
    ] = 4200,
) -> None:
    """Start a local Prefect server (API and UI) in the foreground.

    While it runs, nightshift run and Pipeline.run use it without PREFECT_API_URL
    (set PREFECT_SERVER_API_PORT if you choose another port), so no run pays for a
    temporary server.
    """
    import sys

    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get(
            "PREFECT_SERVER_ANALYTICS_ENABLED", "false"
        ),
    }
    prefect = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    err.print(f"Prefect server on http://127.0.0.1:{port} (UI and API); Ctrl-C stops it")
    os.execve(sys.executable, prefect, env)


def main() -> None:
    try:
        code = app(standalone_mode=False, prog_name="nightshift")
    except NightshiftError as exc:
        if is_verbose():  # the one line stays last
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:
        if not _is_usage_error(exc):
            _unexpected(exc)
        _show_usage_error(exc)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    # Without standalone mode, an Exit raised inside a command (Ctrl-C is one: 130) comes
    # back as the return value.
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _unexpected(exc: Exception) -> None:
    """Anything else (an engine that cannot start, a bug): one line and exit 1; the
    traceback with ``--verbose`` (``NIGHTSHIFT_LOG_LEVEL=DEBUG``)."""
    if is_verbose():
        raise exc
    err.print(
        f"error: {type(exc).__name__}: {one_line(exc)} (--verbose shows the traceback)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    raise SystemExit(1) from None


def _is_usage_error(exc: BaseException) -> bool:
    """A click error: typer >= 0.26 vendors click (``typer._click``, whose exceptions
    derive from ``typer.TyperException``); older typers use the ``click`` package."""
    kinds: list[type] = []
    if hasattr(typer, "TyperException"):
        kinds.append(typer.TyperException)
    if "click" in sys.modules:
        kinds.append(sys.modules["click"].ClickException)
    return isinstance(exc, tuple(kinds))


def _show_usage_error(exc: Any) -> None:
    """``error: <message>``, then the usage line and the ``--help`` hint (stderr)."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare ``nightshift``: the help
        print(exc.format_message().rstrip("\n"), file=sys.stderr)
        return
    message = " ".join(str(exc.format_message()).split())
    lines = [f"error: {message}"]
    if ctx is not None:
        lines.append(ctx.get_usage())
        lines.append(f"Try '{ctx.command_path} --help' for help.")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
