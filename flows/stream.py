"""The ``nightshift-stream`` flow: long-running stream pipelines, one per stream of a spec.

``nightshift stream SPEC`` (or the ``stream`` deployment in ``prefect.yaml``) runs it::

    nightshift stream examples/stream.yaml                 # until SIGINT/SIGTERM
    nightshift stream examples/stream.yaml --until-idle 5  # stop after 5 s with nothing to do
    nightshift stream examples/stream.yaml --check         # connect and check, run nothing

Everything is checked first (the spec, the steps on the decoded schema, NATS, the
stream and consumer, the dead-letter subject, every sink): a problem is one line. Then
each stream runs as its own subflow run (``stream-pipeline``, named after the stream),
concurrently in this process, with its windows' step tasks under it in the UI. A
supervisor restarts a stream whose run failed (NATS or PostgreSQL gone, a step failing)
after a pause that doubles up to ``restart.backoff_max_s``; the others go on. Nothing is
lost in between: unacked messages wait in JetStream. See docs/streaming.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from nightshift.core.errors import NightshiftError, StepFailed
from nightshift.streams.plan import StreamPlan, build_stream_plans
from nightshift.streams.runtime import StopControl, StreamRuntime
from nightshift.streams.spec import StreamSpec, load_stream_spec

ROOT = Path(__file__).resolve().parents[1]
# What the parent flow hands its stream subflows (not flow parameters: not serializable):
# the shared stop control and the plans it built and checked.
_PARENT: ContextVar[tuple[StopControl, StreamPlan] | None] = ContextVar(
    "nightshift_stream_parent", default=None)


def resolve_spec(spec: dict[str, Any] | str) -> StreamSpec:
    """A spec mapping, or a YAML path (relative paths also tried from the repository root,
    as a deployment's working directory may differ)."""
    if isinstance(spec, dict):
        return load_stream_spec(spec)
    path = Path(spec)
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        path = ROOT / path
    return load_stream_spec(path)


def install_stop_handlers(control: StopControl) -> dict[int, Any]:
    """SIGINT/SIGTERM request a graceful stop (a second one abandons the open windows).

    Only in the main thread (where the CLI and Prefect's process workers run flows);
    elsewhere the caller owns the signals. Returns the handlers it replaced. Prefect
    installs its own SIGTERM handler around every flow and subflow run (and puts back
    the one it found when the run ends), so each stream subflow installs these again.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    loop = asyncio.get_running_loop()
    logger = get_run_logger()

    def on_signal(sig: signal.Signals) -> None:
        first = not control.stop.is_set()
        control.request_stop(sig.name)
        logger.warning("%s: %s", sig.name,
                       "finishing the open windows (send it again to abandon them)" if first
                       else "abandoning the open windows; their messages stay for the next start")

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(on_signal, signal.Signals(signum))

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def plan_streams(spec: dict[str, Any] | str, allow_imports: bool) -> tuple[StreamSpec, list[StreamPlan]]:
    """The parsed spec and every stream's plan.

    CPython 3.11 before 3.11.8 raises ``SystemError: AST constructor recursion depth
    mismatch`` when two threads build ASTs at once (cpython#106905); planning still
    compiles Python (Jinja templates in the dry run) while Prefect's background thread
    may do the same. Operator code versions no longer parse ASTs (core/fingerprints.py);
    the plan is pure, so a remaining collision is simply retried.
    """
    for attempt in range(5):
        try:
            parsed = resolve_spec(spec)
            return parsed, build_stream_plans(parsed, allow_imports)
        except SystemError as exc:
            if "AST constructor recursion depth" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def stop_signals(control: StopControl) -> Iterator[None]:
    """:func:`install_stop_handlers` for a block; the previous handlers come back after."""
    previous = install_stop_handlers(control)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@flow(name="stream-pipeline", flow_run_name="{name}", validate_parameters=True)
async def stream_pipeline(
    spec: dict[str, Any],
    index: int,
    name: str,
    allow_imports: bool = False,
    until_idle_s: float | None = None,
) -> dict[str, Any]:
    """One stream of ``spec`` (``streams[index]``, named ``name``) until it is stopped."""
    parsed = load_stream_spec(spec)
    parent = _PARENT.get()
    if parent is None:  # run on its own, not under the nightshift-stream flow
        control = StopControl()
        plan = plan_streams(spec, allow_imports)[1][index]
        with stop_signals(control):
            return await StreamRuntime(plan, control, parsed.artifact_every_s, until_idle_s).run()
    control, plan = parent
    install_stop_handlers(control)  # over Prefect's, for this subflow run (Prefect restores)
    return await StreamRuntime(plan, control, parsed.artifact_every_s, until_idle_s).run()


async def _supervise(parsed: StreamSpec, plan: StreamPlan, control: StopControl,
                     allow_imports: bool, until_idle_s: float | None) -> dict[str, Any]:
    """Run one stream's subflow; restart it with a growing pause when it fails."""
    logger = get_run_logger()
    _PARENT.set((control, plan))
    policy = parsed.restart
    failures, delay = 0, policy.backoff_s
    payload = parsed.model_dump(mode="json", by_alias=True)
    while True:
        started = time.monotonic()
        state = await stream_pipeline(spec=payload, index=plan.index, name=plan.name,
                                      allow_imports=allow_imports, until_idle_s=until_idle_s,
                                      return_state=True)
        if state.is_completed():
            return await state.aresult()
        try:
            await state.aresult()
            message = state.message or state.name
        except Exception as exc:
            message = str(exc)
        if control.stop.is_set():
            return {"stream": plan.name, "stopped_by": f"failed while stopping: {message}"}
        if time.monotonic() - started > policy.backoff_max_s:
            failures, delay = 0, policy.backoff_s  # it had been healthy for a while
        failures += 1
        if policy.max_restarts is not None and failures > policy.max_restarts:
            raise StepFailed(f"stream {plan.name}: failed {failures} time(s) in a row, last: {message}")
        logger.error("stream %s failed: %s; restarting in %.1f s", plan.name, message, delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(control.stop.wait(), timeout=delay)
        if control.stop.is_set():
            return {"stream": plan.name, "stopped_by": f"{control.reason} while restarting"}
        delay = min(delay * 2, policy.backoff_max_s)


@flow(name="nightshift-stream", validate_parameters=True)
async def stream(
    spec: dict[str, Any] | str,
    allow_imports: bool = False,
    until_idle_s: float | None = None,
    check_only: bool = False,
) -> dict[str, Any]:
    """Run every stream of a stream spec (a YAML path or a mapping) until stopped.

    ``until_idle_s``: a stream stops (gracefully) once it has had nothing to do for that
    long and its consumer has nothing pending. ``check_only``: connect to every server
    and check everything, then return.
    """
    parsed, plans = plan_streams(spec, allow_imports)
    control = StopControl()
    with stop_signals(control):
        for plan in plans:
            await StreamRuntime(plan, control).check()
        if check_only:
            return {"checked": [p.name for p in plans]}
        results = await asyncio.gather(*(
            _supervise(parsed, plan, control, allow_imports, until_idle_s) for plan in plans
        ))
    return {"streams": list(results)}


def run_stream(spec: Path | str, until_idle_s: float | None = None, check_only: bool = False,
               allow_imports: bool = False) -> dict[str, Any]:
    """The CLI's entry: check the spec before Prefect starts, run, raise a one-line error."""
    parsed, _ = plan_streams(str(spec), allow_imports)
    state = asyncio.run(stream(spec=parsed.model_dump(mode="json", by_alias=True),
                               allow_imports=allow_imports, until_idle_s=until_idle_s,
                               check_only=check_only, return_state=True))
    if not state.is_completed():
        try:
            asyncio.run(state.aresult())
        except NightshiftError:
            raise
        except Exception as exc:
            raise NightshiftError(f"stream flow ended {state.name}: {exc}") from None
        raise NightshiftError(state.message or f"stream flow ended {state.name}")
    return asyncio.run(state.aresult())
