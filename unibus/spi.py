"""The adapter SPI: what a broker adapter implements.

Two small ABCs. The core (:mod:`unibus.bus`) validates messages, enforces
closed-state and settlement rules, and turns these into the public API; an
adapter only talks to its broker.

Contract for every adapter:

- ``__init__`` validates the URL (unknown option ⇒ ``InvalidURL``) and does no I/O.
- ``connect`` reaches the broker within the declared connect timeout or raises
  ``BrokerUnavailable``; refused credentials raise ``AuthenticationFailed`` at once.
- No driver exception escapes any method: each maps to a ``UnibusError``.
- Methods may be called concurrently from tasks of one event loop. The core calls
  ``connect`` once (concurrent first calls wait for it) and ``open_consumer`` once
  per subscription, but ``aclose`` may come before ``connect``, while ``connect`` is
  still in flight (the core then calls it again once ``connect`` returns), and more
  than once: it must tolerate all three.
- Arguments are validated by the core: names pass ``bus.check_name``, messages are
  :class:`~unibus.message.Message` objects within ``max_message_size``, ``prefetch``
  and ``max_count`` are at least 1, ``delay`` is finite and non-negative.
- Nothing accepted is lost: ``publish`` returns only once every message is
  durably accepted (where ``capabilities.publish_confirms``), and unsettled
  deliveries of a closed consumer return to their group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar

from unibus.capabilities import Capabilities
from unibus.errors import UnsupportedFeature
from unibus.message import Delivery, Message
from unibus.options import Options
from unibus.url import URL

__all__ = ["DEFAULT_PREFETCH", "Adapter", "Consumer"]

#: The prefetch of subscriptions that give none, unless the adapter sets its own.
DEFAULT_PREFETCH = 64


class Consumer(ABC):
    """One attached consumer: fetches deliveries and settles them.

    Safe to use from several tasks of one event loop. ``fetch`` may run
    concurrently with settlement; ``aclose`` may be called while a ``fetch`` is
    blocked, which then returns ``[]``.
    """

    capabilities: Capabilities

    @abstractmethod
    async def fetch(self, max_count: int, timeout: float | None) -> list[Delivery]:
        """Return between 1 and ``max_count`` deliveries, waiting up to ``timeout``.

        Never hands out more than the consumer's prefetch in unsettled deliveries:
        when that many are unsettled it waits for settlements.

        Cancelling a blocked ``fetch`` loses nothing: a delivery is only handed out
        by a ``fetch`` that returns, and unsettled deliveries go back to the group
        when the consumer closes.

        Returns:
            The deliveries, or ``[]`` when the timeout passed or the consumer was closed.

        Raises:
            BrokerError: The broker failed and the consumer could not recover.
        """

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Settle ``delivery`` as done. The adapter may batch acks internally.

        Raises:
            DeliveryLost: The delivery's channel is gone; the broker redelivers it.
        """

    @abstractmethod
    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Return ``delivery`` to its group, to be redelivered no sooner than ``delay`` s.

        Raises:
            DeliveryLost: The delivery's channel is gone; the broker redelivers it.
        """

    @abstractmethod
    async def reject(self, delivery: Delivery) -> None:
        """Drop ``delivery`` for good; route it to the dead-letter topic if configured.

        Raises:
            DeliveryLost: The delivery's channel is gone; the broker redelivers it.
        """

    def check_nack(self, delay: float) -> None:
        """Raise before settling when a ``nack(delay)`` cannot be honoured.

        Raises:
            UnsupportedFeature: The adapter declares no redelivery, or no delayed nack.
        """
        caps = self.capabilities
        if not caps.redelivery:
            raise UnsupportedFeature(f"{caps.name} does not redeliver: nack is not supported; "
                                     "ack or reject the delivery")
        if delay > 0 and not caps.nack_delay:
            raise UnsupportedFeature(f"{caps.name} cannot delay a redelivery: use nack(delay=0)")

    @abstractmethod
    async def aclose(self) -> None:
        """Detach. Unsettled deliveries go back to the group. Idempotent."""


class Adapter(ABC):
    """A broker adapter, constructed from a URL by the registry.

    Attributes:
        options: The URL query options this adapter accepts.
        capabilities: The semantics this adapter declares (may depend on the URL).
        default_prefetch: The prefetch of subscriptions that give none.
    """

    options: ClassVar[Options]
    capabilities: Capabilities
    #: The prefetch of subscriptions that give none (``Bus.subscribe(prefetch=None)``);
    #: an adapter may take it from its URL.
    default_prefetch: int = DEFAULT_PREFETCH

    def __init__(self, url: URL) -> None:
        """Validate ``url`` and its options. No I/O.

        Raises:
            InvalidURL: The URL or one of its options is invalid or unknown.
        """
        self.url = url

    @abstractmethod
    async def connect(self) -> None:
        """Connect to the broker.

        Raises:
            BrokerUnavailable: Not reachable within the connect timeout.
            AuthenticationFailed: Credentials refused.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close every consumer and the connection. Idempotent."""

    @abstractmethod
    async def publish(self, topic: str, messages: Sequence[Message], *,
                      not_before: datetime | None = None) -> None:
        """Publish ``messages`` to ``topic``, in order, and wait for every confirmation.

        The messages are already validated by the core. ``not_before`` (UTC) delays
        delivery; it is only passed when ``capabilities.delayed_delivery``.

        Raises:
            PublishFailed: A message was refused or not confirmed (ids attached).
            BrokerUnavailable: The broker could not be reached.
        """

    @abstractmethod
    async def declare_group(self, topic: str, group: str) -> None:
        """Create ``group`` on ``topic`` if it does not exist, so that it retains messages.

        Raises:
            BrokerError: The broker refused.
        """

    @abstractmethod
    async def open_consumer(self, topics: Sequence[str], group: str | None, *, prefetch: int,
                            dead_letter: str | None) -> Consumer:
        """Attach a consumer; it is receiving when this returns.

        Args:
            topics: The topics to consume, one or more.
            group: The durable group, or ``None`` for an ephemeral subscription that
                sees only what is published while attached.
            prefetch: The most unsettled deliveries this consumer may hold.
            dead_letter: Where ``reject`` routes messages, or ``None`` to drop them.

        Raises:
            BrokerError: The broker refused.
        """
