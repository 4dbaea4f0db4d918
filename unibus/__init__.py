"""unibus: one producer / consumer / scheduler API over RabbitMQ, Kafka, NATS and memory.

Pick the broker with a URL; the meaning of the API does not change with it::

    async with unibus.connect("memory://demo") as bus:
        await bus.publish("orders", b"{}", key="cust-7")
        async with bus.subscribe("orders", group="billing") as sub:
            async for delivery in sub:
                await delivery.ack()

This module only re-exports the public API.
"""

from unibus.bus import Bus, Subscription, connect
from unibus.capabilities import Capabilities, Ordering, RedeliveryOrder, Support, Timings
from unibus.errors import (
    AdapterNotInstalled,
    AlreadySettled,
    AuthenticationFailed,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    BusClosed,
    DecodeError,
    DeliveryLost,
    InvalidMessage,
    InvalidName,
    InvalidURL,
    MessageTooLarge,
    PublishFailed,
    UnibusError,
    UnknownScheme,
    UnsupportedFeature,
)
from unibus.message import Delivery, Message, Outcome, new_message_id
from unibus.migrate import MigrationFailed, MigrationReport, VerifyReport, migrate
from unibus.registry import available_schemes, register, unregister
from unibus.scheduler import App, Retry
from unibus.url import URL, make_url

__version__ = "0.1.0"

__all__ = [
    "URL",
    "AdapterNotInstalled",
    "AlreadySettled",
    "App",
    "AuthenticationFailed",
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "Bus",
    "BusClosed",
    "Capabilities",
    "DecodeError",
    "Delivery",
    "DeliveryLost",
    "InvalidMessage",
    "InvalidName",
    "InvalidURL",
    "Message",
    "MessageTooLarge",
    "MigrationFailed",
    "MigrationReport",
    "Ordering",
    "Outcome",
    "PublishFailed",
    "RedeliveryOrder",
    "Retry",
    "Subscription",
    "Support",
    "Timings",
    "UnibusError",
    "UnknownScheme",
    "UnsupportedFeature",
    "VerifyReport",
    "__version__",
    "available_schemes",
    "connect",
    "make_url",
    "migrate",
    "new_message_id",
    "register",
    "unregister",
]
