"""The one place where nats-py exceptions become unibus errors.

Every adapter method that touches the driver runs inside :func:`map_errors`, so no
nats-py exception (nor a socket, SSL or timeout error it lets through) crosses the
adapter boundary. The messages name what failed, never a credential.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from unibus.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    MessageTooLarge,
    UnibusError,
)

__all__ = ["is_auth_error", "map_errors"]

_AUTH_WORDS = ("authorization", "authentication", "permissions violation", "user credentials")


def is_auth_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is the server refusing the credentials."""
    import nats.errors

    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    text = _text(exc).lower()
    return isinstance(exc, nats.errors.Error) and any(w in text for w in _AUTH_WORDS)


def _text(exc: BaseException) -> str:
    try:
        return str(exc).strip()
    except Exception:
        # Some driver exceptions cannot render themselves when half-initialised.
        return ""


def _describe(exc: BaseException) -> str:
    import nats.js.errors

    if isinstance(exc, nats.js.errors.APIError):
        description = getattr(exc, "description", None) or "JetStream API error"
        return (f"{description} (code {getattr(exc, 'code', None)}, "
                f"err_code {getattr(exc, 'err_code', None)})")
    text = _text(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def map_errors(action: str) -> Iterator[None]:
    """Run a driver call; re-raise any driver failure as the matching unibus error.

    Args:
        action: What was being done, for the error message ("publish to 'orders'").

    Raises:
        AuthenticationFailed: The server refused the credentials.
        BrokerUnavailable: No server could be reached, or the connection is closed.
        BrokerTimeout: The server did not answer in time.
        MessageTooLarge: The message exceeds the server's max_payload.
        BrokerError: Any other driver or server failure.
    """
    import nats.errors
    import nats.js.errors

    try:
        yield
    except UnibusError:
        raise
    except (nats.errors.MaxPayloadError, nats.errors.OutboundBufferLimitError) as exc:
        if isinstance(exc, nats.errors.MaxPayloadError):
            raise MessageTooLarge(f"{action}: the message exceeds the server's max_payload") \
                from exc
        raise BrokerUnavailable(f"{action}: disconnected and the reconnect buffer is full") \
            from exc
    except nats.errors.Error as exc:
        if is_auth_error(exc):
            raise AuthenticationFailed(f"{action}: the server refused the credentials") from exc
        if isinstance(exc, nats.errors.TimeoutError):
            raise BrokerTimeout(f"{action}: the server did not answer in time") from exc
        if isinstance(exc, nats.errors.NoServersError | nats.errors.ConnectionClosedError |
                      nats.errors.StaleConnectionError | nats.errors.ConnectionReconnectingError |
                      nats.errors.SecureConnFailedError | nats.errors.SecureConnRequiredError |
                      nats.errors.SecureConnWantedError):
            raise BrokerUnavailable(f"{action}: {_describe(exc)}") from exc
        if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
            raise BrokerError(f"{action}: no responder (is JetStream enabled on the server?)") \
                from exc
        raise BrokerError(f"{action}: {_describe(exc)}") from exc
    except ssl.SSLError as exc:
        raise BrokerUnavailable(f"{action}: TLS failed: {exc.reason or type(exc).__name__}") \
            from exc
    except TimeoutError as exc:
        # Before OSError, of which TimeoutError is a subclass.
        raise BrokerTimeout(f"{action}: the server did not answer in time") from exc
    except (OSError, EOFError) as exc:
        raise BrokerUnavailable(f"{action}: {_describe(exc)}") from exc
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as exc:
        # nats-py validates names and parses server answers with plain exceptions.
        raise BrokerError(f"{action}: {_describe(exc)}") from exc
