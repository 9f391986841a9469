"""The NATS JetStream source: connection, the durable pull consumer, dead letters.

The consumer is a **pull** consumer with explicit acks: messages come only when the
pipeline asks (bounded by the room left in its windows), the server holds at most
``max_ack_pending`` unacked messages for it, and a message is acked only after its
window is committed. An unacked message of a run that died comes back after
``ack_wait`` to the next run; windows being worked on send in-progress acks
(``+WPI``) so a long step never causes a redelivery.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from nightshift.blocks.loading import load_block
from nightshift.core.errors import NightshiftError, SourceError, SpecError, one_line
from nightshift.streams.decode import RawMessage
from nightshift.streams.nats import NatsCredentials, credentials_from_env

if TYPE_CHECKING:
    from nightshift.streams.spec import DeadLetterSpec, NatsSourceSpec

HEADER_ID = "Nats-Msg-Id"


def credentials(spec: NatsSourceSpec, label: str) -> NatsCredentials:
    """The source's credentials: its block (loaded synchronously, also from async flows)
    or the environment."""
    if spec.credentials is None:
        return credentials_from_env()
    return load_block(NatsCredentials, spec.credentials.block, f"{label}.source.credentials.block")


async def connect(spec: NatsSourceSpec, label: str, name: str, logger: logging.Logger | Any) -> Any:
    """A NATS connection that reconnects on its own; errors name the server, no secret."""
    import nats

    holder: list[Any] = []

    async def on_error(exc: Exception) -> None:
        logger.warning("%s: NATS %s: %s", name, spec.server, one_line(exc))

    async def on_disconnect() -> None:
        if holder and not (holder[0].is_closed or holder[0].is_draining):
            logger.warning("%s: disconnected from %s, reconnecting", name, spec.server)

    try:
        nc = await nats.connect(
            spec.server,
            name=f"nightshift-{name}",
            connect_timeout=5,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            allow_reconnect=False,  # the first connect fails at once (bad URL, bad credentials)
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            **(await asyncio.to_thread(credentials, spec, label)).connect_options(),
        )
        holder.append(nc)
        nc.options["allow_reconnect"] = True  # from now on: reconnect, forever
        return nc
    except SpecError:
        raise
    except Exception as exc:
        raise SourceError(
            f"{label}.source.server {spec.server}: cannot connect: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from None


async def consumer(
    js: Any, spec: NatsSourceSpec, label: str, max_ack_pending: int
) -> tuple[Any, Any]:
    """(stream info, consumer info): the durable pull consumer, created when missing."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    try:
        stream = await js.stream_info(spec.stream)
    except NotFoundError:
        raise SourceError(
            f"{label}.source.stream {spec.stream!r}: no such JetStream stream on {spec.server}"
        ) from None
    try:
        info = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        if not spec.create_consumer:
            raise SourceError(
                f"{label}.source.durable {spec.durable!r}: no such consumer on "
                f"stream {spec.stream} (create_consumer is false)"
            ) from None
        config = ConsumerConfig(
            durable_name=spec.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=spec.subject,
            ack_wait=spec.ack_wait_s,
            max_ack_pending=max_ack_pending,
            max_deliver=-1,
        )
        info = await js.add_consumer(spec.stream, config)
    config = info.config
    if config.deliver_subject:
        raise SourceError(
            f"{label}.source.durable {spec.durable!r} is a push consumer; "
            "Nightshift needs a pull consumer (no deliver_subject)"
        )
    if config.ack_policy != AckPolicy.EXPLICIT:
        raise SourceError(
            f"{label}.source.durable {spec.durable!r}: ack policy "
            f"{config.ack_policy}, Nightshift needs explicit acks"
        )
    if spec.subject and config.filter_subject not in (spec.subject, None):
        raise SourceError(
            f"{label}.source.durable {spec.durable!r} filters "
            f"{config.filter_subject!r}, not {spec.subject!r}: use another durable"
        )
    return stream, info


def raw(message: Any) -> RawMessage:
    """What decoding needs of a JetStream message."""
    meta = message.metadata
    headers = message.headers or {}
    return RawMessage(
        seq=meta.sequence.stream,
        data=message.data,
        subject=message.subject,
        published=meta.timestamp,
        msg_id=headers.get(HEADER_ID),
    )


class DeadLetters:
    """Publish undecodable or invalid messages, with the reason, then terminate them."""

    def __init__(
        self, spec: DeadLetterSpec, label: str, pipeline: str, stream: str, nc: Any
    ) -> None:
        self.spec = spec
        self.label = label
        self.pipeline = pipeline
        self.stream = stream
        self.nc = nc
        self.js = nc.jetstream()
        self.count = 0

    async def check(self) -> None:
        from nats.js.errors import NotFoundError

        if not self.spec.jetstream:
            return
        try:
            await self.js.find_stream_name_by_subject(self.spec.subject)
        except NotFoundError:
            raise SpecError(
                f"{self.label}.dead_letter.subject {self.spec.subject!r}: no "
                "JetStream stream captures it; create one or set jetstream: false"
            ) from None

    async def send(self, items: list[tuple[Any, RawMessage, str]]) -> None:
        """``(nats message, raw, reason)`` each: publish (confirmed), then ``term``."""
        for _, item, reason in items:
            headers = {
                HEADER_ID: f"{self.pipeline}:dead:{item.seq}",
                "Nightshift-Pipeline": self.pipeline,
                "Nightshift-Stream": self.stream,
                "Nightshift-Seq": str(item.seq),
                "Nightshift-Subject": item.subject,
                "Nightshift-Reason": " ".join(reason.split())[:500],
            }
            try:
                if self.spec.jetstream:
                    await self.js.publish(self.spec.subject, item.data, headers=headers, timeout=10)
                else:
                    await self.nc.publish(self.spec.subject, item.data, headers=headers)
            except Exception as exc:
                raise NightshiftError(
                    f"{self.label}.dead_letter: cannot publish seq {item.seq} "
                    f"to {self.spec.subject}: {one_line(exc)}"
                ) from None
        if not self.spec.jetstream:
            await self.nc.flush()
        for message, _, _ in items:
            await message.term()
        self.count += len(items)
