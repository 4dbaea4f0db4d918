"""The producer side: one idempotent ``acks=all`` producer, its poll thread, topic creation.

confluent-kafka blocks, so the adapter bridges it here: ``produce`` only queues a
record (it never blocks), and ``poll`` serves the delivery reports. A publish of N
messages registers one :class:`_Batch`; the reports count it down, and the last one
finishes it — no task and no thread hop per message. The confluent-kafka asyncio
wrappers are not used.

Who serves the reports:

- while publish calls wait for the reports of ``_LOOP_SERVES_FROM`` records or more,
  the event loop itself: ``poll(0)`` (which never blocks) every ``_SERVE_EVERY``
  seconds, and once per ``_SERVE_PER`` records a publish queues. confluent-kafka
  takes the GIL for every report it serves, so a thread serving them while the loop
  is busy hands the GIL back and forth once per report; served on the loop, that
  costs nothing (publishing 200,000 records: ~190k → ~220k a second, end to end
  ~130k → ~145k);
- otherwise a daemon thread, blocked in ``poll``: a lone ``publish`` is woken as
  soon as its report comes (not at the loop's next tick), and error reports and the
  driver's log lines are served while nothing is published. The loop wakes the
  thread when it hands the reports back.

Both may serve at once for a moment (the thread finishing its ``poll`` as the loop
takes over): a batch's count is safe from either side.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from unibus.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerUnavailable,
    PublishFailed,
    UnibusError,
)
from unibus.message import Message
from unibus_kafka._codec import META_HEADER, encode_headers, record_id, stamp
from unibus_kafka._errors import TOPIC_ALREADY_EXISTS, DriverLog, Scrubber, map_errors, to_unibus
from unibus_kafka._url import Settings

__all__ = ["Producer"]

log = logging.getLogger("unibus.kafka")

_AUTH_CODES = frozenset({-169, 58, 33, 34})
_POLL = 0.05
# The driver's RD_KAFKA_PARTITION_UA: the partitioner chooses (by key).
_ANY_PARTITION = -1
# While publishes wait for reports, the event loop serves them this often.
_SERVE_EVERY = 0.001
# ... and in between, once per this many records it queues.
_SERVE_PER = 1024
# ... once publishes wait for the reports of this many records at least.
_LOOP_SERVES_FROM = 64


class _Batch:
    """The delivery reports of one publish call, counted down as they are served.

    Reports may be served on the event loop or on the poll thread, at times both at
    once: the count is one ``next`` of an ``itertools.count`` (atomic under the GIL).
    ``seal`` takes a number too, so exactly one party draws ``expected + 1`` — the
    last report if ``seal`` came first (``expected`` was set before its draw), or
    ``seal`` itself — and finishes the batch.
    """

    __slots__ = ("_count", "errors", "expected", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self._count = itertools.count(1)
        self.expected = -2
        self.errors: list[tuple[Any, Any]] = []

    def report(self, error: Any, record: Any) -> None:
        """The delivery callback."""
        if error is not None:
            self.errors.append((error, record))
        if next(self._count) == self.expected + 1:
            self.loop.call_soon_threadsafe(self._finish)

    def seal(self, expected: int) -> None:
        """Say how many reports to wait for (event loop)."""
        self.expected = expected
        if next(self._count) == expected + 1:
            self._finish()

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class Producer:
    """The adapter's producer and admin client (see the module docstring)."""

    def __init__(self, settings: Settings, scrub: Scrubber) -> None:
        self._settings = settings
        self._scrub = scrub
        self._producer: Any = None
        self._admin: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._known_topics: set[str] = set()
        # Records whose reports publish calls wait for; from _LOOP_SERVES_FROM on, the
        # event loop serves the reports itself (``loop_serves`` tells the poll thread
        # to keep off; ``_handback`` wakes it when the loop stops).
        self._awaited = 0
        self._timer: asyncio.Handle | None = None
        self.loop_serves = False
        self._handback = threading.Event()
        self.auth_error: Any = None
        self.fatal_error: Any = None
        self.last_error: Any = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Create the clients and check that the bootstrap list answers.

        Raises:
            BrokerUnavailable: No broker answered within the connect timeout.
            AuthenticationFailed: The broker refused the credentials.
        """
        from confluent_kafka import Producer as KafkaProducer
        from confluent_kafka.admin import AdminClient

        settings = self._settings
        deadline = time.monotonic() + settings.connect_timeout
        with map_errors("creating the Kafka producer", self._scrub):
            config: dict[str, Any] = {**settings.producer(), "error_cb": self._on_error,
                                      "logger": DriverLog(self._scrub)}
            self._producer = KafkaProducer(config)
            admin_config: dict[str, Any] = {**settings.common(), "error_cb": self._on_error,
                                            "logger": DriverLog(self._scrub)}
            self._admin = AdminClient(admin_config)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="unibus-kafka-producer",
                                        daemon=True)
        self._thread.start()
        try:
            await asyncio.to_thread(self._probe, deadline)
        except BaseException:
            await self.close(flush=0.0)
            raise

    def _on_error(self, error: Any) -> None:
        # librdkafka reports connection trouble here and retries by itself; only
        # refused credentials and fatal errors change what unibus does.
        if error.code() in _AUTH_CODES:
            self.auth_error = error
        elif error.fatal():
            self.fatal_error = error
        self.last_error = error
        log.debug("kafka client: %s", self._scrub(error.str()))

    def _probe(self, deadline: float) -> None:
        from confluent_kafka import KafkaException

        last: Any = None
        while True:
            if self.auth_error is not None:
                raise to_unibus(self.auth_error, "connecting to Kafka", self._scrub)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._producer.list_topics(timeout=min(remaining, 0.5))
                return
            except KafkaException as exc:
                last = exc.args[0] if exc.args else None
        # The client's own report (refused connection, TLS handshake, ...) says more
        # than the metadata request's "transport failure".
        cause = self.last_error or last
        detail = f": {self._scrub(cause.str())}" if cause is not None else ""
        raise BrokerUnavailable(
            f"no Kafka broker of {self._settings.bootstrap} answered within "
            f"{self._settings.connect_timeout:g}s{detail}")

    def _serve(self) -> None:
        producer = self._producer
        admin = self._admin
        stop = self._stop
        while not stop.is_set():
            try:
                if self.loop_serves:
                    # The loop serves the reports (no GIL hand-off per report); this
                    # thread only keeps the admin client's log lines moving.
                    self._handback.wait(_POLL)
                    self._handback.clear()   # loop_serves is read again first
                else:
                    producer.poll(_POLL)
                admin.poll(0)   # serves the admin client's log lines
            except Exception:   # a callback's bug must not kill the thread
                log.exception("unibus kafka producer poll failed")

    def _serve_reports(self) -> None:
        """Serve the delivery reports on the event loop while publishes wait for them."""
        self._timer = None
        producer = self._producer
        if producer is None or self._awaited < _LOOP_SERVES_FROM:
            self.loop_serves = False
            self._handback.set()
            return
        try:
            producer.poll(0)
        finally:
            self._timer = asyncio.get_running_loop().call_later(_SERVE_EVERY,
                                                                self._serve_reports)

    async def close(self, *, flush: float) -> None:
        """Deliver what is queued (up to ``flush`` seconds), then stop. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            self._handback.set()
            await asyncio.to_thread(thread.join)
        producer, self._producer = self._producer, None
        self._admin = None
        if producer is not None:
            def finish() -> None:
                with map_errors("flushing the Kafka producer", self._scrub):
                    if producer.flush(flush) > 0:
                        # Unconfirmed messages: their publish calls fail, never hang.
                        producer.purge()
                        producer.poll(0)
            await asyncio.to_thread(finish)

    # -- topics ------------------------------------------------------------------

    async def ensure_topics(self, names: Sequence[str]) -> None:
        """Create the topics that unibus has not seen yet (``partitions`` each).

        Raises:
            BrokerError: The broker refused to create a topic.
        """
        missing = [n for n in dict.fromkeys(names) if n not in self._known_topics]
        if missing:
            await asyncio.to_thread(self._create_topics, self._admin_client(), missing)
            self._known_topics.update(missing)

    def _admin_client(self) -> Any:
        """The admin client, read on the event loop: a thread started later must not
        find it gone (``close`` clears it)."""
        admin = self._admin
        if admin is None:
            raise BrokerUnavailable("the Kafka adapter is not connected")
        return admin

    def _create_topics(self, admin: Any, names: list[str]) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

        settings = self._settings
        timeout = max(settings.connect_timeout, 5.0)
        with map_errors(f"creating topics {names}", self._scrub):
            futures = admin.create_topics(
                [NewTopic(n, num_partitions=settings.partitions,
                          replication_factor=settings.replication_factor) for n in names],
                operation_timeout=timeout, request_timeout=timeout)
            for name, future in futures.items():
                try:
                    future.result()
                except KafkaException as exc:
                    if exc.args[0].code() != TOPIC_ALREADY_EXISTS:
                        raise
                    log.debug("topic %s exists already", name)
            # Creation is acknowledged by the controller before every broker's metadata
            # shows the topic: wait until it does, so that subscribing assigns it.
            deadline = time.monotonic() + timeout
            pending = set(names)
            while pending and time.monotonic() < deadline:
                metadata = admin.list_topics(timeout=timeout)
                for name in list(pending):
                    topic = metadata.topics.get(name)
                    if (topic is not None and topic.error is None and topic.partitions
                            and all(p.leader >= 0 for p in topic.partitions.values())):
                        pending.discard(name)
                if pending:
                    time.sleep(0.05)
        if pending:
            raise BrokerError(f"topics {sorted(pending)} were created but did not appear in "
                              f"the cluster metadata within {timeout:g}s")

    async def partitions(self, topic: str) -> list[int]:
        """The partition numbers of ``topic``.

        Raises:
            BrokerError: The metadata could not be read.
        """
        admin = self._admin_client()

        def read() -> list[int]:
            with map_errors(f"reading the partitions of {topic!r}", self._scrub):
                metadata = admin.list_topics(topic, timeout=self._settings.connect_timeout)
            entry = metadata.topics.get(topic)
            if entry is None or entry.error is not None:
                raise BrokerError(f"topic {topic!r} has no metadata: {entry and entry.error}")
            return sorted(entry.partitions)
        return await asyncio.to_thread(read)

    # -- publishing --------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[Message], *,
                      extra: list[tuple[str, str]] | None = None) -> None:
        """Produce ``messages`` to ``topic`` and wait for every delivery report.

        Args:
            topic: The topic (created if unibus has not seen it).
            messages: The messages, in order.
            extra: Bookkeeping headers for every message (due time, attempt, origin).

        Raises:
            PublishFailed: A message was refused or not confirmed (its id attached).
            BrokerUnavailable: The adapter is not connected.
        """
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable("the Kafka adapter is not connected")
        if self.fatal_error is not None:
            raise to_unibus(self.fatal_error, "the Kafka producer failed", self._scrub)
        await self.ensure_topics((topic,))
        # Queued after close flushed (the topic was being created), a record would never
        # be reported: every queued one is flushed or purged, each with its report.
        self._still_open(producer)
        loop = asyncio.get_running_loop()
        batch = _Batch(loop)
        count = len(messages)
        # Counted from the start: the first reports come while the rest is queued.
        self._awaited += count
        if self._awaited >= _LOOP_SERVES_FROM and self._timer is None:
            self.loop_serves = True
            self._timer = loop.call_soon(self._serve_reports)
        try:
            failure = await self._produce(producer, topic, messages, extra, batch)
            await batch.future
        finally:
            self._awaited -= count
        if batch.errors:
            error, _ = batch.errors[0]
            ids = tuple(record_id(record) for _, record in batch.errors)
            raise to_unibus(error, f"publishing to {topic!r}", self._scrub,
                            message_ids=ids)
        if failure is not None:
            raise failure

    async def _produce(self, producer: Any, topic: str, messages: Sequence[Message],
                       extra: list[tuple[str, str]] | None,
                       batch: _Batch) -> UnibusError | None:
        """Queue ``messages`` and seal ``batch`` with how many were queued; the error
        that stopped it short, if any (what was queued is still reported)."""
        produce = producer.produce
        report = batch.report
        sent = 0
        failure: UnibusError | None = None
        last_us = -1
        front = b""
        try:
            for message in messages:
                key = message.key
                if extra is None and not message.headers:
                    # The common message: its one header without the general encoder,
                    # the front of it made once for the messages of one moment (this
                    # loop runs once per message).
                    us = message.timestamp_us
                    if us != last_us:
                        last_us, front = us, stamp(us)
                    headers = [(META_HEADER, front + message.id.encode())]
                else:
                    headers = encode_headers(message, extra)
                while True:
                    try:
                        # Positional: the driver parses keywords at ~0.4 µs a call. Its
                        # order is topic, value, key, partition, callback, on_delivery
                        # (an alias), timestamp (0: now), headers.
                        produce(topic, message.body, None if key is None else key.encode(),
                                _ANY_PARTITION, report, None, 0, headers)
                        break
                    except BufferError:
                        # The local queue is full: give the driver time to send and the
                        # reports time to be served.
                        await asyncio.sleep(0.002)
                        self._still_open(producer)
                sent += 1
                if not sent % _SERVE_PER:
                    producer.poll(0)   # the reports of what went before, on this thread
        except Exception as exc:
            failure = self._refused(exc, topic, messages[sent:])
        batch.seal(sent)
        return failure

    def _still_open(self, producer: Any) -> None:
        """Raise if the adapter closed (and flushed ``producer``) while a publish waited.

        Raises:
            BrokerUnavailable: It did.
        """
        if self._producer is not producer:
            raise BrokerUnavailable("the Kafka adapter was closed while publishing")

    def _refused(self, exc: Exception, topic: str, unsent: Sequence[Message]) -> UnibusError:
        ids = tuple(m.id for m in unsent)
        try:
            with map_errors(f"publishing message {ids[0]} to {topic!r}", self._scrub):
                raise exc
        except UnibusError as mapped:
            if isinstance(mapped, AuthenticationFailed):
                return mapped
            return PublishFailed(str(mapped), message_ids=ids)
