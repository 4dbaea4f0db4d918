"""The exchanges and queues that carry the unibus model on RabbitMQ.

Maps to
    - every topic → a routing key on one durable topic exchange (``exchange`` option,
      default ``unibus``); topic names carry no ``*`` or ``#``, so a binding matches
      exactly one topic;
    - a group → the durable queue ``<topic>:<group>`` bound to the exchange with the
      topic as binding key (``:`` cannot occur in unibus names, so two pairs never
      share a queue); quorum by default (``x-delivery-limit=-1``: RabbitMQ 4 would
      otherwise drop or dead-letter a message after 20 redeliveries), classic with
      ``queue_type=classic``. Names RabbitMQ would refuse (``amq.`` prefix, over 255
      bytes) are prefixed with ``~`` or shortened with a hash;
    - an ephemeral subscription → a server-named, exclusive, auto-delete classic queue;
    - delays → the headers exchange ``<exchange>.delay`` and one durable classic queue
      per delay value: ``<exchange>.delay.<ms>`` (delayed publish: TTL, then dead-lettered
      back to the topic exchange with the topic as routing key, so every group bound at
      that moment gets it) and ``<exchange>.retry.<ms>`` (delayed nack: TTL, then
      dead-lettered through the default exchange to the one group queue). Delays are
      rounded **up** to a bucket (100 ms up to 10 s, then three significant digits), never
      down, so nothing arrives early and no long delay blocks a short one (each queue
      holds one TTL). Idle delay queues expire 7 days after their TTL.

URL
    Uses the ``exchange`` and ``queue_type`` options (see :mod:`unibus_rabbitmq.adapter`).

Driver
    aio-pika channels are passed in; nothing is imported here.

Capabilities
    Decides ``delay_slack``: the bucket rounding (≤ 100 ms up to 10 s, ≤ 1 % above)
    plus RabbitMQ's TTL expiry latency.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from unibus_rabbitmq._codec import DELAY, RETRY

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel

__all__ = ["Topology", "bucket_ms", "group_queue"]

_MAX_NAME = 255
_IDLE_EXPIRY_MS = 7 * 24 * 3600 * 1000


def group_queue(topic: str, group: str) -> str:
    """Return the queue name of ``group`` on ``topic``."""
    name = f"{topic}:{group}"
    if name.startswith("amq."):
        name = "~" + name
    if len(name.encode()) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = f"{name[:200]}~{digest}"
    return name


def bucket_ms(seconds: float) -> int:
    """Round a delay up to its bucket, in milliseconds (0: no delay)."""
    ms = math.ceil(seconds * 1000)
    if ms <= 0:
        return 0
    step = 100 if ms <= 10_000 else 10 ** (len(str(ms)) - 3)
    return -(-ms // step) * step


ChannelSource = Callable[[], Awaitable["AbstractChannel"]]


class Topology:
    """Declares (idempotently, cached per connection) what the adapter routes through.

    Args:
        exchange: The topic exchange's name.
        queue_type: ``quorum`` or ``classic`` for group queues.
        channel: Returns a live channel for declarations.
    """

    def __init__(self, exchange: str, queue_type: str, channel: ChannelSource) -> None:
        self.exchange = exchange
        self.delay_exchange = f"{exchange}.delay"
        self.queue_type = queue_type
        self._channel = channel
        self._declared: set[tuple[str, ...]] = set()

    def reset(self) -> None:
        """Forget what was declared (after a reconnect, declare again)."""
        self._declared.clear()

    def forget_bucket(self, kind: str, ms: int) -> None:
        """Forget one delay queue, e.g. after a publish to it came back unroutable."""
        self._declared.discard((kind, str(ms)))

    def group_arguments(self) -> dict[str, Any]:
        """The ``x-arguments`` of a group queue."""
        if self.queue_type == "quorum":
            return {"x-queue-type": "quorum", "x-delivery-limit": -1}
        return {"x-queue-type": "classic"}

    async def exchanges(self) -> None:
        """Declare the topic exchange and the delay exchange.

        Raises:
            Exception: The driver's error; callers map it.
        """
        if ("exchanges",) in self._declared:
            return
        from aio_pika import ExchangeType

        channel = await self._channel()
        await channel.declare_exchange(self.exchange, ExchangeType.TOPIC, durable=True)
        await channel.declare_exchange(self.delay_exchange, ExchangeType.HEADERS, durable=True)
        self._declared.add(("exchanges",))

    async def group(self, topic: str, group: str) -> str:
        """Declare ``group``'s durable queue on ``topic`` and bind it; return its name.

        Raises:
            Exception: The driver's error; callers map it.
        """
        name = group_queue(topic, group)
        if ("group", name) in self._declared:
            return name
        await self.exchanges()
        channel = await self._channel()
        queue = await channel.declare_queue(name, durable=True,
                                            arguments=self.group_arguments())
        await queue.bind(self.exchange, routing_key=topic)
        self._declared.add(("group", name))
        return name

    async def ephemeral(self, channel: AbstractChannel, topic: str) -> str:
        """Declare a server-named exclusive queue on ``channel`` bound to ``topic``.

        Exclusive queues belong to their connection, so they are never cached.

        Raises:
            Exception: The driver's error; callers map it.
        """
        await self.exchanges()
        queue = await channel.declare_queue("", durable=False, exclusive=True,
                                            auto_delete=True,
                                            arguments={"x-queue-type": "classic"})
        await queue.bind(self.exchange, routing_key=topic)
        return queue.name

    async def bucket(self, kind: str, ms: int) -> None:
        """Declare the ``delay`` (back to the topic) or ``retry`` (back to the queue) queue.

        Raises:
            Exception: The driver's error; callers map it.
        """
        if (kind, str(ms)) in self._declared:
            return
        await self.exchanges()
        channel = await self._channel()
        target = self.exchange if kind == "delay" else ""
        queue = await channel.declare_queue(
            f"{self.exchange}.{kind}.{ms}", durable=True,
            arguments={"x-queue-type": "classic", "x-message-ttl": ms,
                       "x-dead-letter-exchange": target,
                       "x-expires": ms + _IDLE_EXPIRY_MS})
        header = DELAY if kind == "delay" else RETRY
        await queue.bind(self.delay_exchange,
                         arguments={"x-match": "all-with-x", header: str(ms)})
        self._declared.add((kind, str(ms)))
