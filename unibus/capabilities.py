"""What an adapter guarantees, declared once and checked by the contract suite.

Every adapter returns a frozen :class:`Capabilities`. The contract suite tests
both directions: a declared capability must hold, and a declared absence must
fail cleanly (:class:`~unibus.errors.UnsupportedFeature` or the documented
weaker behaviour), never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Capabilities", "Ordering", "RedeliveryOrder", "Support", "Timings"]


class Support(Enum):
    """How a feature is provided."""

    NATIVE = "native"
    EMULATED = "emulated"
    ABSENT = "absent"

    def __bool__(self) -> bool:
        return self is not Support.ABSENT


class Ordering(Enum):
    """The publish-order guarantee inside one group."""

    NONE = "none"
    SINGLE_CONSUMER = "single-consumer"   # publish order kept for one consumer, not across
    PER_KEY = "per-key"                   # per-key order kept across competing consumers


class RedeliveryOrder(Enum):
    """What a redelivery (nack, consumer loss) does to order."""

    NOT_APPLICABLE = "n/a"         # nothing is ever redelivered
    # a redelivered message still precedes the later messages of its key
    KEY_ORDER_KEPT = "key-order-kept"
    MAY_REORDER = "may-reorder"    # later messages may overtake a redelivered one


@dataclass(frozen=True, slots=True)
class Timings:
    """Bounds the adapter promises, from which the contract suite derives its timeouts.

    Attributes:
        delivery: Seconds within which a published message reaches an attached consumer.
        redelivery: Seconds within which an unsettled delivery comes back after its
            consumer closed or died.
        delay_slack: Delayed messages arrive within ``delay + delay_slack`` seconds.
        connect_timeout: An unreachable broker is reported within this many seconds.
        recovery: Seconds to recover after a broker restart or pause.
    """

    delivery: float = 5.0
    redelivery: float = 5.0
    delay_slack: float = 1.0
    connect_timeout: float = 5.0
    recovery: float = 30.0


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The delivery semantics an adapter declares.

    Attributes:
        name: The adapter's name, as it appears in the semantics report.
        persistent: Accepted messages survive a broker restart.
        publish_confirms: ``publish`` returns only after the broker accepted the message.
        group_retention: A declared group keeps messages while no consumer is attached.
        replay_for_new_groups: A new group starts at the beginning of the topic's history.
        redelivery: ``nack`` and consumer loss redeliver messages.
        nack_delay: How ``nack(delay=...)`` is carried out.
        dead_letter: ``reject`` routes to the subscription's dead-letter topic.
        ordering: The ordering guarantee inside one group.
        redelivery_order: What redelivery does to order.
        delayed_delivery: How ``publish(..., delay=...)`` is carried out.
        dedup_window: Seconds within which a repeated message id is delivered once;
            ``None`` when the adapter does not deduplicate.
        max_message_size: The largest body, in bytes, the adapter accepts.
        prefetch: ``prefetch`` bounds the unsettled deliveries at one consumer.
        timings: The time bounds the adapter promises.
    """

    name: str
    persistent: bool
    publish_confirms: bool
    group_retention: bool
    replay_for_new_groups: bool
    redelivery: bool
    nack_delay: Support
    dead_letter: bool
    ordering: Ordering
    redelivery_order: RedeliveryOrder
    delayed_delivery: Support
    dedup_window: float | None
    max_message_size: int
    prefetch: bool = True
    timings: Timings = field(default_factory=Timings)
