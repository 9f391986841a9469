"""The stream spec: NATS JetStream in, decode, windows, the same operators, sinks out.

Example (``examples/stream.yaml``)::

    store: {url: "file://./.nightshift"}
    streams:
      - name: reviews-live
        source:
          server: nats://127.0.0.1:4222
          stream: REVIEWS                 # the JetStream stream (created by its producers)
          subject: reviews.new            # consumer filter subject (optional)
          durable: nightshift-reviews     # durable pull consumer: where the stream resumes
          credentials: {block: nats-prod} # or NATS_USER/NATS_PASSWORD/... from the environment
        decode:
          columns: {review_id: string, text: string, stars: int}
          required: [review_id, text]
          validate: "stars between 1 and 5"      # SQL; failing rows go to the dead letter
        dead_letter: {subject: reviews.dead}
        window: {count: 500, seconds: 5}         # whichever comes first
        steps:
          - template: {output: prompt, template: "Summarize: {{ text }}"}
        sinks:
          - store: {}                                    # <store>/<name>/output/w-<window>.parquet
          - nats: {subject: reviews.enriched}            # one JSON message per row
          - postgres: {connection: {block: pg-prod}, table: enriched, mode: upsert}

Like a batch spec, nothing here is evaluated as Python, secrets never appear in it, and
every error is one line naming the key path at fault (``streams[0].window.count: ...``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nightshift.core.errors import SpecError
from nightshift.core.validation import (
    Float,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    validation_message,
)
from nightshift.tasks.dag import StepNode, parse_steps
from nightshift.tasks.operators import BarrierOperator, Operator
from nightshift.tasks.spec import StoreSpec, read_spec_mapping

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
TOKEN = r"^[A-Za-z0-9_-]+$"  # NATS stream and consumer names
SUBJECT = r"^[^\s]+$"
COLUMN = r"^[A-Za-z][A-Za-z0-9_]*$"
ColumnType = Literal["string", "int", "float", "bool", "datetime", "json"]
Metadata = Literal["subject", "published", "msg_id"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlockRef(_Strict):
    """``{block: NAME}``: a saved Prefect block, by name."""

    block: str = Field(min_length=1)


class NatsSourceSpec(_Strict):
    """A durable pull consumer on a JetStream stream."""

    server: str = "nats://127.0.0.1:4222"
    stream: str = Field(pattern=TOKEN)
    subject: str | None = Field(default=None, pattern=SUBJECT)
    durable: str = Field(pattern=TOKEN)
    credentials: BlockRef | None = None
    #: Seconds before an unacked message is redelivered; open windows send
    #: in-progress acks every ack_wait/3, so this bounds recovery time, not processing.
    ack_wait_s: Float = Field(default=30.0, ge=1)
    #: Unacked messages the server lets this consumer hold (default: windows in flight + 2).
    max_ack_pending: PositiveInt | None = None
    #: Messages asked for per pull request.
    fetch_batch: PositiveInt = 256
    #: Create the durable consumer when it does not exist (else it must exist).
    create_consumer: bool = True

    @field_validator("server")
    @classmethod
    def _no_secrets(cls, value: str) -> str:
        if not re.match(r"^(nats|tls)://", value):
            raise ValueError("expected nats://HOST:PORT or tls://HOST:PORT")
        if "@" in value.split("://", 1)[1]:
            raise ValueError(
                "credentials do not go in the URL; use credentials: {block: NAME} or "
                "NATS_USER/NATS_PASSWORD in the environment"
            )
        return value


class DecodeSpec(_Strict):
    """JSON messages to rows of a fixed schema; what does not fit is a dead letter."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    format: Literal["json"] = "json"
    columns: dict[str, ColumnType] = Field(min_length=1)
    required: list[str] = Field(default_factory=list)
    #: A SQL expression over the columns; rows where it is not true are dead letters.
    validate_expr: str | None = Field(default=None, alias="validate")
    #: Message metadata as columns: ``_subject``, ``_published`` (UTC), ``_msg_id``.
    metadata: list[Metadata] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> DecodeSpec:
        for name in self.columns:
            if not re.match(COLUMN, name):
                raise ValueError(f"column {name!r}: use letters, digits and _ (not leading _)")
        unknown = [c for c in self.required if c not in self.columns]
        if unknown:
            raise ValueError(f"required {unknown} not in columns {sorted(self.columns)}")
        return self


class WindowSpec(_Strict):
    """Close a window at ``count`` messages or ``seconds`` after its first, whichever first."""

    count: PositiveInt | None = None
    seconds: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one(self) -> WindowSpec:
        if self.count is None and self.seconds is None:
            raise ValueError("give count, seconds or both")
        return self


class DeadLetterSpec(_Strict):
    """Where undecodable or invalid messages go, with the reason in a header."""

    subject: str = Field(pattern=SUBJECT)
    #: Publish through JetStream (a stream must capture the subject; deduplicated).
    jetstream: bool = True


