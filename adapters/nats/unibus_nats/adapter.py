"""The JetStream adapter: ``nats://`` — topics are streams, groups durable pull consumers.

Maps to
    topic → a stream ``<prefix>-<topic>`` holding the subject ``<prefix>.<topic>``
    (``.`` in names carried as ``~``), limits retention so that every group sees
    every message; group → a durable pull consumer on that subject, created with
    DeliverPolicy.ALL (a new group replays the stream's history); ephemeral
    subscription → an ephemeral pull consumer with DeliverPolicy.NEW, created before
    ``subscribe`` returns; ack → ``+ACK``; nack(delay) → ``-NAK`` with delay;
    reject → ``+TERM`` after publishing to the dead-letter topic; delay → a server
    message schedule (``Nats-Schedule: @at ...``, servers 2.12+) or, on older
    servers, a ``Unibus-Not-Before`` header honoured by the consumer (emulated);
    dedup → ``Nats-Msg-Id`` = message id within the stream's duplicate window.

URL
    ``nats://[user:password@]host[:port][,host[:port]...][?option=value&...]``

    Connection: ``prefix`` (``unibus``), ``token``, ``nkeys_seed`` (seed file),
    ``creds`` (credentials file), ``tls`` (false), ``tls_ca``, ``tls_cert``,
    ``tls_key``, ``tls_hostname``, ``name`` (``unibus``), ``connect_timeout`` (5 s),
    ``reconnect_wait`` (0.5 s), ``retry_for`` (30 s), ``max_message_size``
    (1000000). JetStream: ``storage`` (``file`` | ``memory``), ``replicas`` (1),
    ``ack_wait`` (30 s), ``dedup_window`` (120 s; 0 = off), ``max_age`` (0 =
    forever), ``heartbeat`` (1 s), ``publish_window`` (1024), ``publish_timeout``
    (5 s), ``max_ack_pending`` (0 = 8 x the largest prefetch), ``delayed``
    (``auto`` | ``native`` | ``emulated``). See ``docs/adapters/nats.md``.

Driver
    nats-py (``nats``), imported lazily.

Capabilities
    Persistent with file storage; publish confirmed by PubAck (retried under the same
    Nats-Msg-Id until ``retry_for``); groups retain; new groups replay history;
    nack with native delay; reject to the dead-letter topic; order kept for a single
    consumer, a redelivery may be overtaken; delayed delivery native (2.12+ servers)
    or emulated, never early; dedup within ``dedup_window``; prefetch bounds each
    consumer (client-side credit), the group shares ``max_ack_pending``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote

from unibus.capabilities import Capabilities, Ordering, RedeliveryOrder, Support, Timings
from unibus.errors import BrokerError, BrokerUnavailable
from unibus.message import Message
from unibus.options import Options
from unibus.spi import Adapter, Consumer
from unibus.url import URL
from unibus_nats._codec import NOT_BEFORE, SAFE, SCHEDULED_ID, micros
from unibus_nats._connection import Connection
from unibus_nats._errors import map_errors
from unibus_nats._publisher import Publisher
from unibus_nats._url import JETSTREAM_OPTIONS, parse_settings, token
from unibus_nats.consumer import JetStreamConsumer, MemberSpec

__all__ = ["JetStreamAdapter"]

_DEFAULT_PREFETCH = 64
_GROUP_ROOM = 8                # the group's server-side cap: room for 8 full consumers
_EPHEMERAL_INACTIVE = 60.0     # an ephemeral consumer outlives its dead process this long
_HEADER_ROOM = 1024            # max_payload must exceed max_message_size by this much
_SCHEDULE_API_LEVEL = 2        # JetStream API level of nats-server 2.12 (message schedules)


class JetStreamAdapter(Adapter):
    """The ``nats://`` adapter (see the module docstring)."""

    options: ClassVar[Options] = JETSTREAM_OPTIONS

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        self._settings = settings = parse_settings(url, self.options)
        self._prefix: str = settings["prefix"]
        self._ack_wait: float = settings["ack_wait"]
        self._delayed: str = settings["delayed"]
        self._native_schedules = self._delayed != "emulated"
        self.capabilities = self._declare()
        self._conn: Connection | None = None
        self._publisher: Publisher | None = None
        self._streams: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._group_caps: dict[tuple[str, str], int] = {}
        self.consumers: set[JetStreamConsumer] = set()

    def _declare(self) -> Capabilities:
        s = self._settings
        recovery = (s["reconnect_wait"] + 3 * s["heartbeat"] + s["ack_wait"]
                    + 2 * s["publish_timeout"] + 2.0)
        return Capabilities(
            name="nats", persistent=s["storage"] == "file", publish_confirms=True,
            group_retention=True, replay_for_new_groups=True, redelivery=True,
            nack_delay=Support.NATIVE, dead_letter=True, ordering=Ordering.SINGLE_CONSUMER,
            redelivery_order=RedeliveryOrder.MAY_REORDER,
            delayed_delivery=Support.NATIVE if self._native_schedules else Support.EMULATED,
            dedup_window=s["dedup_window"] or None, max_message_size=s["max_message_size"],
            timings=Timings(delivery=2.0, redelivery=s["ack_wait"] + 2.0, delay_slack=1.0,
                            connect_timeout=s["connect_timeout"] + 1.0,
                            recovery=max(10.0, recovery)))

    def __repr__(self) -> str:
        return f"<JetStreamAdapter {self.url}>"

    # -- names ------------------------------------------------------------------------------

    def subject(self, topic: str) -> str:
        """The subject that carries ``topic``."""
        return f"{self._prefix}.{token(topic)}"

    def stream(self, topic: str) -> str:
        """The stream that stores ``topic``."""
        return f"{self._prefix}-{token(topic)}"

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise BrokerUnavailable("the nats adapter is not connected")
        return self._conn

    # -- lifecycle --------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._conn is not None:
            return
        conn = Connection(self._settings)
        await conn.open()
        try:
            self._check_server(conn.server_info)
            publisher = Publisher(conn, window=self._settings["publish_window"],
                                  timeout=self._settings["publish_timeout"],
                                  retry_for=self._settings["retry_for"],
                                  ensure_stream=self._ensure_stream)
            await publisher.start()
        except BaseException:
            await conn.close()
            raise
        self._conn, self._publisher = conn, publisher

    def _check_server(self, info: dict[str, Any]) -> None:
        if not info.get("jetstream"):
            raise BrokerError(f"{self.url}: JetStream is not enabled on the server (start it "
                              "with -js), or use nats+core:// for core NATS")
        max_payload = int(info.get("max_payload", 0))
        wanted = self._settings["max_message_size"] + _HEADER_ROOM
        if max_payload < wanted:
            raise BrokerError(
                f"{self.url}: the server's max_payload is {max_payload} bytes; "
                f"max_message_size={self._settings['max_message_size']} needs {wanted} "
                f"(lower max_message_size to {max_payload - _HEADER_ROOM})")
        supported = int(info.get("api_lvl", 0)) >= _SCHEDULE_API_LEVEL
        if self._delayed == "native" and not supported:
            raise BrokerError(f"{self.url}: server {info.get('version')} has no message "
                              "schedules (2.12+); use delayed=emulated or delayed=auto")
        if self._delayed == "auto" and not supported:
            self._native_schedules = False
            self.capabilities = replace(self.capabilities,
                                        delayed_delivery=Support.EMULATED)

    async def aclose(self) -> None:
        for consumer in list(self.consumers):
            await consumer.aclose()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    # -- streams and consumers --------------------------------------------------------------

    async def _ensure_stream(self, topic: str, force: bool = False) -> None:
        """Create the topic's stream if this adapter has not seen it (or ``force``)."""
        name = self.stream(topic)
        if name in self._streams and not force:
            return
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._streams and not force:
                return
            await self._create_stream(topic, name)
            self._streams.add(name)

    async def _create_stream(self, topic: str, name: str) -> None:
        import nats.js.errors
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        s = self._settings
        subject = self.subject(topic)
        subjects = [subject, f"{subject}.~s.*"] if self._native_schedules else [subject]
        config = StreamConfig(
            name=name, subjects=subjects, retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE if s["storage"] == "file" else StorageType.MEMORY,
            num_replicas=s["replicas"], duplicate_window=s["dedup_window"],
            max_age=s["max_age"], allow_msg_schedules=True if self._native_schedules else None)
        js = self.conn.nc.jetstream()
        with map_errors(f"create the stream for topic {topic!r}"):
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:     # 10058: exists with another configuration
                    raise
                # A stream made elsewhere is used as it is; only schedules are switched on.
                info = await js.stream_info(name)
                existing = info.config
                missing = [x for x in subjects if x not in (existing.subjects or [])]
                if missing or (self._native_schedules and not existing.allow_msg_schedules):
                    existing.subjects = [*(existing.subjects or []), *missing]
                    if self._native_schedules:
                        existing.allow_msg_schedules = True
                    await js.update_stream(existing)

    async def _ensure_group(self, topic: str, group: str, prefetch: int | None) -> str:
        """Create (or widen) the group's durable consumer; return its name."""
        import nats.js.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await self._ensure_stream(topic)
        stream, name = self.stream(topic), token(group)
        cap = self._settings["max_ack_pending"] or _GROUP_ROOM * (prefetch or _DEFAULT_PREFETCH)
        if prefetch is not None:
            cap = max(cap, prefetch)
        if self._group_caps.get((stream, name), 0) >= cap:
            return name
        js = self.conn.nc.jetstream()
        with map_errors(f"create group {group!r} on topic {topic!r}"):
            try:
                info = await js.consumer_info(stream, name)
            except nats.js.errors.NotFoundError:
                info = await js.add_consumer(stream, ConsumerConfig(
                    name=name, durable_name=name, deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT, ack_wait=self._ack_wait, max_deliver=-1,
                    filter_subject=self.subject(topic), max_ack_pending=cap))
            current = info.config.max_ack_pending or 0
            if 0 < current < cap:
                info.config.max_ack_pending = cap
                info = await js.add_consumer(stream, info.config)
        self._group_caps[(stream, name)] = max(cap, info.config.max_ack_pending or 0)
        return name

    async def _ensure_ephemeral(self, topic: str, prefetch: int, name: str | None,
                                since: float | None = None) -> str:
        """Return ``name`` if that ephemeral consumer still exists, else a new one's name.

        A replacement (the server lost the consumer, e.g. in a restart) starts at
        ``since`` (the last word heard from the server), so that what was published
        while it was being re-created is not skipped; a first one starts at "new".
        """
        import nats.js.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await self._ensure_stream(topic)
        stream = self.stream(topic)
        js = self.conn.nc.jetstream()
        with map_errors(f"subscribe to topic {topic!r}"):
            if name is not None:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.consumer_info(stream, name)
                    return name
            start = None if since is None else datetime.fromtimestamp(since, UTC)
            info = await js.add_consumer(stream, ConsumerConfig(
                name=self.conn.nc._nuid.next().decode(),
                deliver_policy=DeliverPolicy.NEW if start is None else DeliverPolicy.BY_START_TIME,
                opt_start_time=start, ack_policy=AckPolicy.EXPLICIT, ack_wait=self._ack_wait,
                max_deliver=-1, filter_subject=self.subject(topic), max_ack_pending=prefetch,
                inactive_threshold=_EPHEMERAL_INACTIVE, mem_storage=True, num_replicas=1))
        return str(info.name)

    # -- the Adapter SPI --------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[Message], *,
                      not_before: datetime | None = None) -> None:
        publisher = self._publisher
        if publisher is None:
            raise BrokerUnavailable("the nats adapter is not connected")
        await self._ensure_stream(topic)
        subject = self.subject(topic)
        route = None
        if not_before is not None and not_before > datetime.now(UTC):
            route = self._route(subject, not_before)
        await publisher.publish(topic, subject, messages, route)

    def _route(self, subject: str, due: datetime) -> Any:
        due_us = str(micros(due))
        if not self._native_schedules:
            emulated = {NOT_BEFORE: due_us}
            return lambda message: (subject, emulated)
        at = due.astimezone(UTC).strftime("@at %Y-%m-%dT%H:%M:%S.%fZ")
        nuid = self.conn.nc._nuid

        def native(message: Message) -> tuple[str, dict[str, str]]:
            # Each schedule needs its own subject: a schedule replaces the previous one
            # on the same subject.
            return (f"{subject}.~s.{nuid.next().decode()}",
                    {"Nats-Schedule": at, "Nats-Schedule-Target": subject, NOT_BEFORE: due_us,
                     SCHEDULED_ID: quote(message.id, safe=SAFE)})
        return native

    async def declare_group(self, topic: str, group: str) -> None:
        await self._ensure_group(topic, group, None)

    async def open_consumer(self, topics: Sequence[str], group: str | None, *, prefetch: int,
                            dead_letter: str | None) -> Consumer:
        specs = [await self._spec(topic, group, prefetch) for topic in dict.fromkeys(topics)]
        s = self._settings
        consumer = JetStreamConsumer(
            self.conn, self.capabilities, specs, group=group, prefetch=prefetch,
            dead_letter=dead_letter, heartbeat=s["heartbeat"], ack_wait=self._ack_wait,
            publish=self.publish, on_close=self._closed_consumer)
        self.consumers.add(consumer)
        try:
            await consumer.start()
        except BaseException:
            await consumer.aclose()
            raise
        return consumer

    async def _spec(self, topic: str, group: str | None, prefetch: int) -> MemberSpec:
        stream = self.stream(topic)
        if group is not None:
            name = await self._ensure_group(topic, group, prefetch)

            async def recreate_group() -> str:
                self._group_caps.pop((stream, name), None)
                await self._ensure_stream(topic, True)
                return await self._ensure_group(topic, group, prefetch)
            return MemberSpec(topic, stream, name, recreate_group, durable=True)
        async def recreate_ephemeral() -> str:
            await self._ensure_stream(topic, True)
            return await self._ensure_ephemeral(topic, prefetch, spec.consumer, spec.heard)
        spec = MemberSpec(topic, stream, await self._ensure_ephemeral(topic, prefetch, None),
                          recreate_ephemeral, durable=False)
        return spec

    async def _closed_consumer(self, consumer: JetStreamConsumer) -> None:
        self.consumers.discard(consumer)
        conn = self._conn
        if conn is None or conn.closed or not conn.nc.is_connected:
            return      # the server drops the ephemeral consumer after its inactivity
        js = conn.nc.jetstream(timeout=1)
        for spec in consumer.specs:
            if not spec.durable:
                with contextlib.suppress(Exception):
                    await js.delete_consumer(spec.stream, spec.consumer)
