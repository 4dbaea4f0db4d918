"""The Apache Kafka adapter: ``kafka://`` and ``kafka+ssl://`` through confluent-kafka.

Maps to
    topic → a Kafka topic, created explicitly with ``partitions`` partitions; key →
    record key (it chooses the partition); group → consumer group (``group.id``), a
    new group starting at the beginning of the topic (``auto.offset.reset=earliest``);
    ephemeral subscription → every partition assigned at its end, no group;
    ack → commit of the highest contiguous settled offset; nack(delay) → the record
    is copied to the group's retry lane (topic ``unibus-retry.<hash>.<topic>.<group>``)
    with ``unibus.attempt`` and ``unibus.due`` headers, then the original is settled;
    reject → the subscription's dead-letter topic; delayed publish → the record is
    written now to the topic's delay lane (``unibus-delay.<hash>.<topic>``) with a
    ``unibus.due`` header, and every consumer of the topic holds it until then.

URL
    ``kafka://[user:password@]host[:port][,host[:port]...][?option=value&...]`` and
    ``kafka+ssl://...`` (TLS). A user name turns SASL on (SCRAM-SHA-512 unless
    ``sasl_mechanism`` says otherwise).

    =======================  ===================  ==========================================
    option                   default              meaning
    =======================  ===================  ==========================================
    ``partitions``           4                    partitions of each topic unibus creates
    ``replication_factor``   -1                   replicas of created topics (-1: broker's)
    ``client_id``            unibus               client.id
    ``connect_timeout``      5                    seconds before ``BrokerUnavailable``
    ``session_timeout``      6                    group session timeout, seconds
    ``publish_timeout``      30                   message.timeout.ms, seconds
    ``linger``               0.005                producer batching window, seconds
    ``commit_interval``      0.2                  seconds between offset commits
    ``message_max_bytes``    1000000              producer message.max.bytes
    ``assignment_strategy``  cooperative-sticky   or range, roundrobin
    ``group_protocol``       classic              or consumer (KIP-848)
    ``security_protocol``    from the scheme      PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    ``sasl_mechanism``       SCRAM-SHA-512        or SCRAM-SHA-256, PLAIN
    ``ssl_cafile``           —                    CA bundle (PEM)
    ``ssl_certfile``         —                    client certificate (PEM)
    ``ssl_keyfile``          —                    client key (PEM)
    ``ssl_key_password``     —                    the client key's password (secret)
    ``ssl_check_hostname``   true                 verify the broker's host name
    =======================  ===================  ==========================================

Driver
    confluent-kafka (librdkafka), blocking: one producer with a poll thread per adapter,
    one consumer with its own thread per subscription; batches cross to the event loop
    with one ``call_soon_threadsafe`` each. Classic group protocol by default.

Capabilities
    Persistent; publish confirmed (``acks=all``, idempotent producer); groups retain
    messages and a new group replays the topic's history; nack with emulated delay
    (retry lane); reject to the dead-letter topic; per-key order (partition) across
    competing consumers; a redelivery may reorder (the retry lane is another topic);
    emulated delayed delivery (delay lane); no dedup window; bodies up to ``message_max_bytes``
    minus 32 KiB.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar

from unibus.capabilities import Capabilities, Ordering, RedeliveryOrder, Support, Timings
from unibus.errors import BrokerUnavailable
from unibus.message import Message
from unibus.options import Options
from unibus.spi import Adapter, Consumer
from unibus.url import URL
from unibus_kafka._codec import DUE, ORIGIN, timestamp_us
from unibus_kafka._consumer import KafkaConsumer
from unibus_kafka._errors import Scrubber
from unibus_kafka._producer import Producer
from unibus_kafka._url import OPTIONS, parse_settings

__all__ = ["KafkaAdapter", "delay_topic", "retry_topic"]

log = logging.getLogger("unibus.kafka")

#: The broker's default group.consumer.session.timeout.ms (KIP-848), in seconds.
_KIP848_SESSION_TIMEOUT = 45.0


def _lane(kind: str, *names: str) -> str:
    """``unibus-<kind>.<hash>.<names...>``: a lane's topic name.

    The hash of the names keeps names apart that the dots would make ambiguous; the
    names share 200 characters, keeping the topic within Kafka's 249.
    """
    digest = hashlib.sha256("\0".join(names).encode()).hexdigest()[:10]
    keep = 200 // len(names)
    return ".".join([f"unibus-{kind}", digest, *(name[:keep] for name in names)])


def retry_topic(topic: str, group: str) -> str:
    """The retry lane of ``group`` on ``topic``: one topic per (topic, group)."""
    return _lane("retry", topic, group)


def delay_topic(topic: str) -> str:
    """The delay lane of ``topic``, where its delayed publishes wait: one per topic.

    Apart from the topic so that a message held until its due time never stops the
    topic's commit point, and so that a record of the topic itself needs no look at
    its headers before it is handed out.
    """
    return _lane("delay", topic)


class KafkaAdapter(Adapter):
    """The ``kafka://`` adapter (see the module docstring)."""

    options: ClassVar[Options] = OPTIONS

    def __init__(self, url: URL) -> None:
        """Validate ``url`` and its options. No I/O.

        Raises:
            InvalidURL: The URL or one of its options is invalid or unknown.
        """
        super().__init__(url)
        self._settings = settings = parse_settings(url)
        self._scrub = Scrubber(url.password, settings.security.get("ssl.key.password"))
        # With KIP-848 the broker owns the session timeout (45 s by default).
        session = (settings.session_timeout if settings.group_protocol == "classic"
                   else _KIP848_SESSION_TIMEOUT)
        timings = Timings(
            delivery=3.0,
            redelivery=session + 3.0,
            delay_slack=1.0,
            # The probe gives up at connect_timeout; closing the clients adds a little.
            connect_timeout=settings.connect_timeout + 0.5,
            recovery=30.0,
        )
        self.capabilities = Capabilities(
            name="kafka", persistent=True, publish_confirms=True, group_retention=True,
            replay_for_new_groups=True, redelivery=True, nack_delay=Support.EMULATED,
            dead_letter=True, ordering=Ordering.PER_KEY,
            redelivery_order=RedeliveryOrder.MAY_REORDER, delayed_delivery=Support.EMULATED,
            dedup_window=None, max_message_size=settings.max_body, timings=timings)
        self._producer: Producer | None = None
        self._consumers: set[KafkaConsumer] = set()

    def __repr__(self) -> str:
        return f"<KafkaAdapter {self.url}>"

    @property
    def _connected(self) -> Producer:
        if self._producer is None:
            raise BrokerUnavailable("the Kafka adapter is not connected")
        return self._producer

    async def connect(self) -> None:
        """Create the producer and check that a broker answers.

        Raises:
            BrokerUnavailable: No broker of the bootstrap list answered in time.
            AuthenticationFailed: The broker refused the credentials.
        """
        if self._producer is None:
            producer = Producer(self._settings, self._scrub)
            await producer.start()
            self._producer = producer

    async def aclose(self) -> None:
        """Close every consumer (committing what is settled), then flush the producer."""
        for consumer in list(self._consumers):
            await consumer.aclose()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.close(flush=min(self._settings.publish_timeout, 5.0))

    async def publish(self, topic: str, messages: Sequence[Message], *,
                      not_before: datetime | None = None) -> None:
        """Produce ``messages`` and wait for every delivery report.

        Raises:
            PublishFailed: A message was refused or not confirmed (ids attached).
            BrokerUnavailable: The adapter is not connected.
        """
        producer = self._connected
        if not_before is None:
            await producer.publish(topic, messages)
            return
        # The topic too: its subscribers read the lane along with it.
        lane = delay_topic(topic)
        await producer.ensure_topics((topic, lane))
        await producer.publish(lane, messages, extra=[(DUE, str(timestamp_us(not_before))),
                                                      (ORIGIN, topic)])

    async def declare_group(self, topic: str, group: str) -> None:
        """Create the topic, its delay lane and the group's retry lane.

        A new Kafka group starts at the beginning of its topic, so the group keeps
        everything published from now on even before its first consumer joins.

        Raises:
            BrokerError: The broker refused to create a topic.
        """
        await self._connected.ensure_topics((topic, delay_topic(topic), retry_topic(topic, group)))

    async def open_consumer(self, topics: Sequence[str], group: str | None, *, prefetch: int,
                            dead_letter: str | None) -> Consumer:
        """Join ``group`` (or attach ephemerally) and return once partitions are assigned.

        Raises:
            BrokerError: The broker refused.
        """
        producer = self._connected
        retry = {t: retry_topic(t, group) for t in topics} if group is not None else {}
        lanes = [*(delay_topic(t) for t in topics), *retry.values()]
        await producer.ensure_topics([*topics, *lanes])
        consumer = KafkaConsumer(
            settings=self._settings, producer=producer, scrub=self._scrub,
            capabilities=self.capabilities, topics=topics, lanes=lanes, group=group,
            retry_topics=retry, prefetch=prefetch, dead_letter=dead_letter,
            on_close=self._consumers.discard)
        self._consumers.add(consumer)
        try:
            await consumer.start()
        except BaseException:
            await consumer.aclose()
            raise
        return consumer
