"""The one place where confluent-kafka errors become unibus errors.

Every call into the driver runs inside :func:`map_errors` (or its error is passed
through :func:`to_unibus`), so no ``KafkaException``, ``KafkaError``,
``BufferError`` or driver ``ValueError`` crosses the adapter boundary. Error texts
are scrubbed of the SASL and key passwords before they reach a message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from unibus.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    InvalidURL,
    PublishFailed,
    UnibusError,
)

__all__ = ["DriverLog", "Scrubber", "map_errors", "to_unibus"]

# librdkafka error codes (confluent_kafka.KafkaError attributes), kept as numbers so
# that this module imports without the driver.
_TRANSPORT = -195
_ALL_BROKERS_DOWN = -187
_RESOLVE = -193
_SSL = -181
_AUTHENTICATION = -169
_TIMED_OUT = -185
_MSG_TIMED_OUT = -192
_INVALID_ARG = -186
_QUEUE_FULL = -184
REQUEST_TIMED_OUT = 7
MSG_SIZE_TOO_LARGE = 10
TOPIC_ALREADY_EXISTS = 36

_UNAVAILABLE = frozenset({_TRANSPORT, _ALL_BROKERS_DOWN, _RESOLVE, _SSL})
_AUTH = frozenset({_AUTHENTICATION, 58, 33, 34})   # + SASL failed, unsupported, illegal state
_DENIED = frozenset({29, 30, 31})                    # topic, group, cluster authorization
_TIMEOUT = frozenset({_TIMED_OUT, REQUEST_TIMED_OUT})


class Scrubber:
    """Removes secrets from driver error texts."""

    __slots__ = ("_secrets",)

    def __init__(self, *secrets: str | None) -> None:
        self._secrets = tuple(s for s in secrets if s)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


_NO_SECRETS = Scrubber()


class DriverLog:
    """The ``logger`` handed to librdkafka: its lines go to ``unibus.kafka.driver``.

    librdkafka logs every failed connection attempt at error level while it keeps
    retrying by itself; unibus reports what matters through its errors, so the
    driver's lines are demoted to DEBUG (and scrubbed).
    """

    def __init__(self, scrub: Scrubber) -> None:
        self._scrub = scrub
        self._log = logging.getLogger("unibus.kafka.driver")

    def log(self, level: int, msg: str, *args: object) -> None:
        """Receive one librdkafka log line."""
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("%s", self._scrub(msg % args if args else msg))


def to_unibus(error: Any, context: str, scrub: Scrubber = _NO_SECRETS, *,
              message_ids: tuple[str, ...] = ()) -> UnibusError:
    """Map a ``KafkaError`` to the most specific unibus error.

    Args:
        error: A ``confluent_kafka.KafkaError``.
        context: What unibus was doing, for the message.
        scrub: Removes secrets from the driver's text.
        message_ids: The messages concerned, for ``PublishFailed``.
    """
    code = error.code()
    text = scrub(f"{context}: {error.str()}")
    if code in _AUTH:
        return AuthenticationFailed(f"{text} (credentials refused; not retried)")
    if message_ids:
        return PublishFailed(text, message_ids=message_ids)
    if code in _UNAVAILABLE:
        return BrokerUnavailable(text)
    if code in _TIMEOUT:
        return BrokerTimeout(text)
    if code == _INVALID_ARG:
        return InvalidURL(text)
    if code in _DENIED:
        return BrokerError(f"{text} (not authorized)")
    return BrokerError(text)


@contextmanager
def map_errors(context: str, scrub: Scrubber = _NO_SECRETS) -> Iterator[None]:
    """Run driver calls, turning every driver exception into a ``UnibusError``.

    Args:
        context: What unibus is doing ("publishing to 'orders'"), for the message.
        scrub: Removes secrets from the driver's text.

    Raises:
        UnibusError: The mapped error (``BrokerUnavailable``, ``AuthenticationFailed``,
            ``BrokerTimeout``, ``PublishFailed``, ``InvalidURL`` or ``BrokerError``).
    """
    from confluent_kafka import KafkaException

    try:
        yield
    except UnibusError:
        raise
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if error is not None and hasattr(error, "code"):
            raise to_unibus(error, context, scrub) from None
        raise BrokerError(scrub(f"{context}: {exc}")) from None
    except BufferError as exc:
        raise PublishFailed(scrub(f"{context}: the local producer queue is full ({exc})")) \
            from None
    except (ValueError, TypeError) as exc:
        # confluent-kafka raises these for configuration it refuses.
        raise InvalidURL(scrub(f"{context}: the driver refused the configuration: {exc}")) \
            from None
