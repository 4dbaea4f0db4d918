"""The RabbitMQ adapter: ``amqp://`` and ``amqps://`` URLs, on aio-pika.

Maps to
    topic → a routing key on one durable topic exchange (``exchange``, default
    ``unibus``); group → the durable queue ``<topic>:<group>`` bound to it (quorum,
    ``x-delivery-limit=-1``; or classic); ephemeral subscription → an exclusive
    auto-delete queue per topic; publish → ``basic.publish`` (mandatory, persistent)
    with publisher confirms and a bounded window of unconfirmed messages; ack →
    ``basic.ack`` (coalesced into ``multiple`` acks); nack(0) → ``basic.nack(requeue)``
    (quorum) or republish (classic); nack(delay) and delayed publish → per-delay TTL
    queues that dead-letter back, delays rounded up, never down; reject →
    republish to the dead-letter topic, else ``basic.reject``; prefetch →
    ``basic.qos``; connection loss → reconnect, re-declare, resume consumers.
    See ``docs/adapters/rabbitmq.md`` for the details and where RabbitMQ differs.

URL
    ``amqp[s]://[user[:password]@]host[:port][,host[:port]...][/vhost][?option=value&...]``
    — default port 5672 (5671 for ``amqps``), user ``guest``/``guest``, vhost ``/``
    (the path after the first ``/``, percent-decoded: ``%2F`` is ``/``). Several hosts
    are tried in order.

    ====================  ==========  =====================================================
    option                default     meaning
    ====================  ==========  =====================================================
    ``heartbeat``         5           AMQP heartbeat, whole seconds (0: off)
    ``connect_timeout``   5           seconds to reach a broker, else BrokerUnavailable
    ``recovery``          30          seconds to keep reconnecting after a loss
    ``prefetch``          64          prefetch of subscriptions that give none
    ``queue_type``        quorum      group queues: ``quorum`` or ``classic``
    ``exchange``          unibus      the topic exchange (delay queues named after it)
    ``publish_window``    1024        unconfirmed publishes in flight per call
    ``max_message_size``  16777216    largest body, bytes (RabbitMQ 4's default limit)
    ``ca_file``           —           ``amqps``: PEM CA bundle verifying the broker
    ``cert_file``         —           ``amqps``: PEM client certificate (mutual TLS)
    ``key_file``          —           ``amqps``: PEM key of ``cert_file``
    ``verify``            true        ``amqps``: ``false`` skips certificate checks
    ====================  ==========  =====================================================

    An unknown option, or a TLS option on ``amqp://``, is an ``InvalidURL``.

Driver
    aio-pika (and its protocol layer aiormq), imported lazily: this package imports
    without it. Every driver exception is mapped to the unibus error tree.

Capabilities
    Persistent; publish confirmed; groups retain messages; a new group does not
    replay history; redelivery with ``attempt`` from ``x-delivery-count`` (quorum);
    nack with delay and delayed publish emulated broker-side with TTL queues (never
    early, within ``delay_slack``); reject to the dead-letter topic; publish order
    for a single consumer, redelivery may reorder; no deduplication (declared
    absent); prefetch bounds unsettled deliveries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar

from unibus.capabilities import Capabilities, Ordering, RedeliveryOrder, Support, Timings
from unibus.errors import PublishFailed, UnibusError
from unibus.message import Message
from unibus.options import Options
from unibus.spi import Adapter, Consumer
from unibus.url import URL
from unibus_rabbitmq._codec import DELAY, encode_headers, properties
from unibus_rabbitmq._connection import Connection
from unibus_rabbitmq._errors import map_errors
from unibus_rabbitmq._publisher import Outgoing, Publisher
from unibus_rabbitmq._topology import Topology, bucket_ms
from unibus_rabbitmq._url import OPTIONS, parse_settings
from unibus_rabbitmq.consumer import RabbitMQConsumer

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel

__all__ = ["RabbitMQAdapter"]


class RabbitMQAdapter(Adapter):
    """The ``amqp://`` / ``amqps://`` adapter (see the module docstring)."""

    options: ClassVar[Options] = OPTIONS

    def __init__(self, url: URL) -> None:
        """Validate ``url``; no I/O.

        Raises:
            InvalidURL: An option is unknown or invalid, or the URL has no host.
        """
        super().__init__(url)
        self.settings = s = parse_settings(url)
        self.default_prefetch = s.prefetch
        self.capabilities = Capabilities(
            name="rabbitmq", persistent=True, publish_confirms=True, group_retention=True,
            replay_for_new_groups=False, redelivery=True, nack_delay=Support.EMULATED,
            dead_letter=True, ordering=Ordering.SINGLE_CONSUMER,
            redelivery_order=RedeliveryOrder.MAY_REORDER, delayed_delivery=Support.EMULATED,
            dedup_window=None, max_message_size=s.max_message_size, prefetch=True,
            timings=Timings(
                delivery=2.0, redelivery=2.0 + 2 * s.heartbeat, delay_slack=1.0,
                connect_timeout=s.connect_timeout * len(s.hosts) + 1.0,
                recovery=s.recovery + s.connect_timeout))
        self.connection = Connection(s, name=f"unibus pid {os.getpid()}")
        self.topology = Topology(s.exchange, s.queue_type, self._declaring_channel)
        self.publisher = Publisher(self.connection, s.publish_window)
        self._declaring: AbstractChannel | None = None
        self._consumers: set[RabbitMQConsumer] = set()
        self.connection.add_listener(self._recovered)

    def __repr__(self) -> str:
        return f"<RabbitMQAdapter {self.url}>"

    async def connect(self) -> None:
        """Connect and declare the exchanges.

        Raises:
            BrokerUnavailable: No broker reachable within the connect timeout.
            AuthenticationFailed: Credentials or vhost refused.
            BrokerError: The exchanges could not be declared (e.g. another type).
        """
        await self.connection.open()
        with map_errors("declaring the exchanges", self.settings.password):
            await self.topology.exchanges()

    async def _declaring_channel(self) -> AbstractChannel:
        channel = self._declaring
        if channel is None or channel.is_closed:
            # A refused declaration closes its channel: the next one opens a new one.
            channel = self._declaring = await self.connection.channel(confirms=False)
        return channel

    async def _recovered(self) -> None:
        self.topology.reset()
        if self.connection.failure is None:
            with map_errors("declaring the exchanges", self.settings.password):
                await self.topology.exchanges()
        for consumer in list(self._consumers):
            await consumer.resume()

    async def aclose(self) -> None:
        """Close every consumer, then the connection. Idempotent."""
        for consumer in list(self._consumers):
            await consumer.aclose()
        if self.connection.is_open:
            with contextlib.suppress(UnibusError):
                await self.publisher.aclose()
        await self.connection.aclose()

    async def publish(self, topic: str, messages: Sequence[Message], *,
                      not_before: datetime | None = None) -> None:
        """Publish ``messages`` to ``topic`` and wait for every confirmation.

        A topic without groups keeps nothing: RabbitMQ returns such messages as
        unroutable, which is not an error (see ``docs/adapters/rabbitmq.md``).

        Raises:
            InvalidMessage: A header uses a name reserved on RabbitMQ.
            PublishFailed: A message was nacked, or not confirmed within ``recovery``.
            BrokerUnavailable: The broker could not be reached.
        """
        ms = 0
        if not_before is not None:
            ms = bucket_ms((not_before - datetime.now(UTC)).total_seconds())
        if ms:
            extra = {DELAY: str(ms)}
            items = [(m.id, m.body, properties(m, encode_headers(m, extra))) for m in messages]
            await self.send_delayed("delay", ms, topic, items)
            return
        items = [(m.id, m.body, properties(m, encode_headers(m))) for m in messages]
        try:
            with map_errors(f"publishing to {topic!r}", self.settings.password):
                await self.publisher.send(self.topology.exchange, topic, items,
                                          must_route=False)
        except PublishFailed:
            # The exchange may have been deleted under us: declare it again next time.
            self.topology.reset()
            raise

    async def send_delayed(self, kind: str, ms: int, routing_key: str,
                           items: Sequence[Outgoing]) -> None:
        """Publish ``items`` through the ``kind`` (delay or retry) queue of ``ms``.

        A delay queue that expired since it was declared is declared again and the
        returned messages go out once more; returned twice, they fail.

        Raises:
            PublishFailed: A message was nacked or could not be routed.
            BrokerUnavailable: The broker could not be reached.
        """
        topology = self.topology
        with map_errors(f"publishing with a delay of {ms} ms", self.settings.password):
            await topology.bucket(kind, ms)
            returned = await self.publisher.send(topology.delay_exchange, routing_key, items,
                                                 must_route=False)
            if returned:
                topology.forget_bucket(kind, ms)
                await topology.bucket(kind, ms)
                await self.publisher.send(topology.delay_exchange, routing_key,
                                          [items[i] for i in returned], must_route=True)

    async def declare_group(self, topic: str, group: str) -> None:
        """Create the group's durable queue and bind it to the topic.

        Raises:
            BrokerError: The broker refused (e.g. the queue exists with another type).
            BrokerUnavailable: The broker could not be reached.
        """
        with map_errors(f"declaring group {group!r} on {topic!r}", self.settings.password):
            await self.topology.group(topic, group)

    async def open_consumer(self, topics: Sequence[str], group: str | None, *, prefetch: int,
                            dead_letter: str | None) -> Consumer:
        """Attach a consumer; it is receiving when this returns.

        Raises:
            BrokerError: The broker refused a declaration or the consumer.
            BrokerUnavailable: The broker could not be reached.
        """
        consumer = RabbitMQConsumer(self, topics, group, prefetch, dead_letter)
        self._consumers.add(consumer)
        try:
            await consumer.start()
        except BaseException:
            await consumer.aclose()
            raise
        return consumer

    def forget(self, consumer: RabbitMQConsumer) -> None:
        """Stop resuming ``consumer`` after reconnects (it closed)."""
        self._consumers.discard(consumer)
