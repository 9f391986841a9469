"""The ``nightshift-stream`` flow: long-running stream pipelines, one per stream of a spec.

``nightshift stream SPEC`` (or the ``stream`` deployment in ``prefect.yaml``) runs it::

    nightshift stream examples/stream.yaml                 # until SIGINT/SIGTERM
    nightshift stream examples/stream.yaml --until-idle 5  # stop after 5 s with nothing to do
    nightshift stream examples/stream.yaml --check         # connect and check, run nothing
    nightshift stream examples/stream-discover.yaml --discover   # streams from a table too

Everything is checked first (the spec, the steps on the decoded schema, NATS, the
stream and consumer, the dead-letter subject, every sink): a problem is one line. Then
each stream runs as its own subflow run (``stream-pipeline``, named after the stream),
concurrently in this process, with its windows' step tasks under it in the UI. An
outage (a sink, NATS or the Prefect API unreachable) is waited out, for as long as it
lasts (``restart.max_outage_s``), with one log line when it starts, one a minute and one
when it ends. A supervisor restarts a stream whose run failed otherwise (a step failing
for most of a window's messages, a sink refusing rows) after a pause that doubles up to
``restart.backoff_max_s``, and gives it up after ``restart.max_restarts`` such failures in
a row without progress (default 5: one error line naming the step and the last error);
the others go on. Nothing is lost in between:
unacked messages wait in JetStream. With ``--discover`` the stream definitions of a
PostgreSQL table (``discover:``) are polled: started, drained and stopped, or restarted
with their new steps while the process runs (:mod:`nightshift.streams.discover`).
See docs/streaming.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Coroutine, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from prefect import flow
from prefect.logging import get_run_logger

from nightshift.core.errors import NightshiftError, SpecError, StepFailed, Unavailable, one_line
from nightshift.flows.log_filters import install_log_filters
from nightshift.flows.parameters import (
    OptionalFloat,
    check_parameter_size,
    parameters_accepted,
)
from nightshift.streams.discover import Definition, DefinitionTable, pipeline_spec
from nightshift.streams.outage import Outages
from nightshift.streams.plan import StreamPlan, build_stream_plans
from nightshift.streams.runtime import StopControl, StreamRuntime
from nightshift.streams.spec import StreamSpec, load_stream_spec

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

#: What calling one of these async flows with ``return_state=True`` gives. Prefect 3.8's
#: overloads say ``State[Coroutine]``: its async overload does not match ``CoroutineType``.
_FlowState: TypeAlias = "Coroutine[Any, Any, State[dict[str, Any]]]"

ROOT = Path(__file__).resolve().parents[2]
# What the parent flow hands its stream subflows (not flow parameters: not serializable):
# the stream's stop control, the plan it built and checked, and a list the subflow puts
# its runtime in (the supervisor reads its progress after a failure).
_PARENT: ContextVar[tuple[StopControl, StreamPlan, list[StreamRuntime], Outages] | None] = (
    ContextVar("nightshift_stream_parent", default=None)
)


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
        logger.warning(
            "%s: %s",
            sig.name,
            "finishing the open windows (send it again to abandon them)"
            if first
            else "abandoning the open windows; their messages stay for the next start",
        )

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(on_signal, signal.Signals(signum))

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def plan_streams(
    spec: dict[str, Any] | str | StreamSpec, allow_imports: bool, where: str = ""
) -> tuple[StreamSpec, list[StreamPlan]]:
    """The parsed spec and every stream's plan.

    CPython 3.11 before 3.11.8 raises ``SystemError: AST constructor recursion depth
    mismatch`` when two threads build ASTs at once (cpython#106905); planning still
    compiles Python (Jinja templates in the dry run) while Prefect's background thread
    may do the same. Operator code versions no longer parse ASTs (core/fingerprints.py);
    the plan is pure, so a remaining collision is simply retried.
    """
    for attempt in range(5):
        try:
            parsed = spec if isinstance(spec, StreamSpec) else resolve_spec(spec)
            return parsed, build_stream_plans(parsed, allow_imports, where)
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
            return await StreamRuntime(
                plan, control, parsed.artifact_every_s, until_idle_s, restart=parsed.restart
            ).run()
    control, plan, box, outages = parent
    install_stop_handlers(control.root)  # over Prefect's, for this subflow run (Prefect restores)
    runtime = StreamRuntime(
        plan, control, parsed.artifact_every_s, until_idle_s, outages, parsed.restart
    )
    box.append(runtime)
    return await runtime.run()


async def _supervise(
    parsed: StreamSpec,
    plan: StreamPlan,
    control: StopControl,
    allow_imports: bool,
    until_idle_s: float | None,
) -> dict[str, Any]:
    """Run one stream's subflow; restart it with a growing pause when it fails; give it up
    after ``restart.max_restarts`` failures in a row without progress (a run that
    committed a window, or stayed up ``backoff_max_s``, is progress). A failure on a
    server that cannot be reached (:class:`Unavailable`) is an outage: waited out (up to
    ``restart.max_outage_s``), not counted, logged once per outage."""
    logger = get_run_logger()
    box: list[StreamRuntime] = []
    policy = parsed.restart
    outages = Outages(plan.name, policy.backoff_max_s, logger)
    _PARENT.set((control, plan, box, outages))
    failures, delay = 0, policy.backoff_s
    payload = parsed.model_dump(mode="json", by_alias=True)
    while True:
        started = time.monotonic()
        box.clear()
        with parameters_accepted({"spec": payload}, "stream spec"):
            state = await cast(
                _FlowState,
                stream_pipeline(
                    spec=payload,
                    index=plan.index,
                    name=plan.name,
                    allow_imports=allow_imports,
                    until_idle_s=until_idle_s,
                    return_state=True,
                ),
            )
        if state.is_completed():
            return await state.aresult()
        transient: Unavailable | None = None
        try:
            await state.aresult()
            message = state.message or state.name
        except Unavailable as exc:
            message, transient = one_line(exc), exc
        except Exception as exc:
            message = one_line(exc)
        if control.stop.is_set():
            return {"stream": plan.name, "stopped_by": f"failed while stopping: {message}"}
        if any(r.metrics.windows for r in box) or time.monotonic() - started > policy.backoff_max_s:
            failures, delay = 0, policy.backoff_s  # it had made progress
        if transient is not None and (
            policy.max_outage_s is None or outages.lasted(transient.what) <= policy.max_outage_s
        ):  # an outage: not a failure of the stream; one line per outage, not per try
            outages.failed(transient.what, message or "unreachable")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(control.stop.wait(), timeout=delay)
            if control.stop.is_set():
                return {"stream": plan.name, "stopped_by": f"{control.reason} while waiting"}
            delay = min(delay * 2, policy.backoff_max_s)
            continue
        failures += 1
        if policy.max_restarts is not None and failures > policy.max_restarts:
            line = (
                f"stream {plan.name}: given up after {failures} failures in a row without "
                f"progress (restart.max_restarts: {policy.max_restarts}); last: {message}"
            )
            logger.error(line)
            return {"stream": plan.name, "stopped_by": "given up", "given_up": line}
        logger.error("stream %s failed: %s; restarting in %.1f s", plan.name, message, delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(control.stop.wait(), timeout=delay)
        if control.stop.is_set():
            return {"stream": plan.name, "stopped_by": f"{control.reason} while restarting"}
        delay = min(delay * 2, policy.backoff_max_s)


async def _run_one(
    parsed: StreamSpec,
    plan: StreamPlan,
    control: StopControl,
    allow_imports: bool,
    until_idle_s: float | None,
) -> dict[str, Any]:
    try:
        return await _supervise(parsed, plan, control, allow_imports, until_idle_s)
    finally:
        control.detach()


class Discovery:
    """Polls the definitions table and starts, drains or restarts discovered streams."""

    def __init__(
        self,
        parsed: StreamSpec,
        root: StopControl,
        allow_imports: bool,
        until_idle_s: float | None,
        static: list[StreamPlan],
        poll_s: float | None,
    ) -> None:
        assert parsed.discover is not None
        self.parsed = parsed
        self.root = root
        self.allow_imports = allow_imports
        self.until_idle_s = until_idle_s
        self.poll_s = poll_s or parsed.discover.poll_s
        self.table = DefinitionTable(parsed.discover)
        self.static = {p.name: p for p in static}
        self.static_durables = {_durable(p): p.name for p in static}
        # name -> (definition, plan, control, task) of the streams running now
        self.running: dict[str, tuple[Definition, StreamPlan, StopControl, asyncio.Task[Any]]] = {}
        self.stopping: set[str] = set()  # asked to drain (removed, disabled or changed)
        self.reported: dict[str, str] = {}  # name -> digest of a bad definition already logged
        self.retrying: dict[str, str] = {}  # name -> digest whose start failed (unreachable)
        self.ended: dict[str, str] = {}  # name -> digest of a stream that ended on its own
        self.definitions: list[Definition] = []
        self.results: list[dict[str, Any]] = []
        #: the flow run's logger once ``run`` starts
        self.logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = logging.getLogger(
            __name__
        )

    async def run(self) -> list[dict[str, Any]]:
        self.logger = get_run_logger()
        await asyncio.to_thread(self.table.open)
        self.logger.info(
            "discover: polling %s on %s every %g s",
            self.table.spec.table,
            self.table.display,
            self.poll_s,
        )
        next_poll, polled = 0.0, False
        try:
            while not self.root.stop.is_set():
                if time.monotonic() >= next_poll:
                    try:
                        self.definitions = await asyncio.to_thread(self.table.read)
                        polled = True
                    except NightshiftError as exc:  # the table is back at the next poll
                        self.logger.warning("discover: %s", exc)
                    next_poll = time.monotonic() + self.poll_s
                await self._apply()
                if self.until_idle_s is not None and polled and not self.running:
                    break  # every discovered stream ran until idle
                tasks = {t for *_, t in self.running.values()}
                waits: set[asyncio.Future[Any]] = {
                    asyncio.ensure_future(self.root.stop.wait()),
                    *tasks,
                }
                timeout = max(0.05, next_poll - time.monotonic())
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waits - tasks:
                    waiter.cancel()
                self._reap()
            for *_, task in self.running.values():
                await asyncio.wait({task})
            self._reap()
        finally:
            await asyncio.to_thread(self.table.close)
        return self.results

    def _reap(self) -> None:
        for name, (definition, _, _, task) in list(self.running.items()):
            if not task.done():
                continue
            del self.running[name]
            try:
                result = task.result()
            except Exception as exc:
                result = {"stream": name, "stopped_by": f"failed: {one_line(exc)}"}
            self.results.append(result)
            if name in self.stopping:
                self.stopping.discard(name)
                self.logger.info("discover: stream %s stopped (%s)", name, result.get("stopped_by"))
            else:  # stopped on its own (idle, given up): not again until its definition changes
                self.ended[name] = definition.digest

    async def _apply(self) -> None:
        wanted = {d.name: d for d in self.definitions if d.enabled}
        present = {d.name for d in self.definitions}
        for name, (old, _, control, _) in self.running.items():
            if name in self.stopping:
                continue
            new = wanted.get(name)
            if new is None or new.digest != old.digest:
                why = (
                    "removed"
                    if name not in present
                    else "disabled"
                    if new is None
                    else f"changed ({old.digest[:12]} -> {new.digest[:12]})"
                )
                self.logger.info(
                    "discover: stream %s %s: draining its windows, then stopping%s",
                    name,
                    why,
                    ", then starting it again" if new else "",
                )
                self.stopping.add(name)
                control.request_stop(f"{why} in {self.table.spec.table}")
        for name in [
            n for n in self.ended if wanted.get(n) is None or wanted[n].digest != self.ended[n]
        ]:
            del self.ended[name]
        for name, definition in wanted.items():
            if name in self.running or self.ended.get(name) == definition.digest:
                continue
            if self.reported.get(name) == definition.digest:
                continue
            try:
                plan = await self._plan(definition)
                control = self.root.child()
                try:
                    await StreamRuntime(plan, control).check()
                except BaseException:
                    control.detach()
                    raise
            except SpecError as exc:  # the definition is wrong: not again until it changes
                self.reported[name] = definition.digest
                self.logger.error("discover: %s; stream %s not started", exc, name)
                continue
            except NightshiftError as exc:  # a server unreachable: again at the next poll
                if self.retrying.get(name) != definition.digest:
                    self.logger.warning(
                        "discover: %s; stream %s not started, trying again at every poll", exc, name
                    )
                self.retrying[name] = definition.digest
                continue
            self.retrying.pop(name, None)
            self.reported.pop(name, None)
            parsed = pipeline_spec(definition, self.parsed)
            task = asyncio.ensure_future(
                _run_one(parsed, plan, control, self.allow_imports, self.until_idle_s)
            )
            self.running[name] = (definition, plan, control, task)
            self.logger.info(
                "discover: stream %s started (definition %s)", name, definition.digest[:12]
            )

    async def _plan(self, definition: Definition) -> StreamPlan:
        if definition.name in self.static:
            raise SpecError(
                f"{definition.label}: a stream named {definition.name!r} is in the "
                "spec file already"
            )
        parsed = pipeline_spec(definition, self.parsed)
        _, plans = await asyncio.to_thread(
            plan_streams, parsed, self.allow_imports, definition.label
        )
        plan = plans[0]
        users = dict(self.static_durables)
        users.update({_durable(p): n for n, (_, p, _, _) in self.running.items() if n != plan.name})
        other = users.get(_durable(plan))
        if other is not None:
            raise SpecError(
                f"{definition.label}.source.durable {plan.spec.source.durable!r}: "
                f"already used by stream {other!r}"
            )
        return plan


def _durable(plan: StreamPlan) -> tuple[str, str, str]:
    source = plan.spec.source
    return (source.server, source.stream, source.durable)


def check_modes(parsed: StreamSpec, discover: bool) -> None:
    """``--discover`` needs a ``discover:`` section; without it, the spec needs streams."""
    if discover and parsed.discover is None:
        raise SpecError(
            "discover: --discover needs a discover: section in the spec (connection, table)"
        )
    if not parsed.streams and not discover:
        raise SpecError(
            "streams: the spec lists no stream; run with --discover to poll "
            f"{parsed.discover.table if parsed.discover else 'a table'}"
        )


@flow(name="nightshift-stream", validate_parameters=True)
async def stream(
    spec: dict[str, Any] | str,
    allow_imports: bool = False,
    until_idle_s: OptionalFloat = None,
    check_only: bool = False,
    discover: bool = False,
    poll_s: OptionalFloat = None,
) -> dict[str, Any]:
    """Run every stream of a stream spec (a YAML path or a mapping) until stopped.

    A stream given up after ``restart.max_restarts`` failures does not stop the others;
    the flow fails at the end, naming it.

    Args:
        spec: a stream spec's YAML path (relative to the repository root) or the spec
            itself as a mapping (streams:, and optionally discover:).
        allow_imports: allow operators given as module:Class import paths in the spec.
        until_idle_s: stop a stream (gracefully) once it has had nothing to do for this
            many seconds and its consumer has nothing pending; empty: run until
            cancelled.
        check_only: connect to every server and check everything (the spec, NATS, the
            streams and consumers, the sinks), then return without running.
        discover: also run the streams defined in the spec's discover: table, started,
            drained or restarted as its rows change.
        poll_s: seconds between reads of the discover: table; empty: the spec's
            discover.poll_s.
    """
    install_log_filters()
    parsed, plans = plan_streams(spec, allow_imports)
    check_modes(parsed, discover)
    control = StopControl()
    with stop_signals(control):
        for plan in plans:
            await StreamRuntime(plan, control).check()
        if check_only:
            if discover:
                table = DefinitionTable(parsed.discover)  # type: ignore[arg-type]
                await asyncio.to_thread(table.open)
                await asyncio.to_thread(table.close)
            return {"checked": [p.name for p in plans]}
        runs: list[Coroutine[Any, Any, Any]] = [
            _run_one(parsed, plan, control.child(), allow_imports, until_idle_s) for plan in plans
        ]
        finder = (
            Discovery(parsed, control, allow_imports, until_idle_s, plans, poll_s)
            if discover
            else None
        )
        if finder is not None:
            runs.append(finder.run())
        results = await asyncio.gather(*runs)
    streams = list(results[: len(plans)])
    if finder is not None:
        streams += results[-1]
    given_up = [r["given_up"] for r in streams if r.get("given_up")]
    if given_up:
        raise StepFailed("; ".join(given_up))
    return {"streams": streams}


def run_stream(
    spec: Path | str,
    until_idle_s: float | None = None,
    check_only: bool = False,
    allow_imports: bool = False,
    discover: bool = False,
    poll_s: float | None = None,
) -> dict[str, Any]:
    """The CLI's entry: check the spec before Prefect starts, run, raise a one-line error."""
    parsed, _ = plan_streams(str(spec), allow_imports)
    check_modes(parsed, discover)
    parameters: dict[str, Any] = {
        "spec": parsed.model_dump(mode="json", by_alias=True),
        "allow_imports": allow_imports,
        "until_idle_s": until_idle_s,
        "check_only": check_only,
        "discover": discover,
        "poll_s": poll_s,
    }
    check_parameter_size(parameters, str(spec))
    with parameters_accepted(parameters, str(spec)):
        state = asyncio.run(cast(_FlowState, stream(**parameters, return_state=True)))
    if not state.is_completed():
        try:
            asyncio.run(state.aresult())
        except NightshiftError:
            raise
        except Exception as exc:
            raise NightshiftError(f"stream flow ended {state.name}: {exc}") from None
        raise NightshiftError(state.message or f"stream flow ended {state.name}")
    return asyncio.run(state.aresult())