class StoreSinkSpec(_Strict):
    """The final rows, one Parquet file per window, under ``<store>/<name>/<path>/``."""

    path: str = Field(default="output", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


class NatsSinkSpec(_Strict):
    """One JSON message per row, ``Nats-Msg-Id`` from the stream sequence."""

    subject: str = Field(pattern=SUBJECT)
    #: Publish through JetStream (exactly-once via its duplicate window); false: core NATS
    #: publish, at-least-once.
    jetstream: bool = True
    columns: list[str] | None = None


class PostgresConnectionSpec(_Strict):
    """``{block: NAME}`` or ``{url: postgresql://user@host:port/db}`` (password: PGPASSWORD)."""

    block: str | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _one(self) -> PostgresConnectionSpec:
        if (self.block is None) == (self.url is None):
            raise ValueError("give exactly one of 'block' or 'url'")
        if self.url is not None:
            if not re.match(r"^postgres(ql)?://", self.url):
                raise ValueError("url: expected postgresql://USER@HOST:PORT/DATABASE")
            userinfo = self.url.split("://", 1)[1].split("@", 1)
            if len(userinfo) == 2 and ":" in userinfo[0]:
                raise ValueError(
                    "url: no password in the URL; use a block or PGPASSWORD in the environment"
                )
            if "password=" in self.url:
                raise ValueError("url: no password in the URL; use a block or PGPASSWORD")
        return self


class PostgresSinkSpec(_Strict):
    """Rows inserted (first write wins) or upserted (last write wins) by ``key``."""

    connection: PostgresConnectionSpec
    table: str = Field(pattern=r"^([A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*$")
    mode: Literal["insert", "upsert"] = "upsert"
    key: list[str] = Field(default_factory=lambda: ["_row_id"], min_length=1)
    columns: list[str] | None = None
    create_table: bool = True


SINK_TYPES: dict[str, type[BaseModel]] = {
    "store": StoreSinkSpec,
    "nats": NatsSinkSpec,
    "postgres": PostgresSinkSpec,
}
SinkSpec = StoreSinkSpec | NatsSinkSpec | PostgresSinkSpec


class StreamPipelineSpec(_Strict):
    """One stream: its own consumer, windows, steps and sinks (one pipeline)."""

    name: str = Field(pattern=NAME, max_length=100)
    source: NatsSourceSpec
    decode: DecodeSpec
    dead_letter: DeadLetterSpec
    window: WindowSpec
    #: ``{operator: config}`` entries, parsed as a batch spec's (``tasks/dag.py``): an
    #: optional ``name:``; ``after:`` only as the chain it is (each step after the one before).
    steps: list[dict[str, Any]] = Field(default_factory=list)
    sinks: list[dict[str, dict[str, Any] | None]] = Field(min_length=1)
    #: Windows being processed at once (the open window comes on top).
    max_windows_in_flight: PositiveInt = 2
    fuse: bool = True
    #: Threads running step tasks.
    workers: PositiveInt = 2
    retries: NonNegativeInt = 0
    retry_delay_seconds: NonNegativeFloat = 2.0
    #: Keep each committed window's step outputs (default: only the sinks' data stays).
    keep_steps: bool = False
    #: A window whose step fails is split until the failing messages are alone (they go
    #: to the dead letters with the step and the error; the rest is written). The stream
    #: fails instead when more than this share of its messages fail (counted over the
    #: window and the windows just before it, at least 10 messages).
    max_poison_rate: float = Field(default=0.5, ge=0, le=1)
    #: On SIGINT/SIGTERM, how long to finish the open and in-flight windows before
    #: abandoning them (their messages are then redelivered to the next start).
    stop_timeout_s: NonNegativeFloat = 30.0

    def operators(self, allow_imports: bool = False) -> list[Operator]:
        """The steps' operators; errors name ``steps[i].name.key``."""
        return [node.operator for node in self.step_nodes(allow_imports)]

    def step_nodes(self, allow_imports: bool = False) -> list[StepNode]:
        """The steps, parsed as a batch spec's are (``tasks.dag.parse_steps``: the same
        one-line errors, ``name:`` and ``after:``), checked for what a stream adds: its
        windows go through the steps as one chain, and no step needs the whole data set."""
        nodes = parse_steps(self.steps, allow_imports)
        for node in nodes:
            if node.parents != ((node.index - 1,) if node.index else ()):
                before = f"after: [{nodes[node.index - 1].name}]" if node.index else "after: []"
                raise SpecError(
                    f"{node.where}.after: a stream's steps run as one chain, each after the "
                    f"step before it ({before}); remove after, or split the stream"
                )
            if isinstance(node.operator, BarrierOperator):
                raise SpecError(
                    f"{node.where}: a barrier step needs the whole data set and a stream has "
                    "no end; deduplicate with a sink key (postgres key: [...]) instead"
                )
        return nodes

    def sink_specs(self) -> list[SinkSpec]:
        """The sinks, validated; errors name ``sinks[i].kind.key``."""
        built: list[SinkSpec] = []
        for i, entry in enumerate(self.sinks):
            if len(entry) != 1:
                raise SpecError(
                    f"sinks[{i}]: expected one sink kind as the only key "
                    f"({', '.join(SINK_TYPES)}), got {sorted(entry)}"
                )
            ((kind, config),) = entry.items()
            if kind not in SINK_TYPES:
                raise SpecError(
                    f"sinks[{i}]: unknown sink '{kind}' (known: {', '.join(SINK_TYPES)})"
                )
            try:
                built.append(SINK_TYPES[kind].model_validate(config or {}))  # type: ignore[arg-type]
            except ValidationError as exc:
                raise SpecError(validation_message(exc, f"sinks[{i}].{kind}")) from None
        kinds = [type(s) for s in built]
        if kinds.count(StoreSinkSpec) > 1:
            raise SpecError("sinks: at most one store sink per stream")
        return built


#: Failures in a row without progress (no window committed) before a stream is given up.
DEFAULT_MAX_RESTARTS = 5


class RestartSpec(_Strict):
    """The supervisor: a failed stream pipeline restarts after a growing pause."""

    #: Restarts in a row without progress (no window committed, not healthy for
    #: ``backoff_max_s``) before the stream is given up (null: never give up). Only
    #: failures that are not transient count: an outage of a sink, NATS or the Prefect
    #: API is waited out (see ``max_outage_s``).
    max_restarts: NonNegativeInt | None = DEFAULT_MAX_RESTARTS
    #: The first pause before a restart or a retry of an unreachable server; it doubles
    #: up to ``backoff_max_s`` (the longest a stream takes to notice a server is back).
    backoff_s: PositiveFloat = 1.0
    backoff_max_s: PositiveFloat = 60.0
    #: How long one outage (a sink, NATS, the Prefect API unreachable) is waited out
    #: before it counts as a failure (null: as long as it lasts).
    max_outage_s: PositiveFloat | None = None


class DiscoverSpec(_Strict):
    """Stream definitions kept in a PostgreSQL table, polled by ``nightshift stream --discover``.

    One row per stream: ``name text primary key, definition jsonb, enabled boolean,
    updated_at timestamptz`` (see :mod:`nightshift.streams.discover`).
    """

    connection: PostgresConnectionSpec
    table: str = Field(
        default="nightshift_streams", pattern=r"^([A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*$"
    )
    #: Seconds between two reads of the table.
    poll_s: PositiveFloat = 5.0
    #: Create the table when it is missing.
    create_table: bool = True


class StreamSpec(_Strict):
    """A stream spec: shared store and serving, and the streams (listed, discovered or both)."""

    store: StoreSpec = Field(default_factory=lambda: StoreSpec(url="file://./.nightshift"))
    serving: dict[str, dict[str, Any]] = Field(default_factory=dict)
    streams: list[StreamPipelineSpec] = Field(default_factory=list)
    #: Where more stream definitions live (used with ``nightshift stream --discover``).
    discover: DiscoverSpec | None = None
    restart: RestartSpec = Field(default_factory=RestartSpec)
    #: Seconds between refreshes of each stream's window-metrics artifact.
    artifact_every_s: NonNegativeFloat = 30.0

    @model_validator(mode="after")
    def _unique(self) -> StreamSpec:
        if not self.streams and self.discover is None:
            raise ValueError("streams: give at least one stream, or discover: (a table of them)")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.streams):
            if s.name in seen:
                raise ValueError(f"streams[{i}].name {s.name!r} repeats streams[{seen[s.name]}]")
            seen[s.name] = i
        durables: dict[tuple[str, str, str], int] = {}
        for i, s in enumerate(self.streams):
            key = (s.source.server, s.source.stream, s.source.durable)
            if key in durables:
                raise ValueError(
                    f"streams[{i}].source.durable {s.source.durable!r}: "
                    f"already used by streams[{durables[key]}]"
                )
            durables[key] = i
        return self


def load_stream_spec(source: str | Path | dict[str, Any] | StreamSpec) -> StreamSpec:
    """A validated stream spec from a YAML path, a mapping or a spec; errors are one line."""
    if isinstance(source, StreamSpec):
        return source
    origin, data = read_spec_mapping(source)
    if not isinstance(data, dict) or ("streams" not in data and "discover" not in data):
        raise SpecError(
            f"{origin}: a stream spec must be a mapping with 'streams:' (a list) or 'discover:'"
        )
    try:
        return StreamSpec.model_validate(data)
    except ValidationError as exc:
        message = validation_message(exc)
        raise SpecError(f"{origin}: {message}") from None
