"""The unibus error tree.

Every error unibus raises derives from :class:`UnibusError`; no driver exception
crosses an adapter boundary (each adapter maps them in one ``_map_errors()``
context manager). Where a generic handler expects a builtin, the error also
inherits it::

    UnibusError
    ├── InvalidURL (ValueError)               malformed URL, unknown or bad option
    │   └── UnknownScheme                     no adapter for the scheme (did-you-mean)
    ├── AdapterNotInstalled (ImportError)     the scheme's driver is missing (pip hint)
    ├── InvalidName (ValueError)              a topic or group name brokers cannot carry
    ├── InvalidMessage (TypeError)            non-bytes body, header not str → str, ...
    │   └── MessageTooLarge (ValueError)      body over the adapter's declared maximum
    ├── DecodeError (ValueError)              a body a codec cannot decode
    ├── UnsupportedFeature                    the adapter declared this capability absent
    ├── BusClosed                             the bus or subscription was closed
    ├── AlreadySettled                        a delivery settled a second time
    ├── DeliveryLost                          settling a delivery whose channel died;
    │                                         the broker redelivers it
    └── BrokerError                           the broker side failed
        ├── BrokerUnavailable (ConnectionError)   cannot reach the broker in time
        ├── AuthenticationFailed              credentials refused (never retried)
        ├── BrokerTimeout                     an operation outlived its deadline
        └── PublishFailed                     the broker refused or lost a publish
"""

from __future__ import annotations

__all__ = [
    "AdapterNotInstalled",
    "AlreadySettled",
    "AuthenticationFailed",
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "BusClosed",
    "DecodeError",
    "DeliveryLost",
    "InvalidMessage",
    "InvalidName",
    "InvalidURL",
    "MessageTooLarge",
    "PublishFailed",
    "UnibusError",
    "UnknownScheme",
    "UnsupportedFeature",
]


class UnibusError(Exception):
    """Base of every error unibus raises."""


class InvalidURL(UnibusError, ValueError):
    """A broker URL is malformed, or names an unknown or invalid option."""


class UnknownScheme(InvalidURL):
    """No adapter is registered for the URL's scheme."""


class AdapterNotInstalled(UnibusError, ImportError):
    """The adapter for a scheme is known but its distribution or driver is missing."""


class InvalidName(UnibusError, ValueError):
    """A topic or group name is empty or has characters not every broker can carry."""


class InvalidMessage(UnibusError, TypeError):
    """A message is malformed: body not bytes, headers not ``str → str``, bad id or key."""


class MessageTooLarge(InvalidMessage, ValueError):
    """A message body exceeds the adapter's declared maximum size; nothing was sent."""


class DecodeError(UnibusError, ValueError):
    """A codec could not decode a message body."""


class UnsupportedFeature(UnibusError):
    """The adapter declares this capability absent (see its ``Capabilities``)."""


class BusClosed(UnibusError):
    """The bus or subscription is closed; open a new one."""


class AlreadySettled(UnibusError):
    """A delivery was acked, nacked or rejected already; each settles exactly once."""


class DeliveryLost(UnibusError):
    """The delivery's channel is gone; it cannot be settled and the broker redelivers it."""


class BrokerError(UnibusError):
    """The broker failed or refused an operation."""


class BrokerUnavailable(BrokerError, ConnectionError):
    """The broker cannot be reached within the connect timeout."""


class AuthenticationFailed(BrokerError):
    """The broker refused the credentials; unibus does not retry."""


class BrokerTimeout(BrokerError):
    """A broker operation did not complete within its deadline."""


class PublishFailed(BrokerError):
    """The broker refused, could not route, or lost a publish.

    Attributes:
        message_ids: The ids of the messages that were not confirmed.
    """

    def __init__(self, message: str, *, message_ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message_ids = message_ids
