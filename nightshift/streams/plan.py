"""Planning a stream: everything checked before any message is fetched.

For each stream of a stream spec: the operators (a barrier such as ``dedup`` needs the
whole data set and a stream has no end, so it is refused), the stages (fused like a batch
pipeline), a dry run of every operator on an empty frame of the decoded schema (missing
columns, wrong types, bad expressions fail here, naming the step), the output schema the
sinks receive, the sinks' own checks, and the serving configs of LLM steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from nightshift.blocks.serving_config import BackendConfig
from nightshift.blocks.step_store import StepStore
from nightshift.core.errors import NightshiftError, SpecError
from nightshift.core.fingerprints import digest
from nightshift.streams.decode import Decoder
from nightshift.streams.spec import (
    NatsSinkSpec,
    PostgresSinkSpec,
    SinkSpec,
    StoreSinkSpec,
    StreamPipelineSpec,
    StreamSpec,
)
from nightshift.streams.windows import WindowPolicy
from nightshift.tasks.operators import Operator
from nightshift.tasks.spec import resolve_serving
from nightshift.tasks.stages import Stage, build_stages, dry_run, serving_identities


@dataclass
class StreamPlan:
    """One stream's pipeline, validated."""

    index: int
    spec: StreamPipelineSpec
    store: StepStore
    decoder: Decoder
    operators: list[Operator]
    stages: list[Stage]
    output_schema: pl.Schema
    sinks: list[SinkSpec]
    serving: dict[str, BackendConfig] = field(default_factory=dict)
    #: How errors and logs name it (``streams[0]``; a discovered one: its table row).
    where: str = ""

    @property
    def label(self) -> str:
        return self.where or f"streams[{self.index}]"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def policy(self) -> WindowPolicy:
        return WindowPolicy(self.spec.window.count, self.spec.window.seconds)

    @property
    def max_held(self) -> int:
        """Messages held at most: the open window plus the windows in flight."""
        return self.policy.max_count * (self.spec.max_windows_in_flight + 1)

    @property
    def max_ack_pending(self) -> int:
        return self.spec.source.max_ack_pending or self.policy.max_count * (
            self.spec.max_windows_in_flight + 2
        )

    def step_path(self, stage: int, window_id: str, key: str) -> str:
        return self.store.layout.stream(self.name).step_output(
            self.stages[stage].dirname, window_id, key
        )

    def input_identity(self, stream_created: str) -> str:
        """What a window's rows depend on besides its sequences: the JetStream stream
        (a re-created stream restarts its sequences) and the decode config."""
        source = self.spec.source
        return digest(
            "nightshift-stream",
            source.stream,
            stream_created,
            source.subject,
            self.spec.decode.model_dump(mode="json", by_alias=True),
        )


def build_stream_plans(
    spec: StreamSpec, allow_imports: bool = False, where: str = ""
) -> list[StreamPlan]:
    """Every stream's plan; a problem raises one line naming ``streams[i].key`` (or
    ``where.key``: a discovered stream's table row)."""
    store = resolve_store(spec)
    store.check_writable()
    return [_plan(spec, i, s, store, allow_imports, where) for i, s in enumerate(spec.streams)]


def resolve_store(spec: StreamSpec) -> StepStore:
    return spec.store.resolve()


def _plan(
    spec: StreamSpec,
    index: int,
    stream: StreamPipelineSpec,
    store: StepStore,
    allow_imports: bool,
    where: str = "",
) -> StreamPlan:
    label = where or f"streams[{index}]"
    try:
        decoder = Decoder(stream.decode)
        nodes = stream.step_nodes(allow_imports)  # one chain, no barrier step
        operators = [node.operator for node in nodes]
        for i, op in enumerate(operators):
            if op.makes_rows:
                raise SpecError(
                    f"steps[{i}] ({op.name}): makes rows of a new identity, and a stream's rows "
                    "are its messages (sinks key them by message); run it in a batch pipeline"
                )
        serving = resolve_serving(spec.serving, operators)
        output = dry_run(operators, decoder.schema, where=[node.where for node in nodes])
        sinks = stream.sink_specs()
        _check_sinks(sinks, stream, output)
    except NightshiftError as exc:
        raise type(exc)(f"{label}.{exc}".replace(": Value error, ", ": ")) from None
    context = {"serving": serving_identities(serving)}  # serving: is a top-level key
    stages = build_stages(operators, stream.fuse, context)
    return StreamPlan(
        index, stream, store, decoder, operators, stages, output, sinks, serving, where
    )


def _check_sinks(sinks: list[SinkSpec], stream: StreamPipelineSpec, output: pl.Schema) -> None:
    nullable = {c for c in stream.decode.columns if c not in stream.decode.required}
    for i, sink in enumerate(sinks):
        kind = {StoreSinkSpec: "store", NatsSinkSpec: "nats", PostgresSinkSpec: "postgres"}[
            type(sink)
        ]
        columns = getattr(sink, "columns", None) or []
        keys = getattr(sink, "key", [])
        missing = [c for c in [*columns, *keys] if c not in output]
        if missing:
            raise SpecError(
                f"sinks[{i}].{kind}: column {', '.join(missing)} is not in the output "
                f"(columns: {', '.join(output.names())})"
            )
        loose = [k for k in keys if k in nullable]
        if loose:
            raise SpecError(
                f"sinks[{i}].{kind}.key: column {', '.join(loose)} may be null; "
                "add it to decode.required"
            )
        if isinstance(sink, NatsSinkSpec) and sink.subject == stream.source.subject:
            raise SpecError(
                f"sinks[{i}].nats.subject: {sink.subject!r} is the source subject "
                "(the stream would read its own output)"
            )
