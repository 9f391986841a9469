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
from nightshift.core.errors import SourceError, SpecError, Unavailable, one_line
from nightshift.streams.decode import RawMessage
from nightshift.streams.nats import NatsCredentials, credentials_from_env
from nightshift.streams.outage import Outages

if TYPE_CHECKING:
    from nightshift.streams.spec import DeadLetterSpec, NatsSourceSpec

HEADER_ID = "Nats-Msg-Id"


def credentials(spec: NatsSourceSpec, label: str) -> NatsCredentials:
    """The source's credentials: its block (loaded synchronously, also from async flows)
    or the environment."""
    if spec.credentials is None:
        return credentials_from_env()
    return load_block(NatsCredentials, spec.credentials.block, f"{label}.source.credentials.block")


def server_name(spec: NatsSourceSpec) -> str:
    """How outage lines name the NATS server (``NATS nats://host:4222``)."""
    return f"NATS {spec.server}"


async def connect(
    spec: NatsSourceSpec,
    label: str,
    name: str,
    logger: logging.Logger | Any,
    outages: Outages | None = None,
) -> Any:
    """A NATS connection that reconnects on its own, forever; errors name the server, no
    secret. With ``outages``, a lost connection is one outage (a line when it is lost,
    one a minute, one when it is back), not a line per reconnect attempt."""
    import nats

    holder: list[Any] = []
    what = server_name(spec)

    async def on_error(exc: Exception) -> None:
        lost = bool(holder) and not holder[0].is_connected
        if outages is not None and (lost or unreachable(exc)):
            outages.failed(what, f"{type(exc).__name__}: {one_line(exc)}")
        else:
            logger.warning("%s: NATS %s: %s", name, spec.server, one_line(exc))

    async def on_disconnect() -> None:
        if holder and not (holder[0].is_closed or holder[0].is_draining):
            if outages is not None:
                outages.failed(what, "disconnected, reconnecting")
            else:
                logger.warning("%s: disconnected from %s, reconnecting", name, spec.server)

    async def on_reconnect() -> None:
        if outages is not None:
            outages.recovered(what)

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
            reconnected_cb=on_reconnect,
            **(await asyncio.to_thread(credentials, spec, label)).connect_options(),
        )
        holder.append(nc)
        nc.options["allow_reconnect"] = True  # from now on: reconnect, forever
        return nc
    except SpecError:
        raise
    except Exception as exc:
        message = (
            f"{label}.source.server {spec.server}: cannot connect: "
            f"{type(exc).__name__}: {one_line(exc)}"
        )
        if unreachable(exc):  # refused, timed out: the server may be restarting
            raise Unavailable(message, what) from None
        raise SourceError(message) from None


def unreachable(exc: BaseException) -> bool:
    """A connection-class failure (the server is down or restarting), not a refusal."""
    import nats.errors

    if "authorization" in str(exc).lower() or "permissions" in str(exc).lower():
        return False
    return isinstance(
        exc,
        (
            OSError,
            TimeoutError,
            asyncio.TimeoutError,
            nats.errors.NoServersError,
            nats.errors.TimeoutError,
            nats.errors.ConnectionClosedError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
            nats.errors.UnexpectedEOF,
        ),
    ) or getattr(exc, "code", None) in (503,)


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
    except Exception as exc:
        if unreachable(exc):
            raise Unavailable(
                f"{label}.source.stream {spec.stream!r} on {spec.server}: "
                f"{type(exc).__name__}: {one_line(exc)}",
                server_name(spec),
            ) from None
        raise
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
        except Exception as exc:
            if unreachable(exc):
                raise Unavailable(
                    f"{self.label}.dead_letter.subject {self.spec.subject!r}: "
                    f"{type(exc).__name__}: {one_line(exc)}",
                    f"{self.label}.dead_letter",
                ) from None
            raise

    async def send(self, items: list[tuple[Any, RawMessage, str]]) -> None:
        """``(nats message, raw, reason)`` each: publish (confirmed), then ``term``."""
        await self.publish([(raw, reason, {}) for _, raw, reason in items])
        for message, _, _ in items:
            await message.term()

    async def publish(self, items: list[tuple[RawMessage, str, dict[str, str]]]) -> None:
        """``(raw, reason, more headers)`` each, published (confirmed by JetStream).

        NATS unreachable raises :class:`Unavailable`: nothing was terminated, so the
        messages come back (after ``ack_wait``) and are published again, deduplicated
        by their ``Nats-Msg-Id``."""
        for item, reason, more in items:
            headers = {
                HEADER_ID: f"{self.pipeline}:dead:{item.seq}",
                "Nightshift-Pipeline": self.pipeline,
                "Nightshift-Stream": self.stream,
                "Nightshift-Seq": str(item.seq),
                "Nightshift-Subject": item.subject,
                "Nightshift-Reason": " ".join(reason.split())[:500],
                **({"Nightshift-Msg-Id": item.msg_id} if item.msg_id else {}),
                **more,
            }
            try:
                if self.spec.jetstream:
                    await self.js.publish(self.spec.subject, item.data, headers=headers, timeout=10)
                else:
                    await self.nc.publish(self.spec.subject, item.data, headers=headers)
            except Exception as exc:
                raise Unavailable(
                    f"{self.label}.dead_letter: cannot publish seq {item.seq} "
                    f"to {self.spec.subject}: {type(exc).__name__}: {one_line(exc)}",
                    f"{self.label}.dead_letter",
                ) from None
        if not self.spec.jetstream:
            await self.nc.flush()
        self.count += len(items)
